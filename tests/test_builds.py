"""Every build (engine x precision) packages, loads offline and agrees with torch fp32; ONNX serves without torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from click.testing import CliRunner
from helpers import CLASS_TO_INDEX, build_tiny_checkpoint, copy_empty_store, log_training_run, mlflow_store, scoring_server, varied_rows

from mlflow_model.checkpoint import SAFETENSORS_FILE
from mlflow_model.config import ONNX_FILE, ONNX_WEIGHTS_FILE, TRACE_FILE, PredictorConfig
from mlflow_model.predictor import Predictor
from tagger.cli import cli
from tagger.config import PackageConfig
from mlflow_model.errors import ConfigError
from tagger.package import package_best_run

ROWS = varied_rows(60, seed=5)


@pytest.fixture(scope="module")
def builds_run(tmp_path_factory, tiny_encoder, empty_store) -> dict:
    """One training run (tiny model) in a module-wide store of its own (the builds register versions of it),
    a labelled CSV, and torch fp32's probabilities."""
    folder = tmp_path_factory.mktemp("builds")
    checkpoint = build_tiny_checkpoint(folder / "checkpoint", tiny_encoder, seed=3)
    labelled = ROWS.assign(tag=[list(CLASS_TO_INDEX)[i % 4] for i in range(len(ROWS))])
    labelled.to_csv(folder / "eval.csv", index=False)
    with mlflow_store(copy_empty_store(empty_store, folder), cwd=folder) as uri:
        log_training_run("exp", checkpoint, 0.5)
    with Predictor.from_directories(checkpoint, tiny_encoder) as reference:
        expected = reference.predict_proba(ROWS)
    return {"uri": uri, "folder": folder, "csv": str(folder / "eval.csv"), "expected": expected}


@pytest.fixture
def store(builds_run, tmp_path) -> dict:
    """That store, the current one for this test."""
    with mlflow_store(builds_run["uri"], cwd=tmp_path):
        yield builds_run


def package(store: dict, tiny_encoder, engine: str, precision: str) -> str:
    """Package the run as one build; its models:/ URI."""
    config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder), eval_dataset=store["csv"],
                           predictor=PredictorConfig(engine=engine, precision=precision))
    version = package_best_run(config)
    assert (version.tags["engine"], version.tags["precision"]) == (engine, precision)
    assert version.tags["forward"] == ("graph" if engine == "onnx" else "trace_at_load")
    assert float(version.tags["accuracy.f1_delta"]) == pytest.approx(
        float(version.tags["accuracy.f1"]) - float(version.tags["accuracy.reference_f1"]), abs=2e-6)
    return f"models:/tagger/{version.version}"


def probabilities(model: mlflow.pyfunc.PyFuncModel) -> np.ndarray:
    """The model's probabilities of ROWS, columns in CLASS_TO_INDEX order."""
    return np.array([[row[tag] for tag in CLASS_TO_INDEX] for row in model.predict(ROWS)["probabilities"]])


@pytest.mark.parametrize(("engine", "precision"), [("torch", "bf16"), ("torch", "int8-dynamic"), ("onnx", "int8"), ("onnx", "int8-dynamic")])
@pytest.mark.slow  # packages a model per build
def test_each_build_agrees_with_torch_fp32(store, tiny_encoder, engine, precision):
    got = probabilities(mlflow.pyfunc.load_model(package(store, tiny_encoder, engine, precision)))
    assert got.shape == store["expected"].shape
    assert (got.argmax(axis=1) == store["expected"].argmax(axis=1)).mean() >= 0.95
    np.testing.assert_allclose(got, store["expected"], atol=0.05)


def load_offline_in_a_new_process(tracking_uri: str, uri: str) -> dict:
    """Load the model and predict ROWS in a fresh offline process: whether it imported torch / transformers, its probabilities."""
    script = (
        "import json, sys, mlflow, pandas as pd;"
        f"m = mlflow.pyfunc.load_model({uri!r});"
        f"p = m.predict(pd.DataFrame({ROWS.to_dict(orient='list')!r}));"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules,"
        " 'probabilities': list(p['probabilities'])}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    output = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(output.stdout.strip().splitlines()[-1])
    loaded["probabilities"] = np.array([[row[tag] for tag in CLASS_TO_INDEX] for row in loaded["probabilities"]])
    return loaded


def test_the_torch_fp32_build_ships_its_trace_without_weights(packaged):
    import torch

    checkpoint = packaged.local / "artifacts" / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} == {SAFETENSORS_FILE, TRACE_FILE, "args.json", "class_to_index.json",
                                                      "calibration.json"}
    assert packaged.model.metadata.flavors["python_function"]["config"]["forward"] == "shipped_trace"
    assert isinstance(packaged.model.unwrap_python_model().predictor.engine.model, torch.jit.ScriptModule)
    trace = torch.jit.load(str(checkpoint / TRACE_FILE))
    assert all(p.untyped_storage().nbytes() <= p.element_size() for p in trace.parameters())  # placeholders only


