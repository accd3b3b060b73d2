"""What a user reads in MLflow: run names and descriptions, links between runs and versions, inputs, no local paths.

The end-to-end test trains through the CLI (its own local Ray, quiet output), then packages,
evaluates and promotes on a real sqlite store and registry.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, build_tiny_encoder, write_tiny_csv
from mlflow.tracking import MlflowClient
from transformers import BertConfig, BertModel

from tagger.cli import QUIET_ENV, configure_output
from tagger.config import DEFAULT_ENCODER_NAME, TrainConfig, default_base_model
from tagger.records import dataset_name, encoder_name, short_number, train_run_name
from tagger.registry import version_headline

NAME = "tagger"


# ---------------------------------------------------------------------------- names (no Ray)


def test_encoders_are_named_by_their_name_never_their_path(tmp_path):
    assert encoder_name(default_base_model()) == DEFAULT_ENCODER_NAME  # the bundled one, wherever installed
    assert encoder_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    saved_from_hub = tmp_path / "snapshot"
    saved_from_hub.mkdir()
    (saved_from_hub / "config.json").write_text(json.dumps({"_name_or_path": "bert-base-uncased"}))
    assert encoder_name(str(saved_from_hub)) == "bert-base-uncased"
    (saved_from_hub / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    assert encoder_name(str(saved_from_hub)) == "snapshot"  # a recorded local path is not a name
    assert encoder_name(str(tmp_path / "no-config")) == "no-config"


def test_run_names_and_dataset_names():
    assert [short_number(v) for v in (1e-4, 3e-3, 2.5e-5, 0.5, 0.01)] == ["1e-4", "3e-3", "2.5e-5", "0.5", "0.01"]
    assert train_run_name(TrainConfig()) == "train-all-MiniLM-L6-v2-lr1e-4-bs32-ep5"
    assert dataset_name("/data/sets/holdout.csv") == "holdout.csv"
    assert dataset_name("https://example.org/data/holdout.csv") == "https://example.org/data/holdout.csv"


def test_version_headline_names_run_encoder_epochs_loss_and_f1_once_known():
    tags = {"training_run": "train-x", "encoder": "org/enc", "num_epochs": "5", "val_loss": "0.31234",
            "selected_by": "val_loss ASC"}
    expected = "val_loss 0.3123 (not evaluated yet) — org/enc fine-tuned for 5 epochs in run `train-x`."
    assert version_headline(tags) == expected
    evaluated = version_headline(tags | {"eval.f1": "0.9", "eval.dataset": "holdout.csv", "num_epochs": "1"})
    assert evaluated == "F1 0.9000 on holdout.csv, val_loss 0.3123 — org/enc fine-tuned for 1 epoch in run `train-x`."


def test_quiet_unless_verbose(monkeypatch):
    for name in QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    configure_output(verbose=True)
    assert not any(name in os.environ for name in QUIET_ENV)
    configure_output(verbose=False)
    assert {name: os.environ[name] for name in QUIET_ENV} == QUIET_ENV


# ---------------------------------------------------------------------------- train -> package -> evaluate -> promote


def local_paths(tmp_path: Path, encoder: Path) -> tuple[str, ...]:
    """Prefixes no description or tag may hold."""
    return str(tmp_path), str(encoder), str(ROOT), sys.prefix, str(Path(default_base_model()).parent)


def readable_texts(client: MlflowClient, experiment_id: str) -> dict[str, str]:
    """Every description and tag a user reads: registered model, its versions, the runs (system tags aside)."""
    model = client.get_registered_model(NAME)
    texts = {"model description": model.description or ""} | {f"model tag {k}": v for k, v in model.tags.items()}
    for version in client.search_model_versions(f"name = '{NAME}'"):
        texts[f"v{version.version} description"] = version.description or ""
        texts |= {f"v{version.version} tag {k}": v for k, v in version.tags.items()}
    for run in client.search_runs([experiment_id]):
        texts |= {f"{run.info.run_name} tag {k}": v for k, v in run.data.tags.items()
                  if not k.startswith("mlflow.") or k == "mlflow.note.content"}
    return texts


@pytest.mark.slow
def test_a_user_reads_names_descriptions_links_and_inputs(tmp_path, tracking_uri):

    from tagger.evaluate import evaluate_model
    from tagger.gate import gated_promote
    from tagger.package import package_best_run
    from tagger.config import PackageConfig

    encoder = build_tiny_encoder(tmp_path / "tiny-bert")
    BertModel(BertConfig.from_pretrained(encoder)).save_pretrained(encoder)
    train_csv, holdout = write_tiny_csv(tmp_path / "projects.csv"), write_tiny_csv(tmp_path / "holdout.csv", 3, seed=5)
    command = [sys.executable, "-m", "tagger", "train", "--experiment-name", "records", "--dataset-loc", str(train_csv),
               "--base-model", str(encoder), "--num-epochs", "2", "--batch-size", "8", "--lr", "1e-3",
               "--cpu-per-worker", "1", "--storage-path", str(tmp_path / "ray")]
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV} | {"MLFLOW_TRACKING_URI": tracking_uri}
    trained = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-3000:]
    assert "epoch 1/2:" in output and "epoch 2/2:" in output  # the progress a user wants stays
    # Ray's internal lines are hidden. (Not Ray's own traceback when PlacementGroupCleaner finds several Ray
    # instances on one machine, as on a shared box: that one is printed whatever the log level.)
    for noise in ("Failed to query Ray Train Controller", "Token authentication", "Requesting resources",
                  "Reporting training result", "Checkpoint successfully created", "Loading weights"):
        assert noise not in output, noise

    version = package_best_run(PackageConfig(experiment_name="records"))
    evaluation = evaluate_model(f"models:/{NAME}/{version.version}", str(holdout))
    gated_promote(NAME, str(version.version), str(holdout))

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("records").experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment_id])}
    assert set(runs) == {"train-tiny-bert-lr1e-3-bs8-ep2", "package-tagger-v1", "evaluate-tagger-v1-holdout.csv",
                         "promote-tagger-v1"}  # the gate's evaluation is nested under the promote run, same name
    assert all(run.data.tags.get("mlflow.note.content") for run in runs.values())
    training = runs["train-tiny-bert-lr1e-3-bs8-ep2"]
    assert training.data.tags["registered_versions"] == "tagger v1"  # the link back from the training run
    assert sorted((d.dataset.name, d.tags[0].value) for d in training.inputs.dataset_inputs) == [
        ("projects.csv", "training"), ("projects.csv", "validation")]
    for name in ("package-tagger-v1", "evaluate-tagger-v1-holdout.csv", "promote-tagger-v1"):
        assert runs[name].data.tags["model_version"] == "1", name
    assert [d.dataset.name for d in runs["evaluate-tagger-v1-holdout.csv"].inputs.dataset_inputs] == ["holdout.csv"]
    checkpoint = {Path(a.path).name for a in client.list_artifacts(training.info.run_id, "checkpoint")}
    assert checkpoint == {"model.safetensors", "args.json", "class_to_index.json", "calibration.json"}  # one weights file

    model = client.get_registered_model(NAME)
    for words in ("`title`", "`description`", "`prediction`", "`probabilities`", "`threshold` (default 0.0)",
                  "`batch_size` (default 64)", "models:/tagger@champion", "`natural-language-processing`"):
        assert words in model.description, words
    assert model.tags["labels"] == "computer-vision, mlops, natural-language-processing, other"
    headline = client.get_model_version(NAME, "1").description.splitlines()[0]
    assert headline.startswith(f"F1 {evaluation['overall']['f1']:.4f}, ECE {evaluation['calibration']['ece']:.4f} "
                               "on holdout.csv ([evaluation report](#/experiments/")
    assert headline.endswith(" — tiny-bert fine-tuned for 2 epochs in run `train-tiny-bert-lr1e-3-bs8-ep2`.")
    assert "**Registered as**: [tagger v1](#/models/tagger/versions/1)" in training.data.tags["mlflow.note.content"]

    paths = local_paths(tmp_path, encoder)
    texts = readable_texts(client, experiment_id)
    assert not {where: text for where, text in texts.items() if any(p in text for p in paths)}
