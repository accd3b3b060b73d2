"""Score a model on a labelled CSV (overall, per tag, slices, calibration) and log a report to MLflow.

The run is named `evaluate-<model>-v<N>-<dataset>`; overall accuracy, weighted
precision/recall/F1, and the calibration of its probabilities (ECE over 15 bins, Brier score, mean
confidence) are its metrics (also on the LoggedModel); per-tag and slice scores are one table
(`evaluation_table.json`), the threshold sweep another (`threshold_sweep.json`). Its figures,
titled with the model, version and dataset: the confusion matrix, the reliability diagram, per-tag
precision/recall and the threshold sweep (coverage and accuracy against `threshold`). A registered
version gets `eval.*` tags and its description's first line names the F1 and ECE and links the run.
"""
from __future__ import annotations

import re

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient

from mlflow_model.errors import TaggerError
from mlflow_model.preprocess import prepare_texts
from tagger.calibration import brier, ece, ece_noise_floor, reliability_bins, top_confidence
from tagger.config import EvaluateConfig
from tagger.data import load_data
from tagger.errors import RunSelectionError
from tagger.figures import confusion_figure, per_tag_figure, reliability_figure, threshold_figure
from tagger.metrics import per_class_scores, scores
from tagger.records import dataset_name, evaluate_run_name, mlflow_dataset, name_and_describe, version_label
from tagger.registry import refresh_headline
from tagger.signing import load_model as load_checked

OVERALL_METRICS = ("accuracy", "precision", "recall", "f1")  # run metrics; the rest goes into the table
CALIBRATION_METRICS = ("ece", "ece_noise_floor", "brier", "mean_confidence", "top_accuracy")  # run metrics too
SWEEP_STEP = 0.01  # thresholds of the sweep: 0, 0.01, ..., 1


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
        return load_checked(model_uri)
    except TaggerError:  # a model that fails its integrity or signature check: as it is
        raise
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


def probability_matrix(probabilities: pd.Series) -> tuple[np.ndarray, list[str]]:
    """The model's per-tag probabilities (one dict per row) as rows x tags, and the tags (the columns)."""
    tags = list(probabilities.iloc[0])
    return np.array([[row[tag] for tag in tags] for row in probabilities], dtype=np.float64), tags


def label_positions(y_true: pd.Series, tags: list[str]) -> np.ndarray:
    """Each row's true tag as a column of the probability matrix (-1: a tag the model does not answer)."""
    index = {tag: i for i, tag in enumerate(tags)}
    return np.array([index.get(tag, -1) for tag in y_true])


def calibration_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ECE (15 bins) and what a perfectly calibrated model would score, Brier score, mean top probability and the
    top tag's accuracy (no threshold)."""
    confidence, correct = top_confidence(probabilities, labels)
    return {"ece": ece(probabilities, labels), "ece_noise_floor": ece_noise_floor(probabilities),
            "brier": brier(probabilities, labels),
            "mean_confidence": float(confidence.mean()), "top_accuracy": float(correct.mean())}


def threshold_sweep(probabilities: np.ndarray, labels: np.ndarray, tags: list[str], fallback: str) -> pd.DataFrame:
    """Per threshold: coverage (rows whose top probability reaches it, not turned into the fallback tag), the
    accuracy of those answers, and the accuracy of all answers (fallback ones right when the row is that tag)."""
    confidence, correct = top_confidence(probabilities, labels)
    is_fallback_row = labels == (tags.index(fallback) if fallback in tags else -2)
    rows = []
    for threshold in np.round(np.arange(0.0, 1.0 + SWEEP_STEP / 2, SWEEP_STEP), 2):
        kept = confidence >= threshold
        rows.append({
            "threshold": float(threshold),
            "coverage": float(kept.mean()),
            "accuracy_kept": float(correct[kept].mean()) if kept.any() else float("nan"),
            "accuracy_all": float(np.where(kept, correct, is_fallback_row).mean()),
            "rows_kept": int(kept.sum()),
        })
    return pd.DataFrame(rows)


def without_nan(values: dict | list) -> dict | list:
    """The values with NaN (an empty bin or threshold) as None, so that the results are plain JSON."""
    def plain(value: object) -> object:
        return None if isinstance(value, float) and np.isnan(value) else value

    return {k: plain(v) for k, v in values.items()} if isinstance(values, dict) else [plain(v) for v in values]


def overall_metrics(results: dict) -> dict[str, float]:
    """The run's metrics: accuracy, weighted precision, recall, F1, and the calibration scores."""
    return {k: float(results["overall"][k]) for k in OVERALL_METRICS} | {
        k: float(results["calibration"][k]) for k in CALIBRATION_METRICS
    }


def scores_table(results: dict) -> pd.DataFrame:
    """One row per scope (overall, each tag, each slice): rows, precision, recall, F1 (weighted, but for one tag)."""
    rows = [{"scope": "overall", "name": "all rows", **results["overall"]}]
    rows += [{"scope": "tag", "name": tag, **values} for tag, values in results["per_class"].items()]
    rows += [{"scope": "slice", "name": name, **values} for name, values in results["slices"].items()]
    table = pd.DataFrame(rows).rename(columns={"num_samples": "rows"})
    return table.reindex(columns=["scope", "name", "rows", "precision", "recall", "f1"]).round(4)


