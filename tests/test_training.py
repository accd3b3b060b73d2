"""Training end to end: real Ray Train, real MLflow (sqlite), a tiny BERT and a tiny CSV.

The trained runs are packaged with package_best_run and the registered model predicts.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from transformers import BertConfig, BertModel

from helpers import CLASS_TO_INDEX, TAG_WORDS, build_tiny_encoder, write_tiny_csv
from tagger.config import PackageConfig, TrainConfig
from tagger.errors import DatasetError
from tagger.data import check_columns, class_to_index, load_data, stratified_split

@pytest.fixture(scope="module")
def pretrained_encoder(tmp_path_factory) -> Path:
    """The tiny encoder's config + tokenizer, with randomly initialised weights saved beside them."""
    folder = build_tiny_encoder(tmp_path_factory.mktemp("pretrained"))
    BertModel(BertConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory) -> Path:
    return write_tiny_csv(tmp_path_factory.mktemp("data") / "projects.csv")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (training code reuses a running Ray instead of starting one)."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


def tiny_config(tiny_csv: Path, encoder: Path, tmp_path: Path, **changes) -> TrainConfig:
    values = dict(
        experiment_name="tiny", dataset_loc=str(tiny_csv), base_model=str(encoder), num_epochs=2, batch_size=8,
        lr=1e-3, cpu_per_worker=1, storage_path=str(tmp_path / "ray"),
    )
    return TrainConfig(**(values | changes))


# ---------------------------------------------------------------------------- data (no Ray)


def test_load_data_checks_columns_and_tags(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"title": ["a"], "tag": ["mlops"]}).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['description'\]"):
        load_data(str(path))
    frame = pd.DataFrame({"title": ["a", "b", "c"], "description": ["x", "y", "z"], "tag": ["mlops", None, " "]})
    with pytest.raises(DatasetError, match=r"2 row\(s\) have an empty or missing tag \(first rows: \[1, 2\]\)"):
        check_columns(frame)
    with pytest.raises(DatasetError, match="does not exist"):
        load_data(str(tmp_path / "nowhere.csv"))


def test_label_map_is_sorted_and_split_is_stratified(tiny_csv):
    frame = load_data(str(tiny_csv))
    labels = class_to_index(frame["tag"])
    assert labels == {tag: i for i, tag in enumerate(sorted(CLASS_TO_INDEX))}
    train, val = stratified_split(frame, val_size=0.25, seed=1)
    assert len(train) + len(val) == len(frame) == 40
    assert len(val) == 10 and set(val["tag"].value_counts()) <= {2, 3}  # 10 rows of each tag: 2 or 3 held out
    assert set(val["tag"]) == set(train["tag"]) == set(TAG_WORDS)
    again_train, again_val = stratified_split(frame, val_size=0.25, seed=1)
    assert again_val.equals(val) and again_train.equals(train)
    with pytest.raises(DatasetError, match="fewer than 2 rows"):
        stratified_split(pd.concat([frame, frame.head(1).assign(tag="lonely")]), 0.25, 1)


