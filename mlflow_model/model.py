"""The classifier: a Hugging Face encoder, dropout and a linear head on the pooled output."""
from __future__ import annotations

import torch
from torch import nn

from mlflow_model.checkpoint import ModelArgs

__all__ = ["FinetunedLLM", "ModelArgs", "build_model"]


class FinetunedLLM(nn.Module):
    """Made With ML's model: state dict keys `llm.*` (encoder) and `fc1.*` (head)."""

    def __init__(self, llm: nn.Module, args: ModelArgs) -> None:
        super().__init__()
        self.llm = llm
        self.dropout = nn.Dropout(args.dropout_p)
        self.fc1 = nn.Linear(args.embedding_dim, args.num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits, one row per input row."""
        pooled = self.llm(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.fc1(self.dropout(pooled))


def build_model(encoder_config: object, args: ModelArgs) -> FinetunedLLM:
    """An untrained FinetunedLLM whose encoder has the given transformers config."""
    from transformers import AutoModel

    encoder = AutoModel.from_config(encoder_config)
    # The classifier computes its own loss. Unset, transformers' loss_function property warns "loss_type=None
    # ... unrecognized" whenever it is read, which torch.jit.trace does for every attribute of the module.
    encoder.loss_function = None
    return FinetunedLLM(encoder, args)