def compute_results(frame: pd.DataFrame, answers: pd.DataFrame, config: EvaluateConfig) -> dict:
    """Overall, per-tag, slice and calibration scores of the model's answers against the frame's tags."""
    y_true, y_pred = frame["tag"].reset_index(drop=True), answers["prediction"].reset_index(drop=True)
    labels = sorted(set(y_true) | set(y_pred))
    masks = slice_masks(y_true, prepare_texts(frame), config)
    probabilities, tags = probability_matrix(answers["probabilities"])
    positions = label_positions(y_true, tags)
    return {
        "overall": scores(y_true, y_pred),
        "per_class": per_class_scores(y_true, y_pred, labels),
        "slices": slice_scores(y_true, y_pred, masks),
        "calibration": calibration_scores(probabilities, positions),
        "threshold_sweep": [without_nan(row) for row in
                            threshold_sweep(probabilities, positions, tags, config.fallback_tag).to_dict("records")],
        "reliability": {k: without_nan(v.tolist()) for k, v in reliability_bins(probabilities, positions).items()},
    }


def attach_to_version(version: ModelVersion, results: dict, config: EvaluateConfig) -> None:
    """Version tags eval.f1, eval.precision, ..., eval.dataset (its name), eval.run_id; the headline names the F1."""
    client = MlflowClient()
    measured = results["overall"] | {k: results["calibration"][k] for k in ("ece", "brier", "mean_confidence")}
    scores = {k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in measured.items()}
    values = {**scores, "dataset": dataset_name(results["dataset"]), "dataset_digest": results["dataset_digest"],
              "run_id": results["run_id"], "experiment_id": results["experiment_id"]}
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
    overall, calibration = results["overall"], results["calibration"]
    sweep = pd.DataFrame(results["threshold_sweep"]).set_index("threshold")
    choices = "; ".join(f"{t:g} keeps {sweep.loc[t, 'coverage']:.0%} of answers at {sweep.loc[t, 'accuracy_kept']:.1%}"
                        for t in (0.5, 0.8, 0.9))
    return (
        f"Evaluates **{shown}** (`{model_uri}`) on `{dataset_name(dataset_loc)}` ({overall['num_samples']} rows): "
        f"weighted F1 {overall['f1']:.4f}, precision {overall['precision']:.4f}, recall {overall['recall']:.4f}.\n\n"
        f"Calibration: ECE {calibration['ece']:.4f} (a perfectly calibrated model with these confidences would "
        f"score {calibration['ece_noise_floor']:.4f} on as many rows), Brier {calibration['brier']:.4f}, mean confidence "
        f"{calibration['mean_confidence']:.3f} against accuracy {calibration['top_accuracy']:.3f} "
        f"(`{config.reliability_file}`). Threshold: {choices} (`{config.threshold_file}`, `{config.sweep_table_file}`)."
        f"\n\nWhere it fails: `{config.figure_file}` and `{config.per_tag_file}`; per tag and per slice, "
        f"the table `{config.table_file}`."
    )


def experiment_of(version: ModelVersion | None) -> str | None:
    """The experiment of the active run, else of the run that logged the version (None: the default)."""
    active = mlflow.active_run()
    if active is not None:
        return active.info.experiment_id
    if version is None or not version.run_id:
        return None
    return MlflowClient().get_run(version.run_id).info.experiment_id


def log_figures(y_true: pd.Series, y_pred: pd.Series, labels: list[str], results: dict, what: str,
                config: EvaluateConfig) -> None:
    """The report's four figures, each titled with `what` (model, version, dataset), as PNGs of the run."""
    calibration = results["calibration"]
    bins = {k: np.asarray(v, dtype=float) for k, v in results["reliability"].items()}
    figures = {
        config.figure_file: confusion_figure(y_true, y_pred, labels, f"Confusion matrix: {what}"),
        config.reliability_file: reliability_figure(bins, calibration, f"Reliability: {what}"),
        config.per_tag_file: per_tag_figure(results["per_class"], f"Precision and recall per tag: {what}"),
        config.threshold_file: threshold_figure(pd.DataFrame(results["threshold_sweep"]), config.fallback_tag,
                                                f"Threshold sweep: {what}"),
    }
    for name, figure in figures.items():
        mlflow.log_figure(figure, name)


def evaluate_model(model_uri: str, dataset_loc: str, config: EvaluateConfig | None = None) -> dict:
    """Score a model on a labelled CSV, log it to an MLflow run and tag the registered version.

    Returns {"model_uri", "version", "model_id", "dataset", "dataset_digest", "run_id", "overall",
    "per_class", "slices"}; the run gets the metrics, the table, the confusion matrix PNG and the JSON.
    Inside an active run (a promotion), the evaluation is a run nested in it.
    """
    config = config or EvaluateConfig()
    frame = load_data(dataset_loc)
    version, model_id = resolve_model(model_uri)
    answers = load_model(model_uri).predict(frame[["title", "description"]])
    predictions = answers["prediction"]
    results = compute_results(frame, answers, config)
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
        mlflow.log_table(pd.DataFrame(results["threshold_sweep"]).round(4), config.sweep_table_file)
        log_figures(frame["tag"], predictions, labels, results, f"{shown} on {dataset_name(dataset_loc)}", config)
        results = {
            "model_uri": model_uri,
            "version": version.version if version else None,
            "model_id": model_id,
            "dataset": dataset_loc,
            "dataset_digest": dataset.digest,
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            **results,
        }
        mlflow.log_dict(results, config.results_file)
    if version is not None:
        attach_to_version(version, results, config)
    return results