@pytest.mark.slow  # a new process
def test_the_torch_fp32_build_loads_offline_without_transformers(packaged, tiny_encoder):
    with Predictor.from_directories(packaged.checkpoint, tiny_encoder) as reference:
        expected = reference.predict_proba(ROWS)
    loaded = load_offline_in_a_new_process(packaged.tracking_uri, packaged.model_uri)
    assert loaded["torch"] is True and loaded["transformers"] is False
    np.testing.assert_allclose(loaded["probabilities"], expected, atol=1e-5)


@pytest.mark.slow
def test_the_onnx_build_loads_offline_without_torch_and_serves(store, tiny_encoder):
    uri = package(store, tiny_encoder, "onnx", "fp32")
    checkpoint = Path(mlflow.artifacts.download_artifacts(uri)) / "artifacts" / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} == {ONNX_FILE, ONNX_WEIGHTS_FILE, "args.json", "class_to_index.json",
                                                      "calibration.json"}
    assert (checkpoint / ONNX_FILE).stat().st_size < (checkpoint / ONNX_WEIGHTS_FILE).stat().st_size  # graph apart
    requirements = mlflow.pyfunc.get_model_dependencies(uri)
    pins = open(requirements).read().split()
    assert any(p.startswith("onnxruntime==") for p in pins) and not any(p.startswith(("torch", "transformers")) for p in pins)
    loaded = load_offline_in_a_new_process(store["uri"], uri)
    assert loaded["torch"] is False and loaded["transformers"] is False
    np.testing.assert_allclose(loaded["probabilities"], store["expected"], atol=1e-4)  # fp32: the same model

    with scoring_server(uri, store["uri"], store["folder"]) as url:
        records = ROWS.head(5).astype(object).where(ROWS.head(5).notna(), None).to_dict(orient="records")
        response = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=60)
        assert response.status_code == 200, response.text
        served = np.array([[row["probabilities"][tag] for tag in CLASS_TO_INDEX] for row in response.json()["predictions"]])
        np.testing.assert_allclose(served, store["expected"][:5], atol=1e-4)


@pytest.mark.slow  # exports an ONNX graph
def test_an_onnx_file_that_is_not_the_model_is_refused(tmp_path, tiny_encoder):
    """The export check compares the ONNX file with the torch model on real rows: another model's file fails it."""
    from transformers import AutoConfig

    from mlflow_model.checkpoint import load_finetuned
    from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT
    from mlflow_model.engines.onnx_engine import ExportCheckError, build_graph, check_export
    from tagger.builds import sample_batches

    models = [load_finetuned(build_tiny_checkpoint(tmp_path / f"c{seed}", tiny_encoder, seed), tiny_encoder) for seed in (7, 8)]
    files = {CHECKPOINT_ARTIFACT: str(tmp_path / "c7"), ENCODER_ARTIFACT: str(tiny_encoder)}
    batches = sample_batches(files, PredictorConfig(), ROWS)
    onnx_file = build_graph(models[0], AutoConfig.from_pretrained(tiny_encoder), tmp_path / "onnx", "fp32", batches)
    assert check_export(models[0], onnx_file, batches) <= 1e-4
    with pytest.raises(ExportCheckError, match=r"disagrees with the torch fp32 model \(max \|probability difference\| "):
        check_export(models[1], onnx_file, batches)


def test_only_builds_that_exist_are_offered_and_accepted():
    with pytest.raises(ConfigError, match="engine 'onnx' has no 'bf16' build; the builds are torch-fp32, torch-bf16"):
        PredictorConfig(engine="onnx", precision="bf16")
    outcome = CliRunner().invoke(cli, ["package", "--experiment-name", "exp", "--build", "onnx-bf16"])
    assert outcome.exit_code == 2 and "'onnx-bf16' is not one of 'torch-fp32', 'torch-bf16'" in outcome.output
    assert "Traceback" not in outcome.output


def test_config_cli_choices_and_requirements_all_come_from_the_engine_registry(packaged):
    from mlflow_model.engines import ENGINES, build_names
    from tagger.bundle import pinned_requirements

    offered = next(p for p in cli.commands["package"].params if p.name == "build").type
    assert list(offered.inner.choices) == build_names()  # click.Choice inside Blankable
    assert build_names() == [f"{e}-{p}" for e, spec in ENGINES.items() for p in spec.precisions]
    assert build_names()[0] == "torch-fp32"  # the reference build first
    for engine, spec in ENGINES.items():
        assert [pin.split("==")[0] for pin in pinned_requirements(engine)] == list(spec.requirements)
        for forward in spec.forwards:
            assert PredictorConfig(engine=engine, precision=spec.precisions[0], forward=forward).forward == forward
    with pytest.raises(ConfigError, match=r"unknown engine 'tpu'; the engines are \['onnx', 'torch'\]"):
        PredictorConfig(engine="tpu")
    with pytest.raises(ConfigError, match=r"engine 'onnx' has no forward path 'eager'"):
        PredictorConfig(engine="onnx", forward="eager")
    with pytest.raises(ConfigError, match="unknown engine 'tpu'"):  # a config error at load, not a checkpoint one
        mlflow.pyfunc.load_model(str(packaged.local), model_config={"engine": "tpu"})
