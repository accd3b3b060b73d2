"""Fine-tune the classifier with Ray Train (V2 TorchTrainer) and record the run in MLflow.

The driver (`train`) reads and splits the data, tokenizes it with the serving code's own
preprocessing (`mlflow_model.preprocess`), opens one MLflow run and starts the TorchTrainer.
Each worker (`train_loop_per_worker`) fine-tunes the encoder + dropout + linear head, prints one
line per epoch, logs the epoch's metrics to the MLflow run (rank 0) and reports a checkpoint to
Ray whenever `val_loss` improves. After `fit()` the driver logs the best checkpoint as the run's
`checkpoint/` artifacts and points the run tag `checkpoint_path` at it, which is what
`packaging/runs.py` reads.

Metrics, at step = epoch (0-based): `train_loss`, `lr`, `val_loss`, `val_accuracy`,
`val_precision`, `val_recall`, `val_f1` (weighted). Once training ends, the best epoch's `val_*`
values are logged once more at step = num_epochs, so that a run's latest `val_loss` (the value
MLflow searches and ranks runs by) is the one of the checkpoint it holds; `best_epoch` and
`train_seconds` come with them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mlflow_model.config import CHECKPOINT_ARTIFACT, CHECKPOINT_TAG, SHIPPED_DATASET, TrainConfig, default_base_model
from mlflow_model.errors import TaggerError
from training.data import DatasetError, class_to_index, load_data, stratified_split

SCHEDULERS = ("linear", "cosine", "plateau", "constant")
VAL_METRICS = ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1")


class TrainConfigError(TaggerError):
    """A training setting is out of range (e.g. an unknown scheduler, zero epochs)."""


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


# ----------------------------------------------------------------------------------------------
# Driver side: configuration, data, MLflow run, Ray
# ----------------------------------------------------------------------------------------------


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill in the defaults (dataset, encoder) and check the values a typo could break."""
    dataset = config.dataset_loc or str(SHIPPED_DATASET)
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
    return config.replace(dataset_loc=dataset, base_model=config.base_model or default_base_model())


