"""Fine-tune the classifier with Ray Train (V2 TorchTrainer) and record the run in MLflow.

The driver (`train`) reads and splits the data, tokenizes it with the serving code's own
preprocessing (`mlflow_model.preprocess`), opens one MLflow run and starts the TorchTrainer,
whose workers run `tagger.train_loop`. After `fit()` the driver logs the best checkpoint as the
run's `checkpoint/` artifacts and points the run tag `checkpoint_path` at it, which is what
`tagger.runs` reads.

Metrics, at step = epoch (0-based): `train_loss`, `lr`, `val_loss`, `val_accuracy`,
`val_precision`, `val_recall`, `val_f1` (weighted). Once training ends, the best epoch's `val_*`
values are logged once more at step = num_epochs, so that a run's latest `val_loss` (the value
MLflow searches and ranks runs by) is the one of the checkpoint it holds; `best_epoch` and
`train_seconds` come with them.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mlflow_model.config import CHECKPOINT_ARTIFACT
from tagger.config import CHECKPOINT_TAG, SCHEDULERS, SHIPPED_DATASET, TrainConfig, default_base_model
from tagger.data import class_to_index, load_data, stratified_split
from tagger.errors import DatasetError, TrainConfigError
from tagger.sessions import absolute_tracking_uri, open_run, ray_session

VAL_METRICS = ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1")


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
    if problems:
        raise TrainConfigError("; ".join(problems))
    return config.replace(
        dataset_loc=config.dataset_loc or str(SHIPPED_DATASET), base_model=config.base_model or default_base_model()
    )


def prepare_data(config: TrainConfig) -> dict[str, Any]:
    """Load, check and split the dataset; tokenize it as serving does. Runs on the driver."""
    from transformers import AutoConfig, AutoTokenizer

    from mlflow_model.preprocess import configure_tokenizer, prepare_texts, tokenize

    frame = load_data(config.dataset_loc, config.num_samples)
    labels = class_to_index(frame["tag"])
    train_frame, val_frame = stratified_split(frame, config.val_size, config.seed)
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
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("storage_path", "experiment_name")}
    params |= {
        "max_length": data["max_length"],
        "train_rows": len(data["train_ids"]),
        "val_rows": len(data["val_ids"]),
        "num_classes": len(data["class_to_index"]),
    }
    logged = client.get_run(run_id).data.params
    return {(f"resolved.{k}" if k in logged and logged[k] != str(v) else k): v for k, v in params.items()}


def make_trainer(config: TrainConfig, loop_config: dict[str, Any], storage: str, run_id: str) -> Any:
    """The TorchTrainer: one worker group, keeping only the best checkpoint by val_loss."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
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
            storage_path=os.path.abspath(storage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
        ),
    )


def log_best_checkpoint(client: MlflowClient, run_id: str, result: Any) -> None:
    """Log the best checkpoint under `checkpoint/` and tag the run with where it is."""
    checkpoint = result.get_best_checkpoint("val_loss", "min") or result.checkpoint
    if checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with checkpoint.as_directory() as folder:
        client.log_artifacts(run_id, folder, CHECKPOINT_ARTIFACT)
    client.set_tag(run_id, CHECKPOINT_TAG, CHECKPOINT_ARTIFACT)


def log_summary(client: MlflowClient, run_id: str, summary: dict[str, Any], train_seconds: float, step: int) -> None:
    """The best epoch's val_* metrics again at the last step, with best_epoch and the timings."""
    final = {k: summary["best"][k] for k in VAL_METRICS} | {
        "best_epoch": summary["best_epoch"], "train_seconds": train_seconds, "loop_seconds": summary["loop_seconds"],
    }
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in final.items()])


def fit(config: TrainConfig, loop_config: dict[str, Any], client: MlflowClient, run_id: str) -> tuple[dict, float]:
    """Run the TorchTrainer on Ray, log its best checkpoint; returns (worker summary, fit seconds)."""
    storage = config.storage_path or tempfile.mkdtemp(prefix="tagger-ray-")
    try:
        trainer = make_trainer(config, loop_config, storage, run_id)
        with ray_session(num_cpus=config.num_workers * config.cpu_per_worker):
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


def train(
    config: TrainConfig,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    reuse_parent: bool = True,
) -> TrainResult:
    """Train one model on Ray Train and record it as one MLflow run; returns the run's summary."""
    import mlflow

    config = resolve_config(config)
    data = prepare_data(config)
    tracking_uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    client = MlflowClient(tracking_uri)
    run_id, experiment_id, owned = open_run(client, config.experiment_name, run_name, tags or {}, reuse_parent)
    print(f"MLflow run {run_id} (experiment {config.experiment_name!r}, tracking {tracking_uri})")
    status = "FAILED"
    try:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in run_params(client, run_id, config, data).items()])
        loop_config = dataclasses.asdict(config) | data | {"tracking_uri": tracking_uri, "run_id": run_id}
        summary, train_seconds = fit(config, loop_config, client, run_id)
        log_summary(client, run_id, summary, train_seconds, step=config.num_epochs)
        status = "FINISHED"
    finally:
        if owned:
            client.set_terminated(run_id, status)
    best = summary["best"]
    print(
        f"Run {run_id}: best epoch {summary['best_epoch']} val_loss={best['val_loss']:.4f} val_f1={best['val_f1']:.4f}, "
        f"trained in {train_seconds / 60:.2f} min; checkpoint logged under '{CHECKPOINT_ARTIFACT}/'"
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
