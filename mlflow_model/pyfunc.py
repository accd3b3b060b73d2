"""The MLflow pyfunc, logged as *models from code*: MLflow imports this file and calls set_model.

Artifacts: `checkpoint` (the build's weights or graph, args.json, class_to_index.json) and
`encoder` (transformers config + tokenizer files), so loading needs no network and no
unpickling. `model_config` holds the PredictorConfig chosen at packaging, including the forward
path the build runs; the integrity manifest (`manifest.json`) is checked before anything is read.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig


class TaggerModel(PythonModel):
    """Title + description -> tag and per-tag probabilities."""

    def load_context(self, context: PythonModelContext) -> None:
        """Check the files against the packaged manifest, then rebuild the build's predictor once per process."""
        from mlflow_model.integrity import verify_artifacts
        from mlflow_model.predictor import Predictor

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