def prepare_data(config: TrainConfig) -> dict[str, Any]:
    """Load, check and split the dataset; tokenize it as serving does. Runs on the driver."""
    from transformers import AutoConfig, AutoTokenizer

    from mlflow_model.preprocess import prepare_texts, tokenize

    frame = load_data(config.dataset_loc, config.num_samples)
    labels = class_to_index(frame["tag"])
    train_frame, val_frame = stratified_split(frame, config.val_size, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    encoder_config = AutoConfig.from_pretrained(config.base_model)
    max_length = min(
        config.max_length, tokenizer.model_max_length, getattr(encoder_config, "max_position_embeddings", 10**9)
    )
    return {
        "class_to_index": labels,
        "max_length": int(max_length),
        "pad_id": int(tokenizer.pad_token_id or 0),
        "train_ids": tokenize(tokenizer, prepare_texts(train_frame), max_length),
        "train_labels": [labels[t] for t in train_frame["tag"]],
        "val_ids": tokenize(tokenizer, prepare_texts(val_frame), max_length),
        "val_labels": [labels[t] for t in val_frame["tag"]],
    }


def absolute_tracking_uri(uri: str) -> str:
    """The tracking URI with a relative sqlite/file path made absolute (Ray workers run elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + os.path.abspath(uri[len("file:"):])
    if "://" not in uri and not uri.startswith(("databricks", "file:", "sqlite:")):
        return os.path.abspath(uri)
    return uri


def _experiment_id(client: Any, name: str) -> str:
    """Id of the experiment, created if it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def open_run(
    client: Any, experiment_name: str, run_name: str | None, tags: dict[str, str], reuse_parent: bool = True
) -> tuple[str, str, bool]:
    """(run_id, experiment_id, owned): the MLflow run this training logs into.

    An active run or MLFLOW_RUN_ID (set by `mlflow run`) in the same experiment is used as it is
    (with reuse_parent); otherwise a new run is made in `experiment_name`, nested under that
    parent when they share the experiment. `owned`: this code ends the run.
    """
    import mlflow

    active = mlflow.active_run()
    parent_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
    experiment_id = _experiment_id(client, experiment_name)
    parent = client.get_run(parent_id) if parent_id else None
    same_experiment = parent is not None and parent.info.experiment_id == experiment_id
    if reuse_parent and same_experiment:
        for key, value in tags.items():
            client.set_tag(parent_id, key, value)
        return parent_id, experiment_id, active is None
    run_tags = dict(tags)
    if same_experiment:
        run_tags["mlflow.parentRunId"] = parent_id
    elif parent is not None:
        run_tags["launched_by_run_id"] = parent_id
        print(
            f"MLflow run {parent_id} belongs to another experiment; training logs a new run into "
            f"experiment {experiment_name!r}"
        )
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    if parent is not None and not same_experiment:
        client.set_tag(parent_id, "training_run_id", run.info.run_id)
    return run.info.run_id, experiment_id, True


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None):
    """Start a local Ray (no dashboard, no usage stats) unless one is running; stop it if started here."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cores = os.cpu_count() or 1
    ray.init(
        num_cpus=max(cores, num_cpus or 0),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="warning",
    )
    try:
        yield
    finally:
        ray.shutdown()


def run_params(client: Any, run_id: str, config: TrainConfig, data: dict[str, Any]) -> dict[str, Any]:
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


def train(
    config: TrainConfig,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    reuse_parent: bool = True,
) -> TrainResult:
    """Train one model on Ray Train and record it as one MLflow run; returns the run's summary."""
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = resolve_config(config)
    data = prepare_data(config)
    tracking_uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    client = MlflowClient(tracking_uri)
    run_id, experiment_id, owned = open_run(client, config.experiment_name, run_name, tags or {}, reuse_parent)
    print(f"MLflow run {run_id} (experiment {config.experiment_name!r}, tracking {tracking_uri})")
    status, storage = "FAILED", config.storage_path or tempfile.mkdtemp(prefix="tagger-ray-")
    try:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in run_params(client, run_id, config, data).items()])
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=dataclasses.asdict(config) | data | {"tracking_uri": tracking_uri, "run_id": run_id},
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
        with ray_session(config.num_workers * config.cpu_per_worker):
            started = time.perf_counter()
            result = trainer.fit()
            train_seconds = time.perf_counter() - started
        if result.error:
            raise result.error
        summary = result.return_value or {}
        checkpoint = result.get_best_checkpoint("val_loss", "min") or result.checkpoint
        if checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        with checkpoint.as_directory() as folder:
            client.log_artifacts(run_id, folder, CHECKPOINT_ARTIFACT)
        client.set_tag(run_id, CHECKPOINT_TAG, CHECKPOINT_ARTIFACT)
        best, best_epoch = summary["best"], int(summary["best_epoch"])
        now = int(time.time() * 1000)
        final = {k: best[k] for k in VAL_METRICS} | {
            "best_epoch": best_epoch,
            "train_seconds": train_seconds,
            "loop_seconds": summary["loop_seconds"],
        }
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, config.num_epochs) for k, v in final.items()])
        status = "FINISHED"
    finally:
        if owned:
            client.set_terminated(run_id, status)
        if not config.storage_path:
            shutil.rmtree(storage, ignore_errors=True)
    print(
        f"Run {run_id}: best epoch {best_epoch} val_loss={best['val_loss']:.4f} val_f1={best['val_f1']:.4f}, "
        f"trained in {train_seconds / 60:.2f} min; checkpoint logged under '{CHECKPOINT_ARTIFACT}/'"
    )
    return TrainResult(
        run_id=run_id,
        experiment_id=experiment_id,
        best_epoch=best_epoch,
        best_metrics=dict(best),
        history=summary["history"],
        train_seconds=train_seconds,
        loop_seconds=summary["loop_seconds"],
        loop_cpu_seconds=summary["loop_cpu_seconds"],
        train_rows=len(data["train_ids"]),
        val_rows=len(data["val_ids"]),
        class_to_index=data["class_to_index"],
    )


# ----------------------------------------------------------------------------------------------
# Worker side: the training loop
# ----------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: the epochs loop with Ray's context, DDP and reporting."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    return run_training(
        loop_config, rank=rank, world_size=world_size, report=report, wrap_model=ray.train.torch.prepare_model
    )


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _make_scheduler(optimizer: Any, name: str, total_steps: int, warmup_ratio: float) -> Any:
    """A per-step LambdaLR (linear/cosine/constant) or ReduceLROnPlateau (stepped per epoch)."""
    import torch

    if name == "plateau":  # Made With ML's choice
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.8, patience=3)
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _bucketed_batches(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 8
) -> list[np.ndarray]:
    """Batches of rows of similar length (less padding), in a random order.

    The shuffled rows are cut into pools of `pool` batches, each pool is sorted by length and cut
    into batches, then the batches are shuffled: still random, but padded ~30% less.
    """
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += _batches(chunk, batch_size)
    return [batches[i] for i in rng.permutation(len(batches))]


def _evaluate(model: Any, ids: list[list[int]], labels: np.ndarray, pad_id: int, loss_fn: Any) -> dict[str, float]:
    """Validation loss and weighted accuracy/precision/recall/F1 (rows sorted by length for speed)."""
    import torch
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    from mlflow_model.preprocess import pad_batch

    model.eval()
    order = np.argsort([len(row) for row in ids], kind="stable")
    logits = []
    with torch.inference_mode():
        for rows in _batches(order, 64):
            input_ids, mask = pad_batch([ids[i] for i in rows], pad_id)
            logits.append(model(torch.from_numpy(input_ids), torch.from_numpy(mask)))
    scores = torch.cat(logits)
    targets = torch.from_numpy(labels[order])
    loss = float(loss_fn(scores, targets))
    predicted = scores.argmax(dim=1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets.numpy(), predicted, average="weighted", zero_division=0
    )
    return {
        "val_loss": loss,
        "val_accuracy": float(accuracy_score(targets.numpy(), predicted)),
        "val_precision": float(precision),
        "val_recall": float(recall),
        "val_f1": float(f1),
    }


