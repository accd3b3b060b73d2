"""The MLflow pyfunc, logged as *models from code*: MLflow imports this file and calls set_model.

Artifacts: `checkpoint` (the build's weights or graph, args.json, class_to_index.json) and
`encoder` (transformers config + tokenizer files), so loading needs no network and no
unpickling. `model_config` holds the PredictorConfig chosen at packaging, including the forward
path the build runs; the integrity manifest (`manifest.json`) is checked before anything is read,
and, when TAGGER_VERIFY_KEY names a public key, the model's signature (`model.sig`) first. That
signature check is defence in depth against corruption, not against tampering: whoever can rewrite
the model can rewrite this file too. The tamper defence is the installed tagger verifying a
downloaded copy before it loads it (`tagger fetch`, `tagger serve`, `tagger batch-predict`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig, verify_key_path
from mlflow_model.errors import CheckpointError


def model_folder(artifacts: dict[str, str]) -> Path:
    """The model's root folder (MLmodel's): MLflow keeps each artifact at `<root>/artifacts/<name>`."""
    root = Path(artifacts[CHECKPOINT_ARTIFACT]).parent.parent
    if not (root / "MLmodel").is_file():
        raise CheckpointError(f"cannot find the model folder of artifact {artifacts[CHECKPOINT_ARTIFACT]} (no MLmodel)")
    return root


class TaggerModel(PythonModel):
    """Title + description -> tag and per-tag probabilities."""

    def load_context(self, context: PythonModelContext) -> None:
        """Check the signature (if a key is set) and the manifest, then rebuild the build's predictor once per process."""
        from mlflow_model.integrity import verify_artifacts
        from mlflow_model.predictor import Predictor

        if key_path := verify_key_path():
            from mlflow_model.signature import read_public_key, verify_model

            verify_model(model_folder(context.artifacts), read_public_key(key_path), skip_byproducts=True)
        verify_artifacts(context.artifacts, context.model_config)
        self.predictor = Predictor.from_directories(
            context.artifacts[CHECKPOINT_ARTIFACT],
            context.artifacts[ENCODER_ARTIFACT],
            PredictorConfig.from_dict(context.model_config),
        )

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Predict each row; params `threshold`, `batch_size` and `bad_rows` override the packaged defaults."""
        return self.predictor.predict(model_input, params)

    def observe_batches(self, callback: Callable[[int], None]) -> None:
        """Call `callback(rows)` after each forward batch, which gathers the rows of concurrent requests (metrics)."""
        self.predictor.observe_batches(callback)

    def close(self) -> None:
        """Stop the model's inference threads: a server that replaces this version with another calls it."""
        self.predictor.close()


mlflow.models.set_model(TaggerModel())