def test_the_training_loop_learns_a_learnable_toy_set(tiny_csv, pretrained_encoder, tmp_path):
    from tagger.train import prepare_data, resolve_config
    from tagger.train_loop import run_training

    config = resolve_config(tiny_config(tiny_csv, pretrained_encoder, tmp_path, num_epochs=10, lr=3e-3, dropout_p=0.0, scheduler="constant"))
    summary = run_training(dataclasses.asdict(config) | prepare_data(config))  # no Ray, no MLflow run
    losses = [epoch["train_loss"] for epoch in summary["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["best"]["val_accuracy"] >= 0.75  # 4 balanced tags: chance is 0.25
    assert summary["best"]["val_loss"] == min(epoch["val_loss"] for epoch in summary["history"])


def test_a_resumed_loop_goes_on_exactly_where_its_checkpoint_stopped(tiny_csv, pretrained_encoder, tmp_path):
    """Weights, optimizer, scheduler and RNG come back: epoch 2 after a resume equals epoch 2 of an unbroken run."""
    import shutil

    from mlflow_model.checkpoint import SAFETENSORS_FILE
    from tagger.train import prepare_data, resolve_config
    from tagger.train_loop import TRAINING_STATE_FILE, run_training

    config = resolve_config(tiny_config(tiny_csv, pretrained_encoder, tmp_path, num_epochs=3, lr=3e-3))
    cfg = dataclasses.asdict(config) | prepare_data(config)

    def keep(metrics: dict, folder: str | None) -> None:  # Ray's report: keep each epoch's checkpoint
        shutil.copytree(folder, tmp_path / f"epoch-{metrics['epoch']}")

    unbroken = run_training(cfg, report=keep)
    assert {p.name for p in (tmp_path / "epoch-0").iterdir()} == {
        SAFETENSORS_FILE, "args.json", "class_to_index.json", "calibration.json", TRAINING_STATE_FILE
    }
    resumed = run_training(cfg, resume_from=tmp_path / "epoch-0")  # as after a failure during epoch 1
    assert resumed["resumed_at_epoch"] == 1 and len(resumed["history"]) == 3
    assert resumed["history"][0] == unbroken["history"][0]  # restored, not re-run
    for epoch in (1, 2):
        for key, value in unbroken["history"][epoch].items():
            assert resumed["history"][epoch][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (epoch, key)
    assert resumed["best_epoch"] == unbroken["best_epoch"]


# ---------------------------------------------------------------------------- Ray + MLflow


@pytest.mark.slow
def test_train_logs_run_and_best_checkpoint_that_packages_and_predicts(
    ray_cluster, tracking_uri, tiny_csv, pretrained_encoder, tmp_path
):
    from tagger.package import package_best_run
    from tagger.config import CHECKPOINT_TAG
    from tagger.runs import get_best_run_id

    from tagger.train import train

    result = train(tiny_config(tiny_csv, pretrained_encoder, tmp_path), run_name="tiny-run")
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-run"
    params = run.data.params
    assert params["lr"] == "0.001" and params["num_epochs"] == "2" and params["base_model"] == str(pretrained_encoder)
    assert params["train_rows"] == "32" and params["val_rows"] == "8"
    for metric in ("train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(result.run_id, metric)] == [0, 1]
    val_history = client.get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in val_history] == [0, 1]  # the curve ends at the last epoch
    assert run.data.metrics["best_val_loss"] == pytest.approx(min(m.value for m in val_history))
    assert run.data.tags["best_epoch"] == f"{result.best_epoch + 1} of 2 (step {result.best_epoch})"
    assert {"val_f1", "val_accuracy", "best_val_f1", "best_val_accuracy"} <= set(run.data.metrics)
    assert float(run.data.tags["train_seconds"]) > 0
    assert len(client.get_metric_history(result.run_id, "best_val_loss")) == 1
    assert run.data.tags[CHECKPOINT_TAG] == "checkpoint"
    names = {Path(a.path).name for a in client.list_artifacts(result.run_id, "checkpoint")}
    assert names == {"model.safetensors", "args.json", "class_to_index.json", "calibration.json"}  # one weights copy
    assert [m.step for m in client.get_metric_history(result.run_id, "temperature")] == [0, 1]
    assert {"val_ece", "val_ece_calibrated", "best_val_ece", "best_val_ece_calibrated"} <= set(run.data.metrics)
    calibration = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/checkpoint/calibration.json")
    assert calibration["temperature"] == pytest.approx(run.data.metrics["best_temperature"])  # the best epoch's
    assert calibration["ece_after"] <= calibration["ece_before"] + 1e-9 and calibration["rows"] == 8
    assert result.class_to_index == {tag: i for i, tag in enumerate(sorted(CLASS_TO_INDEX))}

    assert get_best_run_id("tiny") == result.run_id
    version = package_best_run(PackageConfig(experiment_name="tiny"))  # encoder: the run's base_model
    assert version.tags["source_run_id"] == result.run_id
    assert (float(version.tags["temperature"]), version.tags["temperature.source"]) == (
        pytest.approx(calibration["temperature"], rel=1e-5), "checkpoint")
    # the encoder is the run's base_model, logged by its name, never its local path
    assert mlflow.get_run(version.tags["package_run_id"]).data.params["encoder"] == pretrained_encoder.name
    model = mlflow.pyfunc.load_model(f"models:/tagger/{version.version}")
    assert model.model_config["max_length"] == int(params["max_length"])  # served as trained
    frame = pd.DataFrame({"title": ["bert text language", "image video"], "description": ["transformer", None]})
    predictions = model.predict(frame)
    assert set(predictions["prediction"]) <= set(CLASS_TO_INDEX)
    assert all(abs(sum(p.values()) - 1) < 1e-4 for p in predictions["probabilities"])


@pytest.mark.slow
def test_training_survives_a_worker_failure_with_each_epoch_logged_once(
    ray_cluster, tracking_uri, tiny_csv, pretrained_encoder, tmp_path, monkeypatch
):
    """Rank 0 dies (os._exit) once, after logging epoch 2 and before reporting it; Ray Train restarts it."""
    from tagger.train import FAULT_ENV, train

    monkeypatch.setenv(FAULT_ENV, "1")  # 0-based epoch
    config = tiny_config(tiny_csv, pretrained_encoder, tmp_path, num_epochs=3, max_failures=1)
    result = train(config)
    assert (tmp_path / "ray" / "fault-injected").is_file()  # the worker really died once
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "resumed at epoch 2" in run.data.tags["mlflow.note.content"]
    for key in ("train_loss", "lr", "val_loss", "val_f1"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [0, 1, 2], key
    assert len(result.history) == 3
    names = {Path(a.path).name for a in client.list_artifacts(result.run_id, "checkpoint")}
    assert names == {"model.safetensors", "args.json", "class_to_index.json", "calibration.json"}  # no training state
    assert run.data.metrics["best_val_loss"] == pytest.approx(min(m["val_loss"] for m in result.history))


@pytest.mark.slow
def test_without_max_failures_a_worker_failure_fails_the_run(
    ray_cluster, tracking_uri, tiny_csv, pretrained_encoder, tmp_path, monkeypatch
):
    from tagger.train import FAULT_ENV, train

    monkeypatch.setenv(FAULT_ENV, "0")
    with pytest.raises(Exception, match="(?i)worker|actor|died|exit"):
        train(tiny_config(tiny_csv, pretrained_encoder, tmp_path, num_epochs=2, max_failures=0), run_name="no-retry")
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("tiny").experiment_id],
                                        "attributes.run_name = 'no-retry'")
    assert run.info.status == "FAILED"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [0]


@pytest.mark.slow
def test_sweep_makes_one_run_per_configuration_and_best_is_selected(
    ray_cluster, tracking_uri, tiny_csv, pretrained_encoder, tmp_path
):
    from tagger.runs import get_best_run_id

    from tagger.sweep import grid, sweep

    outcome = sweep(
        tiny_config(tiny_csv, pretrained_encoder, tmp_path, experiment_name="tiny-sweep", num_epochs=1),
        grid(lr=[3e-3, 1e-5], dropout_p=[0.0]),
    )
    runs = mlflow.search_runs(experiment_names=["tiny-sweep"])
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    assert set(runs["tags.sweep_id"]) == {outcome.sweep_id}
    assert set(runs["params.lr"]) == {"0.003", "1e-05"}
    losses = dict(zip(runs["run_id"], runs["metrics.val_loss"]))
    assert outcome.best.run_id == min(losses, key=losses.get) == get_best_run_id("tiny-sweep")


@pytest.mark.slow
def test_cli_train_takes_mlproject_flags_and_logs_into_mlflow_run_id(
    ray_cluster, tracking_uri, tiny_csv, pretrained_encoder, tmp_path, monkeypatch
):
    from tagger import cli

    client = MlflowClient()
    experiment_id = client.create_experiment("tiny-cli")
    parent = client.create_run(experiment_id, run_name="launched-by-mlflow-run")
    # As `mlflow run` does: the entry point's raw params are on the run before training starts.
    client.log_param(parent.info.run_id, "base_model", "")
    client.log_param(parent.info.run_id, "seed", "7.0")
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    # The MLproject's command line, with floats spelled as MLproject passes them.
    args = [
        "train", "--experiment-name", "tiny-cli", "--dataset-loc", str(tiny_csv), "--base-model", str(pretrained_encoder),
        "--num-epochs", "1.0", "--batch-size", "8.0", "--lr", "0.001", "--dropout-p", "0.1", "--num-workers", "1.0",
        "--cpu-per-worker", "1.0", "--seed", "7.0", "--storage-path", str(tmp_path / "ray"),
    ]
    outcome = CliRunner().invoke(cli.cli, args, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    assert f'"run_id": "{parent.info.run_id}"' in outcome.output
    run = client.get_run(parent.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["resolved.seed"] == "7"
    assert run.data.params["resolved.base_model"] == str(pretrained_encoder)
    assert run.data.tags["checkpoint_path"] == "checkpoint" and "val_loss" in run.data.metrics


def test_cli_train_reports_a_bad_dataset_in_one_line(tracking_uri, tmp_path):
    from tagger import cli

    path = tmp_path / "bad.csv"
    pd.DataFrame({"title": ["a"], "text": ["b"]}).to_csv(path, index=False)
    outcome = CliRunner().invoke(cli.cli, ["train", "--dataset-loc", str(path)])
    assert outcome.exit_code != 0
    assert "DatasetError" in outcome.output and "missing column(s) ['description', 'tag']" in outcome.output