def run_training(
    cfg: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    report: Callable[[dict[str, float], str | None], None] | None = None,
    wrap_model: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """The epochs loop of one worker; returns the history and the best epoch's metrics.

    `cfg` holds TrainConfig's fields plus the tokenized data from prepare_data and, optionally,
    `tracking_uri` and `run_id` (rank 0 then logs each epoch's metrics to that MLflow run).
    `report(metrics, checkpoint_dir_or_None)` is called once per epoch on every worker.
    """
    import torch
    from torch import nn
    from transformers import AutoModel

    from mlflow_model.checkpoint import write_checkpoint
    from mlflow_model.model import FinetunedLLM, ModelArgs
    from mlflow_model.preprocess import pad_batch

    torch.set_num_threads(int(cfg["cpu_per_worker"]))  # Ray sets OMP_NUM_THREADS=1 in workers
    _seed_everything(int(cfg["seed"]))
    labels_map = cfg["class_to_index"]
    llm = AutoModel.from_pretrained(cfg["base_model"])
    args = ModelArgs(
        dropout_p=float(cfg["dropout_p"]), embedding_dim=int(llm.config.hidden_size), num_classes=len(labels_map)
    )
    model = FinetunedLLM(llm, args)
    if wrap_model is not None and world_size > 1:
        model = wrap_model(model)
    bare = getattr(model, "module", model)  # the FinetunedLLM inside DDP

    train_ids, val_ids = cfg["train_ids"], cfg["val_ids"]
    train_labels, val_labels = np.asarray(cfg["train_labels"]), np.asarray(cfg["val_labels"])
    train_lengths = np.asarray([len(row) for row in train_ids])
    pad_id, num_epochs = int(cfg["pad_id"]), int(cfg["num_epochs"])
    batch_size = max(1, int(cfg["batch_size"]) // world_size)
    shard_rows = math.ceil(len(train_ids) / world_size)  # every worker: the same number of steps
    steps_per_epoch = math.ceil(shard_rows / batch_size)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(cfg.get("label_smoothing", 0.0)))
    eval_loss_fn = nn.CrossEntropyLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(cfg["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(cfg["lr"]),
    )
    scheduler = _make_scheduler(optimizer, cfg["scheduler"], steps_per_epoch * num_epochs, float(cfg["warmup_ratio"]))
    per_step = cfg["scheduler"] != "plateau"

    mlflow_client = None
    if rank == 0 and cfg.get("run_id"):
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(cfg["tracking_uri"])

    history: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    best_epoch = -1
    loop_start, loop_cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(num_epochs):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        rng = np.random.default_rng(int(cfg["seed"]) + epoch)
        order = rng.permutation(len(train_ids))
        order = np.resize(order, shard_rows * world_size)[rank::world_size]  # wrap round to equal shards
        total, count = 0.0, 0
        for rows in _bucketed_batches(order, train_lengths, batch_size, rng):
            input_ids, mask = pad_batch([train_ids[i] for i in rows], pad_id)
            logits = model(torch.from_numpy(input_ids), torch.from_numpy(mask))
            loss = loss_fn(logits, torch.from_numpy(train_labels[rows]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if per_step:
                scheduler.step()
            total += loss.item() * len(rows)
            count += len(rows)
        train_loss = total / max(1, count)
        if world_size > 1 and torch.distributed.is_initialized():
            tensor = torch.tensor([train_loss])
            torch.distributed.all_reduce(tensor)
            train_loss = float(tensor) / world_size
        metrics = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
        metrics |= _evaluate(bare, val_ids, val_labels, pad_id, eval_loss_fn)
        if not per_step:
            scheduler.step(metrics["val_loss"])
        history.append(metrics)
        improved = best is None or metrics["val_loss"] < best["val_loss"]
        if improved:
            best, best_epoch = metrics, epoch
        seconds = time.perf_counter() - epoch_start
        if rank == 0:  # sys.stdout, not print: Ray Train's patched print would show the line twice
            sys.stdout.write(
                f"epoch {epoch + 1}/{num_epochs}: train_loss={train_loss:.4f} val_loss={metrics['val_loss']:.4f} "
                f"val_f1={metrics['val_f1']:.4f} lr={lr:.2e} ({seconds:.1f}s{', best so far' if improved else ''})\n"
            )
            sys.stdout.flush()
        if mlflow_client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            mlflow_client.log_batch(
                cfg["run_id"],
                metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"],
            )
        if report is None:
            continue
        if improved and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                write_checkpoint(folder, bare.state_dict(), args, labels_map, torch_format=True)
                report(metrics, folder)
        else:
            report(metrics, None)
    return {
        "history": history,
        "best": best,
        "best_epoch": best_epoch,
        "loop_seconds": time.perf_counter() - loop_start,
        "loop_cpu_seconds": time.process_time() - loop_cpu_start,  # all threads: ~ loop_seconds * threads
        "train_rows_per_epoch": shard_rows,
    }
