"""The predictor: preprocess -> forward -> postprocess, the three steps of a prediction.

`Predictor` is engine-agnostic: it validates, cleans and tokenizes rows on the caller's thread,
runs the token ids through its engine on its inference threads (which batch the rows of
concurrent requests; the first builds the engine, so no idle loading thread keeps an OpenMP
team of its own), and turns probabilities into tags. `TorchPredictor` (the reference and the default) and
`OnnxPredictor` only differ in the engine they build from the model's files.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_model.batching import batched_logits, softmax
from mlflow_model.checkpoint import read_args, read_class_to_index
from mlflow_model.config import ONNX_FILE, TOKENIZER_FILE, PredictorConfig, is_number_in
from mlflow_model.engines import Engine, OnnxEngine, TorchEngine, bound_onednn_cache, usable_cores
from mlflow_model.errors import CheckpointError, InvalidInputError
from mlflow_model.inference import InferenceThread
from mlflow_model.preprocess import checked_texts, load_tokenizer, prepare_texts, tokenize


def index_to_class(checkpoint_dir: str | Path) -> list[str]:
    """Tag of each output index, from the checkpoint's label map (checked against args.json)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    labels = read_class_to_index(folder)
    if len(labels) != read_args(folder).num_classes:
        raise CheckpointError(
            f"{folder}: args.json says num_classes={read_args(folder).num_classes} but the label map has {len(labels)} tags"
        )
    return [tag for tag, _ in sorted(labels.items(), key=lambda item: item[1])]


