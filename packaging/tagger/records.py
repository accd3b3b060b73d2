"""How tagger names what it records in MLflow: encoders, datasets, runs, notes and model versions.

Names never hold a local filesystem path: an encoder is named by its hub name (or its folder's
name), a local dataset by its file name.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE

from tagger.config import DEFAULT_ENCODER_NAME, TrainConfig, default_base_model


def _is_local_path(value: str) -> bool:
    """True for an absolute or relative filesystem path, False for a hub name or a URL."""
    return "://" not in value and (value.startswith(("/", ".", "~")) or Path(value).exists())


def encoder_name(base_model: str) -> str:
    """The encoder's name: the bundled one's hub name, a folder's `_name_or_path` or folder name, else as given."""
    if not _is_local_path(base_model):
        return base_model
    folder = Path(base_model).expanduser().resolve()
    if folder == Path(default_base_model()).resolve():
        return DEFAULT_ENCODER_NAME
    try:
        recorded = str(json.loads((folder / "config.json").read_text()).get("_name_or_path") or "")
    except (OSError, ValueError):
        recorded = ""
    return recorded if recorded and not _is_local_path(recorded) else folder.name


def short_encoder_name(base_model: str) -> str:
    """The encoder's name without its hub owner (`all-MiniLM-L6-v2`), for run names."""
    return encoder_name(base_model).rstrip("/").rsplit("/", 1)[-1]


def dataset_name(dataset_loc: str) -> str:
    """A dataset's display name: a local file's name, a URL as it is."""
    return Path(dataset_loc).name if _is_local_path(dataset_loc) else dataset_loc


def short_number(value: float) -> str:
    """A learning rate as people write it: 1e-4, 3e-3, 2.5e-5, 0.5."""
    if 0.01 <= abs(value) < 1000 or value == 0:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def train_run_name(config: TrainConfig) -> str:
    """`train-<encoder>-lr<lr>-bs<batch>-ep<epochs>` for a resolved TrainConfig."""
    encoder = short_encoder_name(config.base_model or default_base_model())
    return f"train-{encoder}-lr{short_number(config.lr)}-bs{config.batch_size}-ep{config.num_epochs}"


def version_label(name: str, version: str | int) -> str:
    """`tagger-v3`: a registered version as run names spell it."""
    return f"{name}-v{version}"


def package_run_name(name: str, version: str | int) -> str:
    """`package-tagger-v3`."""
    return f"package-{version_label(name, version)}"


def promote_run_name(name: str, version: str | int) -> str:
    """`promote-tagger-v3`."""
    return f"promote-{version_label(name, version)}"


def evaluate_run_name(model: str, dataset_loc: str) -> str:
    """`evaluate-tagger-v3-holdout.csv` (model: a version label, a LoggedModel id or a URI)."""
    return f"evaluate-{model}-{dataset_name(dataset_loc)}"


def plural(count: int | str, noun: str) -> str:
    """`1 epoch`, `5 epochs`."""
    return f"{count} {noun}{'' if str(count) == '1' else 's'}"


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A markdown link to a run's page in the MLflow UI."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


def version_link(name: str, version: str | int) -> str:
    """A markdown link to a model version's page in the MLflow UI."""
    return f"[{name} v{version}](#/models/{name}/versions/{version})"


def mlflow_dataset(frame: pd.DataFrame, dataset_loc: str) -> mlflow.data.dataset.Dataset:
    """A labelled frame as an MLflow dataset named after its file (digest, schema, source)."""
    with warnings.catch_warnings():  # MLflow: "source can be interpreted in multiple ways" (both local)
        warnings.filterwarnings("ignore", message="The specified dataset source")
        return mlflow.data.from_pandas(frame, source=dataset_loc, targets="tag", name=dataset_name(dataset_loc))


def log_dataset(client: MlflowClient, run_id: str, frame: pd.DataFrame, dataset_loc: str, context: str) -> None:
    """Log a frame as an input of a run (what mlflow.log_input does, for a run that is not the active one)."""
    dataset = DatasetEntity(**mlflow_dataset(frame, dataset_loc).to_dict())
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def set_note(client: MlflowClient, run_id: str, text: str) -> None:
    """The run's description in the MLflow UI (markdown)."""
    client.set_tag(run_id, MLFLOW_RUN_NOTE, text)


def name_and_describe(run_id: str, name: str, note: str) -> None:
    """Name a run and set its description (also a run `mlflow run` started, whose name is random)."""
    client = MlflowClient()
    client.update_run(run_id, name=name)
    set_note(client, run_id, note)
