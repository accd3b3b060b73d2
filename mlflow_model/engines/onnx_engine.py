"""The ONNX engine: the classifier exported to ONNX, optimized for ONNX Runtime, fp32, static int8 or dynamic int8.

At load it imports only onnxruntime (never torch or transformers). `build` runs at packaging
only: it exports the torch model, fuses GELU with its bias (ONNX Runtime's BERT optimizer),
quantizes for int8, and checks the result against the torch fp32 model on real rows before
the build can be registered. Its build-time imports (torch, onnx) stay inside it.

- `int8` (static): the weight MatMuls (attention's Q/K/V and output projections, the FFN, the
  pooler, the head) get int8 weights and uint8 inputs whose scales are calibrated at packaging
  on training rows, one row at a time (no padded position enters a range), and stored in the
  graph; their outputs stay float (ONNX Runtime runs them as MatMulIntegerToFloat). A row's
  answer is then the same whatever it is batched with.
- `int8-dynamic`: int8 weights, activation scales computed per batch from the whole padded batch:
  an answer depends on the other rows of its batch.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlflow_model.checkpoint import ARGS_FILE, CALIBRATION_FILE, LABELS_FILE
from mlflow_model.config import (
    CHECKPOINT_ARTIFACT,
    ENCODER_ARTIFACT,
    ONNX_FILE,
    ONNX_WEIGHTS_FILE,
    PredictorConfig,
    usable_cores,
)
from mlflow_model.engines import DYNAMIC_INT8, STATIC_INT8
from mlflow_model.errors import BuildError, CheckpointError

if TYPE_CHECKING:
    import torch

    from mlflow_model.model import FinetunedLLM

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
OPSET = 17
FP32_TOLERANCE = 1e-4  # fp32 must give torch fp32's probabilities within this
INT8_MIN_AGREEMENT = 0.95  # int8 must give torch fp32's tag on this share of the rows (F1 is measured too)
BATCH_TOLERANCE = 1e-4  # static int8: a row alone and inside its batch must agree within this


class ExportCheckError(BuildError):
    """An ONNX file's probabilities differ from the torch fp32 model's on real rows."""


class OnnxEngine:
    """An ONNX Runtime session (CPU, graph optimizations on) over an exported FinetunedLLM.

    With `alone_threads` above `num_threads`, a second session over the same graph runs the passes that run
    alone on that many threads, spinning only while a pass runs: a lone request then has every core. Both
    sessions run the same kernels, each output element computed in the same order, so answers are the same.
    """

    def __init__(self, model_path: str | Path, num_threads: int | None = None, alone_threads: int = 1) -> None:
        self.model_path = str(model_path)
        threads = num_threads or usable_cores()
        self.session = self._open(threads, spin=False)
        self.alone_session = self._open(alone_threads, spin=True) if alone_threads > threads else self.session
        self._check_signature()

    def _open(self, threads: int, spin: bool) -> Any:
        """A session on `threads` intra-op threads; spinning pool threads stop spinning when a pass ends."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads spin by default: on a few shared cores they steal CPU from the server's threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            return ort.InferenceSession(self.model_path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # missing, corrupt or incompatible file
            raise CheckpointError(f"cannot load ONNX model {self.model_path}: {error}") from error

    def _check_signature(self) -> None:
        """The session must take input_ids/attention_mask and give logits."""
        inputs = sorted(i.name for i in self.session.get_inputs())
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != sorted(INPUT_NAMES) or OUTPUT_NAME not in outputs:
            raise CheckpointError(
                f"ONNX model {self.model_path} takes {inputs} and gives {outputs}; "
                f"expected {list(INPUT_NAMES)} -> {OUTPUT_NAME!r}"
            )

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, alone: bool = False) -> np.ndarray:
        """float32 logits of one padded batch; a pass that runs alone takes every core the model has."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        session = self.alone_session if alone else self.session
        return np.asarray(session.run([OUTPUT_NAME], feeds)[0], dtype=np.float32)


def load(checkpoint_dir: str | Path, encoder_dir: str | Path, config: PredictorConfig) -> OnnxEngine:
    """The session over the build's graph (its weights memory-mapped from the external data file)."""
    return OnnxEngine(Path(checkpoint_dir) / ONNX_FILE, config.intra_op_threads, config.alone_intra_op_threads)


# ---- packaging only ------------------------------------------------------------------------------


def _dummy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A small padded batch for tracing (one row with padding, so the mask path is traced)."""
    import torch

    input_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 0]], dtype=torch.long)  # ids any vocabulary has
    return input_ids, (input_ids != 0).long()


@contextmanager
def _eager_attention(model: FinetunedLLM) -> Iterator[None]:
    """Trace the classic attention pattern (MatMul, Softmax): the graph every ONNX build was measured with."""
    previous = model.llm.config._attn_implementation
    model.llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.llm.set_attn_implementation(previous)


def export_onnx(model: FinetunedLLM, path: str | Path) -> Path:
    """torch.onnx.export of encoder + head: input_ids/attention_mask (batch, sequence) -> logits."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    with torch.no_grad(), _eager_attention(model):
        torch.onnx.export(
            model.eval(), _dummy_inputs(), str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )
    return path


