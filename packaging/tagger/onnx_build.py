"""Build side of the ONNX engines: export FinetunedLLM, fuse it for ONNX Runtime, quantize, check.

Only packaging imports this (torch, onnx and onnxruntime's build tools); the served model loads
the resulting file with mlflow_model.engines.OnnxEngine and never imports torch.
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlflow_model.engines import INPUT_NAMES, OUTPUT_NAME, OnnxEngine
from mlflow_model.model import FinetunedLLM
from mlflow_model.batching import pad_batch
from mlflow_model.config import ONNX_FILE, ONNX_WEIGHTS_FILE
from tagger.errors import BuildError

logger = logging.getLogger(__name__)

ONNX_PRECISIONS = ("fp32", "int8")
OPSET = 17
INT8_MIN_AGREEMENT = 0.95  # int8 must give torch fp32's tag on this share of the rows (F1 is measured too)


class ExportCheckError(BuildError):
    """An ONNX file's probabilities differ from the torch fp32 model's on real rows."""


def _dummy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A small padded batch for tracing (one row with padding, so the mask path is traced)."""
    input_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 0]], dtype=torch.long)  # ids any vocabulary has
    return input_ids, (input_ids != 0).long()


@contextmanager
def _eager_attention(model: FinetunedLLM) -> Iterator[None]:
    """Trace the classic attention pattern (ONNX Runtime's BERT optimizer fuses no SDPA graph)."""
    previous = model.llm.config._attn_implementation
    model.llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.llm.set_attn_implementation(previous)


def export_onnx(model: FinetunedLLM, path: str | Path) -> Path:
    """torch.onnx.export of encoder + head: input_ids/attention_mask (batch, sequence) -> logits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    with torch.no_grad(), _eager_attention(model):
        torch.onnx.export(
            model.eval(),
            _dummy_inputs(),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def optimize_onnx(path: str | Path, out_path: str | Path, num_heads: int, hidden_size: int) -> Path:
    """Fuse attention, LayerNorm and GELU with onnxruntime.transformers' BERT optimizer."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    fused = optimized.get_fused_operator_statistics()
    logger.info("ONNX fusion: %s", {k: v for k, v in fused.items() if v})
    if not fused.get("Attention") and not fused.get("MultiHeadAttention"):
        logger.warning("ONNX optimizer fused no attention in %s: the graph stays slow", path)
    optimized.save_model_to_file(str(out_path))
    return Path(out_path)


def quantize_int8(path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 (QInt8 weights per channel, activations quantized per batch) of MatMuls and Attention."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per_channel + reduce_range (7-bit weights): on AVX2 CPUs without VNNI the u8s8 kernels saturate;
    # measured here, the holdout F1 equals fp32's with both (default settings lost 0.025), at the same speed.
    quantize_dynamic(
        str(path),
        str(out_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused graphs lack some type info
    )
    return Path(out_path)


def save_with_external_weights(path: str | Path, out_path: str | Path) -> Path:
    """The graph in out_path, its weights beside it in ONNX_WEIGHTS_FILE (ONNX external data).

    ONNX Runtime memory-maps external weights instead of copying them out of the graph file: the
    served MiniLM worker started 88 MB smaller here (pages are read as they are used; most of the
    embedding table never is), and the workers of one server share those pages.
    """
    import onnx

    out_path = Path(out_path)
    onnx.save_model(onnx.load(str(path)), str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_WEIGHTS_FILE)
    return out_path


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def both_probabilities(
    torch_model: FinetunedLLM, onnx_path: str | Path, token_id_batches: Iterable[Sequence[Sequence[int]]], pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """torch fp32's and the ONNX file's probabilities over the padded batches, rows stacked."""
    engine = OnnxEngine(onnx_path)
    expected, got = [], []
    for batch in token_id_batches:
        input_ids, mask = pad_batch(batch, pad_id)
        with torch.inference_mode():
            expected.append(_softmax(torch_model.eval()(torch.from_numpy(input_ids), torch.from_numpy(mask)).float().numpy()))
        got.append(_softmax(engine.logits(input_ids, mask)))
    return np.vstack(expected), np.vstack(got)


def check_export(
    torch_model: FinetunedLLM,
    onnx_path: str | Path,
    token_id_batches: Iterable[Sequence[Sequence[int]]],
    atol: float | None = 1e-4,
    min_agreement: float | None = None,
    pad_id: int = 0,
) -> float:
    """Raise ExportCheckError unless ONNX and torch fp32 agree on real rows; else the largest probability difference.

    fp32 must give the same probabilities (within atol); int8 must give the same tags on at least
    min_agreement of the rows: rounding moves a row near a decision boundary, a broken graph most rows.
    """
    batches = [list(batch) for batch in token_id_batches if len(batch)]
    if not batches:
        raise ExportCheckError(f"no rows to check {onnx_path} with")
    expected, got = both_probabilities(torch_model, onnx_path, batches, pad_id)
    worst = float(np.abs(expected - got).max())
    agreement = float((expected.argmax(axis=1) == got.argmax(axis=1)).mean())
    measured = f"max |probability difference| {worst:.3g}, same tag on {agreement:.1%} of {len(expected)} rows"
    if (atol is not None and not worst <= atol) or (min_agreement is not None and not agreement >= min_agreement):
        wanted = f"probabilities within {atol:g}" if atol is not None else f"the same tag on >= {min_agreement:.0%}"
        raise ExportCheckError(
            f"{onnx_path} disagrees with the torch fp32 model ({measured}; wanted {wanted}): "
            "the export, a graph optimization or the quantization changed the model"
        )
    logger.info("%s agrees with torch fp32: %s", onnx_path, measured)
    return worst


def build_onnx(
    model: FinetunedLLM,
    encoder_config: Any,
    out_dir: str | Path,
    precision: str,
    sample_batches: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
) -> Path:
    """The checked, fused ONNX model of one precision in out_dir (ONNX_FILE + ONNX_WEIGHTS_FILE); int8 quantizes."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"unknown ONNX precision {precision!r}; use one of {list(ONNX_PRECISIONS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        plain = export_onnx(model, Path(scratch) / "plain.onnx")
        fused = optimize_onnx(plain, Path(scratch) / "fused.onnx", encoder_config.num_attention_heads,
                              encoder_config.hidden_size)
        check_export(model, fused, sample_batches, pad_id=pad_id)
        built = fused
        if precision == "int8":
            built = quantize_int8(fused, Path(scratch) / "int8.onnx")
            check_export(model, built, sample_batches, atol=None, min_agreement=INT8_MIN_AGREEMENT, pad_id=pad_id)
        result = save_with_external_weights(built, out_dir / ONNX_FILE)
    logger.info("built %s (%s) in %.1f s", result, precision, time.perf_counter() - start)
    return result
