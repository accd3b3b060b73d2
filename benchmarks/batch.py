"""Batch inference at scale: `tagger batch-predict` on local Ray against in-process predict, in one run.

    python benchmarks/batch.py --tracking-uri sqlite:///$PWD/mlflow.db --model-uri models:/tagger@champion \
        --csv your-train.csv --scales 10,100 --out outputs/batch.json

Whether a batch job is worth its start-up, and whether its cost per row stays flat as the input
grows: from --csv (the reference rows) it writes an input of each --scales multiple (the rows
repeated, ids made unique) as one CSV file and as many files (one per copy), and measures, in the
same run:
- in process: `mlflow.pyfunc.load_model(uri).predict(frame, params={"bad_rows": "report"})`, the
  call the batch actors make, over the smallest scale's rows (rows/s);
- each batch job as a user runs it (`tagger batch-predict`, a fresh process that starts a local Ray):
  end-to-end rows/s; steady-state rows/s (from the output files' row counts and write times, after
  the first file; it needs at least 3 output files, so inputs of a few thousand rows or more);
  start-up (the part of the end-to-end time that the steady rate does not explain); peak RSS of the
  driver and of the largest Ray worker (the actor);
- a plain Ray Data pipeline on one scale's one-file input (--pipeline-scale), from a fresh process
  (read_csv -> map_batches(preprocess) -> map_batches(predict, the torch model in the closure) ->
  take_all, as the Made With ML course predicts in batch), for comparison.
Then it reports, PASS or FAIL, the goals a batch job should meet (see `goals`). Other work on the
machine slows every figure: run it on a quiet machine (it prints the load average before and after).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq

ROW_COLUMNS = ["id", "title", "description"]  # what an input file holds (the tag is not an input)
LAYOUTS = ("one file", "many files")


def make_inputs(reference: pd.DataFrame, folder: Path, scales: list[int]) -> dict[tuple[int, str], str]:
    """Input path per (scale, layout): `scale` copies of the reference rows with unique ids, in one CSV or one per copy."""
    inputs = {}
    for scale in scales:
        copies = [reference[ROW_COLUMNS].assign(id=reference["id"].astype(str) + f"-{k}") for k in range(scale)]
        pd.concat(copies, ignore_index=True).to_csv(folder / f"x{scale}.csv", index=False)
        (folder / f"x{scale}-parts").mkdir()
        for k, copy in enumerate(copies):
            copy.to_csv(folder / f"x{scale}-parts" / f"part-{k:04d}.csv", index=False)
        inputs[(scale, "one file")] = str(folder / f"x{scale}.csv")
        inputs[(scale, "many files")] = str(folder / f"x{scale}-parts" / "*.csv")
    return inputs


def in_process_rate(model_uri: str, frame: pd.DataFrame) -> dict[str, float]:
    """Rows/s of the loaded pyfunc's predict over the whole frame, in this process (after a warm-up), called as
    the batch actors call it: no online request-size limit, bad rows reported."""
    import mlflow

    import mlflow_model.predictor  # noqa: F401 - the installed runtime code, as the batch actors run it

    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri, model_config={"max_request_rows": None})  # the online limit off
    load_s = time.perf_counter() - started
    frame, params = frame.astype(object), {"bad_rows": "report"}
    model.predict(frame.head(64), params=params)
    started = time.perf_counter()
    model.predict(frame, params=params)
    rate = len(frame) / (time.perf_counter() - started)
    model.unwrap_python_model().predictor.close()  # its inference threads: the jobs measured next need the cores
    return {"rows_per_s": rate, "load_s": load_s}


def run_measured(command: list[str], log: Path) -> dict[str, float]:
    """Run a command to its end: its wall time, and the peak RSS of it (the driver) and of its largest Ray worker."""
    peaks = {"driver_mb": 0.0, "worker_mb": 0.0}
    started = time.time()
    with log.open("w") as out:
        process = psutil.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            try:
                peaks["driver_mb"] = max(peaks["driver_mb"], process.memory_info().rss / 2**20)
                workers = [p for p in process.children(recursive=True) if p.name().startswith("ray::")]
                for worker in workers:
                    peaks["worker_mb"] = max(peaks["worker_mb"], worker.memory_info().rss / 2**20)
            except psutil.Error:  # a process that ended between listing and reading
                pass
            time.sleep(0.25)
    if process.returncode != 0:
        raise click.ClickException(f"{' '.join(command[:3])} ... failed ({process.returncode}); see {log}")
    return {"started": started, "seconds": time.time() - started, **peaks}


def output_timeline(folder: Path, started: float) -> dict[str, float]:
    """Rows, files, first output (s after start) and the steady rows/s, from the Parquet files' rows and write times.

    Steady rows/s: the slope of rows written so far against time, fitted over the files (actors
    finish their files in parallel, so the first and last file alone misjudge it).
    """
    files = sorted((path.stat().st_mtime, pq.ParquetFile(path).metadata.num_rows) for path in folder.glob("*.parquet"))
    times = np.array([at for at, _ in files])
    written = np.cumsum([count for _, count in files])
    steady = float(np.polyfit(times - times[0], written, 1)[0]) if len(files) > 2 else float("nan")
    return {"rows": int(written[-1]), "files": len(files), "first_output_s": times[0] - started,
            "steady_rows_per_s": steady}


def batch_job(model_uri: str, path: str, output: Path, batch_size: int | None, logs: Path) -> dict[str, float]:
    """One `tagger batch-predict` job from a fresh process: timing, memory and its output's timeline."""
    tagger = str(Path(sys.executable).with_name("tagger"))
    command = [tagger, "batch-predict", "--model-uri", model_uri, "--input", path, "--output", str(output)]
    command += ["--batch-size", str(batch_size)] if batch_size else []
    run = run_measured(command, logs / f"{output.name}.log")
    timeline = output_timeline(output, run["started"])
    rows_per_s = timeline["rows"] / run["seconds"]
    startup = run["seconds"] - timeline["rows"] / timeline["steady_rows_per_s"]
    return {**run, **timeline, "rows_per_s": rows_per_s, "startup_s": startup}


