"""The training loop of one Ray Train worker: model, optimizer, epochs, evaluation, reports.

`train_loop_per_worker` is what the TorchTrainer runs; `run_training` is the same loop without
Ray (tests call it directly). Each epoch: train on bucketed batches, evaluate on the validation
rows, fit the temperature that calibrates its probabilities on them (`tagger.calibration`), print
one line, log the epoch's metrics to the MLflow run (rank 0) and report to Ray with a checkpoint.
The checkpoint is the packaged layout (`model.safetensors`, `args.json`, label map, and
`calibration.json` with that epoch's temperature, so the best checkpoint carries its own) plus
`training_state.pt` (optimizer, scheduler, epoch, history; tensors and plain values, read with
`weights_only=True`), so that after a worker failure Ray Train restarts the loop from the last
reported checkpoint and it goes on where it stopped. An epoch already logged to the MLflow
run (before the failure) is not logged again.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlflow_model.batching import batched_logits, pad_batch
from mlflow_model.checkpoint import read_state_dict, write_calibration, write_checkpoint
from mlflow_model.model import FinetunedLLM, ModelArgs
from tagger.calibration import fit_temperature
from tagger.metrics import scores

Report = Callable[[dict[str, float], "str | None"], None]  # (metrics, checkpoint folder or None)
LossFn = Callable[[torch.Tensor, np.ndarray], torch.Tensor]  # (logits of a batch, its row indices) -> loss
# Distillation (tagger.distill) adds these to the loop config; an ordinary run has none of them.
TEACHER_LOGITS_KEY = "teacher_logits"  # the teacher's logits of each training row, computed once
DISTILL_ALPHA_KEY = "distill_alpha"  # weight of the teacher's soft labels in the loss (the rest: the true tags)
DISTILL_TEMPERATURE_KEY = "distill_temperature"  # both logits are divided by it before the softmax
INIT_HEAD_KEY = "init_head"  # {"weight": rows x hidden, "bias": rows}: the head starts as the teacher's
EVAL_BATCH_SIZE = 64
TRAINING_STATE_FILE = "training_state.pt"  # in Ray's checkpoints only: what resuming needs, never packaged
FAULT_KEY = "fail_once"  # loop config, tests only: {"epoch": N, "marker": path}: rank 0 exits once at epoch N
FAULT_DELAY_S = 5.0  # before that exit: Ray Train's controller collects reports every 2 s, as in a real-length epoch


@dataclass
class Trainee:
    """What one worker trains: the (maybe DDP-wrapped) model, the bare FinetunedLLM, its args."""

    model: nn.Module
    bare: FinetunedLLM
    args: ModelArgs
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: bool  # the scheduler steps per batch (else per epoch, on val_loss)


@dataclass
class Progress:
    """Where the epochs loop stands: the next epoch, the metrics of the epochs done, the best of them."""

    start_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: the epochs loop with Ray's context, DDP and reporting."""
    import ray.train
    import ray.train.torch

    logging.getLogger().setLevel(loop_config.get("log_level", "INFO"))  # Ray Train's per-report lines go to root
    context = ray.train.get_context()

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    last = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    with last.as_directory() if last else contextlib.nullcontext() as resume_from:
        return run_training(
            loop_config, context.get_world_rank(), context.get_world_size(), report, ray.train.torch.prepare_model,
            resume_from,
        )


def seed_everything(seed: int) -> None:
    """The same seed for Python, NumPy and torch: the same head, dropout and batch order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_ratio: float) -> Any:
    """A per-step LambdaLR (linear/cosine/constant) or ReduceLROnPlateau (stepped per epoch)."""
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


def make_trainee(cfg: dict[str, Any], world_size: int, steps: int, wrap_model: Callable | None) -> Trainee:
    """The pretrained encoder + a fresh head, AdamW (no decay on biases and LayerNorm) and the lr schedule."""
    from transformers import AutoModel

    llm = AutoModel.from_pretrained(cfg["base_model"])
    args = ModelArgs(float(cfg["dropout_p"]), int(llm.config.hidden_size), len(cfg["class_to_index"]))
    bare = FinetunedLLM(llm, args)
    if cfg.get(INIT_HEAD_KEY):
        with torch.no_grad():
            bare.fc1.weight.copy_(torch.as_tensor(cfg[INIT_HEAD_KEY]["weight"]))
            bare.fc1.bias.copy_(torch.as_tensor(cfg[INIT_HEAD_KEY]["bias"]))
    model = wrap_model(bare) if wrap_model is not None and world_size > 1 else bare
    decayed = {n: p.ndim > 1 and "LayerNorm" not in n for n, p in model.named_parameters()}
    groups = [
        {"params": [p for n, p in model.named_parameters() if decayed[n]], "weight_decay": float(cfg["weight_decay"])},
        {"params": [p for n, p in model.named_parameters() if not decayed[n]], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=float(cfg["lr"]))
    scheduler = make_scheduler(optimizer, cfg["scheduler"], steps, float(cfg["warmup_ratio"]))
    return Trainee(model, bare, args, optimizer, scheduler, per_step=cfg["scheduler"] != "plateau")


def bucketed_batches(
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
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shard_order(num_rows: int, epoch: int, seed: int, rank: int, world_size: int) -> tuple[np.ndarray, np.random.Generator]:
    """This worker's rows for the epoch (a seeded shuffle, wrapped round so every shard has as many)."""
    rng = np.random.default_rng(seed + epoch)
    shard_rows = math.ceil(num_rows / world_size)
    return np.resize(rng.permutation(num_rows), shard_rows * world_size)[rank::world_size], rng


