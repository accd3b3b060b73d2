"""The team stack: MLflow on PostgreSQL with artifacts on S3 (a moto server), a running Ray cluster.

The slow tests start real services (tests/services.py, each stopped by its PIDs) and drive tagger
as a user would, in subprocesses: `mlflow run` train on the cluster (RAY_ADDRESS, checkpoints on
s3://) -> package -> promote -> serve one request -> batch_predict from s3:// to s3://; then the
fallback past a run whose checkpoint is gone and a forced promotion past an unloadable champion.
The quick tests check the one-line errors (unreachable server or cluster, ray://) and the pieces.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from helpers import ROOT, build_tiny_checkpoint, build_tiny_encoder, log_training_run
from mlflow.tracking import MlflowClient

import services
from tagger.cli import cli
from tagger.config import PackageConfig
from tagger.errors import RunSelectionError
from tagger.package import package_best_run
from tagger.runs import select_checkpoint
from tagger.sessions import experiment_for_run, worker_environment
from tagger.train import storage_problem

BUCKET = "tagger-team"
TAGS = {"natural-language-processing", "computer-vision", "mlops", "other"}
WORDS = {
    "natural-language-processing": ["transformer", "bert", "language", "text"],
    "computer-vision": ["vision", "image", "detection", "video"],
    "mlops": ["pipeline", "deploy", "model"],
    "other": ["learning", "data"],
}


def labelled_csv(path: Path, rows_per_tag: int = 10) -> Path:
    """A small labelled CSV whose texts use each tag's own words."""
    rng = random.Random(0)
    rows = [{"title": " ".join(rng.choices(words, k=3)), "description": " ".join(rng.choices(words, k=4)), "tag": tag}
            for tag, words in WORDS.items() for _ in range(rows_per_tag)]
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------------- quick checks


def mlflow_requests(monkeypatch) -> list:
    """Record each request MLflow's REST client makes (and stop it there: against an unreachable server it
    would retry for minutes)."""
    from mlflow.utils import rest_utils

    made = []

    def request(*args, **kwargs):
        made.append(kwargs.get("endpoint"))
        raise ConnectionError("stopped by the test: MLflow's REST client was used")

    monkeypatch.setattr(rest_utils, "http_request", request)
    return made


def ray_inits(monkeypatch) -> list:
    """Record each ray.init (and stop it there)."""
    import ray

    made = []

    def init(*args, **kwargs):
        made.append(kwargs.get("address"))
        raise ConnectionError("stopped by the test: ray.init was called")

    monkeypatch.setattr(ray, "init", init)
    return made


def test_an_unreachable_tracking_server_is_one_line_naming_it_before_mlflow_retries(monkeypatch):
    port = services.free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    requests_made = mlflow_requests(monkeypatch)
    result = CliRunner().invoke(cli, ["package", "--experiment-name", "x"])
    assert requests_made == []  # refused by tagger's own bounded check, before MLflow's retrying client ran
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: ServiceError: MLflow tracking server http://127.0.0.1:{port} is not reachable: Connection refused "
        f"(tried 127.0.0.1:{port} for up to 10 s)"
    )


def test_an_unreachable_ray_address_from_the_option_or_ray_address_is_one_line_naming_it(tracking_uri, monkeypatch):
    port = services.free_port()
    joined = ray_inits(monkeypatch)
    given = CliRunner().invoke(cli, ["batch-predict", "--input", "in.csv", "--output", "out", "--address",
                                     f"127.0.0.1:{port}"])
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    from_env = CliRunner().invoke(cli, ["batch-predict", "--input", "in.csv", "--output", "out"])
    assert joined == []  # refused by tagger's own bounded check, before ray.init (which waits much longer)
    for result in (given, from_env):
        assert result.exit_code == 1
        assert result.output.strip() == (
            f"Error: ServiceError: Ray cluster at 127.0.0.1:{port} is not reachable: Connection refused "
            f"(tried 127.0.0.1:{port} for up to 10 s)"
        )


