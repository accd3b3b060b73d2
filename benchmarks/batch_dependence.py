"""Does a build's answer for a row depend on the rows it is batched with? Prints a table, writes JSON.

    python benchmarks/batch_dependence.py --tracking-uri sqlite:///$PWD/mlflow.db \
        --model-uri models:/tagger@champion --holdout-csv your-holdout.csv --csv your-train.csv --out outputs/batch_dependence.json

From the registered model's checkpoint it makes every build (as `tagger package` makes it) and,
for each of the first --rows rows of --holdout-csv (in batches of --batch-rows rows, as they come,
unsorted), compares the probabilities of the row predicted alone (no padding) with:
- `padded alone`: the row alone, padded to the width of its batch (only padding differs);
- `same-length batch`: the row beside the batch's other rows cut to its own length (no padding:
  only the other rows differ);
- `in batch`: the row inside its padded batch (what a server that batches requests does).
It also reports, for the fp32 model, the largest |activation| entering the Linear layers at real
and at padded token positions: a dynamic int8 scale is computed over the whole input tensor.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click
import mlflow
import numpy as np
import pandas as pd

from mlflow_model.batching import pad_batch, softmax
from mlflow_model.preprocess import INPUT_COLUMNS
from speed import REFERENCE, eager, load, make_builds, reference_artifacts


def row_views(engine: Any, batch: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Max |probability difference| per row of the batch between `alone` and each other view."""
    alone = np.vstack([softmax(engine.logits(*pad_batch([ids], pad_id))) for ids in batch])
    width = max(len(ids) for ids in batch)
    padded = []
    for ids in batch:
        input_ids, mask = pad_batch([ids + [pad_id] * (width - len(ids))], pad_id)
        mask[0, len(ids):] = 0
        padded.append(softmax(engine.logits(input_ids, mask)))
    same_length = []
    for i, ids in enumerate(batch):
        others = [row[: len(ids)] for j, row in enumerate(batch) if j != i and len(row) >= len(ids)]
        same_length.append(softmax(engine.logits(*pad_batch([ids, *others], pad_id)))[:1])
    in_batch = softmax(engine.logits(*pad_batch(batch, pad_id)))
    return {name: np.abs(view - alone).max(axis=1)
            for name, view in (("padded alone", np.vstack(padded)), ("same-length batch", np.vstack(same_length)),
                               ("in batch", in_batch))}


def activation_ranges(model: Any, batch: list[list[int]], pad_id: int) -> dict[str, float]:
    """Largest |input| of any Linear layer at real and at padded positions of one padded batch (fp32 model)."""
    import torch

    input_ids, mask = pad_batch(batch, pad_id)
    real, padded = [0.0], [0.0]
    keep = torch.from_numpy(mask).bool()

    def hook(module: Any, inputs: tuple, output: Any) -> None:
        x = inputs[0].detach().abs()
        if x.dim() == 3:
            real.append(float(x[keep].max()))
            if (~keep).any():
                padded.append(float(x[~keep].max()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            model(torch.from_numpy(input_ids), torch.from_numpy(mask))
    finally:
        for handle in handles:
            handle.remove()
    return {"real_max_abs": max(real), "padded_max_abs": max(padded)}


@click.command()
@click.option("--tracking-uri", default=None, help="Store the --model-uri resolves against.")
@click.option("--model-uri", required=True, help="A registered torch build of a trained model.")
@click.option("--holdout-csv", required=True, help="Rows to batch (title, description).")
@click.option("--csv", "csv_path", default=None, help="Training rows: 256 of them calibrate the static int8 build.")
@click.option("--rows", default=128, show_default=True, help="Rows compared.")
@click.option("--batch-rows", default=64, show_default=True, help="Rows per batch.")
@click.option("--builds", default="", help="Comma-separated build names to measure (default: all).")
@click.option("--out", default="outputs/batch_dependence.json", show_default=True)
def main(tracking_uri: str | None, model_uri: str, holdout_csv: str, csv_path: str | None, rows: int, batch_rows: int, builds: str,
         out: str) -> None:
    """Print, per build, how far a row's probabilities move when it is padded or batched."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    frame = pd.read_csv(holdout_csv).head(rows)
    wanted = {name for name in builds.split(",") if name}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="batchdep-") as tmp:
        reference, base = reference_artifacts(model_uri, Path(tmp) / "model")
        calibration = pd.read_csv(csv_path).sample(256, random_state=0) if csv_path else None
        made = [b for b in make_builds(reference, base, Path(tmp), frame.head(64), calibration) if not wanted or b.name in wanted
                or b.name == REFERENCE]
        for build in made:
            with load(build) as predictor:
                ids = predictor.preprocess(frame[list(INPUT_COLUMNS)]).token_ids
                batches = [ids[i : i + batch_rows] for i in range(0, len(ids), batch_rows)]
                views = [row_views(predictor.engine, batch, predictor.pad_id) for batch in batches]
                results[build.name] = {name: float(np.max([v[name].max() for v in views])) for name in views[0]}
                results[build.name]["rows_over_1e-3"] = int(sum((v["in batch"] > 1e-3).sum() for v in views))
        with load(eager(made[0])) as predictor:
            ids = predictor.preprocess(frame[list(INPUT_COLUMNS)]).token_ids
            results["fp32 activations"] = activation_ranges(predictor.engine.model, ids[:batch_rows], predictor.pad_id)
    print(f"{len(frame)} rows of {holdout_csv}, batches of {batch_rows} (unsorted); max |probability difference| "
          "against the row alone:\n")
    print("| build | padded alone | same-length batch | in batch | rows > 1e-3 in batch |\n|---|---|---|---|---|")
    for name, r in results.items():
        if name != "fp32 activations":
            print(f"| {name} | {r['padded alone']:.1e} | {r['same-length batch']:.1e} | {r['in batch']:.1e} | "
                  f"{r['rows_over_1e-3']} |")
    act = results["fp32 activations"]
    print(f"\nfp32 Linear inputs, max |x|: real tokens {act['real_max_abs']:.1f}, padded tokens {act['padded_max_abs']:.1f}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