def pipeline_job(model_uri: str, path: str, logs: Path) -> dict[str, float]:
    """The plain Ray Data pipeline over one CSV file, from a fresh process: end-to-end rows/s."""
    command = [sys.executable, __file__, "--pipeline-job", path, "--model-uri", model_uri]
    run = run_measured(command, logs / "pipeline.log")
    rows = int((logs / "pipeline.log").read_text().split("pipeline rows: ")[-1].split()[0])
    return {**run, "rows": rows, "rows_per_s": rows / run["seconds"]}


def run_pipeline_job(model_uri: str, path: str) -> None:
    """Body of the pipeline's process: start Ray, load the model, predict every row of the file, print the count."""
    import mlflow
    import ray

    import mlflow_model.predictor  # noqa: F401 - the installed runtime code
    from speed import pipeline_predictions

    # A Ray of its own (address="local"), never one that something else runs on this machine.
    ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
             log_to_driver=False)
    # The pipeline ships the torch model itself to its tasks (by pickling): the eager model, not a trace.
    eager = {"forward": "eager"}
    predictor = mlflow.pyfunc.load_model(model_uri, model_config=eager).unwrap_python_model().predictor
    outputs = pipeline_predictions(predictor, ray.data.read_csv(path))
    print(f"pipeline rows: {len(outputs)}")
    predictor.close()
    ray.shutdown()


def goals(results: dict[str, Any], scales: list[int]) -> dict[str, bool]:
    """What a batch job should reach, checked on this run's figures (PASS/FAIL per goal).

    Every job's steady rate at least 0.9x in-process predict (the actors add little per row); at
    the largest scale, end to end at least 0.75x in-process (start-up paid off); from the smallest
    to the largest scale, the steady cost per row within 15% and the driver's peak memory flat
    (nothing grows with the input); and end to end at least 3x the plain Ray Data pipeline on the
    same rows. A job that wrote fewer than 3 output files has no steady rate: its steady goals are left out.
    """
    in_process, jobs = results["in_process"]["rows_per_s"], results["jobs"]
    small, large = f"x{min(scales)}", f"x{max(scales)}"
    checks = {}
    for name, job in jobs.items():
        if np.isfinite(job["steady_rows_per_s"]):
            checks[f"{name}: steady-state >= 0.9x in-process"] = job["steady_rows_per_s"] >= 0.9 * in_process
    for layout in LAYOUTS:
        big, little = jobs[f"{large} {layout}"], jobs[f"{small} {layout}"]
        checks[f"{large} {layout}: end to end >= 0.75x in-process"] = big["rows_per_s"] >= 0.75 * in_process
        change = big["steady_rows_per_s"] / little["steady_rows_per_s"] - 1
        if np.isfinite(change):
            checks[f"{layout}: steady cost per row {small} -> {large} within 15% ({change:+.0%})"] = abs(change) <= 0.15
        growth = big["driver_mb"] / little["driver_mb"] - 1
        checks[f"{layout}: driver peak {small} -> {large} flat ({growth:+.0%}, within 15%)"] = growth <= 0.15
    if "ray_data_pipeline" in results:
        same = f"x{results['ray_data_pipeline']['scale']} one file"
        ratio = jobs[same]["rows_per_s"] / results["ray_data_pipeline"]["rows_per_s"]
        checks[f"{same}: end to end >= 3x the plain Ray Data pipeline on the same rows ({ratio:.1f}x)"] = ratio >= 3
    return checks


