"""The torch engine: FinetunedLLM (or its TorchScript trace) in fp32, bf16 or dynamic int8 (`int8-dynamic`).

Forward paths, recorded at packaging (`PredictorConfig.forward`) and run as recorded at load:
- `shipped_trace` (fp32): the trace saved at packaging, without weights, takes the checkpoint's
  tensors; the served model needs no transformers;
- `trace_at_load` (bf16, int8-dynamic): the model is built, converted and traced at load, and the trace is
  checked against it;
- `eager`: the model itself, when it cannot be traced or when packaging was asked not to trace.
torch is imported only when an engine is built, so importing this module costs nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, TRACE_FILE, PredictorConfig
from mlflow_model.engines import DYNAMIC_INT8, ENGINES
from mlflow_model.errors import CheckpointError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def bound_onednn_cache(precision: str) -> None:
    """Cap oneDNN's kernel cache before torch first runs it, so that memory stays flat under varied batch shapes.

    oneDNN compiles a kernel per input shape and by default caches 1024 of them, a few MB each:
    a server meets a new batch shape with almost every batch. oneDNN reads the setting once, at
    its first use in the process (the first predictor loaded sets it); a value the user set is kept.
    """
    kernels = ENGINES["torch"].onednn_cached_kernels
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(kernels.get(precision, max(kernels.values()))))


def _cpu_flags() -> set[str] | None:
    """Flags of the first CPU in /proc/cpuinfo, or None where that file is not readable."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512_BF16 or AMX_BF16); else bf16 is emulated and slow."""
    flags = _cpu_flags()
    if flags is not None:
        return any(flag in flags for flag in _BF16_CPU_FLAGS)
    import torch  # no /proc/cpuinfo (not Linux): ask oneDNN

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def in_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The eval-mode model in its precision: fp32 as is, bf16 cast in place, int8-dynamic quantized in place.

    int8-dynamic quantizes the Linear layers (weights int8, activations per batch); in place, because a
    copy would also copy the embedding table out of the memory-mapped weights file.
    """
    import warnings

    import torch

    model = model.eval()
    if precision == "bf16":
        if not cpu_has_native_bf16():
            logger.warning("bf16 build on a CPU without native bf16 (%s): it runs emulated, slower than fp32",
                           " / ".join(_BF16_CPU_FLAGS))
        return model.to(torch.bfloat16)
    if precision == DYNAMIC_INT8:
        with warnings.catch_warnings():  # torch marks torch.ao.quantization deprecated (torchao)
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


class TorchEngine:
    """A torch module (the model or its trace) run in inference mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        import torch

        self._torch = torch
        self.model = model

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, alone: bool = False) -> np.ndarray:
        """float32 logits of one padded batch, on this inference thread's own intra-op threads, alone or not."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return out.float().numpy()


def recorded_forward(checkpoint_dir: str | Path, config: PredictorConfig) -> str:
    """The forward path to run: as recorded at packaging; a model packaged before paths were recorded ran its
    shipped trace when it has one, else a trace made at load (its `trace: false` reads as eager)."""
    if config.forward is not None:
        return config.forward
    return "shipped_trace" if (Path(checkpoint_dir) / TRACE_FILE).is_file() else "trace_at_load"


def load(checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig) -> TorchEngine:
    """The engine running the recorded forward path; CheckpointError naming the file and reason if it cannot."""
    bound_onednn_cache(config.precision)
    import torch

    from mlflow_model.checkpoint import load_finetuned
    from mlflow_model.traced import load_trace, trace_checked

    torch.set_num_threads(config.intra_op_threads)  # per inference thread
    forward = recorded_forward(checkpoint_dir, config)
    if forward == "shipped_trace":
        if config.precision != "fp32":
            raise CheckpointError(f"a {config.precision} build has no shipped trace (fp32 only); repackage it")
        return TorchEngine(load_trace(checkpoint_dir))
    model = in_precision(load_finetuned(checkpoint_dir, encoder_dir), config.precision)
    return TorchEngine(trace_checked(model) if forward == "trace_at_load" else model)


def build(
    files: dict[str, str], out_dir: Path, config: PredictorConfig, samples: list[list[list[int]]],
    calibration: list[list[int]] | None = None,
) -> tuple[dict[str, str], PredictorConfig]:
    """The staged checkpoint is the build (precision applies at load); decide and record its forward path.

    fp32 ships its trace; bf16 and int8-dynamic are traced at load; a model that cannot be traced, or whose
    trace differs from it, runs eagerly, and packaging says so. `forward="eager"` given: kept.
    """
    from mlflow_model.checkpoint import load_finetuned
    from mlflow_model.traced import TraceError, save_trace, trace_checked

    if config.forward == "eager":
        return files, config
    checkpoint = files[CHECKPOINT_ARTIFACT]
    model = in_precision(load_finetuned(checkpoint, files[ENCODER_ARTIFACT]), config.precision)
    try:
        if config.precision == "fp32":
            save_trace(model, checkpoint)
            forward = "shipped_trace"
        else:
            trace_checked(model)
            forward = "trace_at_load"
    except TraceError as error:
        logger.warning("the torch %s build will run the model eagerly: %s", config.precision, error)
        forward = "eager"
    return files, dataclasses.replace(config, forward=forward)

