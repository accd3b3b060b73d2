"""A small sweep: several training configurations, one MLflow run each, in one experiment.

Each configuration is a plain Ray Train run (tagger.train.train) sharing one Ray (local, or the
cluster at --ray-address or RAY_ADDRESS); the
runs carry the tag `sweep_id`, so the best one by `val_loss` can then be packaged with
`tagger package --experiment-name NAME`.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

from mlflow.tracking import MlflowClient

from tagger.config import TrainConfig
from tagger.errors import OptionError
from tagger.sessions import experiment_for_run, ray_session
from tagger.train import TrainResult, train

# Fields a sweep may vary (the rest of TrainConfig is shared by every run).
SWEEPABLE = ("lr", "dropout_p", "batch_size", "num_epochs", "weight_decay", "warmup_ratio", "scheduler", "seed")


@dataclass
class SweepResult:
    """The runs of a sweep and the best of them by validation loss."""

    sweep_id: str
    results: list[TrainResult]
    overrides: list[dict[str, Any]]

    @property
    def best(self) -> TrainResult:
        """The run with the lowest best-epoch val_loss."""
        return min(self.results, key=lambda r: r.best_metrics["val_loss"])


def grid(**values: Iterable[Any]) -> list[dict[str, Any]]:
    """Every combination of the given field values: grid(lr=[1e-4, 5e-5], dropout_p=[0.1]) -> 2 configs."""
    unknown = sorted(set(values) - set(SWEEPABLE))
    if unknown:
        raise OptionError(f"cannot sweep {unknown}; sweepable fields: {SWEEPABLE}")
    names = [name for name, options in values.items() if list(options)]
    return [dict(zip(names, combo)) for combo in itertools.product(*(list(values[n]) for n in names))] or [{}]


def sweep(base: TrainConfig, overrides: list[dict[str, Any]], sweep_id: str | None = None) -> SweepResult:
    """Train base.replace(**o) for each o, each as its own MLflow run of base.experiment_name."""
    if not overrides:
        raise OptionError("a sweep needs at least one configuration")
    sweep_id = sweep_id or uuid.uuid4().hex[:8]
    base = base.replace(experiment_name=experiment_for_run(MlflowClient(), base.experiment_name))
    need = base.num_workers * base.cpu_per_worker
    results = []
    with ray_session(base.ray_address, num_cpus=need):
        for number, changes in enumerate(overrides, start=1):
            label = ", ".join(f"{k}={v}" for k, v in changes.items()) or "base configuration"
            print(f"=== sweep {sweep_id}: configuration {number}/{len(overrides)}: {label}", flush=True)
            result = train(
                base.replace(**changes),
                run_name=f"sweep-{sweep_id}-{number}",
                tags={"sweep_id": sweep_id, "sweep_trial": str(number)},
                reuse_parent=False,
            )
            results.append(result)
    outcome = SweepResult(sweep_id, results, list(overrides))
    print(f"=== sweep {sweep_id}: {len(results)} runs in experiment {base.experiment_name!r}")
    for changes, result in zip(overrides, results):
        marker = "  <- best" if result is outcome.best else ""
        print(
            f"  run {result.run_id}  val_loss={result.best_metrics['val_loss']:.4f} "
            f"val_f1={result.best_metrics['val_f1']:.4f}  {changes}{marker}"
        )
    return outcome
