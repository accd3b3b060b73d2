"""Builds of one trained model (engine x precision): making one through the engine registry, and its F1 change.

torch fp32 is the reference. Each engine's module makes and checks its own files and records
the forward path it runs (`mlflow_model.engines`); this module gives it the staged reference
files and real rows to check against, and measures the build's weighted F1 against torch fp32.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from mlflow_model.checkpoint import encoder_max_length
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, TOKENIZER_FILE, PredictorConfig
from mlflow_model.engines import REFERENCE_BUILD, STATIC_INT8, build_name, engine_module
from mlflow_model.predictor import Predictor
from mlflow_model.preprocess import load_tokenizer, prepare_texts, tokenize
from tagger.data import load_data, stratified_split
from tagger.errors import DatasetError
from tagger.metrics import scores
from tagger.runs import trained_param

logger = logging.getLogger(__name__)
NOT_MEASURED = "not measured"
F1_KEYS = ("accuracy.reference_f1", "accuracy.f1", "accuracy.f1_delta")
SAMPLE_BATCH_ROWS = 16  # rows per batch an engine's build is checked on
CALIBRATION_ROWS = 256  # training rows a static int8 build's activation scales are calibrated on


def is_reference(config: PredictorConfig) -> bool:
    """True for torch fp32, the build every other one is measured against."""
    return (config.engine, config.precision) == REFERENCE_BUILD


def sample_batches(files: dict[str, str], config: PredictorConfig, rows: pd.DataFrame) -> list[list[list[int]]]:
    """Token ids of real rows, in batches, tokenized as the served model will: what a build is checked on."""
    token_ids = token_rows(files, config, rows)
    return [token_ids[i : i + SAMPLE_BATCH_ROWS] for i in range(0, len(token_ids), SAMPLE_BATCH_ROWS)]


def training_rows(params: dict[str, str], count: int = CALIBRATION_ROWS, seed: int = 0) -> pd.DataFrame | None:
    """Up to `count` of a training run's own training rows (its dataset re-split as it was), or None (and why, logged)
    when its dataset cannot be read here."""
    from tagger.config import TrainConfig

    dataset = trained_param(params, "dataset_loc")
    if not dataset:
        logger.warning("the run logged no dataset_loc: its training rows are unknown")
        return None
    try:
        samples = trained_param(params, "num_samples")
        frame = load_data(dataset, int(samples) if samples not in (None, "None") else None)
        val_size = float(trained_param(params, "val_size") or TrainConfig.val_size)
        train, _ = stratified_split(frame, val_size, int(trained_param(params, "seed") or TrainConfig.seed))
    except (DatasetError, KeyError, TypeError, ValueError) as error:
        logger.warning("the training rows of the run cannot be read (%s): %s", dataset, error)
        return None
    return train.sample(min(count, len(train)), random_state=seed)


def token_rows(files: dict[str, str], config: PredictorConfig, rows: pd.DataFrame) -> list[list[int]]:
    """Token ids of rows, tokenized as the served model will."""
    encoder = files[ENCODER_ARTIFACT]
    tokenizer = load_tokenizer(Path(encoder) / TOKENIZER_FILE, config.max_length or encoder_max_length(encoder))
    return tokenize(tokenizer, prepare_texts(rows))


def make_build(
    reference: dict[str, str], out_dir: str | Path, config: PredictorConfig, rows: pd.DataFrame,
    calibration: pd.DataFrame | None = None,
) -> tuple[dict[str, str], PredictorConfig]:
    """The build's files and its config with the forward path recorded, made by its engine's module; a static int8
    build calibrates on `calibration` (training rows), else on `rows`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration_ids = None
    if config.precision == STATIC_INT8:
        if calibration is None:
            logger.warning("static int8: no training rows to calibrate on; calibrating on the %d check rows", len(rows))
        calibration_ids = token_rows(reference, config, calibration if calibration is not None else rows)
    files, config = engine_module(config.engine).build(
        dict(reference), out_dir, config, sample_batches(reference, config, rows), calibration_ids
    )
    logger.info("%s build runs forward path %r", build_name(config.engine, config.precision), config.forward)
    return files, config


def weighted_f1(artifacts: dict[str, str], config: PredictorConfig, frame: pd.DataFrame) -> float:
    """Weighted F1 of one build of the staged model on a labelled frame."""
    with Predictor.from_directories(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config) as predictor:
        predictions = predictor.predict(frame[["title", "description"]])["prediction"]
    return scores(frame["tag"], predictions)["f1"]


def accuracy_change(
    reference: dict[str, str], artifacts: dict[str, str], config: PredictorConfig, dataset_loc: str
) -> dict[str, str]:
    """Tags with the build's weighted F1, torch fp32's, and the change, on a labelled CSV (or why not measured)."""
    if not Path(dataset_loc).is_file() and "://" not in dataset_loc:
        logger.warning("accuracy change not measured: no labelled CSV at %s (use --eval-dataset)", dataset_loc)
        return {"accuracy.f1_delta": NOT_MEASURED, "accuracy.dataset": f"missing: {dataset_loc}"}
    frame = load_data(dataset_loc)
    engine, precision = REFERENCE_BUILD
    base = weighted_f1(reference, dataclasses.replace(config, engine=engine, precision=precision, forward="eager"), frame)
    build = weighted_f1(artifacts, config, frame)
    logger.info("weighted F1 on %s: torch fp32 %.4f, %s %.4f", dataset_loc, base,
                build_name(config.engine, config.precision), build)
    return {
        "accuracy.reference_f1": f"{base:.6f}",
        "accuracy.f1": f"{build:.6f}",
        "accuracy.f1_delta": f"{build - base:+.6f}",
        "accuracy.dataset": dataset_loc,
        "accuracy.rows": str(len(frame)),
    }


def f1_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The measured F1 values among the tags, as MLflow metrics (none when the check was skipped)."""
    return {key: float(tags[key]) for key in F1_KEYS if key in tags and tags[key] != NOT_MEASURED}
