"""Pick the best run of an experiment and fetch its best checkpoint through MLflow's artifact API."""
from __future__ import annotations

import csv
import math
import posixpath
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_model.checkpoint import ARGS_FILE, SAFETENSORS_FILE, TORCH_FILE
from tagger.config import BEST_PREFIX, CHECKPOINT_TAG, ENCODER_ARTIFACT_TAG, PackageConfig
from tagger.errors import RunSelectionError, one_line
from tagger.sessions import shown_uri

RAY_PROGRESS_FILE = "progress.csv"  # Ray trial folders: one row per report, with checkpoint_dir_name
_MAX_DEPTH = 4


def trained_param(params: dict[str, str], name: str) -> str | None:
    """A training param as resolved by the trainer (`resolved.` first, see tagger.train.run_params)."""
    return params.get(f"resolved.{name}") or params.get(name) or None


def ranking_key(metrics: Mapping[str, float], metric: str) -> str:
    """The key a run is ranked by: `best_<metric>` (its best epoch's, which its checkpoint holds) if it has one,
    else `<metric>` itself (its latest value: Made With ML's runs, or a metric that has no best_ summary)."""
    best = f"{BEST_PREFIX}{metric}"
    return best if best in metrics else metric


def ranking_value(metrics: Mapping[str, float], metric: str) -> float:
    """The value a run is ranked by (see ranking_key)."""
    return metrics[ranking_key(metrics, metric)]


def _ranking_values(runs: pd.DataFrame, metric: str) -> pd.Series:
    """Per run of a search_runs frame: metrics.best_<metric> where logged, else metrics.<metric>."""
    missing = pd.Series(float("nan"), index=runs.index)
    best, latest = runs.get(f"metrics.{BEST_PREFIX}{metric}", missing), runs.get(f"metrics.{metric}", missing)
    return best.where(best.notna(), latest)


def get_best_run_id(experiment_name: str, metric: str = "val_loss", mode: str = "ASC") -> str:
    """Id of the finished run with the best value of `metric` (ASC: lowest first), by ranking_value."""
    return ranked_run_ids(experiment_name, metric, mode)[0]


def ranked_run_ids(experiment_name: str, metric: str = "val_loss", mode: str = "ASC") -> list[str]:
    """Ids of the finished runs that logged `metric`, best first (by ranking_value; ties: newest first)."""
    mode = mode.upper()
    if mode not in ("ASC", "DESC"):
        raise RunSelectionError(f"mode must be ASC or DESC, got {mode!r}")
    if mlflow.get_experiment_by_name(experiment_name) is None:
        raise RunSelectionError(f"experiment {experiment_name!r} does not exist at {shown_uri(mlflow.get_tracking_uri())}")
    runs = mlflow.search_runs(experiment_names=[experiment_name], filter_string="attributes.status = 'FINISHED'")
    if runs.empty:
        raise RunSelectionError(f"experiment {experiment_name!r} has no finished runs")
    values = _ranking_values(runs, metric).dropna()
    if values.empty:
        raise RunSelectionError(f"no finished run of {experiment_name!r} logged the metric {metric!r}")
    ranked = values.sort_values(ascending=mode == "ASC", kind="stable")  # stable: ties keep search_runs' newest-first
    return [str(runs.loc[index, "run_id"]) for index in ranked.index]


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


def fetch_checkpoint(run_id: str, metric: str, mode: str, dst: str | Path) -> tuple[str, Path]:
    """(artifact path, local copy) of the run's best checkpoint, checked to hold args.json and weights."""
    artifact_path = find_checkpoint(run_id, metric, mode)
    local = download_checkpoint(run_id, artifact_path, dst)
    names = {path.name for path in local.iterdir()} if local.is_dir() else set()
    if ARGS_FILE not in names or not names & {SAFETENSORS_FILE, TORCH_FILE}:
        raise RunSelectionError(
            f"run {run_id}: the download of '{artifact_path}' holds no {ARGS_FILE} with {SAFETENSORS_FILE} or "
            f"{TORCH_FILE} (found {sorted(names) or 'nothing'}); were its artifacts moved or deleted?"
        )
    return artifact_path, local


def check_chosen_run(run_id: str, experiment_name: str, metric: str) -> None:
    """Refuse a run named with --run-id that does not exist, is in another experiment or lacks the metric."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise RunSelectionError(f"run {run_id} does not exist at {shown_uri(mlflow.get_tracking_uri())}") from error
    experiment = client.get_experiment(run.info.experiment_id).name
    if experiment != experiment_name:
        raise RunSelectionError(f"run {run_id} belongs to experiment {experiment!r}, not {experiment_name!r}")
    if ranking_key(run.data.metrics, metric) not in run.data.metrics:
        raise RunSelectionError(f"run {run_id} has no metric {metric!r} (nor {BEST_PREFIX}{metric})")


def fetch_or_explain(run_id: str, config: PackageConfig, dst: str | Path) -> tuple[str, Path]:
    """fetch_checkpoint, any failure turned into a RunSelectionError naming the run and why."""
    try:
        return fetch_checkpoint(run_id, config.metric, config.mode, Path(dst) / run_id)
    except Exception as error:  # any store error: a moved bucket, deleted objects, a stale tag, a missing folder
        raise RunSelectionError(f"run {run_id}: its checkpoint cannot be downloaded: {one_line(error)}") from error


def select_checkpoint(config: PackageConfig, dst: str | Path) -> tuple[str, str, Path]:
    """(run id, checkpoint artifact path, local copy): config.run_id's, else the best run whose checkpoint
    downloads; each run skipped is printed with the reason."""
    if config.run_id:
        check_chosen_run(config.run_id, config.experiment_name, config.metric)
        return config.run_id, *fetch_or_explain(config.run_id, config, dst)
    skipped = []
    for run_id in ranked_run_ids(config.experiment_name, config.metric, config.mode):
        try:
            return run_id, *fetch_or_explain(run_id, config, dst)
        except RunSelectionError as error:
            skipped.append(error.message)
            print(f"Skipping {error.message}", flush=True)
    raise RunSelectionError(
        f"no finished run of {config.experiment_name!r} has a checkpoint that can be downloaded ({'; '.join(skipped)})"
    )


def run_encoder(run: Run, dst: str | Path) -> str | None:
    """Local copy of the encoder folder a run logged as its own (a distilled student's, tag `encoder_artifact`),
    or None when the run trained a stock encoder (its `base_model` param names it)."""
    path = run.data.tags.get(ENCODER_ARTIFACT_TAG)
    if not path:
        return None
    try:
        return mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path, dst_path=str(dst))
    except MlflowException as error:
        raise RunSelectionError(f"run {run.info.run_id} has no encoder at artifact path '{path}': {error.message}") from error