def encoder_settings(encoder_dir: str | Path) -> dict[str, Any]:
    """The encoder's config.json (pad id, position limit, heads) as a dict, read without transformers."""
    path = Path(encoder_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the encoder config {path}: {error}") from error


def encoder_max_length(encoder_dir: str | Path) -> int:
    """Longest input the encoder takes: its tokenizer's limit, capped by its position embeddings."""
    limits = [encoder_settings(encoder_dir).get("max_position_embeddings") or 512]
    tokenizer_config = Path(encoder_dir) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        limit = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(limit, int) and limit < 10**6:  # transformers writes 1e30 for "no limit"
            limits.append(limit)
    return int(min(limits))


def intra_op_threads(config: PredictorConfig) -> int:
    """Threads each inference thread's engine runs one forward pass on: as asked, else 1."""
    return config.num_threads or 1


def inference_threads(config: PredictorConfig) -> int:
    """Inference threads: as asked, else one per group of `num_threads` cores (one per core by default)."""
    return config.inference_threads or max(1, usable_cores() // intra_op_threads(config))


class Predictor:
    """Title + description rows -> tag and per-tag probabilities, over any engine."""

    def __init__(
        self, build_engine: Callable[[], Engine], encoder_dir: str | Path, labels: list[str], config: PredictorConfig
    ) -> None:
        """`build_engine` runs on the first inference thread, one of the threads that run the engine afterwards."""
        self.index_to_class, self.config = list(labels), config
        self.max_length = config.max_length or encoder_max_length(encoder_dir)
        self.tokenizer = load_tokenizer(Path(encoder_dir) / TOKENIZER_FILE, self.max_length)
        self.pad_id = int(encoder_settings(encoder_dir).get("pad_token_id") or 0)
        self.engine: Engine | None = None  # set on the inference thread before __init__ returns
        self.inference = InferenceThread(
            self.run_batch, config.max_batch_rows, config.max_wait_ms, config.timeout_s,
            warmup=lambda: self.start(build_engine), threads=inference_threads(config),
        )

    def preprocess(self, frame: pd.DataFrame) -> list[list[int]]:
        """Validated, cleaned and tokenized rows (unpadded token ids), in input order."""
        return tokenize(self.tokenizer, prepare_texts(frame))

    def forward(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Class probabilities per row, in input order, computed on the inference threads."""
        return self.inference.submit(token_ids, batch_size)

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

    def predict_valid(
        self, frame: pd.DataFrame, threshold: float | None = None, batch_size: int | None = None
    ) -> tuple[pd.DataFrame, list[str | None]]:
        """Predict the valid rows and say why each other row was refused: in a batch job a bad row fails alone.

        Each row is validated and cleaned once. The predictions have one row per input row (nulls
        where refused); the problems are None where the row was predicted.
        """
        limit, size = self._checked_threshold(threshold), self._checked_batch_size(batch_size)
        texts, problems = checked_texts(frame)
        valid = [position for position, problem in enumerate(problems) if problem is None]
        tags: list[str | None] = [None] * len(problems)
        per_tag: list[dict[str, float] | None] = [None] * len(problems)
        if valid:
            probabilities = self.forward(tokenize(self.tokenizer, [texts[i] for i in valid]), size)
            predicted = self.postprocess(probabilities, limit)
            for position, tag, row in zip(valid, predicted["prediction"], predicted["probabilities"]):
                tags[position], per_tag[position] = tag, row
        columns = {"prediction": tags, "probabilities": per_tag}  # object columns: refused rows stay None
        return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()}), problems

    def run_batch(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Probabilities of gathered rows, from length-sorted padded micro-batches (on the inference thread)."""
        logits = batched_logits(self.engine.logits, token_ids, batch_size, self.pad_id, self.config.sort_by_length)
        return softmax(logits)

    def start(self, build_engine: Callable[[], Engine]) -> None:
        """Build the engine and run one forward, on the inference thread, so the first request pays for neither."""
        self.engine = build_engine()
        self.run_batch(tokenize(self.tokenizer, ["warm up"]), 1)

    def close(self) -> None:
        """Stop the inference threads (a predictor that is dropped without close keeps idle threads)."""
        self.inference.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _checked_batch_size(self, batch_size: Any) -> int:
        """The batch size to use, or InvalidInputError naming the param."""
        size = self.config.batch_size if batch_size is None else batch_size
        if not is_number_in(size, 1, whole=True):
            raise InvalidInputError(f"param 'batch_size' must be a positive integer, got {size!r}")
        return int(size)

    def _checked_threshold(self, threshold: Any) -> float:
        """The threshold to use, or InvalidInputError naming the param."""
        limit = self.config.threshold if threshold is None else threshold
        if not is_number_in(limit, 0.0, 1.0):
            raise InvalidInputError(f"param 'threshold' must be a number between 0 and 1, got {limit!r}")
        return float(limit)


class TorchPredictor(Predictor):
    """The reference predictor: FinetunedLLM in eval mode on torch (fp32, bf16 or dynamic int8)."""

    @classmethod
    def from_directories(
        cls, checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig | None = None
    ) -> TorchPredictor:
        """Build from a checkpoint folder and an encoder folder (config + tokenizer), offline."""
        config = config or PredictorConfig()

        def build_engine() -> TorchEngine:
            """The model from the checkpoint, loaded by the thread that will run it."""
            bound_onednn_cache(config.precision)
            import torch

            from mlflow_model.checkpoint import load_finetuned
            from mlflow_model.traced import load_trace

            torch.set_num_threads(intra_op_threads(config))  # per inference thread
            if config.trace and config.precision == "fp32" and (traced := load_trace(checkpoint_dir)) is not None:
                return TorchEngine(traced, trace=False)  # the trace saved at packaging: no transformers needed
            return TorchEngine(load_finetuned(checkpoint_dir, encoder_dir), config.precision, config.trace)

        return cls(build_engine, encoder_dir, index_to_class(checkpoint_dir), config)


class OnnxPredictor(Predictor):
    """The same pipeline on ONNX Runtime: imports neither torch nor transformers."""

    @classmethod
    def from_directories(
        cls, checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig | None = None
    ) -> OnnxPredictor:
        """Build from a folder holding model.onnx + label map, and the encoder's tokenizer folder."""
        config = config or PredictorConfig(engine="onnx")
        model_path, threads = Path(checkpoint_dir) / ONNX_FILE, intra_op_threads(config)
        return cls(lambda: OnnxEngine(model_path, threads), encoder_dir, index_to_class(checkpoint_dir), config)


def load_predictor(checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig) -> Predictor:
    """The predictor of the model's engine."""
    kinds = {"torch": TorchPredictor, "onnx": OnnxPredictor}
    if config.engine not in kinds:
        raise CheckpointError(f"unknown engine {config.engine!r}; use one of {sorted(kinds)}")
    return kinds[config.engine].from_directories(checkpoint_dir, encoder_dir, config)