def optimize_onnx(path: str | Path, out_path: str | Path, num_heads: int, hidden_size: int) -> Path:
    """Fuse GELU (with its bias) with onnxruntime.transformers' BERT optimizer, leaving attention and the
    residual LayerNorms as plain ops.

    ONNX Runtime's fused Attention/MultiHeadAttention and SkipLayerNormalization kernels are slower on
    AVX2 CPUs than the plain MatMul/Softmax and Add + LayerNormalization they replace (docs/builds.md:
    every precision gained 10-20% without them), and without a fused Attention every Q/K/V projection
    is a MatMul that static int8 quantizes.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False
    options.enable_skip_layer_norm = False
    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               optimization_options=options)
    fused = optimized.get_fused_operator_statistics()
    logger.info("ONNX fusion: %s", {k: v for k, v in fused.items() if v})
    optimized.save_model_to_file(str(out_path))
    return Path(out_path)


def quantize_int8_dynamic(path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 (QInt8 weights per channel, activations quantized per batch) of the MatMuls.

    per_channel + reduce_range (7-bit weights): on AVX2 CPUs without VNNI the u8s8 kernels
    saturate with 8-bit weights, which cost accuracy (docs/benchmarks.md).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(path), str(out_path), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused graphs lack some type info
    )
    return Path(out_path)


class CalibrationRows:
    """ONNX Runtime's CalibrationDataReader over token ids: one unpadded row per batch."""

    def __init__(self, rows: Sequence[Sequence[int]]) -> None:
        self.rows = iter(list(rows))

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next row's feeds, or None when all were given."""
        from mlflow_model.batching import pad_batch

        row = next(self.rows, None)
        if row is None:
            return None
        input_ids, mask = pad_batch([row], 0)
        return {"input_ids": input_ids, "attention_mask": mask}


def weight_matmuls(path: str | Path) -> list[str]:
    """Names of the MatMul nodes that multiply by a weight (an initializer), not two activations."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "MatMul" and any(i in weights for i in node.input)]


def with_activation_types(path: str | Path, out_path: str | Path) -> Path:
    """The graph with a float type declared for the activation input of each weight MatMul.

    The fused graph carries no types for its intermediate tensors (ONNX's shape inference does not
    know ONNX Runtime's fused ops), and the calibrator measures only tensors whose type it knows.
    """
    import onnx

    model = onnx.load(str(path))
    weights = {initializer.name for initializer in model.graph.initializer}
    known = {info.name for info in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    for node in model.graph.node:
        if node.op_type == "MatMul" and any(i in weights for i in node.input):
            for name in (i for i in node.input if i not in weights and i not in known):
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                known.add(name)
    onnx.save(model, str(out_path))
    return Path(out_path)


def quantize_int8_static(path: str | Path, out_path: str | Path, calibration: Sequence[Sequence[int]]) -> Path:
    """Static int8 of the weight MatMuls: int8 weights per channel (7-bit, see quantize_int8_dynamic), uint8
    inputs whose scales are the MinMax ranges over the calibration rows, stored in the graph as
    QuantizeLinear/DequantizeLinear pairs (QDQ), which ONNX Runtime fuses into int8 kernels at load.

    The MatMuls' outputs are not quantized again: ONNX Runtime runs each as MatMulIntegerToFloat (int8
    in, float out), faster here than QLinearMatMul's requantized output and closer to fp32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    typed = with_activation_types(path, Path(out_path).with_suffix(".typed.onnx"))
    every = weight_matmuls(typed)
    quantize_static(
        str(typed), str(out_path), CalibrationRows(calibration), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"], nodes_to_quantize=every, per_channel=True, reduce_range=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
    )
    return Path(out_path)


def check_batch_independence(onnx_path: str | Path, batches: Sequence[Sequence[Sequence[int]]], pad_id: int = 0) -> float:
    """Raise ExportCheckError unless each row's probabilities alone and inside its padded batch agree within
    BATCH_TOLERANCE; else the largest difference."""
    from mlflow_model.batching import pad_batch, softmax

    engine, worst = OnnxEngine(onnx_path), 0.0
    for batch in (list(b) for b in batches if len(b)):
        together = softmax(engine.logits(*pad_batch(batch, pad_id)))
        alone = np.vstack([softmax(engine.logits(*pad_batch([row], pad_id))) for row in batch])
        worst = max(worst, float(np.abs(together - alone).max()))
    if not worst <= BATCH_TOLERANCE:
        raise ExportCheckError(
            f"{onnx_path}: a row's probabilities alone and inside its batch differ by {worst:.3g} "
            f"(wanted within {BATCH_TOLERANCE:g}): its activation scales are not fixed"
        )
    return worst


