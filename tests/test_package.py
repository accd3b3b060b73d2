"""Best run -> checkpoint -> pyfunc -> registry -> promotion, on a real sqlite MLflow store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CLASS_TO_INDEX, ROOT, build_tiny_checkpoint, log_training_run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import BertConfig, BertModel

from mlflow_model.checkpoint import load_finetuned, write_checkpoint
from mlflow_model.config import PredictorConfig
from mlflow_model.model import FinetunedLLM, ModelArgs
from tagger.config import PackageConfig
from mlflow_model.errors import CheckpointError, ConfigError, InvalidInputError
from tagger.errors import RunSelectionError
from mlflow_model.predictor import Predictor
from tagger.package import package_best_run
from tagger.registry import promote
from tagger.runs import find_checkpoint, get_best_run_id, ranking_key, ranking_value

EXAMPLES = pd.DataFrame(
    {
        "title": ["Transformer language model", "Video object detection", "Deploy a model pipeline", "x"],
        "description": ["bert text data", "image vision detection", None, "learning " * 500],
    }
)


@pytest.fixture
def two_runs(tmp_path, tiny_encoder, tracking_uri) -> dict[str, str]:
    """Experiment 'exp' with a worse (seed 1) and a better (seed 2) run, each with a checkpoint."""
    worse = log_training_run("exp", build_tiny_checkpoint(tmp_path / "c1", tiny_encoder, seed=1), 0.9)
    better = log_training_run("exp", build_tiny_checkpoint(tmp_path / "c2", tiny_encoder, seed=2), 0.4)
    return {"worse": worse, "better": better, "better_dir": str(tmp_path / "c2")}


def package(tiny_encoder: Path, **predictor) -> object:
    """Package the best run of 'exp' with the tiny encoder."""
    config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder), predictor=PredictorConfig(**predictor))
    return package_best_run(config)


def test_best_run_is_chosen_by_val_loss(two_runs):
    assert get_best_run_id("exp") == two_runs["better"]
    assert get_best_run_id("exp", mode="DESC") == two_runs["worse"]


def tagger_and_made_with_ml_runs(checkpoint: Path) -> tuple[str, str]:
    """Experiment 'mixed': a tagger run that overfits after its best epoch (best_val_loss 0.3, last val_loss 0.9)
    with a checkpoint, and a Made With ML run with only val_loss 0.4; their ids."""
    mlflow.set_experiment("mixed")
    with mlflow.start_run() as tagger_run:
        for epoch, value in enumerate([0.5, 0.3, 0.9]):  # overfits after epoch 1
            mlflow.log_metric("val_loss", value, step=epoch)
        mlflow.log_metric("best_val_loss", 0.3)
        mlflow.log_artifacts(str(checkpoint), "checkpoint")
        mlflow.set_tag("checkpoint_path", "checkpoint")
    return tagger_run.info.run_id, log_training_run("mixed", None, 0.4)  # only val_loss


def test_tagger_runs_rank_by_their_best_epoch_and_made_with_ml_runs_by_val_loss(tmp_path, tiny_encoder, tracking_uri):
    """A tagger run's val_loss curve ends at its last epoch; its checkpoint is the best epoch's (best_val_loss)."""
    tagger_run, made_with_ml = tagger_and_made_with_ml_runs(build_tiny_checkpoint(tmp_path / "c", tiny_encoder, 1))
    tagger_metrics = mlflow.get_run(tagger_run).data.metrics
    assert ranking_key(tagger_metrics, "val_loss") == "best_val_loss"
    assert ranking_value(tagger_metrics, "val_loss") == 0.3
    assert ranking_key(mlflow.get_run(made_with_ml).data.metrics, "val_loss") == "val_loss"
    assert get_best_run_id("mixed") == tagger_run  # 0.3 beats 0.4, though its last val_loss is 0.9
    assert get_best_run_id("mixed", mode="DESC") == made_with_ml


@pytest.mark.slow
def test_the_package_of_a_tagger_run_carries_its_best_epochs_val_loss(tmp_path, tiny_encoder, tracking_uri):
    tagger_run, _ = tagger_and_made_with_ml_runs(build_tiny_checkpoint(tmp_path / "c", tiny_encoder, seed=1))
    version = package_best_run(PackageConfig(experiment_name="mixed", base_model=str(tiny_encoder)))
    assert version.tags["source_run_id"] == tagger_run
    assert float(version.tags["val_loss"]) == 0.3  # the packaged checkpoint's value
    assert "val_loss 0.3000" in version.description.splitlines()[0]


def test_selection_errors_name_the_problem(tmp_path, tiny_encoder, tracking_uri):
    with pytest.raises(RunSelectionError, match="'nope' does not exist"):
        get_best_run_id("nope")
    mlflow.create_experiment("empty")
    with pytest.raises(RunSelectionError, match="no finished runs"):
        get_best_run_id("empty")
    run_id = log_training_run("nometric", None, None)
    with pytest.raises(RunSelectionError, match="logged the metric 'val_loss'"):
        get_best_run_id("nometric")
    with pytest.raises(RunSelectionError, match="no checkpoint artifact"):
        find_checkpoint(run_id)
    with pytest.raises(RunSelectionError, match="mode must be ASC or DESC"):
        get_best_run_id("exp", mode="UP")


def made_with_ml_trial_run(tmp_path: Path, encoder: Path) -> str:
    """Experiment 'mwm': a run that logged a whole Ray <= 2.7 trial folder (two checkpoints, progress.csv), untagged."""
    trial = tmp_path / "trial"
    for name in ("checkpoint_000000", "checkpoint_000001"):
        folder = build_tiny_checkpoint(trial / name, encoder, seed=3)
        (folder / "class_to_index.json").unlink()  # Ray <= 2.7 kept the label map in .metadata.json
        (folder / ".metadata.json").write_text(json.dumps({"class_to_index": CLASS_TO_INDEX}))
    (trial / "progress.csv").write_text(
        "epoch,val_loss,checkpoint_dir_name\n0,0.5,checkpoint_000000\n1,0.3,checkpoint_000001\n"
    )
    mlflow.set_experiment("mwm")
    with mlflow.start_run() as run:
        mlflow.log_metric("val_loss", 0.3)
        mlflow.log_artifacts(str(trial))
    return run.info.run_id


def test_made_with_ml_trial_folder_is_found_without_tag(tmp_path, tiny_encoder, tracking_uri):
    """Made With ML logged the whole Ray trial folder; the best checkpoint is found by progress.csv."""
    assert find_checkpoint(made_with_ml_trial_run(tmp_path, tiny_encoder)) == "checkpoint_000001"


@pytest.mark.slow
def test_a_made_with_ml_trial_folder_packages_its_best_checkpoint(tmp_path, tiny_encoder, tracking_uri):
    made_with_ml_trial_run(tmp_path, tiny_encoder)
    version = package_best_run(PackageConfig(experiment_name="mwm", base_model=str(tiny_encoder)))
    assert version.tags["checkpoint_path"] == "checkpoint_000001"


def test_packaged_model_matches_the_checkpoint(packaged_store, tiny_encoder):
    version = MlflowClient().get_model_version("tagger", packaged_store.version)
    assert str(version.version) == "1"
    assert version.tags["source_run_id"] == packaged_store.run_id
    assert float(version.tags["val_loss"]) == pytest.approx(0.4)
    assert version.tags["checkpoint_path"] == "checkpoint"
    assert version.tags["forward"] == "shipped_trace"  # the path the torch fp32 build runs, recorded at packaging
    assert packaged_store.run_id in version.description
    assert version.tags["encoder"] == tiny_encoder.name  # the encoder's name, never its local path
    assert str(tiny_encoder) not in version.description
    assert mlflow.get_run(packaged_store.run_id).data.tags["registered_versions"] == "tagger v1"
    assert mlflow.get_run(version.tags["package_run_id"]).info.run_name == "package-tagger-v1"

    loaded = mlflow.pyfunc.load_model("models:/tagger/1")  # the registry's copy, loaded in this test
    got = loaded.predict(EXAMPLES)
    with Predictor.from_directories(packaged_store.checkpoint, tiny_encoder) as direct:
        expected = direct.predict_proba(EXAMPLES)
    assert list(got.columns) == ["prediction", "probabilities"]
    probabilities = np.array([[row[tag] for tag in direct.index_to_class] for row in got["probabilities"]])
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert list(got["prediction"]) == [direct.index_to_class[i] for i in expected.argmax(axis=1)]
    assert probabilities.sum(axis=1) == pytest.approx(np.ones(len(EXAMPLES)), abs=1e-5)


@pytest.mark.slow
def test_package_trace_option_chooses_how_the_served_torch_model_runs(two_runs, tiny_encoder):
    import torch
    from click.testing import CliRunner

    from tagger.cli import cli

    for flags in ([], ["--trace", "false"]):
        outcome = CliRunner().invoke(cli, ["package", "--experiment-name", "exp", "--base-model", str(tiny_encoder), *flags])
        assert outcome.exit_code == 0, outcome.output
    traced, eager = (mlflow.pyfunc.load_model(f"models:/tagger/{v}") for v in (1, 2))
    assert traced.metadata.flavors["python_function"]["config"]["forward"] == "shipped_trace"
    assert eager.metadata.flavors["python_function"]["config"]["forward"] == "eager"
    assert isinstance(traced.unwrap_python_model().predictor.engine.model, torch.jit.ScriptModule)
    assert not isinstance(eager.unwrap_python_model().predictor.engine.model, torch.jit.ScriptModule)
    got, expected = traced.predict(EXAMPLES), eager.predict(EXAMPLES)
    assert list(got["prediction"]) == list(expected["prediction"])
    for mine, theirs in zip(got["probabilities"], expected["probabilities"]):
        assert max(abs(mine[tag] - theirs[tag]) for tag in mine) <= 1e-5


def test_a_bad_setting_given_at_load_is_a_typed_error_naming_it(packaged):
    uri = str(packaged.local)
    for setting, message in (({"inference_threads": -1}, "'inference_threads' must be a whole number >= 1, got -1"),
                             ({"max_wait_ms": "soon"}, "'max_wait_ms' must be a number >= 0, got 'soon'"),
                             ({"threshold": 1.5}, "'threshold' must be a number between 0 and 1, got 1.5")):
        with pytest.raises(ConfigError, match=message):
            mlflow.pyfunc.load_model(uri, model_config=setting)
    assert mlflow.pyfunc.load_model(uri, model_config={"inference_threads": 1}).predict(EXAMPLES).shape[0] == len(EXAMPLES)


def test_model_holds_no_pickled_weights_and_pins_requirements(packaged):
    local = packaged.local
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/checkpoint/model.safetensors" in files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))], files
    requirements = (local / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements and "ray" not in requirements
    assert "params" in (local / "MLmodel").read_text()


@pytest.mark.slow
def test_threshold_and_batch_size_params(two_runs, tiny_encoder):
    package(tiny_encoder, threshold=0.99, batch_size=2)
    model = mlflow.pyfunc.load_model("models:/tagger/1")
    assert set(model.predict(EXAMPLES)["prediction"]) == {"other"}  # packaged default applies
    relaxed = model.predict(EXAMPLES, params={"threshold": 0.0, "batch_size": 3})
    top = [max(p, key=p.get) for p in relaxed["probabilities"]]
    assert list(relaxed["prediction"]) == top
    params = model.metadata.get_params_schema().to_dict()
    assert {p["name"]: p["default"] for p in params} == {"threshold": 0.99, "batch_size": 2, "bad_rows": "refuse"}
    limit = model.model_config["max_request_rows"]  # not given: measured at packaging, in hundreds, at least 100
    assert isinstance(limit, int) and limit >= 100 and limit % 100 == 0


def test_request_params_override_the_packaged_defaults(packaged):
    params = packaged.model.metadata.get_params_schema().to_dict()
    assert {p["name"]: p["default"] for p in params} == {"threshold": 0.0, "batch_size": 64, "bad_rows": "refuse"}
    default = packaged.model.predict(EXAMPLES)
    assert list(default["prediction"]) == [max(p, key=p.get) for p in default["probabilities"]]  # threshold 0
    strict = packaged.model.predict(EXAMPLES, params={"threshold": 1.0, "batch_size": 1})
    assert set(strict["prediction"]) == {"other"}  # no probability reaches 1.0: every row falls back
    for mine, theirs in zip(strict["probabilities"], default["probabilities"]):
        assert mine == pytest.approx(theirs, abs=1e-5)  # batch_size changes how, not what
    reported = packaged.model.predict(EXAMPLES, params={"bad_rows": "report"})
    assert list(reported["prediction"]) == list(default["prediction"]) and reported["error"].isna().all()


def test_a_request_over_the_packaged_row_limit_is_refused_naming_it_and_batch_predict(packaged):
    limit = packaged.max_request_rows
    assert packaged.model.model_config["max_request_rows"] == limit
    rows = pd.DataFrame({"title": [f"image model {i}" for i in range(limit + 1)], "description": ["vision"] * (limit + 1)})
    with pytest.raises(InvalidInputError) as refused:
        packaged.model.predict(rows)
    message = refused.value.message
    assert refused.value.get_http_status_code() == 400
    assert f"at most {limit} rows" in message and "max_request_rows" in message and "batch-predict" in message
    assert len(packaged.model.predict(rows.head(limit))) == limit  # the limit itself is fine


@pytest.mark.parametrize(
    ("frame", "params", "message"),
    [
        (pd.DataFrame({"title": ["a"]}), None, "description"),
        (pd.DataFrame({"title": ["a", 5], "description": ["b", "c"]}), None, "title"),
        (pd.DataFrame({"title": ["a", "b"], "description": ["x", 3.5]}), None, "row 1: column 'description'"),
        (pd.DataFrame({"title": ["ok", " "], "description": ["x", None]}), None, "row 1: 'title' and 'description'"),
        (pd.DataFrame({"title": [None], "description": ["x"]}), None, "row 0: column 'title' is null"),
        (EXAMPLES, {"threshold": 1.5}, "param 'threshold'"),
        (EXAMPLES, {"batch_size": 0}, "param 'batch_size'"),
        (EXAMPLES, {"threshold": "high"}, "threshold"),
    ],
)
def test_bad_input_raises_a_typed_error(packaged, frame, params, message):
    with pytest.raises(MlflowException, match=message) as raised:
        packaged.model.predict(frame, params=params)
    assert raised.value.get_http_status_code() == 400


def test_predictor_errors_are_typed(tiny_checkpoint, tiny_encoder, tmp_path):
    predictor = Predictor.from_directories(tiny_checkpoint, tiny_encoder)
    with pytest.raises(InvalidInputError, match="missing column"):
        predictor.predict(pd.DataFrame({"name": ["a"]}))
    with pytest.raises(InvalidInputError, match="no rows"):
        predictor.predict(EXAMPLES.iloc[:0])
    (tiny_checkpoint / "args.json").write_text(json.dumps({"dropout_p": 0.1, "embedding_dim": 32, "num_classes": 3}))
    with pytest.raises(CheckpointError, match="num_classes=3 but the label map has 4"):
        Predictor.from_directories(tiny_checkpoint, tiny_encoder)
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.from_directories(tmp_path / "missing", tiny_encoder)


def test_the_checkpoint_tensors_become_the_weights_in_fp32_whatever_dtype_they_were_saved_in(tiny_encoder, tmp_path):
    """load_finetuned skips the random init and takes the file's tensors: same logits as the trained model."""
    torch.manual_seed(0)
    args = ModelArgs(dropout_p=0.1, embedding_dim=32, num_classes=len(CLASS_TO_INDEX))
    trained = FinetunedLLM(BertModel(BertConfig.from_pretrained(tiny_encoder)), args).eval()
    state = trained.state_dict()
    write_checkpoint(tmp_path / "fp32", state, args, CLASS_TO_INDEX)
    write_checkpoint(tmp_path / "fp16", {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                     args, CLASS_TO_INDEX)
    ids = torch.tensor([[2, 5, 9, 3, 0, 0], [2, 7, 8, 11, 12, 3]])
    with torch.inference_mode():
        expected = trained(ids, (ids != 0).long())
        loaded, from_half = (load_finetuned(tmp_path / name, tiny_encoder) for name in ("fp32", "fp16"))
        assert not loaded.training and torch.equal(loaded(ids, (ids != 0).long()), expected)
        assert {p.dtype for p in from_half.parameters()} == {torch.float32}
        torch.testing.assert_close(from_half(ids, (ids != 0).long()), expected, atol=1e-2, rtol=0)


@pytest.mark.slow
def test_promotion_archives_previous_and_sets_champion(two_runs, tiny_encoder):
    first = package(tiny_encoder)
    assert first.tags["source_run_id"] == two_runs["better"]  # the better of the two runs
    promote("tagger", first.version)
    second = package(tiny_encoder)
    promoted = promote("tagger")  # newest by default
    client = MlflowClient()
    assert str(promoted.version) == str(second.version) == "2"
    assert client.get_model_version("tagger", "1").current_stage == "Archived"
    assert client.get_model_version("tagger", "2").current_stage == "Production"
    assert str(client.get_model_version_by_alias("tagger", "champion").version) == "2"
    for uri in ("models:/tagger/Production", "models:/tagger@champion"):
        assert len(mlflow.pyfunc.load_model(uri).predict(EXAMPLES)) == len(EXAMPLES)
    with pytest.raises(RunSelectionError, match="no versions"):
        promote("unknown-model")


@pytest.mark.slow
def test_loads_and_predicts_with_the_hub_offline(packaged):
    script = (
        "import mlflow, pandas as pd;"
        "m = mlflow.pyfunc.load_model('models:/tagger@champion');"
        "print(m.predict(pd.DataFrame({'title': ['bert'], 'description': ['text']}))['prediction'][0])"
    )
    env = {"MLFLOW_TRACKING_URI": packaged.tracking_uri, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=packaged.folder)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] in CLASS_TO_INDEX


