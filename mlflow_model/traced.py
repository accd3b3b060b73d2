"""The model's TorchScript trace: made and checked from the weights, saved without them, loaded with them.

A trace runs the whole forward in C++ (no GIL, no Python between ops). Packaging traces the
torch fp32 model once and saves the trace with every parameter replaced by a zero-stride
placeholder of its shape: a file of a few hundred KB that holds the graph and no weights. At load
the trace takes the checkpoint's tensors (safetensors, memory-mapped) as its parameters, so the
served model needs neither transformers nor a trace of its own. `torch.jit.load` reads
TorchScript's own archive (TorchScript code and tensor records, through TorchScript's C++
unpickler, which builds TorchScript types only): no Python pickle runs, as for the weights.
A trace that cannot be made, loaded or that differs from the model raises TraceError: packaging
then records the eager forward path, and a load refuses the model.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mlflow_model.checkpoint import as_model_dtypes, read_state_dict
from mlflow_model.config import TRACE_FILE
from mlflow_model.errors import CheckpointError

TRACE_TOLERANCE = 1e-4  # largest logit difference allowed between the traced and the eager model


class TraceError(CheckpointError):
    """The model cannot be traced, or its trace differs from it, or a saved trace does not fit the weights."""


def _padded_example(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with one padded row: the trace must record the masked path."""
    input_ids = torch.arange(1, rows * width + 1, dtype=torch.long).reshape(rows, width) % 100 + 1
    attention_mask = torch.ones(rows, width, dtype=torch.long)
    attention_mask[0, width // 2 :] = 0
    return input_ids * attention_mask, attention_mask


def trace_checked(model: torch.nn.Module) -> torch.jit.ScriptModule:
    """The model as a TorchScript trace that gives its logits, checked on another shape than its example.

    Python control flow on the input's shape would have frozen in the trace: the check sees it.
    """
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the deprecation, and TracerWarnings checked below instead
            traced = torch.jit.trace(model, _padded_example(2, 6), strict=False, check_trace=False)
            check = _padded_example(3, 11)
            difference = (traced(*check).float() - model(*check).float()).abs().max().item()
    except Exception as error:  # noqa: BLE001 - any tracing failure means: no trace for this model
        raise TraceError(f"tracing the model failed ({type(error).__name__}: {error})") from error
    if not difference <= TRACE_TOLERANCE:
        raise TraceError(f"the model's trace differs from it by {difference:.3g} (allowed {TRACE_TOLERANCE:g})")
    return traced


def save_trace(model: torch.nn.Module, checkpoint_dir: str | Path) -> Path:
    """Trace the fp32 model and save the trace, without its weights, into the checkpoint folder."""
    traced = trace_checked(model.eval())
    placeholders = {name: torch.zeros((), dtype=p.dtype).expand(p.shape) for name, p in traced.named_parameters()}
    traced.load_state_dict(placeholders, strict=False, assign=True)  # buffers (position ids) stay: no weights file has them
    path = Path(checkpoint_dir) / TRACE_FILE
    torch.jit.save(traced, str(path))
    return path


def load_trace(checkpoint_dir: str | Path) -> torch.jit.ScriptModule:
    """The saved trace with the checkpoint's weights as its parameters; TraceError naming the file if it cannot be used."""
    path = Path(checkpoint_dir) / TRACE_FILE
    if not path.is_file():
        raise TraceError(f"the model runs its shipped trace, but {path} does not exist")
    try:
        traced = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - a corrupt or foreign archive
        raise TraceError(f"cannot load the shipped trace {path}: {type(error).__name__}: {error}") from error
    weights = read_state_dict(Path(checkpoint_dir))
    parameters = {name for name, _ in traced.named_parameters()}
    if weights.keys() != parameters:
        raise TraceError(f"the shipped trace {path} does not fit the weights: {sorted(weights.keys() ^ parameters)[:5]}")
    try:  # the mapped tensors themselves become the parameters
        traced.load_state_dict(as_model_dtypes(weights, traced), strict=False, assign=True)
    except RuntimeError as error:  # a shape differs
        raise TraceError(f"the shipped trace {path} does not fit the weights: {error}") from error
    return traced.eval()