def save_with_external_weights(path: str | Path, out_path: str | Path) -> Path:
    """The graph in out_path, its weights beside it in ONNX_WEIGHTS_FILE (ONNX external data).

    ONNX Runtime memory-maps external weights instead of copying them out of the graph file: pages
    are read as they are used (most of the embedding table never is), and a server's workers share them.
    """
    import onnx

    out_path = Path(out_path)
    onnx.save_model(onnx.load(str(path)), str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_WEIGHTS_FILE)
    return out_path


def both_probabilities(
    torch_model: FinetunedLLM, onnx_path: str | Path, batches: Sequence[Sequence[Sequence[int]]], pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """torch fp32's and the ONNX file's probabilities over the padded batches, rows stacked."""
    import torch

    from mlflow_model.batching import pad_batch, softmax

    engine = OnnxEngine(onnx_path)
    expected, got = [], []
    for batch in batches:
        input_ids, mask = pad_batch(batch, pad_id)
        with torch.inference_mode():
            expected.append(softmax(torch_model.eval()(torch.from_numpy(input_ids), torch.from_numpy(mask)).float().numpy()))
        got.append(softmax(engine.logits(input_ids, mask)))
    return np.vstack(expected), np.vstack(got)


def check_export(
    torch_model: FinetunedLLM,
    onnx_path: str | Path,
    batches: Sequence[Sequence[Sequence[int]]],
    atol: float | None = FP32_TOLERANCE,
    min_agreement: float | None = None,
    pad_id: int = 0,
) -> float:
    """Raise ExportCheckError unless ONNX and torch fp32 agree on real rows; else the largest probability difference.

    fp32 must give the same probabilities (within atol); int8 must give the same tags on at least
    min_agreement of the rows: rounding moves a row near a decision boundary, a broken graph most rows.
    """
    batches = [list(batch) for batch in batches if len(batch)]
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


def build_graph(
    model: FinetunedLLM, encoder_config: Any, out_dir: Path, precision: str, samples: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0, calibration: Sequence[Sequence[int]] | None = None,
) -> Path:
    """The checked, fused ONNX model of one precision in out_dir (ONNX_FILE + ONNX_WEIGHTS_FILE); int8 quantizes
    (static: on the calibration rows, else on the sample rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        plain = export_onnx(model, Path(scratch) / "plain.onnx")
        built = optimize_onnx(plain, Path(scratch) / "fused.onnx", encoder_config.num_attention_heads,
                              encoder_config.hidden_size)
        check_export(model, built, samples, pad_id=pad_id)
        if precision == DYNAMIC_INT8:
            built = quantize_int8_dynamic(built, Path(scratch) / "int8.onnx")
        elif precision == STATIC_INT8:
            rows = calibration or [row for batch in samples for row in batch]
            built = quantize_int8_static(built, Path(scratch) / "int8.onnx", rows)
            check_batch_independence(built, samples, pad_id)
        if precision != "fp32":
            check_export(model, built, samples, atol=None, min_agreement=INT8_MIN_AGREEMENT, pad_id=pad_id)
        return save_with_external_weights(built, out_dir / ONNX_FILE)


def build(
    files: dict[str, str], out_dir: Path, config: PredictorConfig, samples: list[list[list[int]]],
    calibration: list[list[int]] | None = None,
) -> tuple[dict[str, str], PredictorConfig]:
    """The ONNX build's files: the checked graph + its weights + the label map (+ temperature), and the staged encoder files.

    Static int8 records how many calibration rows set its scales (`calibration_rows`)."""
    from transformers import AutoConfig

    from mlflow_model.checkpoint import encoder_settings, load_finetuned

    checkpoint, encoder = out_dir / CHECKPOINT_ARTIFACT, out_dir / ENCODER_ARTIFACT
    shutil.copytree(files[ENCODER_ARTIFACT], encoder)
    checkpoint.mkdir(parents=True)
    for name in (ARGS_FILE, LABELS_FILE, CALIBRATION_FILE):
        if name != CALIBRATION_FILE or (Path(files[CHECKPOINT_ARTIFACT]) / name).is_file():
            shutil.copy(Path(files[CHECKPOINT_ARTIFACT]) / name, checkpoint / name)
    model = load_finetuned(files[CHECKPOINT_ARTIFACT], encoder)
    pad_id = int(encoder_settings(encoder).get("pad_token_id") or 0)
    build_graph(model, AutoConfig.from_pretrained(encoder), checkpoint, config.precision, samples, pad_id, calibration)
    rows = (len(calibration) if calibration else sum(map(len, samples))) if config.precision == STATIC_INT8 else None
    return {CHECKPOINT_ARTIFACT: str(checkpoint), ENCODER_ARTIFACT: str(encoder)}, dataclasses.replace(
        config, forward="graph", calibration_rows=rows
    )
