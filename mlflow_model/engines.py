"""Engines: padded int64 (input_ids, attention_mask) batches in, float32 logits out.

Runtime code shipped inside the model. It imports neither torch nor transformers at import time:
TorchEngine imports torch when built, OnnxEngine imports only onnxruntime, so a served ONNX
model never loads torch.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mlflow_model.config import ONEDNN_CACHED_KERNELS
from mlflow_model.errors import CheckpointError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TORCH_PRECISIONS = ("fp32", "bf16", "int8")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class Engine(Protocol):
    """Runs one padded batch of token ids through the classifier."""

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 (rows x width) in, float32 (rows x classes) out."""
        ...


def usable_cores() -> int:
    """Cores this process may run on (respects CPU affinity, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bound_onednn_cache(precision: str) -> None:
    """Cap oneDNN's kernel cache before torch first runs it, so that memory stays flat under varied batch shapes.

    oneDNN compiles a kernel per input shape and caches up to 1024 of them, ~4 MB each here: over 600
    requests of varied sizes a model grew by 318 MB and kept growing, against 114 MB and flat with 4
    cached, at the same speed (benchmarks/memory.py). oneDNN reads the setting once, at its first use
    in the process (the first predictor loaded sets it for the process); a value the user set is kept.
    """
    capacity = ONEDNN_CACHED_KERNELS.get(precision, max(ONEDNN_CACHED_KERNELS.values()))
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


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


def _quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantization of the Linear layers (weights int8, activations per batch).

    In place: a copy would also copy the embedding table out of the memory-mapped weights file.
    """
    import warnings

    import torch

    with warnings.catch_warnings():  # torch marks torch.ao.quantization deprecated (torchao)
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _effective_precision(precision: str) -> str:
    """The precision TorchEngine will run: bf16 falls back to fp32 (one warning) without native bf16."""
    if precision not in TORCH_PRECISIONS:
        raise CheckpointError(f"unknown torch precision {precision!r}; use one of {list(TORCH_PRECISIONS)}")
    if precision == "bf16" and not cpu_has_native_bf16():
        logger.warning(
            "precision 'bf16' asked for, but this CPU has no native bf16 (flags %s): running fp32 instead",
            " / ".join(_BF16_CPU_FLAGS),
        )
        return "fp32"
    return precision


class TorchEngine:
    """FinetunedLLM (or its trace) in eval mode, run with torch in fp32, bf16 or dynamic int8 (bf16 converts in place)."""

    def __init__(self, model: torch.nn.Module, precision: str = "fp32", trace: bool = True) -> None:
        import torch

        from mlflow_model.traced import traced_or_eager

        self._torch = torch
        self.requested_precision = precision
        self.precision = _effective_precision(precision)
        model = model.eval()
        if self.precision == "bf16":
            model = model.to(torch.bfloat16)
        elif self.precision == "int8":
            model = _quantize_int8(model)
        self.model = traced_or_eager(model) if trace else model

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 logits of one padded batch."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return out.float().numpy()


class OnnxEngine:
    """An ONNX Runtime session (CPU, graph optimizations on) over an exported FinetunedLLM."""

    def __init__(self, model_path: str | Path, num_threads: int | None = None, spin: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or usable_cores()
        options.inter_op_num_threads = 1
        # Idle pool threads spin by default: on a few shared cores they steal CPU from the server's threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.model_path = str(model_path)
        try:
            self.session = ort.InferenceSession(self.model_path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # missing, corrupt or incompatible file
            raise CheckpointError(f"cannot load ONNX model {self.model_path}: {error}") from error
        self._check_signature()

    def _check_signature(self) -> None:
        """The session must take input_ids/attention_mask and give logits."""
        inputs = sorted(i.name for i in self.session.get_inputs())
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != sorted(INPUT_NAMES) or OUTPUT_NAME not in outputs:
            raise CheckpointError(
                f"ONNX model {self.model_path} takes {inputs} and gives {outputs}; "
                f"expected {list(INPUT_NAMES)} -> {OUTPUT_NAME!r}"
            )

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 logits of one padded batch."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        return np.asarray(self.session.run([OUTPUT_NAME], feeds)[0], dtype=np.float32)
