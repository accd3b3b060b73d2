"""The main job on the embedded defaults: train -> package -> register -> promote -> predict."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import mlflow
import pandas as pd

from tagger.config import CHAMPION_ALIAS, MODEL_NAME, SHIPPED_DATASET, PackageConfig, QuickstartConfig, TrainConfig
from tagger.data import load_data, stratified_split
from tagger.errors import PromotionRefused
from tagger.gate import gated_promote
from tagger.package import package_best_run
from tagger.records import plural
from tagger.signing import load_model
from tagger.train import train

EXAMPLES = pd.DataFrame(
    {
        "title": [
            "Fine-tuning a small language model for support tickets",
            "Counting cars in drone footage",
            "Blue-green deployments for model servers",
            "Forecasting electricity demand with gradient boosting",
        ],
        "description": [
            "Classify customer emails with a distilled BERT and explain its answers.",
            "An object detector tracks vehicles frame by frame in aerial video.",
            "Roll out new model versions with canaries, monitoring and instant rollback.",
            "Hourly load prediction from weather and calendar features.",
        ],
    }
)


def use_local_store(workdir: Path, experiment_name: str) -> str:
    """Point MLflow at workdir/mlflow.db (absolute URI) with artifacts in workdir/mlruns."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment_name) is None:
        mlflow.create_experiment(experiment_name, artifact_location=(workdir / "mlruns").as_uri())
    return uri


def split_shipped_data(folder: Path, holdout_size: float, seed: int) -> tuple[Path, Path]:
    """The shipped dataset cut into a training part and a held-out part (stratified), written as two CSVs."""
    train_part, holdout = stratified_split(load_data(str(SHIPPED_DATASET)), holdout_size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.csv", folder / "holdout.csv"
    for frame, path in zip((train_part, holdout), paths):
        frame.to_csv(path, index=False)
    return paths


def serve_command(tracking_uri: str) -> str:
    """The shell command that serves the promoted model from this store (the environment's bin first on PATH:
    the scoring server starts `uvicorn` from PATH, so without it an inactive virtualenv fails with status 127)."""
    bin_dir = Path(sys.executable).parent
    return (
        f"PATH={shlex.quote(str(bin_dir))}:$PATH MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} "
        f"{shlex.quote(str(bin_dir / 'mlflow'))} models serve "
        f"-m models:/{MODEL_NAME}@{CHAMPION_ALIAS} --env-manager local -h 127.0.0.1 -p 5000"
    )


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store (127.0.0.1 only)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return f"{shlex.quote(str(mlflow_bin))} ui --backend-store-uri {shlex.quote(tracking_uri)} -h 127.0.0.1 -p 5001"


def quickstart(config: QuickstartConfig) -> pd.DataFrame:
    """Run the whole flow and print what a user needs next; returns the example predictions."""
    workdir = Path(config.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = use_local_store(workdir, config.experiment_name)
    train_csv, holdout_csv = split_shipped_data(workdir / "data", config.holdout_size, config.seed)
    print(f"[1/4] Training on Ray Train ({plural(config.num_epochs, 'epoch')}) on {train_csv} into {tracking_uri}",
          flush=True)
    train(TrainConfig(experiment_name=config.experiment_name, dataset_loc=str(train_csv), num_epochs=config.num_epochs))
    print("[2/4] Packaging the best run by val_loss and registering it", flush=True)
    version = package_best_run(PackageConfig(experiment_name=config.experiment_name, eval_dataset=str(holdout_csv)))
    print(f"[3/4] Evaluating {version.name} version {version.version} on the held-out {holdout_csv.name} and "
          f"promoting it to @{CHAMPION_ALIAS} unless it scores worse than the champion", flush=True)
    try:
        _, decision = gated_promote(version.name, str(version.version), str(holdout_csv))
        print(f"      gate {decision.decision}: weighted F1 {decision.challenger_f1:.4f}, ECE {decision.challenger_ece:.4f} "
              f"on {holdout_csv.name}", flush=True)
    except PromotionRefused as refused:
        print(f"      {refused.message}", flush=True)
    uri = f"models:/{MODEL_NAME}@{CHAMPION_ALIAS}"
    print(f"[4/4] Predicting with {uri}", flush=True)
    predictions = load_model(uri).predict(EXAMPLES)
    table = EXAMPLES[["title"]].assign(
        prediction=predictions["prediction"],
        confidence=[round(max(p.values()), 3) for p in predictions["probabilities"]],
    )
    print(table.to_string(index=False))
    print(f"\nSee the runs, charts and the registered model in the MLflow UI (then open http://127.0.0.1:5001):"
          f"\n  {ui_command(tracking_uri)}")
    print(f"\nServe it:\n  {serve_command(tracking_uri)}")
    print(
        "Then:\n  curl -s http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' "
        "-d '{\"dataframe_records\": [{\"title\": \"BERT for legal text\", \"description\": \"\"}]}'"
    )
    return predictions
