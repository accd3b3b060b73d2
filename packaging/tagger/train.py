"""Fine-tune the classifier with Ray Train (V2 TorchTrainer) and record the run in MLflow.

The driver (`train`) reads and splits the data, tokenizes it with the serving code's own
preprocessing (`mlflow_model.preprocess`), opens one MLflow run and starts the TorchTrainer,
whose workers run `tagger.train_loop`. After `fit()` the driver logs the best checkpoint as the
run's `checkpoint/` artifacts and points the run tag `checkpoint_path` at it, which is what
`tagger.runs` reads.

Metrics, at step = epoch (0-based): `train_loss`, `lr`, `val_loss`, `val_accuracy`,
`val_precision`, `val_recall`, `val_f1` (weighted), and calibration: `temperature` (fitted on the
validation rows, stored in that epoch's checkpoint as `calibration.json`), `val_ece` before and
`val_ece_calibrated` after it, `val_loss_calibrated`; each curve ends at the last epoch. Once
training ends, the best epoch's values (those of the checkpoint the run holds) are logged under
their own keys, `best_val_loss`, `best_val_f1`, ... (`tagger.runs` ranks runs by them); the tags
`best_epoch`, `train_seconds` and `loop_seconds` say which epoch that was and how long it took. The run is named
`train-<encoder>-lr<lr>-bs<batch>-ep<epochs>`, its training and validation rows are logged as
inputs, and its description says what it trained and how it went.

Ray Train restarts the workers after a failure (`max_failures` times) from the last reported
checkpoint; `tagger.train_loop` then goes on from that epoch.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from mlflow_model.config import CHECKPOINT_ARTIFACT
from tagger.config import BEST_PREFIX, CHECKPOINT_TAG, SCHEDULERS, SHIPPED_DATASET, TrainConfig, default_base_model
from tagger.data import class_to_index, load_data, stratified_split
from tagger.errors import DatasetError, TrainConfigError, TrainingError
from tagger.records import dataset_name, encoder_name, log_dataset, plural, set_note, short_number, train_run_name
from tagger.sessions import absolute_tracking_uri, experiment_for_run, open_run, ray_session, shown_uri

VAL_METRICS = ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_ece", "val_ece_calibrated",
               "val_loss_calibrated", "temperature")
FAULT_ENV = "TAGGER_FAIL_ONCE_AT_EPOCH"  # tests: rank 0 exits once at this (0-based) epoch, to exercise recovery


@dataclass
class TrainResult:
    """What one training run produced."""

    run_id: str
    experiment_id: str
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    train_seconds: float  # wall time of TorchTrainer.fit (worker start, model load, all epochs)
    loop_seconds: float  # time inside the epochs loop of the rank 0 worker
    loop_cpu_seconds: float  # CPU time of that loop, all threads (~ loop_seconds x threads on an idle CPU)
    train_rows: int
    val_rows: int
    class_to_index: dict[str, int] = field(default_factory=dict)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill in the defaults (dataset, encoder) and check the values a typo could break."""
    if not config.dataset_loc and not SHIPPED_DATASET.is_file():
        raise DatasetError(f"no --dataset-loc given and the default dataset {SHIPPED_DATASET} does not exist")
    problems = []
    if config.scheduler not in SCHEDULERS:
        problems.append(f"scheduler must be one of {SCHEDULERS}, got {config.scheduler!r}")
    for name in ("num_epochs", "batch_size", "num_workers", "cpu_per_worker", "max_length"):
        if int(getattr(config, name)) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:
        problems.append(f"lr must be positive, got {config.lr}")
    if not 0.0 <= config.dropout_p < 1.0:
        problems.append(f"dropout_p must be in [0, 1), got {config.dropout_p}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        problems.append(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if int(config.max_failures) < 0:
        problems.append(f"max_failures must be at least 0, got {config.max_failures}")
    if problems:
        raise TrainConfigError("; ".join(problems))
    return config.replace(
        dataset_loc=config.dataset_loc or str(SHIPPED_DATASET), base_model=config.base_model or default_base_model()
    )


def load_split(config: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The dataset, checked and split into training and validation rows (stratified, seeded)."""
    frame = load_data(config.dataset_loc, config.num_samples)
    return stratified_split(frame, config.val_size, config.seed)


def prepare_data(config: TrainConfig, split: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> dict[str, Any]:
    """Tokenize the split (default: load_split) as serving does, with the label map. Runs on the driver."""
    from transformers import AutoConfig, AutoTokenizer

    from mlflow_model.preprocess import configure_tokenizer, prepare_texts, tokenize

    train_frame, val_frame = split or load_split(config)
    labels = class_to_index(pd.concat([train_frame["tag"], val_frame["tag"]]))
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    encoder_config = AutoConfig.from_pretrained(config.base_model)
    max_length = min(
        config.max_length, tokenizer.model_max_length, getattr(encoder_config, "max_position_embeddings", 10**9)
    )
    fast = configure_tokenizer(tokenizer.backend_tokenizer, max_length)  # what the served model loads
    return {
        "class_to_index": labels,
        "max_length": int(max_length),
        "pad_id": int(tokenizer.pad_token_id or 0),
        "train_ids": tokenize(fast, prepare_texts(train_frame)),
        "train_labels": [labels[t] for t in train_frame["tag"]],
        "val_ids": tokenize(fast, prepare_texts(val_frame)),
        "val_labels": [labels[t] for t in val_frame["tag"]],
    }


def run_params(client: MlflowClient, run_id: str, config: TrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    """The run's params; a value that differs from one `mlflow run` already logged goes under `resolved.`."""
    where = ("storage_path", "experiment_name", "ray_address")  # where it runs and logs, not how it trains
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in where}
    params |= {
        "encoder": encoder_name(config.base_model),
        "max_length": data["max_length"],
        "train_rows": len(data["train_ids"]),
        "val_rows": len(data["val_ids"]),
        "num_classes": len(data["class_to_index"]),
    }
    logged = client.get_run(run_id).data.params
    return {(f"resolved.{k}" if k in logged and logged[k] != str(v) else k): v for k, v in params.items()}


def ray_log_level() -> str:
    """The level of Ray's own log lines: RAY_LOGGER_LEVEL (tagger's CLI sets "error" unless --verbose), else INFO."""
    return os.environ.get("RAY_LOGGER_LEVEL", "info").upper()


def make_trainer(config: TrainConfig, loop_config: dict[str, Any], storage: str, run_id: str) -> Any:
    """The TorchTrainer: one worker group, keeping the best checkpoint by val_loss (and the latest, to resume)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tagger.train_loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=False, resources_per_worker={"CPU": config.cpu_per_worker}
        ),
        run_config=RunConfig(
            name=f"tagger-{run_id[:12]}",
            storage_path=storage if "://" in storage else os.path.abspath(storage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=LoggingConfig(log_level=ray_log_level()),
        ),
    )


def log_best_checkpoint(client: MlflowClient, run_id: str, result: Any) -> None:
    """Log the best checkpoint's model files under `checkpoint/` (not its training state) and tag the run."""
    from tagger.train_loop import TRAINING_STATE_FILE

    checkpoint = result.get_best_checkpoint("val_loss", "min") or result.checkpoint
    if checkpoint is None:
        raise TrainingError("training reported no checkpoint: no epoch finished; see the Ray Train log above")
    with checkpoint.as_directory() as folder:
        for path in sorted(os.scandir(folder), key=lambda entry: entry.name):
            if path.is_file() and path.name != TRAINING_STATE_FILE:
                client.log_artifact(run_id, path.path, CHECKPOINT_ARTIFACT)
    client.set_tag(run_id, CHECKPOINT_TAG, CHECKPOINT_ARTIFACT)


def log_summary(client: MlflowClient, run_id: str, summary: dict[str, Any], train_seconds: float, epochs: int) -> None:
    """The best epoch's metrics under best_* keys (one value each); which epoch it was and the timings as tags."""
    best = summary["best_epoch"]
    now = int(time.time() * 1000)
    tags = {"best_epoch": f"{best + 1} of {epochs} (step {best})", "train_seconds": f"{train_seconds:.1f}",
            "loop_seconds": f"{summary['loop_seconds']:.1f}"}
    client.log_batch(
        run_id,
        metrics=[Metric(f"{BEST_PREFIX}{k}", float(summary["best"][k]), now, best) for k in VAL_METRICS],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


def fault_injection(storage: str) -> dict[str, Any]:
    """The loop config entry that makes rank 0 exit once, if FAULT_ENV is set (tests of recovery)."""
    from tagger.train_loop import FAULT_KEY

    epoch = os.environ.get(FAULT_ENV)
    return {FAULT_KEY: {"epoch": int(epoch), "marker": os.path.join(storage, "fault-injected")}} if epoch else {}


def storage_problem(alive_nodes: int, storage_path: str | None) -> str | None:
    """Why this storage cannot hold a run's checkpoints (None: it can): several nodes need shared storage."""
    if alive_nodes > 1 and not storage_path:
        return (
            f"the Ray cluster has {alive_nodes} nodes, so Ray Train's checkpoints need storage that every node reaches: "
            "pass --storage-path s3://bucket/prefix (or a shared filesystem mounted at the same path on every node)"
        )
    return None


def check_shared_storage(storage_path: str | None) -> None:
    """Refuse, before training starts, a multi-node cluster without a storage path."""
    import ray

    problem = storage_problem(sum(1 for node in ray.nodes() if node["Alive"]), storage_path)
    if problem:
        raise TrainConfigError(problem)


def fit(config: TrainConfig, loop_config: dict[str, Any], client: MlflowClient, run_id: str) -> tuple[dict, float]:
    """Run the TorchTrainer on Ray, log its best checkpoint; returns (worker summary, fit seconds)."""
    storage = config.storage_path or tempfile.mkdtemp(prefix="tagger-ray-")
    try:
        loop_config = loop_config | fault_injection(storage) | {"log_level": ray_log_level()}
        trainer = make_trainer(config, loop_config, storage, run_id)
        with ray_session(config.ray_address, num_cpus=config.num_workers * config.cpu_per_worker):
            check_shared_storage(config.storage_path)
            started = time.perf_counter()
            result = trainer.fit()
            seconds = time.perf_counter() - started
        if result.error:
            raise result.error
        log_best_checkpoint(client, run_id, result)
        return result.return_value or {}, seconds
    finally:
        if not config.storage_path:
            shutil.rmtree(storage, ignore_errors=True)


def describe_training(config: TrainConfig, data: dict[str, Any]) -> str:
    """The run's description before training: what it fine-tunes, on what, how."""
    rows = f"{len(data['train_ids'])} training / {len(data['val_ids'])} validation rows"
    return (
        f"Fine-tunes **{encoder_name(config.base_model)}** to tag ML projects on `{dataset_name(config.dataset_loc)}` "
        f"({rows}) for {plural(config.num_epochs, 'epoch')} (lr {short_number(config.lr)}, batch {config.batch_size}, "
        f"{config.scheduler} schedule) on Ray Train ({plural(config.num_workers, 'worker')})."
    )


def describe_result(summary: dict[str, Any], config: TrainConfig, train_seconds: float) -> str:
    """The lines added to the description once training ends: best epoch, its scores, the checkpoint."""
    best, epoch = summary["best"], summary["best_epoch"]
    resumed = summary.get("resumed_at_epoch")
    recovery = f" Recovered from a worker failure (resumed at epoch {resumed + 1})." if resumed is not None else ""
    return (
        f"Best epoch {epoch + 1} of {config.num_epochs} (step {epoch} in the charts): val_loss {best['val_loss']:.4f}, "
        f"val_f1 {best['val_f1']:.4f} (metrics `{BEST_PREFIX}*`), its checkpoint in artifacts "
        f"`{CHECKPOINT_ARTIFACT}/`; trained in {train_seconds / 60:.1f} min.{recovery} "
        f"Calibrated with temperature {best['temperature']:.3f} (fitted on the validation rows, in "
        f"`{CHECKPOINT_ARTIFACT}/calibration.json`): val ECE {best['val_ece']:.4f} -> {best['val_ece_calibrated']:.4f}."
    )


def name_run(client: MlflowClient, run_id: str, name: str) -> None:
    """Give the run its name (one `mlflow run` made has a random name); a caller's active run keeps its own."""
    import mlflow

    active = mlflow.active_run()
    if (active is None or active.info.run_id != run_id) and client.get_run(run_id).info.run_name != name:
        client.update_run(run_id, name=name)


def train(
    config: TrainConfig,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    reuse_parent: bool = True,
    artifacts: dict[str, str] | None = None,
    loop_extras: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train one model on Ray Train and record it as one MLflow run; returns the run's summary.

    artifacts: {artifact path: local folder} logged to the run before training (a student's encoder);
    loop_extras: from the tokenized data, more entries of the loop config (a teacher's logits, see tagger.distill).
    """
    import mlflow

    config = resolve_config(config)
    split = load_split(config)
    data = prepare_data(config, split)
    tracking_uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    client = MlflowClient(tracking_uri)
    config = config.replace(experiment_name=experiment_for_run(client, config.experiment_name))
    run_name = run_name or train_run_name(config)
    run_id, experiment_id, owned = open_run(client, config.experiment_name, run_name, tags or {}, reuse_parent)
    print(f"MLflow run {run_name} ({run_id}, experiment {config.experiment_name!r}, tracking {shown_uri(tracking_uri)})")
    status = "FAILED"
    try:
        name_run(client, run_id, run_name)
        set_note(client, run_id, describe_training(config, data))
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in run_params(client, run_id, config, data).items()])
        for frame, context in zip(split, ("training", "validation")):
            log_dataset(client, run_id, frame, config.dataset_loc, context)
        for path, folder in (artifacts or {}).items():
            client.log_artifacts(run_id, folder, path)
        loop_config = dataclasses.asdict(config) | data | {"tracking_uri": tracking_uri, "run_id": run_id}
        loop_config |= loop_extras(data) if loop_extras else {}
        summary, train_seconds = fit(config, loop_config, client, run_id)
        log_summary(client, run_id, summary, train_seconds, config.num_epochs)
        result_note = describe_result(summary, config, train_seconds)
        set_note(client, run_id, f"{describe_training(config, data)}\n\n{result_note}")
        status = "FINISHED"
    finally:
        if owned:
            client.set_terminated(run_id, status)
    best = summary["best"]
    print(
        f"Run {run_name}: best epoch {summary['best_epoch'] + 1}/{config.num_epochs} "
        f"val_loss={best['val_loss']:.4f} val_f1={best['val_f1']:.4f}, temperature={best['temperature']:.3f} "
        f"(val ECE {best['val_ece']:.4f} -> {best['val_ece_calibrated']:.4f}), trained in {train_seconds / 60:.2f} min; checkpoint logged under '{CHECKPOINT_ARTIFACT}/'"
    )
    return TrainResult(
        run_id=run_id,
        experiment_id=experiment_id,
        best_epoch=int(summary["best_epoch"]),
        best_metrics=dict(best),
        history=summary["history"],
        train_seconds=train_seconds,
        loop_seconds=summary["loop_seconds"],
        loop_cpu_seconds=summary["loop_cpu_seconds"],
        train_rows=len(data["train_ids"]),
        val_rows=len(data["val_ids"]),
        class_to_index=data["class_to_index"],
    )
