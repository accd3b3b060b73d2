"""The model's TorchScript trace: made and checked from the weights, saved without them, loaded with them.

A trace runs the whole forward in C++ (no GIL, no Python between ops). Packaging traces the
torch fp32 model once and saves the trace with every parameter replaced by a zero-stride
placeholder of its shape: a file of a few hundred KB that holds the graph and no weights. At load
the trace takes the checkpoint's tensors (safetensors, memory-mapped) as its parameters, so the
served model needs neither transformers nor a trace of its own: most of its start-up time and
memory. `torch.jit.load` reads TorchScript's own archive (TorchScript code and tensor records,
through TorchScript's C++ unpickler, which builds TorchScript types only): no Python pickle runs,
as for the weights. torch.jit is deprecated: a trace that is missing, unreadable or that does
not fit the weights is not used, and the model is built from the encoder config and traced at
load instead (eager if that trace differs).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from mlflow_model.checkpoint import as_model_dtypes, read_state_dict
from mlflow_model.config import TRACE_FILE

logger = logging.getLogger(__name__)

TRACE_TOLERANCE = 1e-4  # largest logit difference allowed between the traced and the eager model


def _padded_example(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with one padded row: the trace must record the masked path."""
    input_ids = torch.arange(1, rows * width + 1, dtype=torch.long).reshape(rows, width) % 100 + 1
    attention_mask = torch.ones(rows, width, dtype=torch.long)
    attention_mask[0, width // 2 :] = 0
    return input_ids * attention_mask, attention_mask


def traced_or_eager(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a TorchScript trace, or the model itself if tracing fails or the trace differs from it.

    The trace is checked on another shape than its example: Python control flow on the input's
    shape would have frozen in it.
    """
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the deprecation, and TracerWarnings checked below instead
            traced = torch.jit.trace(model, _padded_example(2, 6), strict=False, check_trace=False)
            check = _padded_example(3, 11)
            difference = (traced(*check).float() - model(*check).float()).abs().max().item()
    except Exception as error:  # noqa: BLE001 - a backbone torch cannot trace still runs, eagerly
        logger.warning("running the model eagerly: tracing it failed (%s: %s)", type(error).__name__, error)
        return model
    if not difference <= TRACE_TOLERANCE:
        logger.warning("running the model eagerly: its trace differs from it by %.3g", difference)
        return model
    return traced


def save_trace(model: torch.nn.Module, checkpoint_dir: str | Path) -> Path | None:
    """Trace the fp32 model and save the trace, without its weights, into the checkpoint folder (None if untraceable)."""
    traced = traced_or_eager(model.eval())
    if not isinstance(traced, torch.jit.ScriptModule):
        return None  # the load traces again and runs eagerly, with the same warning
    placeholders = {name: torch.zeros((), dtype=p.dtype).expand(p.shape) for name, p in traced.named_parameters()}
    traced.load_state_dict(placeholders, strict=False, assign=True)  # buffers (position ids) stay: no weights file has them
    path = Path(checkpoint_dir) / TRACE_FILE
    torch.jit.save(traced, str(path))
    return path


def load_trace(checkpoint_dir: str | Path) -> torch.jit.ScriptModule | None:
    """The saved trace with the checkpoint's weights as its parameters; None (and why, logged) if it cannot be used."""
    path = Path(checkpoint_dir) / TRACE_FILE
    if not path.is_file():
        return None
    try:
        traced = torch.jit.load(str(path), map_location="cpu")
        weights = read_state_dict(Path(checkpoint_dir))
        parameters = {name for name, _ in traced.named_parameters()}
        if weights.keys() != parameters:
            raise ValueError(f"its parameters are not the weights': {sorted(weights.keys() ^ parameters)[:5]}")
        # shapes checked; the mapped tensors themselves become the parameters
        traced.load_state_dict(as_model_dtypes(weights, traced), strict=False, assign=True)
    except Exception as error:  # noqa: BLE001 - the weights are still there: build and trace the model instead
        logger.warning("not using the saved trace %s (%s: %s): tracing the model at load", path, type(error).__name__, error)
        return None
    return traced.eval()
