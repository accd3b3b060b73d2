"""The served model's settings: what the predictor needs at run time, and the artifact names.

`PredictorConfig` travels inside the MLflow model (as its `model_config`). Build-time settings
(training, packaging, evaluation, batch jobs) live in the build package, `tagger.config`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

from mlflow_model.engines import DYNAMIC_INT8, STATIC_INT8, build_problem
from mlflow_model.errors import ConfigError, InvalidInputError

FALLBACK_TAG = "other"
CHECKPOINT_ARTIFACT = "checkpoint"  # model artifact: weights + args.json + label map
ENCODER_ARTIFACT = "encoder"  # model artifact: transformers config + tokenizer files
TOKENIZER_FILE = "tokenizer.json"  # in the encoder artifact: what the predictor tokenizes with
TRACE_FILE = "model.torchscript"  # in the checkpoint artifact of a torch fp32 build: its trace, without weights
ONNX_FILE = "model.onnx"  # in the checkpoint artifact of an ONNX build, instead of the weights
ONNX_WEIGHTS_FILE = "model.onnx.data"  # ...beside it, its weights (ONNX external data: mapped, not copied, at load)
VERIFY_KEY_VARIABLE = "TAGGER_VERIFY_KEY"  # a public key file: tagger's loaders verify a downloaded copy first; load_context checks too
MODELS_WORKERS_VARIABLE = "MLFLOW_MODELS_WORKERS"  # MLflow's own: `mlflow models serve --workers`, as a variable
BAD_ROWS = ("refuse", "report")  # a bad row fails the whole request, or gets an error and no prediction
# Lowest value of each numeric setting, and whether it must be a whole number (None passes where it is the default).
_LOWEST = {
    "batch_size": (1, True), "max_length": (1, True), "num_threads": (1, True), "inference_threads": (1, True),
    "alone_threads": (1, True), "max_batch_rows": (1, True), "max_request_rows": (1, True), "max_wait_ms": (0, False),
    "timeout_s": (1e-3, False), "calibration_rows": (1, True),
}


def is_number_in(value: Any, lowest: float, highest: float = math.inf, whole: bool = False) -> bool:
    """Whether value is a number (a whole one if asked; a bool is not one) with lowest <= value <= highest."""
    kind = numbers.Integral if whole else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool) and lowest <= value <= highest


REQUEST_PARAMS = ("threshold", "batch_size", "bad_rows")  # settings a request may override (the signature's params)


def value_problem(name: str, value: Any) -> str | None:
    """What is wrong with a value of a numeric or choice setting (a request param too), or None: the one rule."""
    if name == "threshold":
        return None if is_number_in(value, 0.0, 1.0) else f"must be a number between 0 and 1, got {value!r}"
    if name == "bad_rows":
        return None if value in BAD_ROWS else f"must be one of {list(BAD_ROWS)}, got {value!r}"
    lowest, whole = _LOWEST[name]
    if is_number_in(value, lowest, whole=whole):
        return None
    return f"must be {'a whole number' if whole else 'a number'} >= {lowest:g}, got {value!r}"


def serving_workers() -> int:
    """Worker processes of `mlflow models serve` on this machine, each loading its own copy of the model: MLflow's
    MLFLOW_MODELS_WORKERS (the variable behind `--workers`; the flag alone does not reach the workers), else 1."""
    value = os.environ.get(MODELS_WORKERS_VARIABLE, "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def verify_key_path() -> str | None:
    """The public key file that the model's signature must verify against (TAGGER_VERIFY_KEY), or None: no check."""
    return os.environ.get(VERIFY_KEY_VARIABLE, "").strip() or None


def usable_cores() -> int:
    """Cores this process may run on (respects CPU affinity, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PredictorConfig:
    """How the served model predicts; stored in the model at packaging time."""

    threshold: float = 0.0  # below this top probability the tag becomes fallback_tag (also a request param)
    batch_size: int = 64  # rows per forward pass (also a request param)
    bad_rows: str = "refuse"  # one of BAD_ROWS (also a request param): batch jobs report, online requests refuse
    max_length: int | None = None  # None: the encoder's own limit
    num_threads: int | None = None  # intra-op threads of each inference thread (None: 1)
    inference_threads: int | None = None  # threads running forward passes side by side (None: cores // num_threads)
    alone_threads: int | None = None  # ONNX: intra-op threads of a pass that runs alone (None: all the model's cores)
    sort_by_length: bool = True  # batch rows of similar length together (less padding)
    engine: str = "torch"  # an engine of mlflow_model.engines.ENGINES: torch (the reference) or onnx (ONNX Runtime)
    precision: str = "fp32"  # one of the engine's precisions: fp32, bf16 (torch), int8 (static), int8-dynamic
    forward: str | None = None  # the forward path the build runs, recorded at packaging (see the engine's module)
    max_batch_rows: int = 32  # an inference thread runs at most this many rows of waiting requests at once
    max_wait_ms: float = 2.0  # ...and waits at most this long after the first for more to arrive
    timeout_s: float = 60.0  # a request whose rows are not done by then fails (the scoring server's own timeout)
    max_request_rows: int | None = None  # rows one online request may hold; None: no limit (set at packaging)
    fallback_tag: str = FALLBACK_TAG
    calibration_rows: int | None = None  # static int8: training rows its activation scales were set on (at packaging)

    def __post_init__(self) -> None:
        """Refuse a value the predictor cannot run with, naming the setting (a model_config at load included)."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for name in dict.fromkeys((*_LOWEST, *REQUEST_PARAMS)):  # each setting once
            value = getattr(self, name)
            if not (value is None and defaults[name] is None) and (problem := value_problem(name, value)):
                raise ConfigError(f"predictor setting {name!r} {problem}")
        if problem := build_problem(self.engine, self.precision, self.forward):
            raise ConfigError(f"predictor settings engine/precision/forward: {problem}")

    @property
    def intra_op_threads(self) -> int:
        """Threads each inference thread's engine runs one forward pass on: as asked, else 1."""
        return self.num_threads or 1

    @property
    def thread_count(self) -> int:
        """Inference threads: as asked, else one per group of `num_threads` cores (one per core by default),
        the cores shared among the scoring server's workers."""
        return self.inference_threads or max(1, usable_cores() // (self.intra_op_threads * serving_workers()))

    @property
    def alone_intra_op_threads(self) -> int:
        """Threads a forward pass that runs alone may use: as asked, else every core the model's threads have."""
        return self.alone_threads or self.thread_count * self.intra_op_threads

    def with_params(self, params: dict[str, Any] | None) -> PredictorConfig:
        """This config with a request's params applied; InvalidInputError naming a bad or unknown param."""
        given = {k: v for k, v in (params or {}).items() if v is not None}
        unknown = sorted(set(given) - set(REQUEST_PARAMS))
        if unknown:
            raise InvalidInputError(f"unknown param(s) {unknown}; this model takes {list(REQUEST_PARAMS)}")
        for name, value in given.items():
            if problem := value_problem(name, value):
                raise InvalidInputError(f"param {name!r} {problem}")
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as MLflow stores `model_config`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PredictorConfig:
        """Rebuild from `context.model_config`, ignoring keys a newer version may add."""
        values = dict(values or {})
        if values.get("trace") is False and "forward" not in values:  # packaged before forward paths were recorded
            values["forward"] = "eager"
        if values.get("precision") == STATIC_INT8 and "calibration_rows" not in values:  # before static int8: dynamic
            values["precision"] = DYNAMIC_INT8
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
