"""The MLflow pyfunc, logged as *models from code*: MLflow imports this file and calls set_model.

Artifacts: `checkpoint` (model.safetensors, args.json, class_to_index.json) and `encoder`
(transformers config + tokenizer files), so loading needs no network and no unpickling.
`model_config` holds the PredictorConfig chosen at packaging time and the SHA-256 of every artifact
file, checked before anything is read.
"""
from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig
from mlflow_model.errors import InvalidInputError


def check_request_size(rows: int, config: PredictorConfig) -> None:
    """Refuse an online request larger than the model answers within the scoring server's timeout."""
    if config.max_request_rows is not None and rows > config.max_request_rows:
        raise InvalidInputError(
            f"the request has {rows} rows; this model answers at most {config.max_request_rows} rows per request "
            f"(max_request_rows: what it predicts well within the {config.timeout_s:g} s request timeout). "
            "Split the request, or tag large inputs with `tagger batch-predict` (Ray Data)."
        )


class TaggerModel(PythonModel):
    """Title + description -> tag and per-tag probabilities."""

    def load_context(self, context: PythonModelContext) -> None:
        """Check the files against the packaged manifest, then rebuild the engine's predictor once per process."""
        from mlflow_model.integrity import MANIFEST_KEY, verify_manifest
        from mlflow_model.predictor import load_predictor

        verify_manifest(context.artifacts, (context.model_config or {}).get(MANIFEST_KEY))
        self.predictor = load_predictor(
            context.artifacts[CHECKPOINT_ARTIFACT],
            context.artifacts[ENCODER_ARTIFACT],
            PredictorConfig.from_dict(context.model_config),
        )

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Predict each row; params `threshold` and `batch_size` override the packaged defaults."""
        params = params or {}
        check_request_size(len(model_input), self.predictor.config)
        return self.predictor.predict(
            model_input, threshold=params.get("threshold"), batch_size=params.get("batch_size")
        )


mlflow.models.set_model(TaggerModel())