def make_loss(cfg: dict[str, Any]) -> LossFn:
    """Cross-entropy on the true tags; with the teacher's logits (distillation), mixed with the divergence from the
    teacher's softened probabilities (Hinton et al. 2015): alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE."""
    labels = torch.as_tensor(np.asarray(cfg["train_labels"]))
    cross_entropy = nn.CrossEntropyLoss(label_smoothing=float(cfg.get("label_smoothing", 0.0)))
    if cfg.get(TEACHER_LOGITS_KEY) is None:
        return lambda logits, rows: cross_entropy(logits, labels[torch.from_numpy(rows)])
    teacher = torch.as_tensor(np.asarray(cfg[TEACHER_LOGITS_KEY], dtype=np.float32))
    alpha, temperature = float(cfg[DISTILL_ALPHA_KEY]), float(cfg[DISTILL_TEMPERATURE_KEY])

    def loss(logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(rows)
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(logits / temperature, dim=-1),
            nn.functional.log_softmax(teacher[index] / temperature, dim=-1), reduction="batchmean", log_target=True,
        )
        return alpha * temperature**2 * soft + (1.0 - alpha) * cross_entropy(logits, labels[index])

    return loss


def train_epoch(trainee: Trainee, batches: list[np.ndarray], data: dict[str, Any], loss_fn: LossFn) -> float:
    """One pass over this worker's batches; returns the mean training loss per row."""
    trainee.model.train()
    total, count = 0.0, 0
    for rows in batches:
        input_ids, mask = pad_batch([data["train_ids"][i] for i in rows], int(data["pad_id"]))
        loss = loss_fn(trainee.model(torch.from_numpy(input_ids), torch.from_numpy(mask)), rows)
        trainee.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), 1.0)
        trainee.optimizer.step()
        if trainee.per_step:
            trainee.scheduler.step()
        total += loss.item() * len(rows)
        count += len(rows)
    return total / max(1, count)


def mean_across_workers(value: float, world_size: int) -> float:
    """The mean of a per-worker value over all workers (itself with one worker)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value])
    torch.distributed.all_reduce(tensor)
    return float(tensor) / world_size


@torch.inference_mode()
def evaluate(model: FinetunedLLM, ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, float]:
    """Validation loss, accuracy/weighted precision/recall/F1 and calibration, through the serving batching loop.

    Calibration: `temperature` fitted on these rows, and the ECE before (`val_ece`) and after
    (`val_ece_calibrated`) dividing the logits by it, with the NLL after (`val_loss_calibrated`).
    """
    model.eval()

    def logits_fn(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(input_ids), torch.from_numpy(mask)).float().numpy()

    logits = torch.from_numpy(batched_logits(logits_fn, ids, EVAL_BATCH_SIZE, pad_id))
    targets = torch.as_tensor(labels)
    measured = scores(targets.numpy(), logits.argmax(dim=1).numpy())
    fitted = fit_temperature(logits.numpy(), labels)
    return {"val_loss": float(nn.functional.cross_entropy(logits, targets))} | {
        f"val_{k}": measured[k] for k in ("accuracy", "precision", "recall", "f1")
    } | {"val_ece": fitted.ece_before, "val_ece_calibrated": fitted.ece_after,
         "val_loss_calibrated": fitted.nll_after, "temperature": fitted.temperature}


def print_epoch(epoch: int, num_epochs: int, metrics: dict[str, float], seconds: float, improved: bool) -> None:
    """One line per epoch (sys.stdout: Ray Train's patched print would show it twice)."""
    sys.stdout.write(
        f"epoch {epoch + 1}/{num_epochs}: train_loss={metrics['train_loss']:.4f} val_loss={metrics['val_loss']:.4f} "
        f"val_f1={metrics['val_f1']:.4f} lr={metrics['lr']:.2e} ({seconds:.1f}s{', best so far' if improved else ''})\n"
    )
    sys.stdout.flush()


def epoch_logger(cfg: dict[str, Any]) -> Callable[[dict[str, float], int], None]:
    """A function logging one epoch's metrics to the MLflow run at step = epoch (no-op without a run).

    A (metric, epoch) point the run already has, logged before a worker failure, is skipped.
    """
    if not cfg.get("run_id"):
        return lambda metrics, epoch: None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(cfg["tracking_uri"]), cfg["run_id"]
    keys = client.get_run(run_id).data.metrics
    logged = {(key, point.step) for key in keys for point in client.get_metric_history(run_id, key)}

    def log(metrics: dict[str, float], epoch: int) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if (k, epoch) not in logged]
        if fresh:
            client.log_batch(run_id, metrics=fresh)
            logged.update((m.key, epoch) for m in fresh)

    return log


