"""Calibration: fit one temperature to a model's logits (temperature scaling), and score probabilities (ECE, Brier).

Temperature scaling (Guo et al., 2017) divides the logits by one number T > 0 before the softmax:
the argmax, so every tag and F1, stays the same; T > 1 softens overconfident probabilities, T < 1
sharpens underconfident ones. T is fitted by minimising the negative log-likelihood of labelled
rows the model was not trained on (the run's validation split, or a CSV given at packaging).
The served model applies it (`mlflow_model.predictor`); a checkpoint without one serves T = 1.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from mlflow_model.checkpoint import write_calibration
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT
from tagger.config import PackageConfig
from tagger.records import dataset_name

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
LOG_T_RANGE = (-3.0, 3.0)  # the fitted temperature lies in [e^-3, e^3] = [0.05, 20]
TEMPERATURE_CHOICES = ("auto", "none")  # `package --temperature`: besides a number > 0


@dataclass(frozen=True)
class CalibrationFit:
    """A fitted temperature and what it did to the rows it was fitted on."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    rows: int

    def to_dict(self) -> dict[str, float]:
        """Plain dict (what calibration.json and the run's metrics hold)."""
        return asdict(self)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def nll(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(len(log_p)), np.asarray(labels)].mean())


def ece(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by its rows."""
    confidence, correct = top_confidence(probabilities, labels)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (k/bins, (k+1)/bins]
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / max(1, len(confidence)))


def ece_noise_floor(probabilities: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these probabilities would score on as many rows, on average
    (labels drawn from the probabilities themselves): with few rows per bin, ECE is above 0 even then."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(probabilities) == 0:
        return 0.0
    cumulative = probabilities.cumsum(axis=1)
    cumulative[:, -1] = 1.0
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(probabilities, (rng.random((len(probabilities), 1)) > cumulative).sum(axis=1))
                          for _ in range(draws)]))


def brier(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot label (0 best, 2 worst).

    A label of -1 (a tag the model does not answer) is the all-zero vector.
    """
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    onehot = np.zeros_like(probabilities)
    known = labels >= 0
    onehot[np.arange(len(probabilities))[known], labels[known]] = 1.0
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def top_confidence(probabilities: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(top probability, whether the top tag is right) of each row."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities.max(axis=1), (probabilities.argmax(axis=1) == np.asarray(labels)).astype(float)


def reliability_bins(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per confidence bin: its edges, rows, mean confidence and accuracy (NaN where empty): the reliability diagram."""
    confidence, correct = top_confidence(probabilities, labels)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, confidence, minlength=bins) / rows
        accuracy = np.bincount(which, correct, minlength=bins) / rows
    return {"edges": np.linspace(0.0, 1.0, bins + 1), "rows": rows, "confidence": mean_confidence,
            "accuracy": accuracy}


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> CalibrationFit:
    """The temperature minimising the NLL of the labels (a bounded 1-D search over log T), and its effect."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        return CalibrationFit(1.0, math.nan, math.nan, math.nan, math.nan, 0)
    found = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), bounds=LOG_T_RANGE,
                            method="bounded", options={"xatol": 1e-4})
    temperature = math.exp(float(found.x))
    if nll(logits, labels, temperature) > nll(logits, labels):  # never worse than leaving it alone
        temperature = 1.0
    return CalibrationFit(
        temperature=temperature,
        nll_before=nll(logits, labels),
        nll_after=nll(logits, labels, temperature),
        ece_before=ece(softmax(logits), labels),
        ece_after=ece(softmax(logits, temperature), labels),
        rows=len(logits),
    )


def label_indices(tags: Sequence[str], labels: list[str], source: str) -> np.ndarray:
    """Each row's tag as its output index; DatasetError naming the tags the model does not know."""
    from tagger.errors import DatasetError

    index = {tag: i for i, tag in enumerate(labels)}
    unknown = sorted(set(tags) - set(index))
    if unknown:
        raise DatasetError(f"{source}: tag(s) {unknown} are not among the model's tags {labels}; "
                           "cannot calibrate on it")
    return np.array([index[tag] for tag in tags])


def fit_on_dataset(checkpoint_dir: str, encoder_dir: str, dataset_loc: str) -> CalibrationFit:
    """Fit a temperature to the torch fp32 logits of a staged checkpoint on a labelled CSV."""
    from mlflow_model.config import PredictorConfig
    from mlflow_model.predictor import Predictor
    from tagger.data import load_data

    frame = load_data(dataset_loc)
    with Predictor.from_directories(checkpoint_dir, encoder_dir, PredictorConfig(forward="eager")) as predictor:
        logits = predictor.predict_logits(frame[["title", "description"]])
        labels = label_indices(list(frame["tag"]), predictor.index_to_class, dataset_loc)
    return fit_temperature(logits, labels)


def parse_temperature(value: str | float) -> str | float:
    """`auto`, `none`, or a number > 0 (as a float); OptionError naming the option otherwise."""
    from tagger.errors import OptionError

    text = str(value).strip().lower()
    if text in TEMPERATURE_CHOICES:
        return text
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not 0 < number < math.inf:
        raise OptionError(f"--temperature must be auto, none or a number > 0, got {value!r}")
    return number


def calibration_choice(choice: str | float, calibration_dataset: str | None) -> str | float:
    """The parsed --temperature, checked against --calibration-dataset (which only `auto` refits with)."""
    from tagger.errors import OptionError

    choice = parse_temperature(choice)
    if calibration_dataset and choice != "auto":
        raise OptionError(f"--calibration-dataset refits the temperature: it needs --temperature auto, got {choice}")
    return choice


def packaged_temperature(
    choice: str | float, calibration_dataset: str | None, checkpoint_dir: str, encoder_dir: str
) -> tuple[float, dict[str, object]]:
    """The temperature a package ships and how it was chosen (calibration.json's details).

    auto: the checkpoint's own (fitted on its training run's validation split, 1 if it has none), or
    refitted on `calibration_dataset`; none: 1 (no calibration); a number: that number.
    """
    from mlflow_model.checkpoint import CALIBRATION_FILE, read_temperature

    choice = calibration_choice(choice, calibration_dataset)
    if choice == "none":
        return 1.0, {"source": "none"}
    if choice != "auto":
        return float(choice), {"source": "given"}
    if calibration_dataset:
        fitted = fit_on_dataset(checkpoint_dir, encoder_dir, calibration_dataset)
        measured = {k: v for k, v in fitted.to_dict().items() if k != "temperature"}
        return fitted.temperature, {"source": "refit", "fitted_on": calibration_dataset, **measured}
    own = Path(checkpoint_dir) / CALIBRATION_FILE
    if not own.is_file():
        return 1.0, {"source": "checkpoint without one"}
    details = {k: v for k, v in json.loads(own.read_text()).items() if k not in ("temperature", "source")}
    return read_temperature(checkpoint_dir), {"source": "checkpoint", **details}


def calibrate(config: PackageConfig, staged: dict[str, str]) -> tuple[float, dict]:
    """Choose the temperature (--temperature, --calibration-dataset) and write it into the staged checkpoint."""
    temperature, details = packaged_temperature(config.temperature, config.calibration_dataset,
                                                staged[CHECKPOINT_ARTIFACT], staged[ENCODER_ARTIFACT])
    write_calibration(staged[CHECKPOINT_ARTIFACT], temperature, **details)
    return temperature, details


def describe_calibration(details: dict) -> str:
    """Where the packaged temperature comes from, in words."""
    source = details["source"]
    if source == "checkpoint":
        return f"fitted on the training run's {details.get('fitted_on', 'validation split')}"
    if source == "refit":
        return f"refitted at packaging on `{dataset_name(details['fitted_on'])}` ({details['rows']} rows)"
    return {"none": "calibration turned off", "given": "given at packaging"}.get(source, "the checkpoint has none")
