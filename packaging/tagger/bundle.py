"""Bundle a build's files into an MLflow pyfunc model (models from code) with its integrity manifest."""
from __future__ import annotations

import dataclasses
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.models.model import ModelInfo

from mlflow_model.checkpoint import (
    CALIBRATION_FILE, index_to_class, read_checkpoint, read_temperature, write_checkpoint,
)
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, REQUEST_PARAMS, PredictorConfig
from mlflow_model.engines import ENGINES
from mlflow_model.errors import CheckpointError
from mlflow_model.integrity import verify_artifacts, write_manifest
from mlflow_model.predictor import Predictor
from tagger.sessions import RUNTIME_PACKAGE
from tagger.signing import verification_off

PYFUNC_FILE = RUNTIME_PACKAGE / "pyfunc.py"
INPUT_EXAMPLE = pd.DataFrame(
    {
        "title": ["Transfer learning with transformers", "Real-time object detection on video"],
        "description": ["Using BERT and T5 for text classification.", "YOLO models on edge GPUs."],
    }
)


def pinned_requirements(engine: str) -> list[str]:
    """`name==version` for each package the engine's served model imports (local labels like +cpu dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in ENGINES[engine].requirements]


def stage_artifacts(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path) -> dict[str, str]:
    """Write the model's artifacts: weights as safetensors + label map (+ calibration), encoder config + tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    out_dir = Path(out_dir)
    checkpoint = read_checkpoint(checkpoint_dir)
    write_checkpoint(out_dir / CHECKPOINT_ARTIFACT, checkpoint.state_dict, checkpoint.args, checkpoint.class_to_index)
    if (Path(checkpoint_dir) / CALIBRATION_FILE).is_file():
        read_temperature(checkpoint_dir)  # a bad one fails here, naming the file
        shutil.copy(Path(checkpoint_dir) / CALIBRATION_FILE, out_dir / CHECKPOINT_ARTIFACT / CALIBRATION_FILE)
    encoder_dir = out_dir / ENCODER_ARTIFACT
    try:
        AutoConfig.from_pretrained(base_model).save_pretrained(encoder_dir)
        AutoTokenizer.from_pretrained(base_model).save_pretrained(encoder_dir)
    except OSError as error:  # not a folder with config + tokenizer, nor a reachable hub name
        raise CheckpointError(f"cannot load the encoder config and tokenizer from {base_model!r}: {error}") from error
    return {CHECKPOINT_ARTIFACT: str(out_dir / CHECKPOINT_ARTIFACT), ENCODER_ARTIFACT: str(encoder_dir)}


def model_signature(predictor: Predictor, config: PredictorConfig) -> ModelSignature:
    """Input columns, output columns and the request params with their packaged defaults."""
    params = {name: getattr(config, name) for name in REQUEST_PARAMS}
    return infer_signature(INPUT_EXAMPLE, predictor.predict(INPUT_EXAMPLE), params=params)


def request_row_limit(predictor: Predictor, config: PredictorConfig, rows: int = 256, share: float = 0.5) -> int:
    """Rows one online request may hold: what this build predicts in `share` of the request timeout, measured now."""
    frame = pd.concat([INPUT_EXAMPLE] * (rows // len(INPUT_EXAMPLE)), ignore_index=True)
    predictor.predict(frame.head(config.batch_size))  # warm-up
    started = time.perf_counter()
    predictor.predict(frame)
    rows_per_s = len(frame) / (time.perf_counter() - started)
    return max(100, int(rows_per_s * config.timeout_s * share) // 100 * 100)


def final_settings(artifacts: dict[str, str], config: PredictorConfig) -> tuple[PredictorConfig, ModelSignature]:
    """The settings the model ships with (the request row limit measured if not given) and its signature;
    the predictor is built once here, which also checks that the build loads."""
    with Predictor.from_directories(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config) as predictor:
        signature = model_signature(predictor, config)
        if config.max_request_rows is None:
            config = dataclasses.replace(config, max_request_rows=request_row_limit(predictor, config))
    return config, signature


def log_pyfunc(
    artifacts: dict[str, str],
    config: PredictorConfig,
    signature: ModelSignature,
    run_id: str,
    manifest_dir: str | Path,
    metadata: dict[str, str] | None = None,
) -> ModelInfo:
    """Log the pyfunc as a LoggedModel of the package run (shown among the run's logged models).

    Logged outside an active run on purpose: inside one, MLflow also logs every model_config entry
    as a run param (a second copy of each setting, which a run of `mlflow run` refuses anyway).
    The model page shows the settings once, as the LoggedModel's params.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.tracking import MlflowClient

    settings = config.to_dict()
    model = mlflow.initialize_logged_model(  # in the run's experiment, not the current one (Default when none is set)
        name="model", source_run_id=run_id, params={name: str(value) for name, value in settings.items()},
        experiment_id=mlflow.get_run(run_id).info.experiment_id,
    )
    with verification_off():  # MLflow loads the model to check its input example: it is not signed yet
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts=write_manifest(artifacts, manifest_dir),
            code_paths=[str(RUNTIME_PACKAGE)],
            model_config=settings,
            signature=signature,
            input_example=INPUT_EXAMPLE,
            pip_requirements=pinned_requirements(config.engine),
            metadata={"engine": config.engine, "precision": config.precision, "forward": config.forward,
                      "labels": index_to_class(artifacts[CHECKPOINT_ARTIFACT]), **(metadata or {})},
            model_id=model.model_id,
        )
    MlflowClient().log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return info


def verify_package(model_uri: str) -> int:
    """Download a packaged model and check its files against its integrity manifest; the files checked."""
    return verify_folder(Path(mlflow.artifacts.download_artifacts(model_uri)))


def verify_folder(local: Path) -> int:
    """Check a local model folder's artifact files against its integrity manifest; the files checked."""
    flavor = Model.load(str(local / "MLmodel")).flavors["python_function"]
    artifacts = {name: str(local / entry["path"]) for name, entry in flavor.get("artifacts", {}).items()}
    return verify_artifacts(artifacts, flavor.get("config"))
