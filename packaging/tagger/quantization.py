"""What int8 quantization costs in accuracy: weighted F1 of the fp32 and int8 builds of one model."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig
from mlflow_model.predictor import TorchPredictor
from tagger.data import load_data
from tagger.metrics import scores

logger = logging.getLogger(__name__)
F1_KEYS = ("fp32.f1", "int8.f1", "int8.f1_delta")
NOT_MEASURED = "not measured"


def weighted_f1(artifacts: dict[str, str], config: PredictorConfig, frame) -> float:
    """Weighted F1 of one build (config.quantize) of the staged model on a labelled frame."""
    predictor = TorchPredictor.from_directories(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config)
    predictions = predictor.predict(frame[["title", "description"]])["prediction"]
    return scores(frame["tag"], predictions)["f1"]


def int8_accuracy_change(artifacts: dict[str, str], config: PredictorConfig, dataset_loc: str) -> dict[str, str]:
    """Tags `fp32.f1`, `int8.f1`, `int8.f1_delta` (int8 - fp32) and the dataset, or why it was skipped."""
    if not Path(dataset_loc).is_file() and "://" not in dataset_loc:
        logger.warning("int8 accuracy change not measured: no labelled CSV at %s (use --eval-dataset)", dataset_loc)
        return {"int8.f1_delta": NOT_MEASURED, "int8.eval_dataset": f"missing: {dataset_loc}"}
    frame = load_data(dataset_loc)
    fp32 = weighted_f1(artifacts, dataclasses.replace(config, quantize=None), frame)
    int8 = weighted_f1(artifacts, dataclasses.replace(config, quantize="int8"), frame)
    logger.info("weighted F1 on %s: fp32 %.4f, int8 %.4f (delta %+.4f)", dataset_loc, fp32, int8, int8 - fp32)
    return {
        "fp32.f1": f"{fp32:.6f}",
        "int8.f1": f"{int8:.6f}",
        "int8.f1_delta": f"{int8 - fp32:+.6f}",
        "int8.eval_dataset": dataset_loc,
        "int8.eval_rows": str(len(frame)),
    }


def f1_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The measured F1 values among the tags, as MLflow metrics (none when the check was skipped)."""
    return {key: float(tags[key]) for key in F1_KEYS if key in tags and tags[key] != NOT_MEASURED}