def markdown(results: dict[str, Any]) -> str:
    """One row per job (and the plain Ray Data pipeline), with ratios to in-process predict."""
    in_process = results["in_process"]["rows_per_s"]
    head = ["job", "rows", "files out", "end to end s", "rows/s", "x in-process", "steady rows/s", "x in-process",
            "first output s", "start-up s", "driver MB", "worker MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| in-process predict (pyfunc) | {results['in_process']['rows']} | | | {in_process:.0f} | 1.00 "
                 f"| | | | load {results['in_process']['load_s']:.1f} | | |")
    for name, job in results["jobs"].items():
        lines.append(
            f"| batch-predict {name} | {job['rows']} | {job['files']} | {job['seconds']:.0f} | {job['rows_per_s']:.0f} | "
            f"{job['rows_per_s'] / in_process:.2f} | {job['steady_rows_per_s']:.0f} | "
            f"{job['steady_rows_per_s'] / in_process:.2f} | {job['first_output_s']:.0f} | {job['startup_s']:.0f} | "
            f"{job['driver_mb']:.0f} | {job['worker_mb']:.0f} |"
        )
    if "ray_data_pipeline" in results:
        plain = results["ray_data_pipeline"]
        lines.append(f"| plain Ray Data pipeline, x{plain['scale']} one file | {plain['rows']} | | {plain['seconds']:.0f} | "
                     f"{plain['rows_per_s']:.0f} | {plain['rows_per_s'] / in_process:.2f} | | | | | "
                     f"{plain['driver_mb']:.0f} | {plain['worker_mb']:.0f} |")
    return "\n".join(lines)


@click.command()
@click.option("--tracking-uri", default=None, help="Store the --model-uri resolves against (default: MLFLOW_TRACKING_URI).")
@click.option("--model-uri", required=True, help="A registered build of a trained model.")
@click.option("--csv", "csv_path", default=None, help="The reference rows (id, title, description).")
@click.option("--scales", default="10,100", show_default=True, help="Input sizes, as multiples of the reference rows.")
@click.option("--batch-size", type=int, default=None, help="batch-predict --batch-size (default: its own).")
@click.option("--pipeline-scale", type=int, default=None,
              help="Run the plain Ray Data pipeline on the one-file input of this scale, for comparison "
                   "(default: the largest; 0: skip).")
@click.option("--out", default="outputs/batch.json", show_default=True, help="Where to write the results as JSON.")
@click.option("--pipeline-job", "pipeline_input", default=None, hidden=True,
              help="Internal: run the plain Ray Data pipeline over this file and exit.")
def main(tracking_uri: str | None, model_uri: str, csv_path: str | None, scales: str, batch_size: int | None,
         pipeline_scale: int | None, out: str, pipeline_input: str | None) -> None:
    """Measure batch-predict at each scale and layout against in-process predict, and print the table."""
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # for this process and the jobs it starts
    if pipeline_input:
        return run_pipeline_job(model_uri, pipeline_input)
    if not csv_path:
        raise click.UsageError("--csv is required")
    sizes = sorted(int(s) for s in scales.split(","))
    reference = pd.read_csv(csv_path)
    results: dict[str, Any] = {"model_uri": model_uri, "load_before": os.getloadavg()[0], "jobs": {}}
    logs = Path(out).parent / "batch-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        inputs = make_inputs(reference, Path(tmp), sizes)
        frame = pd.read_csv(inputs[(sizes[0], "one file")])[["title", "description"]]
        results["in_process"] = {**in_process_rate(model_uri, frame), "rows": len(frame)}
        for (scale, layout), path in inputs.items():
            name = f"x{scale} {layout}"
            output = Path(tmp) / f"out-x{scale}-{layout.replace(' ', '-')}"
            results["jobs"][name] = batch_job(model_uri, path, output, batch_size, logs)
            print(f"{name}: {results['jobs'][name]['rows_per_s']:.0f} rows/s end to end", flush=True)
        pipeline_scale = max(sizes) if pipeline_scale is None else pipeline_scale
        if pipeline_scale:
            results["ray_data_pipeline"] = {**pipeline_job(model_uri, inputs[(pipeline_scale, "one file")], logs),
                                            "scale": pipeline_scale}
    results["load_after"] = os.getloadavg()[0]
    results["goals"] = goals(results, sizes)
    print(f"\nload average {results['load_before']:.2f} -> {results['load_after']:.2f}; "
          f"{os.cpu_count()} CPUs; batch size {batch_size or 'batch-predict default'}\n")
    print(markdown(results))
    print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in results["goals"].items()))
    Path(out).write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
