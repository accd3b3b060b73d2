"""The evaluation report's figures (matplotlib, without pyplot): what a user looks at in the MLflow UI.

Each function takes what `tagger.evaluate` computed and a title naming the model, its version and
the dataset, and returns a Figure for `mlflow.log_figure`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

REFERENCE_THRESHOLDS = (0.5, 0.8, 0.9)  # marked on the threshold sweep


def confusion_figure(y_true: pd.Series, y_pred: pd.Series, labels: list[str], title: str) -> Figure:
    """Confusion matrix (rows: true tag, columns: predicted tag)."""
    figure = Figure(figsize=(7, 6), layout="constrained")
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, ax=axes, xticks_rotation=30, colorbar=False)
    axes.set_title(title)
    return figure


def reliability_figure(bins: dict[str, np.ndarray], calibration: dict[str, float], title: str) -> Figure:
    """Reliability diagram: accuracy against mean confidence per bin (the diagonal is perfect), rows per bin below."""
    figure = Figure(figsize=(8, 7.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    edges, rows = bins["edges"], bins["rows"]
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    filled = rows > 0
    top.bar(centers[filled], bins["accuracy"][filled], width=width * 0.9, color="tab:blue", alpha=0.8,
            label="accuracy of the rows in the bin")
    top.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color="tab:orange",
             label="(mean confidence, accuracy) of the bin")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    top.set(ylabel="accuracy", ylim=(0, 1.02))
    top.set_title(f"{title}\nECE {calibration['ece']:.4f} over 15 bins (a perfectly calibrated model: "
                  f"~{calibration['ece_noise_floor']:.4f} on as many rows)\nmean confidence "
                  f"{calibration['mean_confidence']:.3f}, accuracy {calibration['top_accuracy']:.3f}", fontsize="medium")
    figure.legend(loc="outside lower center", ncols=3, fontsize="small")
    bottom.bar(centers, rows, width=width * 0.9, color="tab:gray")
    bottom.set(xlabel="confidence (top probability)", ylabel="rows", xlim=(0, 1))
    return figure


def per_tag_figure(per_class: dict[str, dict[str, float]], title: str) -> Figure:
    """Precision and recall of each tag, side by side, with its row count."""
    tags = list(per_class)
    x = np.arange(len(tags))
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    for offset, metric, color in ((-0.2, "precision", "tab:blue"), (0.2, "recall", "tab:orange")):
        values = [per_class[tag][metric] for tag in tags]
        bars = axes.bar(x + offset, values, width=0.4, label=metric, color=color)
        axes.bar_label(bars, fmt="%.2f", fontsize="small")
    axes.set_xticks(x, [f"{tag}\n({per_class[tag]['num_samples']} rows)" for tag in tags])
    axes.set(ylim=(0, 1.1), ylabel="score", title=title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def threshold_figure(sweep: pd.DataFrame, fallback: str, title: str) -> Figure:
    """Coverage (answers not turned into the fallback tag) and their accuracy, against the threshold."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    axes.plot(sweep["threshold"], sweep["coverage"], label=f"coverage (answers not turned into '{fallback}')",
              color="tab:blue")
    axes.plot(sweep["threshold"], sweep["accuracy_kept"], label="accuracy of those answers", color="tab:green")
    for threshold in REFERENCE_THRESHOLDS:
        row = sweep.iloc[(sweep["threshold"] - threshold).abs().argmin()]
        axes.axvline(threshold, color="lightgray", linestyle=":")
        axes.annotate(f"{threshold:g}: keeps {row['coverage']:.0%}\nat {row['accuracy_kept']:.1%} accuracy",
                      (threshold, row["coverage"]), textcoords="offset points", xytext=(-110, -30), fontsize="small",
                      arrowprops={"arrowstyle": "->", "color": "gray"})
    axes.set(xlabel="threshold (top probability below it: answer 'other')", ylabel="share", xlim=(0, 1),
             ylim=(0, 1.02), title=title)
    axes.legend(loc="lower left")
    return figure
