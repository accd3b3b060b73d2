"""Memory under varied traffic: RSS of a process that loads the model and predicts requests of random sizes.

    python benchmarks/memory.py --tracking-uri sqlite:///$PWD/mlflow.db \
        --model-uri models:/tagger@champion --csv your-holdout.csv --requests 600 --out outputs/memory.json

Whether a server's memory stays flat however its traffic varies. Every batch shape (rows x padded
width) that torch runs on oneDNN gets a compiled kernel, and oneDNN caches up to 1024 of them by
default, a few MB each: a long-running server would keep one per shape it has seen. A torch
build caps that cache (each precision's `onednn_cached_kernels` in `mlflow_model.engines.ENGINES`)
unless the user set `ONEDNN_PRIMITIVE_CACHE_CAPACITY`. Each setting runs in a fresh process, as
oneDNN reads it once per process: the model as packaged, then with oneDNN's default set
explicitly. Requests of 1 to --max-rows rows drawn from the CSV, one after another, as in a batch
job or a busy server; RSS after the load and every --every requests. Prints a markdown table,
writes JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
import psutil

from serving import local_copy

SETTINGS = {"as packaged (capped)": {}, "oneDNN default (1024 kernels)": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}}


def rss_mb() -> float:
    """This process's resident memory, in MB."""
    return round(psutil.Process().memory_info().rss / 1e6, 1)


def measure(model_dir: str, csv: str, requests: int, max_rows: int, every: int, seed: int) -> dict:
    """Load the model in this process and predict the requests: RSS over time and the time the requests took."""
    import mlflow

    frame = pd.read_csv(csv, usecols=["title", "description"]).fillna("")
    frame = frame[(frame["title"].str.strip() != "") | (frame["description"].str.strip() != "")]  # valid rows only
    model = mlflow.pyfunc.load_model(model_dir)
    rng = np.random.default_rng(seed)
    trace, started = [(0, rss_mb())], time.perf_counter()
    for number in range(1, requests + 1):
        model.predict(frame.sample(int(rng.integers(1, max_rows + 1)), random_state=int(rng.integers(2**31))))
        if number % every == 0:
            trace.append((number, rss_mb()))
    return {"rss_mb": trace, "seconds": round(time.perf_counter() - started, 1)}


def run_setting(env: dict[str, str], model_dir: str, options: dict) -> dict:
    """One setting, measured in a fresh process with its environment."""
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("ONEDNN_")} | env
    args = [sys.executable, __file__, "--child", model_dir, "--options", json.dumps(options)]
    output = subprocess.run(args, env=child_env, capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def markdown(results: dict[str, dict]) -> str:
    """Table: RSS after load and at each checkpoint, growth, and seconds, per setting."""
    counts = [count for count, _ in next(iter(results.values()))["rss_mb"]]
    lines = ["| setting | " + " | ".join(f"MB after {c} requests" for c in counts) + " | growth MB | seconds |",
             "|---|" + "---:|" * (len(counts) + 2)]
    for name, result in results.items():
        sizes = [size for _, size in result["rss_mb"]]
        lines.append(f"| {name} | " + " | ".join(f"{s:.0f}" for s in sizes)
                     + f" | {sizes[-1] - sizes[0]:+.0f} | {result['seconds']} |")
    return "\n".join(lines)


@click.command()
@click.option("--tracking-uri", help="MLflow tracking/registry URI the models:/ URI resolves against.")
@click.option("--model-uri", help="Model to load (a models:/ URI or a local folder).")
@click.option("--csv", help="CSV with title and description columns: the request rows.")
@click.option("--requests", default=600, show_default=True, help="Requests predicted one after another.")
@click.option("--max-rows", default=32, show_default=True, help="Largest request (rows); sizes are uniform from 1.")
@click.option("--every", default=100, show_default=True, help="RSS is read every this many requests.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the request sizes and rows.")
@click.option("--out", default="outputs/memory.json", show_default=True, help="JSON results file.")
@click.option("--child", default=None, hidden=True, help="Internal: measure this local model folder in this process.")
@click.option("--options", default="{}", hidden=True, help="Internal: the child's options, as JSON.")
def main(tracking_uri: str | None, model_uri: str | None, csv: str | None, requests: int, max_rows: int,
         every: int, seed: int, out: str, child: str | None, options: str) -> None:
    """RSS under requests of varied sizes, with the predictor's oneDNN cache cap and with oneDNN's default."""
    if child is not None:
        print(json.dumps(measure(child, **json.loads(options))))
        return
    if not (tracking_uri and model_uri and csv):
        raise click.UsageError("--tracking-uri, --model-uri and --csv are required")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    measured = {"csv": csv, "requests": requests, "max_rows": max_rows, "every": every, "seed": seed}
    with local_copy(model_uri) as (folder, _):
        results = {name: run_setting(env, folder, measured) for name, env in SETTINGS.items()}
    print(markdown(results))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"model_uri": model_uri, **measured, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
