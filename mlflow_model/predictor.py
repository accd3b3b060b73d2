"""The predictor: preprocess -> forward -> postprocess, the three steps of every prediction.

One predict path serves every caller: the pyfunc (online, through `mlflow models serve` or
`load_model`) and batch jobs (Ray Data actors calling the same pyfunc). The request is checked
once, in `preprocess`: the table, its size, each row, and the request's params against the
settings' one rule (`PredictorConfig.with_params`). A bad row either refuses the whole request
(`bad_rows="refuse"`, online) or is reported in an `error` column and not predicted
(`bad_rows="report"`, batch). Token ids run through the engine on the inference threads, which
batch the rows of concurrent requests; the engine is the one the registry names for the build.
Every engine gives logits; `postprocess` turns them into probabilities in one place, for every
build: softmax(logits / temperature), the checkpoint's calibration (`calibration.json`, else 1).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_model.batching import batched_logits, softmax
from mlflow_model.checkpoint import encoder_max_length, encoder_settings, index_to_class, read_temperature
from mlflow_model.config import TOKENIZER_FILE, PredictorConfig
from mlflow_model.engines import Engine, engine_module
from mlflow_model.errors import InvalidInputError
from mlflow_model.inference import InferenceThread
from mlflow_model.preprocess import check_table, checked_texts, load_tokenizer, refuse_bad_rows, tokenize


@dataclass
class Prepared:
    """What preprocess gives: token ids of the rows to predict, and the problem of each input row (None: fine)."""

    token_ids: list[list[int]]
    problems: list[str | None]
    settings: PredictorConfig  # the model's settings with the request's params applied


class Predictor:
    """Title + description rows -> tag and per-tag probabilities, over any registered engine."""

    def __init__(
        self, build_engine: Callable[[], Engine], encoder_dir: str | Path, labels: list[str], config: PredictorConfig,
        temperature: float = 1.0,
    ) -> None:
        """`build_engine` runs on the first inference thread, one of the threads that run the engine afterwards;
        the logits are divided by `temperature` before the softmax (calibration)."""
        self.index_to_class, self.config, self.temperature = list(labels), config, float(temperature)
        self.max_length = config.max_length or encoder_max_length(encoder_dir)
        self.tokenizer = load_tokenizer(Path(encoder_dir) / TOKENIZER_FILE, self.max_length)
        self.pad_id = int(encoder_settings(encoder_dir).get("pad_token_id") or 0)
        self.engine: Engine | None = None  # set on the inference thread before __init__ returns
        self.inference = InferenceThread(self.run_batch, config, warmup=lambda: self.start(build_engine))

    @classmethod
    def from_directories(
        cls, checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig | None = None
    ) -> Predictor:
        """The predictor of a build's files (checkpoint folder, encoder folder), offline."""
        config = config or PredictorConfig()
        engine = engine_module(config.engine)
        return cls(lambda: engine.load(checkpoint_dir, encoder_dir, config), encoder_dir,
                   index_to_class(checkpoint_dir), config, read_temperature(checkpoint_dir))

    def preprocess(self, frame: Any, params: dict[str, Any] | None = None) -> Prepared:
        """The one gate: params, table, size and rows checked; valid rows cleaned and tokenized, in input order."""
        settings = self.config.with_params(params)
        check_table(frame)
        if settings.max_request_rows is not None and len(frame) > settings.max_request_rows:
            raise InvalidInputError(
                f"the request has {len(frame)} rows; this model answers at most {settings.max_request_rows} rows per "
                f"request (max_request_rows: what it predicts well within the {settings.timeout_s:g} s request "
                "timeout). Split the request, or tag large inputs with `tagger batch-predict` (Ray Data)."
            )
        texts, problems = checked_texts(frame)
        if settings.bad_rows == "refuse":
            refuse_bad_rows(problems)
        valid = [text for text, problem in zip(texts, problems) if problem is None]
        return Prepared(tokenize(self.tokenizer, valid) if valid else [], problems, settings)

    def forward(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Logits per row (rows x tags), in input order, computed on the inference threads."""
        if not token_ids:
            return np.empty((0, len(self.index_to_class)), dtype=np.float32)
        return self.inference.submit(token_ids, batch_size)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities: softmax(logits / temperature), the same for every engine and build."""
        return softmax(logits / np.float32(self.temperature))

    def postprocess(self, logits: np.ndarray, prepared: Prepared) -> pd.DataFrame:
        """Top tag per row (the fallback tag under the threshold) and every tag's calibrated probability.

        With bad_rows="report" the frame also has `error`; a refused row has null prediction and probabilities.
        """
        threshold, fallback = prepared.settings.threshold, self.config.fallback_tag
        probabilities = self.probabilities(logits)
        best = probabilities.argmax(axis=1)
        tags = [self.index_to_class[i] if probabilities[row, i] >= threshold else fallback for row, i in enumerate(best)]
        per_tag = [dict(zip(self.index_to_class, map(float, row))) for row in probabilities]
        if prepared.settings.bad_rows == "refuse":
            return pd.DataFrame({"prediction": tags, "probabilities": per_tag})
        predicted = iter(zip(tags, per_tag))
        rows = [next(predicted) if problem is None else (None, None) for problem in prepared.problems]
        columns = {"prediction": [r[0] for r in rows], "probabilities": [r[1] for r in rows],
                   "error": prepared.problems}
        return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})

    def predict(self, frame: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """`prediction` and `probabilities` for each row of a title/description frame (params: threshold,
        batch_size, bad_rows; None or missing: the packaged defaults)."""
        prepared = self.preprocess(frame, params)
        return self.postprocess(self.forward(prepared.token_ids, prepared.settings.batch_size), prepared)

    def predict_proba(self, frame: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Calibrated probabilities of the valid rows (rows x tags, columns in index_to_class order)."""
        prepared = self.preprocess(frame, params)
        return self.probabilities(self.forward(prepared.token_ids, prepared.settings.batch_size))

    def predict_logits(self, frame: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Logits of the valid rows, before calibration (what a temperature is fitted to)."""
        prepared = self.preprocess(frame, params)
        return self.forward(prepared.token_ids, prepared.settings.batch_size)

    def run_batch(self, token_ids: list[list[int]], batch_size: int, alone: bool = False) -> np.ndarray:
        """Logits of gathered rows, from length-sorted padded micro-batches (on the inference thread);
        `alone`: no other forward pass runs, so the engine may use every core."""
        def logits(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return self.engine.logits(input_ids, mask, alone=alone)

        return batched_logits(logits, token_ids, batch_size, self.pad_id, self.config.sort_by_length)

    def start(self, build_engine: Callable[[], Engine]) -> None:
        """Build the engine and run one forward (alone and not), on the inference thread, so the first request pays
        for neither."""
        self.engine = build_engine()
        for alone in (False, True):
            self.run_batch(tokenize(self.tokenizer, ["warm up"]), 1, alone)

    def observe_batches(self, callback: Callable[[int], None]) -> None:
        """Call `callback(rows)` after each forward batch the inference threads run (the rows of all its requests)."""
        self.inference.on_batch = callback

    def close(self) -> None:
        """Stop the inference threads (a predictor that is dropped without close keeps idle threads)."""
        self.inference.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
