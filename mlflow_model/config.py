"""The served model's settings: what the predictor needs at run time, and the artifact names.

`PredictorConfig` travels inside the MLflow model (as its `model_config`). Build-time settings
(training, packaging, evaluation, batch jobs) live in the build package, `tagger.config`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from mlflow_model.errors import ConfigError

FALLBACK_TAG = "other"
CHECKPOINT_ARTIFACT = "checkpoint"  # model artifact: weights + args.json + label map
ENCODER_ARTIFACT = "encoder"  # model artifact: transformers config + tokenizer files
TOKENIZER_FILE = "tokenizer.json"  # in the encoder artifact: what the predictor tokenizes with
TRACE_FILE = "model.torchscript"  # in the checkpoint artifact of a torch fp32 build: its trace, without weights
ONNX_FILE = "model.onnx"  # in the checkpoint artifact of an ONNX build, instead of the weights
ONNX_WEIGHTS_FILE = "model.onnx.data"  # ...beside it, its weights (ONNX external data: mapped, not copied, at load)
ENGINES = ("torch", "onnx")
PRECISIONS = ("fp32", "bf16", "int8")
# oneDNN kernels a torch process keeps compiled, per precision: what one forward pass reuses across its layers on
# each inference thread (fp32/int8: GELU's, one per batch shape; bf16 also runs its matmuls on oneDNN). oneDNN's
# default, 1024, kept one kernel (about 4 MB here) per batch shape the server had seen: memory grew with traffic.
ONEDNN_CACHED_KERNELS = {"fp32": 4, "int8": 4, "bf16": 32}
# Lowest value of each numeric setting, and whether it must be a whole number (None passes where it is the default).
_LOWEST = {
    "batch_size": (1, True), "max_length": (1, True), "num_threads": (1, True), "inference_threads": (1, True),
    "max_batch_rows": (1, True), "max_request_rows": (1, True), "max_wait_ms": (0, False), "timeout_s": (1e-3, False),
}


def is_number_in(value: Any, lowest: float, highest: float = math.inf, whole: bool = False) -> bool:
    """Whether value is a number (a whole one if asked; a bool is not one) with lowest <= value <= highest."""
    kind = numbers.Integral if whole else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool) and lowest <= value <= highest


@dataclass(frozen=True)
class PredictorConfig:
    """How the served model predicts; stored in the model at packaging time."""

    threshold: float = 0.0  # below this top probability the tag becomes fallback_tag
    batch_size: int = 64
    max_length: int | None = None  # None: the encoder's own limit
    num_threads: int | None = None  # intra-op threads of each inference thread (None: 1)
    inference_threads: int | None = None  # threads running forward passes side by side (None: cores // num_threads)
    sort_by_length: bool = True  # batch rows of similar length together (less padding)
    engine: str = "torch"  # one of ENGINES: torch (the reference) or onnx (ONNX Runtime)
    precision: str = "fp32"  # one of PRECISIONS: fp32, bf16 (torch), int8 (dynamic int8 Linear layers)
    trace: bool = True  # torch: run a TorchScript trace of the model (saved at packaging for fp32; eager if it differs)
    max_batch_rows: int = 32  # an inference thread runs at most this many rows of waiting requests at once
    max_wait_ms: float = 2.0  # ...and waits at most this long after the first for more to arrive
    timeout_s: float = 60.0  # a request whose rows are not done by then fails (the scoring server's own timeout)
    max_request_rows: int | None = None  # rows one online request may hold; None: no limit (set at packaging)
    fallback_tag: str = FALLBACK_TAG

    def __post_init__(self) -> None:
        """Refuse a value the predictor cannot run with, naming the setting (a model_config at load included)."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for name, (lowest, whole) in _LOWEST.items():
            value = getattr(self, name)
            if value is None and defaults[name] is None:
                continue
            if not is_number_in(value, lowest, whole=whole):
                kind = "a whole number" if whole else "a number"
                raise ConfigError(f"predictor setting {name!r} must be {kind} >= {lowest:g}, got {value!r}")
        if not is_number_in(self.threshold, 0.0, 1.0):
            raise ConfigError(f"predictor setting 'threshold' must be a number between 0 and 1, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as MLflow stores `model_config`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PredictorConfig:
        """Rebuild from `context.model_config`, ignoring keys a newer version may add."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})
