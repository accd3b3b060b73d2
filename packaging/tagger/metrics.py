"""Classification scores, computed one way for training, evaluation, packaging and benchmarks."""
from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, precision_recall_fscore_support


def scores(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """Accuracy, weighted precision, recall and F1 (weights: true rows per tag) and the row count."""
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="weighted", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "num_samples": len(y_true),
    }


def per_class_scores(y_true: Sequence, y_pred: Sequence, labels: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each tag."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    return {
        tag: {"precision": float(p), "recall": float(r), "f1": float(f), "num_samples": int(n)}
        for tag, p, r, f, n in zip(labels, precision, recall, f1, support)
    }
