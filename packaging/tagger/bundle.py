"""Bundle a checkpoint and its encoder into an MLflow pyfunc model (models from code)."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo

from mlflow_model.checkpoint import read_checkpoint, write_checkpoint
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig
from mlflow_model.errors import CheckpointError
from mlflow_model.predictor import TorchPredictor
from tagger.sessions import RUNTIME_PACKAGE

PYFUNC_FILE = RUNTIME_PACKAGE / "pyfunc.py"
# What the served model imports (no Ray); pinned to the versions installed here.
RUNTIME_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")
INPUT_EXAMPLE = pd.DataFrame(
    {
        "title": ["Transfer learning with transformers", "Real-time object detection on video"],
        "description": ["Using BERT and T5 for text classification.", "YOLO models on edge GPUs."],
    }
)


def pinned_requirements() -> list[str]:
    """`name==version` for each runtime package, as installed (local labels like +cpu dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in RUNTIME_REQUIREMENTS]


def stage_artifacts(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path) -> dict[str, str]:
    """Write the model's artifacts: weights as safetensors + label map, encoder config + tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    out_dir = Path(out_dir)
    checkpoint = read_checkpoint(checkpoint_dir)
    write_checkpoint(out_dir / CHECKPOINT_ARTIFACT, checkpoint.state_dict, checkpoint.args, checkpoint.class_to_index)
    encoder_dir = out_dir / ENCODER_ARTIFACT
    try:
        AutoConfig.from_pretrained(base_model).save_pretrained(encoder_dir)
        AutoTokenizer.from_pretrained(base_model).save_pretrained(encoder_dir)
    except OSError as error:  # not a folder with config + tokenizer, nor a reachable hub name
        raise CheckpointError(f"cannot load the encoder config and tokenizer from {base_model!r}: {error}") from error
    return {CHECKPOINT_ARTIFACT: str(out_dir / CHECKPOINT_ARTIFACT), ENCODER_ARTIFACT: str(encoder_dir)}


def model_signature(predictor: TorchPredictor, config: PredictorConfig) -> ModelSignature:
    """Input columns, output columns and the params with their packaged defaults."""
    params = {"threshold": float(config.threshold), "batch_size": int(config.batch_size)}
    return infer_signature(INPUT_EXAMPLE, predictor.predict(INPUT_EXAMPLE), params=params)


def log_pyfunc(
    artifacts: dict[str, str], config: PredictorConfig, metadata: dict[str, str] | None = None
) -> ModelInfo:
    """Log the pyfunc into the active run; the predictor is built once here to check it loads."""
    predictor = TorchPredictor.from_directories(artifacts[CHECKPOINT_ARTIFACT], artifacts[ENCODER_ARTIFACT], config)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_FILE),
        artifacts=artifacts,
        code_paths=[str(RUNTIME_PACKAGE)],
        model_config=config.to_dict(),
        signature=model_signature(predictor, config),
        input_example=INPUT_EXAMPLE,
        pip_requirements=pinned_requirements(),
        metadata={"quantize": config.quantize or "none", **(metadata or {})},
    )
