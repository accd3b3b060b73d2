"""Pick the best run of an experiment and fetch its best checkpoint through MLflow's artifact API."""
from __future__ import annotations

import csv
import math
import posixpath
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_model.checkpoint import ARGS_FILE, SAFETENSORS_FILE, TORCH_FILE
from tagger.config import CHECKPOINT_TAG
from tagger.errors import RunSelectionError

RAY_PROGRESS_FILE = "progress.csv"  # Ray trial folders: one row per report, with checkpoint_dir_name
_MAX_DEPTH = 4


def get_best_run_id(experiment_name: str, metric: str = "val_loss", mode: str = "ASC") -> str:
    """Id of the finished run with the best value of `metric` (ASC: lowest first)."""
    mode = mode.upper()
    if mode not in ("ASC", "DESC"):
        raise RunSelectionError(f"mode must be ASC or DESC, got {mode!r}")
    if mlflow.get_experiment_by_name(experiment_name) is None:
        raise RunSelectionError(f"experiment {experiment_name!r} does not exist at {mlflow.get_tracking_uri()}")
    runs = mlflow.search_runs(
        experiment_names=[experiment_name],
        filter_string="attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{metric}` {mode}"],
    )
    if runs.empty:
        raise RunSelectionError(f"experiment {experiment_name!r} has no finished runs")
    column = f"metrics.{metric}"
    if column not in runs.columns or runs[column].isna().all():
        raise RunSelectionError(f"no finished run of {experiment_name!r} logged the metric {metric!r}")
    return str(runs.dropna(subset=[column]).iloc[0]["run_id"])


def _checkpoint_dirs(client: MlflowClient, run_id: str, path: str | None = None, depth: int = 0) -> list[str]:
    """Artifact paths of folders that hold args.json and weights, searched a few levels deep."""
    entries = client.list_artifacts(run_id, path)
    names = {posixpath.basename(e.path) for e in entries if not e.is_dir}
    found = [path or ""] if ARGS_FILE in names and names & {SAFETENSORS_FILE, TORCH_FILE} else []
    if depth < _MAX_DEPTH:
        for entry in entries:
            if entry.is_dir:
                found += _checkpoint_dirs(client, run_id, entry.path, depth + 1)
    return found


def _best_by_ray_progress(
    client: MlflowClient, run_id: str, candidates: list[str], metric: str, mode: str
) -> str | None:
    """Among Ray checkpoint folders, the one whose report in progress.csv has the best metric."""
    parents = {posixpath.dirname(c) for c in candidates}
    if len(parents) != 1:
        return None
    parent = parents.pop()
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=posixpath.join(parent, RAY_PROGRESS_FILE) if parent else RAY_PROGRESS_FILE
        )
    except Exception:  # no progress.csv in this run: the caller reports the ambiguity
        return None
    scores = {}
    with open(local, newline="") as handle:
        for row in csv.DictReader(handle):
            name, value = row.get("checkpoint_dir_name"), row.get(metric)
            if name and value not in (None, ""):
                scores[posixpath.join(parent, name) if parent else name] = float(value)
    scored = [c for c in candidates if c in scores and not math.isnan(scores[c])]
    if not scored:
        return None
    return (min if mode.upper() == "ASC" else max)(scored, key=scores.__getitem__)


def find_checkpoint(run_id: str, metric: str = "val_loss", mode: str = "ASC") -> str:
    """Artifact path of the run's best checkpoint: its `checkpoint_path` tag, else a search."""
    client = MlflowClient()
    tagged = client.get_run(run_id).data.tags.get(CHECKPOINT_TAG)
    if tagged:
        return tagged
    candidates = _checkpoint_dirs(client, run_id)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise RunSelectionError(
            f"run {run_id} has no checkpoint artifact (a folder with {ARGS_FILE} and "
            f"{SAFETENSORS_FILE} or {TORCH_FILE})"
        )
    best = _best_by_ray_progress(client, run_id, candidates, metric, mode)
    if best is None:
        raise RunSelectionError(
            f"run {run_id} has several checkpoints {sorted(candidates)} and no {RAY_PROGRESS_FILE} "
            f"to rank them; set the run tag {CHECKPOINT_TAG!r} to the one to package"
        )
    return best


def download_checkpoint(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Local copy of a run's checkpoint folder, from any artifact store MLflow supports."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path or None, dst_path=str(dst))
    except MlflowException as error:  # e.g. a stale checkpoint_path tag
        raise RunSelectionError(f"run {run_id} has no checkpoint at artifact path '{artifact_path}': {error.message}") from error
    return Path(local)