def test_a_ray_client_address_is_refused_clearly(tracking_uri):
    result = CliRunner().invoke(cli, ["batch-predict", "--input", "in.csv", "--output", "out", "--address",
                                      "ray://head:10001"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "Ray Client (ray://) is not supported" in result.output and "ray job submit" in result.output


def test_a_cluster_of_several_nodes_needs_shared_storage():
    assert "pass --storage-path s3://" in storage_problem(2, None)
    assert storage_problem(2, "s3://bucket/ray") is None and storage_problem(1, None) is None


def test_workers_get_the_drivers_mlflow_and_s3_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    env = worker_environment()
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"  # absolute: workers run elsewhere
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "UNRELATED_SETTING" not in env  # secrets: tagger.sessions.secret_hook


def test_training_under_mlflow_run_without_an_experiment_name_uses_the_experiment_of_its_run(tracking_uri, monkeypatch):
    client = MlflowClient()
    parent = client.create_run(client.create_experiment("named-by-mlflow-run"))
    assert experiment_for_run(client, "explicit") == "explicit"
    assert experiment_for_run(client, None) == "tagger"
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    assert experiment_for_run(client, None) == "named-by-mlflow-run"


def good_worse_and_moved_runs(tmp_path: Path, encoder: Path) -> tuple[str, str, str]:
    """Experiment 'exp': runs with val_loss 0.5, 0.9 and 0.1, the last one's artifacts gone (its store "moved")."""
    import shutil

    good = log_training_run("exp", build_tiny_checkpoint(tmp_path / "good", encoder, seed=0), 0.5)
    worse = log_training_run("exp", build_tiny_checkpoint(tmp_path / "worse", encoder, seed=1), 0.9)
    moved = log_training_run("exp", build_tiny_checkpoint(tmp_path / "moved", encoder, seed=2), 0.1)
    shutil.rmtree(mlflow.get_run(moved).info.artifact_uri.removeprefix("file://"))
    return good, worse, moved


def test_package_skips_runs_whose_checkpoint_is_gone(tracking_uri, tiny_encoder, tmp_path):
    good, _, moved = good_worse_and_moved_runs(tmp_path, tiny_encoder)
    config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder))
    run_id, _, local = select_checkpoint(config, tmp_path / "download")
    assert run_id == good and (local / "args.json").is_file()
    with pytest.raises(RunSelectionError, match=f"run {moved}: "):
        select_checkpoint(PackageConfig(experiment_name="exp", run_id=moved), tmp_path / "again")
    with pytest.raises(RunSelectionError, match="belongs to experiment 'exp', not 'other'"):
        select_checkpoint(PackageConfig(experiment_name="other", run_id=good), tmp_path / "other")


@pytest.mark.slow  # packages a model
def test_package_takes_the_run_it_is_given(tracking_uri, tiny_encoder, tmp_path):
    _, worse, _ = good_worse_and_moved_runs(tmp_path, tiny_encoder)
    version = package_best_run(PackageConfig(experiment_name="exp", base_model=str(tiny_encoder), run_id=worse))
    assert version.tags["source_run_id"] == worse


# --------------------------------------------------------------------------- the real team stack


@dataclass
class Stack:
    """The running services and what a client sets to use them."""

    tracking_uri: str
    s3: str
    ray: services.RayCluster
    logs: Path
    data: Path

    def env(self, **changes: str | None) -> dict[str, str]:
        """A client's environment: tracking server, S3 settings, RAY_ADDRESS (changes: None removes one)."""
        env = services.base_environment() | {
            "PATH": f"{services.BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": self.tracking_uri, "RAY_ADDRESS": self.ray.address,
            **services.s3_environment(self.s3),
        }
        env |= {key: value for key, value in changes.items() if value is not None}
        return {key: value for key, value in env.items() if changes.get(key, "") is not None}

    def s3_client(self):
        """A boto3 S3 client of the moto server."""
        return s3_client(self.s3)

    def keys(self, prefix: str) -> list[str]:
        """Object keys under a prefix of the bucket."""
        pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def delete(self, prefix: str) -> int:
        """Delete every object under a prefix (an artifact store that moved); returns how many."""
        keys = self.keys(prefix)
        for key in keys:
            self.s3_client().delete_object(Bucket=BUCKET, Key=key)
        return len(keys)

    def run(self, *command: str, timeout: float = 300, **env: str | None) -> subprocess.CompletedProcess:
        """Run a command as a client of the stack, from the project folder."""
        return subprocess.run(command, cwd=ROOT, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout)


