"""Score a model on a labelled CSV (overall, per tag, slices) and log the results to MLflow."""
from __future__ import annotations

import re
import warnings

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient
from sklearn.metrics import ConfusionMatrixDisplay

from mlflow_model.preprocess import prepare_texts
from tagger.config import EvaluateConfig
from tagger.data import load_data
from tagger.errors import RunSelectionError
from tagger.metrics import per_class_scores, scores


def _logged_model_id(client: MlflowClient, uri: str) -> str | None:
    """The LoggedModel id in a `models:/<model_id>` URI, else None."""
    if not uri.startswith("models:/"):
        return None
    parts = get_model_name_and_version(client, uri)
    return parts[0] if len(parts) == 1 else None


def resolve_model(model_uri: str) -> tuple[ModelVersion | None, str | None]:
    """(registered version, LoggedModel id) the URI names; (None, None) for runs:/ and paths."""
    if not model_uri.startswith("models:/"):
        return None, None
    client = MlflowClient()
    try:
        model_id = _logged_model_id(client, model_uri)
        if model_id:  # models:/<model_id>: a LoggedModel, maybe never registered
            return None, model_id
        version = client.get_model_version(*get_model_name_and_version(client, model_uri))
    except MlflowException as error:
        where = mlflow.get_registry_uri()
        raise RunSelectionError(f"model {model_uri!r} not found at {where}: {error.message}") from error
    # The sqlite registry keeps no model_id; the version's source is models:/<model_id>.
    return version, version.model_id or _logged_model_id(client, version.source)


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model, or a RunSelectionError saying why it cannot be loaded."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        raise RunSelectionError(f"cannot load model {model_uri!r}: {error.message}") from error


def slice_masks(tags: pd.Series, texts: list[str], config: EvaluateConfig) -> dict[str, np.ndarray]:
    """Rows of each slice: short texts, and NLP projects that mention transformers or LLMs."""
    pattern = re.compile(config.llm_pattern)
    return {
        "short_texts": np.array([len(text.split()) < config.short_text_max_words for text in texts]),
        "nlp_llm": (tags == config.llm_tag).to_numpy() & np.array([bool(pattern.search(t)) for t in texts]),
    }


def slice_scores(y_true: pd.Series, y_pred: pd.Series, masks: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Weighted scores inside each slice (just num_samples=0 for an empty slice)."""
    return {
        name: scores(y_true[mask], y_pred[mask]) if mask.any() else {"num_samples": 0}
        for name, mask in masks.items()
    }


def confusion_figure(y_true: pd.Series, y_pred: pd.Series, labels: list[str]) -> Figure:
    """Confusion matrix (rows: true tag, columns: predicted tag) as a figure, without pyplot."""
    figure = Figure(figsize=(7, 6), layout="constrained")
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, ax=axes, xticks_rotation=30, colorbar=False)
    axes.set_title("Confusion matrix")
    return figure


def flat_metrics(results: dict) -> dict[str, float]:
    """MLflow metric names: f1, class.<tag>.f1, slice.<name>.f1, ... (num_samples included)."""
    metrics = dict(results["overall"])
    for group, prefix in (("per_class", "class"), ("slices", "slice")):
        for name, values in results[group].items():
            metrics |= {f"{prefix}.{name}.{k}": v for k, v in values.items()}
    return {k: float(v) for k, v in metrics.items()}


def compute_results(frame: pd.DataFrame, predictions: pd.Series, config: EvaluateConfig) -> dict:
    """Overall, per-tag and slice scores of predictions against the frame's tags."""
    y_true, y_pred = frame["tag"].reset_index(drop=True), predictions.reset_index(drop=True)
    labels = sorted(set(y_true) | set(y_pred))
    masks = slice_masks(y_true, prepare_texts(frame), config)
    return {
        "overall": scores(y_true, y_pred),
        "per_class": per_class_scores(y_true, y_pred, labels),
        "slices": slice_scores(y_true, y_pred, masks),
    }


def mlflow_dataset(frame: pd.DataFrame, dataset_loc: str) -> mlflow.data.dataset.Dataset:
    """The evaluation CSV as an MLflow dataset (name, digest, schema, source)."""
    with warnings.catch_warnings():  # MLflow: "source can be interpreted in multiple ways" (both local)
        warnings.filterwarnings("ignore", message="The specified dataset source")
        return mlflow.data.from_pandas(frame, source=dataset_loc, targets="tag", name=dataset_loc.rsplit("/", 1)[-1])


def attach_to_version(version: ModelVersion, results: dict, config: EvaluateConfig) -> None:
    """Version tags eval.f1, eval.precision, eval.recall, eval.num_samples, eval.dataset, eval.run_id."""
    client = MlflowClient()
    values = {**results["overall"], "dataset": results["dataset"], "dataset_digest": results["dataset_digest"],
              "run_id": results["run_id"]}
    for key, value in values.items():
        client.set_model_version_tag(version.name, version.version, f"{config.tag_prefix}{key}", str(value))


def _experiment_id(version: ModelVersion | None) -> str | None:
    """The experiment of the run that logged the version (None: the active/default experiment)."""
    if version is None or not version.run_id:
        return None
    return MlflowClient().get_run(version.run_id).info.experiment_id


def evaluate_model(model_uri: str, dataset_loc: str, config: EvaluateConfig | None = None) -> dict:
    """Score a model on a labelled CSV, log it to an MLflow run and tag the registered version.

    Returns {"model_uri", "version", "model_id", "dataset", "dataset_digest", "run_id", "overall",
    "per_class", "slices"}; the run gets the metrics, the confusion matrix PNG and the JSON.
    """
    config = config or EvaluateConfig()
    frame = load_data(dataset_loc)
    version, model_id = resolve_model(model_uri)
    predictions = load_model(model_uri).predict(frame[["title", "description"]])["prediction"]
    results = compute_results(frame, predictions, config)
    labels = list(results["per_class"])
    dataset = mlflow_dataset(frame, dataset_loc)
    # Under `mlflow run`, MLFLOW_RUN_ID names the run and experiment_id is ignored.
    with mlflow.start_run(experiment_id=_experiment_id(version), run_name=config.run_name) as run:
        mlflow.log_params({"model_uri": model_uri, "dataset": dataset_loc})
        mlflow.log_input(dataset, context="evaluation")
        mlflow.log_metrics(flat_metrics(results), model_id=model_id, dataset=dataset)
        mlflow.log_figure(confusion_figure(frame["tag"], predictions, labels), config.figure_file)
        results = {
            "model_uri": model_uri,
            "version": version.version if version else None,
            "model_id": model_id,
            "dataset": dataset_loc,
            "dataset_digest": dataset.digest,
            "run_id": run.info.run_id,
            **results,
        }
        mlflow.log_dict(results, config.results_file)
    if version is not None:
        attach_to_version(version, results, config)
    return results