def save_checkpoint(folder: str, trainee: Trainee, cfg: dict[str, Any], metrics: dict[str, float],
                    progress: Progress) -> None:
    """The packaged layout (weights, args, label map, the epoch's temperature) plus the state resuming needs."""
    write_checkpoint(folder, trainee.bare.state_dict(), trainee.args, cfg["class_to_index"])
    write_calibration(folder, metrics["temperature"], fitted_on="validation split", rows=len(cfg["val_ids"]),
                      ece_before=metrics["val_ece"], ece_after=metrics["val_ece_calibrated"])
    state = {
        "epoch": int(metrics["epoch"]),
        "history": progress.history,
        "best_epoch": progress.best_epoch,
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, Path(folder) / TRAINING_STATE_FILE)


def restore(folder: str | Path, trainee: Trainee) -> Progress:
    """Load the weights, optimizer, scheduler and RNG state of a checkpoint; returns where to go on."""
    trainee.bare.load_state_dict(read_state_dict(Path(folder)))
    state = torch.load(Path(folder) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(int(state["epoch"]) + 1, [dict(m) for m in state["history"]], int(state["best_epoch"]))


def report_epoch(report: Report | None, metrics: dict[str, float], trainee: Trainee, cfg: dict, progress: Progress,
                 rank: int) -> None:
    """Report the epoch to Ray; rank 0 sends a checkpoint (weights + training state) with it."""
    if report is None:
        return
    if rank != 0:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, trainee, cfg, metrics, progress)
        report(metrics, folder)


def inject_fault(cfg: dict[str, Any], epoch: int, rank: int) -> None:
    """Tests only: with cfg[FAULT_KEY], rank 0 dies at that epoch, once (a marker file remembers it)."""
    fault = cfg.get(FAULT_KEY)
    if not fault or rank != 0 or epoch != int(fault["epoch"]) or os.path.exists(fault["marker"]):
        return
    Path(fault["marker"]).touch()
    time.sleep(FAULT_DELAY_S)  # let the controller collect the previous epoch's report and checkpoint
    sys.stdout.write(f"fault injection: worker exits at epoch {epoch + 1}\n")
    sys.stdout.flush()
    os._exit(1)


def run_training(
    cfg: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    report: Report | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """The epochs loop of one worker; returns the history and the best epoch's metrics.

    `cfg` holds TrainConfig's fields plus the tokenized data from `tagger.train.prepare_data` and,
    optionally, `tracking_uri` and `run_id` (rank 0 then logs each epoch's metrics to that run).
    `resume_from`: a checkpoint folder this loop wrote; training goes on after its epoch.
    """
    torch.set_num_threads(int(cfg["cpu_per_worker"]))  # Ray sets OMP_NUM_THREADS=1 in workers
    seed_everything(int(cfg["seed"]))
    num_epochs, batch_size = int(cfg["num_epochs"]), max(1, int(cfg["batch_size"]) // world_size)
    lengths = np.asarray([len(row) for row in cfg["train_ids"]])
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / world_size) / batch_size)
    trainee = make_trainee(cfg, world_size, steps_per_epoch * num_epochs, wrap_model)
    loss_fn = make_loss(cfg)
    log_epoch = epoch_logger(cfg) if rank == 0 else (lambda metrics, epoch: None)
    progress = restore(resume_from, trainee) if resume_from else Progress()
    history = progress.history
    if resume_from and rank == 0:
        sys.stdout.write(f"resuming after a worker failure: epochs 1-{progress.start_epoch} done, going on\n")
    loop_start, loop_cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(progress.start_epoch, num_epochs):
        epoch_start, lr = time.perf_counter(), trainee.optimizer.param_groups[0]["lr"]
        order, rng = shard_order(len(lengths), epoch, int(cfg["seed"]), rank, world_size)
        train_loss = train_epoch(trainee, bucketed_batches(order, lengths, batch_size, rng), cfg, loss_fn)
        metrics = {"train_loss": mean_across_workers(train_loss, world_size), "lr": lr}
        metrics |= evaluate(trainee.bare, cfg["val_ids"], cfg["val_labels"], int(cfg["pad_id"]))
        if not trainee.per_step:
            trainee.scheduler.step(metrics["val_loss"])
        history.append(metrics)
        improved = progress.best_epoch < 0 or metrics["val_loss"] < history[progress.best_epoch]["val_loss"]
        progress.best_epoch = epoch if improved else progress.best_epoch
        if rank == 0:
            print_epoch(epoch, num_epochs, metrics, time.perf_counter() - epoch_start, improved)
        log_epoch(metrics, epoch)
        inject_fault(cfg, epoch, rank)
        report_epoch(report, metrics | {"epoch": epoch}, trainee, cfg, progress, rank)
    return {
        "history": history,
        "best": history[progress.best_epoch],
        "best_epoch": progress.best_epoch,
        "resumed_at_epoch": progress.start_epoch if resume_from else None,
        "loop_seconds": time.perf_counter() - loop_start,
        "loop_cpu_seconds": time.process_time() - loop_cpu_start,  # all threads: ~ loop_seconds * threads
    }