def s3_client(endpoint: str):
    """A boto3 S3 client of an S3 endpoint, with the test credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


def artifact_prefix(uri: str) -> str:
    """The S3 key prefix behind an `mlflow-artifacts:/...` URI of this stack's server."""
    return "mlartifacts/" + uri.removeprefix("mlflow-artifacts:").lstrip("/")


def output_of(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a finished command, for an assertion message."""
    return f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    """PostgreSQL, moto (S3), `mlflow server` on both, and `ray start --head` (without MLflow/S3 settings)."""
    if not services.postgres_bin("initdb"):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's server programs are not installed (.ci/run installs them)")
        pytest.skip("PostgreSQL's server programs are not installed (apt-get install postgresql)")
    logs = tmp_path_factory.mktemp("team-stack")
    data = tmp_path_factory.mktemp("team-data")
    with contextlib.ExitStack() as running:
        database = running.enter_context(services.postgres())
        s3 = running.enter_context(services.moto_s3(logs))
        s3_client(s3).create_bucket(Bucket=BUCKET)
        tracking = running.enter_context(services.mlflow_server(
            database, f"s3://{BUCKET}/mlartifacts", services.s3_environment(s3), logs))
        cluster = running.enter_context(services.ray_head(2, {}, logs))
        yield Stack(tracking, s3, cluster, logs, data)


@pytest.fixture(scope="module")
def champion(stack) -> dict[str, str]:
    """`mlflow run` train on the cluster into experiment `team`, package it, promote it: ids and paths."""
    encoder = build_tiny_encoder(stack.data / "encoder")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig.from_pretrained(encoder)).save_pretrained(encoder)
    dataset = labelled_csv(stack.data / "projects.csv")
    drivers_before = len(list(stack.ray.temp_dir.glob("session_*/logs/python-core-driver-*")))
    trained = stack.run(
        sys.executable, "-m", "mlflow", "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name",
        "team", "-P", f"dataset_loc={dataset}", "-P", f"base_model={encoder}", "-P", "num_epochs=1",
        "-P", "batch_size=8", "-P", "cpu_per_worker=1", "-P", f"storage_path=s3://{BUCKET}/ray-storage",
    )
    assert trained.returncode == 0, output_of(trained)
    assert f"Ray: joined the cluster at {stack.ray.address}" in trained.stdout, output_of(trained)
    assert len(list(stack.ray.temp_dir.glob("session_*/logs/python-core-driver-*"))) > drivers_before
    run_id = re.search(r"=== Run \(ID '(\w+)'\) succeeded ===", trained.stderr).group(1)
    packaged = stack.run(sys.executable, "-m", "tagger", "package", "--experiment-name", "team")
    assert packaged.returncode == 0 and "Registered tagger version 1" in packaged.stdout, output_of(packaged)
    promoted = stack.run(sys.executable, "-m", "tagger", "promote", "--version", "1")
    assert promoted.returncode == 0, output_of(promoted)
    return {"run_id": run_id, "encoder": str(encoder), "dataset": str(dataset)}


@pytest.mark.slow
def test_mlflow_run_train_logs_one_run_with_checkpoints_on_s3(stack, champion):
    client = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    team = client.get_experiment_by_name("team")
    runs = [run for run in client.search_runs([team.experiment_id]) if "checkpoint_path" in run.data.tags]
    assert [run.info.run_id for run in runs] == [champion["run_id"]]  # the run `mlflow run` made, no other
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["checkpoint_path"] == "checkpoint"
    assert "best_val_loss" in runs[0].data.metrics
    assert client.search_runs(["0"]) == []  # nothing stray in Default
    assert stack.keys("ray-storage/")  # Ray Train's checkpoints went to the shared storage
    assert stack.keys(artifact_prefix(runs[0].info.artifact_uri) + "/checkpoint/")  # MLflow's artifacts on S3


@pytest.mark.slow
def test_the_champion_serves_and_batch_predicts_from_s3_to_s3_on_the_cluster(stack, champion):
    with services.model_server("models:/tagger@champion", stack.env(), stack.logs) as url:
        answer = requests.post(f"{url}/invocations", json={"dataframe_records": [
            {"title": "image detection", "description": "video vision"}]}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["prediction"] in TAGS
    s3 = stack.s3_client()
    for number in range(2):
        frame = pd.DataFrame({"id": range(number * 10, number * 10 + 10), "title": ["bert text"] * 10,
                              "description": ["language model"] * 10})
        s3.put_object(Bucket=BUCKET, Key=f"inputs/part-{number}.csv", Body=frame.to_csv(index=False).encode())
    result = stack.run(
        sys.executable, "-m", "mlflow", "run", ".", "-e", "batch_predict", "--env-manager", "local",
        "--experiment-name", "team-batch", "-P", f"input=s3://{BUCKET}/inputs/*.csv",
        "-P", f"output=s3://{BUCKET}/predictions/", "-P", f"ray_address={stack.ray.address}", RAY_ADDRESS=None,
    )
    assert result.returncode == 0, output_of(result)
    assert f"Ray: joined the cluster at {stack.ray.address}" in result.stdout and "Wrote 20 rows" in result.stdout
    options = {"client_kwargs": {"endpoint_url": stack.s3}, "key": "testing", "secret": "testing"}
    written = pd.read_parquet(f"s3://{BUCKET}/predictions/", storage_options=options)
    assert sorted(written["id"]) == list(range(20))  # every row, once
    assert set(written["prediction"]) <= TAGS and written["error"].isna().all()
    assert "predictions/_SUCCESS" in stack.keys("predictions/")
    assert not [key for key in stack.keys("") if "-incomplete-" in key]


@pytest.mark.slow
def test_package_skips_a_run_whose_checkpoint_is_gone_and_promote_forces_past_an_unloadable_champion(stack, champion):
    client = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    team = client.get_experiment_by_name("team").experiment_id
    gone = client.create_run(team, run_name="moved-away")  # the best run, but its artifacts are gone
    client.log_metric(gone.info.run_id, "best_val_loss", 0.0)
    client.log_artifacts(gone.info.run_id, str(build_tiny_checkpoint(
        stack.data / "gone", Path(champion["encoder"]), seed=3)), "checkpoint")
    client.set_tag(gone.info.run_id, "checkpoint_path", "checkpoint")
    client.set_terminated(gone.info.run_id)
    assert stack.delete(artifact_prefix(gone.info.artifact_uri)) > 0
    packaged = stack.run(sys.executable, "-m", "tagger", "package", "--experiment-name", "team")
    assert packaged.returncode == 0, output_of(packaged)
    assert f"Skipping run {gone.info.run_id}: " in packaged.stdout
    assert "Registered tagger version 2" in packaged.stdout and champion["run_id"] in packaged.stdout
    chosen = stack.run(sys.executable, "-m", "tagger", "package", "--experiment-name", "team", "--run-id",
                       gone.info.run_id)
    assert chosen.returncode == 1 and chosen.stderr.strip().startswith(f"Error: RunSelectionError: run {gone.info.run_id}")
    assert len(chosen.stderr.strip().splitlines()) == 1, output_of(chosen)

    first = client.get_model_version_download_uri("tagger", "1")
    assert stack.delete(artifact_prefix(first)) > 0, first  # the champion can no longer be loaded
    gate = ("--version", "2", "--eval-dataset", champion["dataset"])
    refused = stack.run(sys.executable, "-m", "tagger", "promote", *gate)
    assert refused.returncode == 1, output_of(refused)
    assert "the champion (tagger version 1) cannot be loaded" in refused.stderr and "--force" in refused.stderr
    assert client.get_model_version_by_alias("tagger", "champion").version == "1"
    forced = stack.run(sys.executable, "-m", "tagger", "promote", *gate, "--force")
    assert forced.returncode == 0, output_of(forced)
    assert "Gate forced" in forced.stdout and "version 1 cannot be loaded" in forced.stdout
    assert client.get_model_version_by_alias("tagger", "champion").version == "2"
    assert client.get_model_version("tagger", "2").tags["gate.decision"] == "forced"
