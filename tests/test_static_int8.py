"""Static int8 (ONNX): scales calibrated at packaging, so a row's answer does not depend on its batch;
dynamic int8 keeps its own name, and models packaged as `int8` before static int8 existed still load."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from helpers import build_tiny_checkpoint, varied_rows

from mlflow_model.batching import pad_batch
from mlflow_model.checkpoint import encoder_settings
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, ONNX_FILE, PredictorConfig
from mlflow_model.engines import split_build
from mlflow_model.engines.onnx_engine import BATCH_TOLERANCE, ExportCheckError, check_batch_independence
from mlflow_model.predictor import Predictor
from tagger.builds import make_build, sample_batches

ROWS = varied_rows(64, seed=11)  # 1 to ~60 tokens: one 64-row batch is padded a lot
CALIBRATION = varied_rows(48, seed=12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_encoder) -> dict[str, str]:
    """A tiny trained-model layout: checkpoint + encoder folders."""
    folder = tmp_path_factory.mktemp("static")
    return {CHECKPOINT_ARTIFACT: str(build_tiny_checkpoint(folder / "checkpoint", tiny_encoder, seed=4)),
            ENCODER_ARTIFACT: str(tiny_encoder)}


def build(reference: dict[str, str], folder, precision: str) -> tuple[dict[str, str], PredictorConfig]:
    """One ONNX build of the tiny model, made as `tagger package` makes it (calibrated on CALIBRATION)."""
    return make_build(reference, folder, PredictorConfig(engine="onnx", precision=precision), ROWS.head(32),
                      calibration=CALIBRATION)


def alone_and_batched(artifacts: dict[str, str], config: PredictorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of each row predicted alone, and of all 64 rows in one forward batch."""
    with Predictor.from_directories(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config) as predictor:
        alone = np.vstack([predictor.predict_proba(ROWS.iloc[[i]]) for i in range(len(ROWS))])
        batched = predictor.predict_proba(ROWS, params={"batch_size": 64})
    return alone, batched


def test_static_int8_answers_a_row_the_same_alone_and_inside_a_64_row_batch(reference, tmp_path):
    artifacts, config = build(reference, tmp_path, "int8")
    assert (config.precision, config.forward, config.calibration_rows) == ("int8", "graph", len(CALIBRATION))
    ops = {node.op_type for node in onnx.load(f"{artifacts[CHECKPOINT_ARTIFACT]}/{ONNX_FILE}").graph.node}
    assert "QLinearMatMul" in ops or "QuantizeLinear" in ops  # quantized with stored scales...
    assert "DynamicQuantizeLinear" not in ops and "DynamicQuantizeMatMul" not in ops  # ...none computed per batch
    alone, batched = alone_and_batched(artifacts, config)
    assert np.abs(alone - batched).max() <= BATCH_TOLERANCE
    with Predictor.from_directories(reference[CHECKPOINT_ARTIFACT], reference[ENCODER_ARTIFACT]) as fp32:
        expected = fp32.predict_proba(ROWS)
    assert (batched.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.9
    np.testing.assert_allclose(batched, expected, atol=0.05)


def test_int8_dynamic_still_builds_and_the_batch_check_tells_it_apart(reference, tmp_path):
    artifacts, config = build(reference, tmp_path, "int8-dynamic")
    assert (config.precision, config.calibration_rows) == ("int8-dynamic", None)
    ops = {node.op_type for node in onnx.load(f"{artifacts[CHECKPOINT_ARTIFACT]}/{ONNX_FILE}").graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
    alone, batched = alone_and_batched(artifacts, config)
    np.testing.assert_allclose(alone, batched, atol=0.05)  # close, but its scales follow the batch:
    pad_id = int(encoder_settings(reference[ENCODER_ARTIFACT]).get("pad_token_id") or 0)
    batches = sample_batches(reference, config, ROWS)
    if np.abs(alone - batched).max() > BATCH_TOLERANCE:  # the check that guards a static build refuses it
        with pytest.raises(ExportCheckError, match="alone and inside its batch"):
            check_batch_independence(f"{artifacts[CHECKPOINT_ARTIFACT]}/{ONNX_FILE}", [sum(batches, [])], pad_id)


class CountingSession:
    """An ONNX Runtime session, counted: which session ran a pass (the real session runs it)."""

    def __init__(self, session) -> None:
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_lone_request_runs_on_every_core_with_the_same_answers(reference, tmp_path, precision):
    artifacts, config = build(reference, tmp_path, precision)
    config = dataclasses.replace(config, inference_threads=1, alone_threads=2)
    with Predictor.from_directories(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config) as predictor:
        engine = predictor.engine
        assert engine.session.get_session_options().intra_op_num_threads == 1
        assert engine.alone_session.get_session_options().intra_op_num_threads == 2
        pad_id = int(encoder_settings(reference[ENCODER_ARTIFACT]).get("pad_token_id") or 0)
        for batch in sample_batches(reference, config, ROWS):  # the two sessions agree exactly, batch by batch
            padded = pad_batch(batch, pad_id)
            np.testing.assert_array_equal(engine.logits(*padded, alone=True), engine.logits(*padded))
        engine.session, engine.alone_session = CountingSession(engine.session), CountingSession(engine.alone_session)
        predictor.predict_proba(ROWS.iloc[[0]])  # a lone request: the all-cores session
        assert (engine.alone_session.runs, engine.session.runs) == (1, 0)


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_a_model_packaged_as_int8_before_static_int8_loads_as_int8_dynamic(reference, tmp_path, engine):
    old = {"engine": engine, "precision": "int8", "forward": "graph" if engine == "onnx" else "trace_at_load"}
    config = PredictorConfig.from_dict(old)  # an old model_config: no calibration_rows
    assert config.precision == "int8-dynamic"
    if engine == "onnx":  # its graph is a dynamic one
        artifacts, _ = build(reference, tmp_path, "int8-dynamic")
    else:  # the torch build is the fp32 checkpoint, quantized at load
        artifacts = reference
    with Predictor.from_directories(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config) as predictor:
        got = predictor.predict_proba(ROWS)
    assert got.shape == (len(ROWS), 4) and np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    if engine == "onnx":  # a new static one stays static
        assert PredictorConfig.from_dict({**old, "calibration_rows": 8}).precision == "int8"


def test_build_names_with_a_dash_in_the_precision_split_at_the_engine():
    assert split_build("onnx-int8-dynamic") == ("onnx", "int8-dynamic")
    assert split_build("torch-int8-dynamic") == ("torch", "int8-dynamic")
    assert split_build("onnx-int8") == ("onnx", "int8")
