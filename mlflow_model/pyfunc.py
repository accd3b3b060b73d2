"""The MLflow pyfunc, logged as *models from code*: MLflow imports this file and calls set_model.

Artifacts: `checkpoint` (model.safetensors, args.json, class_to_index.json) and `encoder`
(transformers config + tokenizer files), so loading needs no network and no unpickling.
`model_config` holds the PredictorConfig chosen at packaging time.
"""
from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT


class TaggerModel(PythonModel):
    """Title + description -> tag and per-tag probabilities."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the TorchPredictor (model in eval mode) once per process."""
        from mlflow_model.config import PredictorConfig
        from mlflow_model.predictor import TorchPredictor

        self.predictor = TorchPredictor.from_directories(
            context.artifacts[CHECKPOINT_ARTIFACT],
            context.artifacts[ENCODER_ARTIFACT],
            PredictorConfig.from_dict(context.model_config),
        )

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Predict each row; params `threshold` and `batch_size` override the packaged defaults."""
        params = params or {}
        return self.predictor.predict(
            model_input, threshold=params.get("threshold"), batch_size=params.get("batch_size")
        )


mlflow.models.set_model(TaggerModel())
