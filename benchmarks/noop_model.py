"""A do-nothing pyfunc (models from code): answers every row with a constant tag and probabilities.

benchmarks/serving.py serves it beside the model under test, so that the scoring server's own
cost (HTTP, JSON, schema checks) is measured on the same machine in the same run.
`model_config["tags"]` lists the tags, so that its answers have the real model's shape.
"""
from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext


class NoopModel(PythonModel):
    """Every row gets the first tag, with probability 1 (the other tags 0)."""

    def load_context(self, context: PythonModelContext) -> None:
        """Read the tags from model_config."""
        tags = list((context.model_config or {}).get("tags") or ["other"])
        self.answer = {"prediction": tags[0], "probabilities": {tag: float(i == 0) for i, tag in enumerate(tags)}}

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """The constant answer, once per input row."""
        return pd.DataFrame([self.answer] * len(model_input))


mlflow.models.set_model(NoopModel())
