"""TorchPredictor: preprocess -> forward -> postprocess, the three steps of a prediction."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mlflow_model.checkpoint import read_checkpoint
from mlflow_model.config import PredictorConfig
from mlflow_model.errors import CheckpointError, InvalidInputError
from mlflow_model.model import FinetunedLLM, build_model
from mlflow_model.batching import batched_logits, softmax
from mlflow_model.preprocess import prepare_texts, tokenize


def _quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of the Linear layers (weights int8, activations per batch)."""
    import warnings

    with warnings.catch_warnings():  # torch marks torch.ao.quantization deprecated (torchao)
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _usable_cores() -> int:
    """Cores this process may run on (respects CPU affinity, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TorchPredictor:
    """A trained FinetunedLLM with its tokenizer and tags, ready to predict DataFrames."""

    def __init__(self, model: FinetunedLLM, tokenizer: Any, index_to_class: list[str], config: PredictorConfig):
        self.model = model.eval()
        if config.quantize == "int8":
            self.model = _quantize_int8(self.model)
        elif config.quantize is not None:
            raise CheckpointError(f"unknown quantize={config.quantize!r}; use None or 'int8'")
        self.tokenizer = tokenizer
        self.index_to_class = list(index_to_class)
        self.config = config
        self.max_length = config.max_length or min(
            tokenizer.model_max_length, model.llm.config.max_position_embeddings
        )
        # Fast tokenizers raise "Already borrowed" when one instance is used by two threads.
        self._tokenizer_lock = threading.Lock()
        torch.set_num_threads(config.num_threads or _usable_cores())

    @classmethod
    def from_directories(
        cls, checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig | None = None
    ) -> TorchPredictor:
        """Build from a checkpoint folder and an encoder folder (config + tokenizer), offline."""
        from transformers import AutoConfig, AutoTokenizer

        checkpoint = read_checkpoint(checkpoint_dir)
        encoder_config = AutoConfig.from_pretrained(encoder_dir, local_files_only=True)
        model = build_model(encoder_config, checkpoint.args)
        try:
            missing, unexpected = model.load_state_dict(checkpoint.state_dict, strict=False)
        except RuntimeError as error:  # tensor shapes differ: another encoder than the one trained
            raise CheckpointError(f"weights in {checkpoint_dir} do not fit the encoder in {encoder_dir}: {error}") from error
        if missing or unexpected:
            raise CheckpointError(
                f"weights in {checkpoint_dir} do not fit the encoder in {encoder_dir}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
        return cls(model, tokenizer, checkpoint.index_to_class, config or PredictorConfig())

    def preprocess(self, frame: pd.DataFrame) -> list[list[int]]:
        """Validated, cleaned and tokenized rows (unpadded token ids), in input order."""
        texts = prepare_texts(frame)
        with self._tokenizer_lock:
            return tokenize(self.tokenizer, texts, self.max_length)

    def forward(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Class probabilities per row, in input order, from padded micro-batches (length-sorted by default)."""
        pad_id = self.tokenizer.pad_token_id or 0
        logits = batched_logits(self._logits, token_ids, batch_size, pad_id, self.config.sort_by_length)
        return softmax(logits)

    @torch.inference_mode()
    def _logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The model's logits for one padded batch, as float32."""
        return self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).float().numpy()

    def postprocess(self, probabilities: np.ndarray, threshold: float) -> pd.DataFrame:
        """Top tag per row (the fallback tag under the threshold) and every tag's probability."""
        best = probabilities.argmax(axis=1)
        tags = [
            self.index_to_class[i] if probabilities[row, i] >= threshold else self.config.fallback_tag
            for row, i in enumerate(best)
        ]
        per_tag = [dict(zip(self.index_to_class, map(float, row))) for row in probabilities]
        return pd.DataFrame({"prediction": tags, "probabilities": per_tag})

    def predict_proba(self, frame: pd.DataFrame, batch_size: int | None = None) -> np.ndarray:
        """Probabilities (rows x tags, columns in index_to_class order)."""
        size = self._checked_batch_size(batch_size)
        return self.forward(self.preprocess(frame), size)

    def predict(
        self, frame: pd.DataFrame, threshold: float | None = None, batch_size: int | None = None
    ) -> pd.DataFrame:
        """`prediction` and `probabilities` for each row of a title/description frame."""
        limit = self._checked_threshold(threshold)
        return self.postprocess(self.predict_proba(frame, batch_size), limit)

    def _checked_batch_size(self, batch_size: Any) -> int:
        """The batch size to use, or InvalidInputError naming the param."""
        size = self.config.batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise InvalidInputError(f"param 'batch_size' must be a positive integer, got {size!r}")
        return int(size)

    def _checked_threshold(self, threshold: Any) -> float:
        """The threshold to use, or InvalidInputError naming the param."""
        limit = self.config.threshold if threshold is None else threshold
        if isinstance(limit, bool) or not isinstance(limit, (int, float, np.number)) or not 0.0 <= limit <= 1.0:
            raise InvalidInputError(f"param 'threshold' must be a number between 0 and 1, got {limit!r}")
        return float(limit)