@pytest.mark.slow  # 48 predictions of 64 rows (the quick loop has the inference threads' own concurrency tests)
def test_concurrent_predict_from_eight_threads(packaged):
    model = packaged.model
    # Many rows of varied length per call, so that the threads' tokenizer calls really overlap.
    rows = pd.DataFrame({
        "title": [f"bert text {j} " * (j % 7 + 1) for j in range(64)],
        "description": ["image video learning " * (j % 11 + 1) for j in range(64)],
    })
    frames = [rows.sample(frac=1.0, random_state=i).reset_index(drop=True) for i in range(8)]
    expected = [model.predict(frame) for frame in frames]
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def call(i: int) -> None:
        barrier.wait()
        try:
            for _ in range(5):
                results[i] = model.predict(frames[i])
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert list(got["prediction"]) == list(want["prediction"])
        for a, b in zip(got["probabilities"], want["probabilities"]):
            assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.slow
def test_mlproject_package_and_promote_entry_points(two_runs, tiny_encoder, tracking_uri):
    """`mlflow run . -e package` then `-e promote`, as a user runs them (empty params = defaults)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    steps = [
        ["package", "-P", "experiment_name=exp", "-P", f"base_model={tiny_encoder}"],
        ["promote"],  # version "" = the newest
    ]
    for step in steps:
        result = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", step[0], "--env-manager", "local", *step[1:]],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    version = MlflowClient().get_model_version_by_alias("tagger", "champion")
    assert version.tags["source_run_id"] == two_runs["better"]
    assert version.current_stage == "Production"
