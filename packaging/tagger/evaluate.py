"""Score a model on a labelled CSV (overall, per tag, slices) and log the results to MLflow.

The run is named `evaluate-<model>-v<N>-<dataset>`; overall accuracy and weighted
precision/recall/F1 are its metrics (also on the LoggedModel), per-tag and slice scores one table
(`evaluation_table.json`, shown in the run's artifacts), with a confusion matrix titled with the
version and the dataset. A registered version gets `eval.*` tags and its description's first line
names the F1.
"""
from __future__ import annotations

import re

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
from tagger.records import dataset_name, evaluate_run_name, mlflow_dataset, name_and_describe, version_label
from tagger.registry import refresh_headline

OVERALL_METRICS = ("accuracy", "precision", "recall", "f1")  # run metrics; the rest goes into the table


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


def confusion_figure(y_true: pd.Series, y_pred: pd.Series, labels: list[str], title: str) -> Figure:
    """Confusion matrix (rows: true tag, columns: predicted tag) as a figure, without pyplot."""
    figure = Figure(figsize=(7, 6), layout="constrained")
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, ax=axes, xticks_rotation=30, colorbar=False)
    axes.set_title(title)
    return figure


def overall_metrics(results: dict) -> dict[str, float]:
    """The run's metrics: accuracy and weighted precision, recall, F1 over the whole dataset."""
    return {k: float(results["overall"][k]) for k in OVERALL_METRICS}


def scores_table(results: dict) -> pd.DataFrame:
    """One row per scope (overall, each tag, each slice): rows, precision, recall, F1 (weighted, but for one tag)."""
    rows = [{"scope": "overall", "name": "all rows", **results["overall"]}]
    rows += [{"scope": "tag", "name": tag, **values} for tag, values in results["per_class"].items()]
    rows += [{"scope": "slice", "name": name, **values} for name, values in results["slices"].items()]
    table = pd.DataFrame(rows).rename(columns={"num_samples": "rows"})
    return table.reindex(columns=["scope", "name", "rows", "precision", "recall", "f1"]).round(4)


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


def attach_to_version(version: ModelVersion, results: dict, config: EvaluateConfig) -> None:
    """Version tags eval.f1, eval.precision, ..., eval.dataset (its name), eval.run_id; the headline names the F1."""
    client = MlflowClient()
    scores = {k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in results["overall"].items()}
    values = {**scores, "dataset": dataset_name(results["dataset"]),
              "dataset_digest": results["dataset_digest"], "run_id": results["run_id"]}
    for key, value in values.items():
        client.set_model_version_tag(version.name, version.version, f"{config.tag_prefix}{key}", str(value))
    refresh_headline(version.name, version.version)


def model_label(model_uri: str, version: ModelVersion | None, model_id: str | None) -> str:
    """How runs name the evaluated model: `tagger-v3`, a LoggedModel id, else the URI's last part."""
    if version is not None:
        return version_label(version.name, version.version)
    return model_id or model_uri.rstrip("/").rsplit("/", 1)[-1]


def describe_evaluation(shown: str, model_uri: str, dataset_loc: str, results: dict, config: EvaluateConfig) -> str:
    """The evaluation run's description: what was scored on what, and the overall result."""
    overall = results["overall"]
    return (
        f"Evaluates **{shown}** (`{model_uri}`) on `{dataset_name(dataset_loc)}` ({overall['num_samples']} rows): "
        f"weighted F1 {overall['f1']:.4f}, precision {overall['precision']:.4f}, recall {overall['recall']:.4f}.\n\n"
        f"Per tag and per slice: the table `{config.table_file}` (artifacts); confusion matrix: "
        f"`{config.figure_file}`."
    )


def experiment_of(version: ModelVersion | None) -> str | None:
    """The experiment of the active run, else of the run that logged the version (None: the default)."""
    active = mlflow.active_run()
    if active is not None:
        return active.info.experiment_id
    if version is None or not version.run_id:
        return None
    return MlflowClient().get_run(version.run_id).info.experiment_id


def evaluate_model(model_uri: str, dataset_loc: str, config: EvaluateConfig | None = None) -> dict:
    """Score a model on a labelled CSV, log it to an MLflow run and tag the registered version.

    Returns {"model_uri", "version", "model_id", "dataset", "dataset_digest", "run_id", "overall",
    "per_class", "slices"}; the run gets the metrics, the table, the confusion matrix PNG and the JSON.
    Inside an active run (a promotion), the evaluation is a run nested in it.
    """
    config = config or EvaluateConfig()
    frame = load_data(dataset_loc)
    version, model_id = resolve_model(model_uri)
    predictions = load_model(model_uri).predict(frame[["title", "description"]])["prediction"]
    results = compute_results(frame, predictions, config)
    labels = list(results["per_class"])
    dataset = mlflow_dataset(frame, dataset_loc)
    label = model_label(model_uri, version, model_id)
    shown = f"{version.name} v{version.version}" if version else label
    # Under `mlflow run`, MLFLOW_RUN_ID names the run and experiment_id is ignored.
    with mlflow.start_run(experiment_id=experiment_of(version), nested=mlflow.active_run() is not None) as run:
        name_and_describe(run.info.run_id, evaluate_run_name(label, dataset_loc),
                          describe_evaluation(shown, model_uri, dataset_loc, results, config))
        mlflow.set_tags({"model_name": version.name, "model_version": str(version.version)} if version else {})
        # Own key names: under `mlflow run` the run already holds the entry point's raw params (model_uri="").
        mlflow.log_params({"uri": model_uri, "model": label, "dataset": dataset_name(dataset_loc),
                           "num_rows": results["overall"]["num_samples"]})
        mlflow.log_input(dataset, context="evaluation")
        mlflow.log_metrics(overall_metrics(results), model_id=model_id, dataset=dataset)
        mlflow.log_table(scores_table(results), config.table_file)
        title = f"Confusion matrix: {shown} on {dataset_name(dataset_loc)}"
        mlflow.log_figure(confusion_figure(frame["tag"], predictions, labels, title), config.figure_file)
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
