"""Builds of one trained model (engine x precision): which exist, their ONNX files, their F1 against torch fp32.

torch fp32 is the reference. torch bf16 and int8 use the same weights file (the precision is
applied at load); an ONNX build exports the model once, optimizes the graph, quantizes it for
int8, and checks it against torch fp32 on real rows before it is registered.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pandas as pd

from mlflow_model.checkpoint import ARGS_FILE, LABELS_FILE, load_finetuned
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig
from mlflow_model.predictor import load_predictor
from tagger.data import load_data
from tagger.errors import BuildError
from tagger.metrics import scores

logger = logging.getLogger(__name__)
BUILDS = {"torch": ("fp32", "bf16", "int8"), "onnx": ("fp32", "int8")}
REFERENCE = ("torch", "fp32")
NOT_MEASURED = "not measured"
F1_KEYS = ("accuracy.reference_f1", "accuracy.f1", "accuracy.f1_delta")


def check_build(engine: str, precision: str) -> None:
    """Refuse an engine x precision that does not exist, saying which do."""
    if engine not in BUILDS:
        raise BuildError(f"unknown engine {engine!r}; use one of {sorted(BUILDS)}")
    if precision not in BUILDS[engine]:
        choices = ", ".join(f"{e} {p}" for e, ps in BUILDS.items() for p in ps)
        raise BuildError(f"engine {engine!r} has no {precision!r} build; the builds are: {choices}")


def is_reference(config: PredictorConfig) -> bool:
    """True for torch fp32, the build every other one is measured against."""
    return (config.engine, config.precision) == REFERENCE


def onnx_artifacts(reference: dict[str, str], out_dir: str | Path, precision: str, rows: pd.DataFrame) -> dict[str, str]:
    """The ONNX build's artifacts: model.onnx + its weights + label map, and the same encoder files as the reference."""
    from transformers import AutoConfig

    from tagger.onnx_build import build_onnx

    out_dir = Path(out_dir)
    checkpoint, encoder = out_dir / CHECKPOINT_ARTIFACT, out_dir / ENCODER_ARTIFACT
    shutil.copytree(reference[ENCODER_ARTIFACT], encoder)
    checkpoint.mkdir(parents=True)
    for name in (ARGS_FILE, LABELS_FILE):
        shutil.copy(Path(reference[CHECKPOINT_ARTIFACT]) / name, checkpoint / name)
    model = load_finetuned(reference[CHECKPOINT_ARTIFACT], encoder)
    with load_predictor(reference[CHECKPOINT_ARTIFACT], encoder, PredictorConfig()) as predictor:
        token_ids, pad_id = predictor.preprocess(rows), predictor.pad_id
    samples = [token_ids[i : i + 16] for i in range(0, len(token_ids), 16)]
    build_onnx(model, AutoConfig.from_pretrained(encoder), checkpoint, precision, samples, pad_id)
    return {CHECKPOINT_ARTIFACT: str(checkpoint), ENCODER_ARTIFACT: str(encoder)}


def save_reference_trace(artifacts: dict[str, str]) -> None:
    """torch fp32: trace the model once here and ship the trace, so the served model loads without transformers."""
    from mlflow_model.traced import save_trace

    checkpoint = artifacts[CHECKPOINT_ARTIFACT]
    if save_trace(load_finetuned(checkpoint, artifacts[ENCODER_ARTIFACT]), checkpoint) is None:
        logger.warning("no trace shipped: the served model will build the model with transformers and run it eagerly")


def weighted_f1(artifacts: dict[str, str], config: PredictorConfig, frame: pd.DataFrame) -> float:
    """Weighted F1 of one build of the staged model on a labelled frame."""
    with load_predictor(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config) as predictor:
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
    base = weighted_f1(reference, dataclasses.replace(config, engine="torch", precision="fp32"), frame)
    build = weighted_f1(artifacts, config, frame)
    logger.info("weighted F1 on %s: torch fp32 %.4f, %s %s %.4f", dataset_loc, base, config.engine, config.precision, build)
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
