"""The MLflow and Ray sessions every command shares: tracking URI, experiment, run, Ray connection."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# What Ray workers on another machine need to import: the served model's code and this package.
RUNTIME_PACKAGE = Path(__file__).resolve().parents[2] / "mlflow_model"
BUILD_PACKAGE = Path(__file__).resolve().parent


def absolute_tracking_uri(uri: str) -> str:
    """The tracking URI with a relative sqlite/file path made absolute (Ray workers run elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + os.path.abspath(uri[len("file:"):])
    if "://" not in uri and not uri.startswith(("databricks", "file:", "sqlite:")):
        return os.path.abspath(uri)
    return uri


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the experiment, created if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def open_run(
    client: MlflowClient, experiment_name: str, run_name: str | None, tags: dict[str, str], reuse_parent: bool = True
) -> tuple[str, str, bool]:
    """(run_id, experiment_id, owned): the MLflow run a training logs into.

    An active run or MLFLOW_RUN_ID (set by `mlflow run`) in the same experiment is used as it is
    (with reuse_parent); otherwise a new run is made in `experiment_name`, nested under that
    parent when they share the experiment. `owned`: the caller ends the run.
    """
    active = mlflow.active_run()
    parent_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
    experiment = experiment_id(client, experiment_name)
    parent = client.get_run(parent_id) if parent_id else None
    same_experiment = parent is not None and parent.info.experiment_id == experiment
    if reuse_parent and same_experiment:
        for key, value in tags.items():
            client.set_tag(parent_id, key, value)
        return parent_id, experiment, active is None
    run_tags = dict(tags)
    if same_experiment:
        run_tags["mlflow.parentRunId"] = parent_id
    elif parent is not None:
        run_tags["launched_by_run_id"] = parent_id
        print(
            f"MLflow run {parent_id} belongs to another experiment; training logs a new run into "
            f"experiment {experiment_name!r}"
        )
    run = client.create_run(experiment, run_name=run_name, tags=run_tags)
    if parent is not None and not same_experiment:
        client.set_tag(parent_id, "training_run_id", run.info.run_id)
    return run.info.run_id, experiment, True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Join the Ray at `address`, or start a local Ray (no dashboard, no usage stats); yields True if local.

    A no-op when this process is already connected. A local Ray started here is shut down at the
    end; a joined cluster is left running, its workers given both packages through the runtime env.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if address is None:  # local workers import both packages from this environment
        options: dict[str, Any] = {"num_cpus": max(os.cpu_count() or 1, num_cpus or 0), "include_dashboard": False}
    else:
        options = {"runtime_env": {"py_modules": [str(RUNTIME_PACKAGE), str(BUILD_PACKAGE)]}}
    ray.init(address=address, logging_level="warning", **options)
    try:
        yield address is None
    finally:
        if address is None:
            ray.shutdown()
