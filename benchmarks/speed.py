"""Speed of every build (engine x precision) of one trained model, measured in one run: prints a table, writes JSON.

    python benchmarks/speed.py --tracking-uri sqlite:///$PWD/mlflow.db --model-uri models:/tagger@champion \
        --csv your-train.csv --holdout-csv your-holdout.csv --out outputs/speed.json

Which build to ship depends on the CPU it runs on: this script answers that for yours. From the
registered model's checkpoint it makes every build of the engine registry (`mlflow_model.engines`:
torch-fp32, torch-bf16, torch-int8-dynamic, onnx-fp32, onnx-int8 (static), onnx-int8-dynamic) as
`tagger package` makes it (static int8 calibrated on 256 rows of --csv), plus torch-fp32 run eagerly
(what the shipped trace gains), and, with --student-uri, the --student-builds of a distilled
student (`tagger distill`), and measures them in the same run:
- in process, through the predictor the served model runs: rows/s over --csv (best of --repeats),
  single-row latency (median), weighted F1 on --holdout-csv, and its change and the largest
  probability difference against the teacher's torch-fp32; `batch dp`: the largest probability
  difference between a holdout row predicted alone and inside a batch of 64 holdout rows;
- the fp32 floor: this CPU's fp32 matmul rate on the model's own matrix shapes divided by the
  FLOPs of one row, what a perfect fp32 engine would reach ("x floor" compares each build with it);
- a plain Ray Data pipeline over the same rows (from_pandas -> map_batches(preprocess) ->
  map_batches(predict, the torch model in the closure) -> take_all, as the Made With ML course
  predicts in batch), for comparison;
- served by `mlflow models serve` (each build logged to a temporary store as `tagger package` logs
  it, beside a do-nothing pyfunc, with benchmarks/serving.py): ready time, worker RSS, 1-client
  p50/p99, rows/s at --clients clients. --served-seconds 0 skips this part.
Then it reports, PASS or FAIL, the goals a build should meet on a CPU (see `goals`), and those of
benchmarks/serving.py for each served build. Other work on the machine slows every figure: run it
on a quiet machine (it prints the load average before and after) and compare ratios from one run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import mlflow
import numpy as np
import pandas as pd

from mlflow_model.batching import pad_batch
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig
from mlflow_model.engines import ENGINES, build_name, build_names
from mlflow_model.engines.torch_engine import cpu_has_native_bf16
from mlflow_model.errors import BuildError
from mlflow_model.predictor import Predictor
from mlflow_model.preprocess import INPUT_COLUMNS, prepare_texts, tokenize
from serving import NOOP_LABEL, bench_server, load_rows, request_body, save_noop_model
from serving import goals as serving_goals
from tagger.builds import make_build
from tagger.metrics import scores

REFERENCE = build_name("torch", "fp32")
STUDENT = "student "  # prefix of a distilled student's builds
CALIBRATION_ROWS = 256  # rows of --csv a static int8 build is calibrated on (as `tagger package` takes training rows)


@dataclass(frozen=True)
class Build:
    """One engine x precision of the model: its artifacts and the predictor settings it is served with."""

    name: str
    artifacts: dict[str, str]
    config: PredictorConfig


def reference_artifacts(model_uri: str, folder: Path) -> tuple[dict[str, str], PredictorConfig]:
    """The registered model's checkpoint and encoder folders, and the predictor settings it was packaged with."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder)))
    config = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"].get("config", {})
    artifacts = {name: str(local / "artifacts" / name) for name in (CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT)}
    return artifacts, PredictorConfig.from_dict(config)


def make_builds(
    reference: dict[str, str], base: PredictorConfig, folder: Path, rows: pd.DataFrame,
    calibration: pd.DataFrame | None = None, names: list[str] | None = None, prefix: str = "",
) -> list[Build]:
    """Every build of the registry (or those named), each made from the reference files as `package` makes it."""
    base = replace(base, engine="torch", precision="fp32", forward=None, max_request_rows=None, calibration_rows=None)
    builds = []
    for engine, spec in ENGINES.items():
        for precision in spec.precisions:
            name = build_name(engine, precision)
            if names is not None and name not in names:
                continue
            if precision == "bf16" and not cpu_has_native_bf16():  # emulated: slower than fp32, exceeds the timeout
                print(f"{prefix}{name} not measured: this CPU has no native bf16 (it would run emulated)")
                continue
            slug = f"{prefix}{name}".replace(" ", "-")
            staged = {key: str(shutil.copytree(path, folder / slug / "staged" / key)) for key, path in reference.items()}
            try:
                artifacts, config = make_build(staged, folder / slug / "build", replace(base, engine=engine,
                                               precision=precision), rows, calibration)
            except BuildError as error:  # packaging would refuse it too: report it, measure the others
                print(f"{prefix}{name} not measured: {error.message}")
                continue
            builds.append(Build(f"{prefix}{name}", artifacts, config))
    if names is None:
        builds.insert(1, eager(replace(builds[0], name=f"{REFERENCE} eager")))  # what the trace gains
    return builds


def load(build: Build) -> Predictor:
    """The build's predictor, as the served model builds it."""
    return Predictor.from_directories(build.artifacts[CHECKPOINT_ARTIFACT], build.artifacts[ENCODER_ARTIFACT], build.config)


def eager(build: Build) -> Build:
    """The build with its torch model run eagerly: FLOP counting and the Ray Data pipeline need the model itself."""
    return replace(build, config=replace(build.config, forward="eager"))


def best_rate(predictor: Predictor, frame: pd.DataFrame, repeats: int) -> float:
    """Rows per second of the best of `repeats` predictions of the whole frame (others share this CPU)."""
    predictor.predict(frame.head(predictor.config.batch_size))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict(frame)
        best = min(best, time.perf_counter() - started)
    return len(frame) / best


def single_row_ms(predictor: Predictor, frame: pd.DataFrame, count: int = 100) -> float:
    """Median latency of predicting one row at a time."""
    times = []
    for i in range(min(count, len(frame))):
        started = time.perf_counter()
        predictor.predict(frame.iloc[[i]])
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def batch_dependence(predictor: Predictor, rows: pd.DataFrame) -> float:
    """Largest probability difference between each row predicted alone and inside one batch of all the rows."""
    alone = np.vstack([predictor.predict_proba(rows.iloc[[i]]) for i in range(len(rows))])
    return float(np.abs(alone - predictor.predict_proba(rows, params={"batch_size": len(rows)})).max())


def measure_in_process(build: Build, frame: pd.DataFrame, holdout: pd.DataFrame | None, repeats: int) -> dict:
    """Throughput, single-row latency, holdout probabilities, F1 and batch dependence of one build, in this process."""
    with load(build) as predictor:
        result = {"rows_per_s": best_rate(predictor, frame, repeats), "single_row_ms": single_row_ms(predictor, frame)}
        if holdout is not None:
            result["probabilities"] = predictor.predict_proba(holdout[list(INPUT_COLUMNS)])
            predicted = [predictor.index_to_class[i] for i in result["probabilities"].argmax(axis=1)]
            result["f1"] = scores(holdout["tag"], predicted)["f1"]
            result["batch_dp"] = batch_dependence(predictor, holdout[list(INPUT_COLUMNS)].head(64))
    return result


def flops_per_row(model: Any, token_ids: list[list[int]]) -> float:
    """Mean FLOPs of one unpadded row's forward pass (torch's FLOP counter, per distinct length)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    lengths = np.array([len(ids) for ids in token_ids])
    flops = {}
    with torch.inference_mode():
        for length in np.unique(lengths):
            ids = torch.ones(1, int(length), dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                model(ids, torch.ones_like(ids))
            flops[length] = counter.get_total_flops()
    return float(np.mean([flops[length] for length in lengths]))


def matmul_rate(encoder_config: Any, rows: int, repeats: int = 20) -> float:
    """fp32 FLOP/s of this CPU on one encoder layer's GEMMs at `rows` tokens (best of repeats)."""
    import torch

    hidden, inner = encoder_config.hidden_size, encoder_config.intermediate_size
    shapes = [(hidden, hidden)] * 4 + [(hidden, inner), (inner, hidden)]  # q, k, v, out, FFN up, FFN down
    pairs = [(torch.randn(rows, k), torch.randn(k, n)) for k, n in shapes]
    work = sum(2.0 * rows * k * n for k, n in shapes)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for a, b in pairs:
            torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return work / best


def fp32_floor(reference: Build, frame: pd.DataFrame) -> dict[str, float]:
    """Rows/s a perfect fp32 engine would reach on this CPU: matmul rate / FLOPs per row (the faster of two tries)."""
    with load(eager(reference)) as predictor:
        token_ids, model = predictor.preprocess(frame[list(INPUT_COLUMNS)]).token_ids, predictor.engine.model
        flops = flops_per_row(model, token_ids)
        mean_tokens = float(np.mean([len(ids) for ids in token_ids]))
        rows = int(predictor.config.batch_size * mean_tokens)
        rate = max(matmul_rate(model.llm.config, rows), matmul_rate(model.llm.config, rows))
    return {"rows_per_s": rate / flops, "flops_per_row": flops, "mean_tokens": mean_tokens, "matmul_gflops": rate / 1e9}


def interleaved_rates(builds: list[Build], frame: pd.DataFrame, floor: dict[str, float], rounds: int) -> dict[str, float]:
    """Throughput again, every build and the floor's matmul rate taking turns, `rounds` times: each keeps its best.

    On a shared machine, load comes and goes within minutes; measured one after the other, a build that
    happens to run during a busy spell looks slow. Taking turns gives each the same chances.
    """
    from transformers import AutoConfig

    if rounds < 1:
        return {}
    config = AutoConfig.from_pretrained(builds[0].artifacts[ENCODER_ARTIFACT])
    rows = int(builds[0].config.batch_size * floor["mean_tokens"])
    rates: dict[str, float] = {}
    predictors = {build.name: load(build) for build in builds}
    try:
        for predictor in predictors.values():
            predictor.predict(frame.head(predictor.config.batch_size))  # warm-up
        for _ in range(rounds):
            floor["matmul_gflops"] = max(floor["matmul_gflops"], matmul_rate(config, rows) / 1e9)
            for name, predictor in predictors.items():
                started = time.perf_counter()
                predictor.predict(frame)
                rates[name] = max(rates.get(name, 0.0), len(frame) / (time.perf_counter() - started))
    finally:
        for predictor in predictors.values():
            predictor.close()
    floor["rows_per_s"] = floor["matmul_gflops"] * 1e9 / floor["flops_per_row"]
    return rates


def pipeline_predictions(predictor: Predictor, dataset: Any) -> list:
    """A plain Ray Data pipeline's predictions over a Ray Dataset: two map_batches (preprocess, then
    predict_proba with the torch model in the closure, no length sorting), then take_all."""
    import torch

    model, tokenizer, pad_id = predictor.engine.model, predictor.tokenizer, predictor.pad_id

    def preprocess(batch: pd.DataFrame) -> dict[str, np.ndarray]:
        ids, mask = pad_batch(tokenize(tokenizer, prepare_texts(batch)), pad_id)
        return {"ids": ids, "masks": mask}

    def predict_proba(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits = model(torch.as_tensor(batch["ids"]), torch.as_tensor(batch["masks"]))
        return {"output": torch.softmax(logits, dim=-1).numpy()}

    preprocessed = dataset.map_batches(preprocess, batch_format="pandas")
    return preprocessed.map_batches(predict_proba, batch_format="numpy").take_all()


def pipeline_rate(reference: Build, frame: pd.DataFrame) -> dict[str, float]:
    """The plain Ray Data pipeline over the frame (from_pandas, one block): rows/s after a warm-up."""
    import ray

    with load(eager(reference)) as predictor:  # what the tasks need, without the predictor's thread
        # A Ray of its own (address="local"), never one that something else runs on this machine.
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                 log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            pipeline_predictions(predictor, ray.data.from_pandas(frame.head(2)))  # workers started, functions shipped
            started = time.perf_counter()
            outputs = pipeline_predictions(predictor, ray.data.from_pandas(frame[list(INPUT_COLUMNS)]))
            rate = len(frame) / (time.perf_counter() - started)
        finally:
            ray.shutdown()
    assert len(outputs) == len(frame)
    return {"rows_per_s": rate}


def register_builds(builds: list[Build], folder: Path) -> dict[str, str]:
    """Each build logged as `tagger package` logs it (settings, signature, integrity manifest), in a temporary
    store; its model URI by build name."""
    from tagger.bundle import final_settings, log_pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = mlflow.create_experiment("speed-benchmark", artifact_location=(folder / "artifacts").as_uri())
    uris = {}
    for build in builds:
        slug = build.name.replace(" ", "-")
        config, signature = final_settings(build.artifacts, build.config)
        with mlflow.start_run(experiment_id=experiment, run_name=f"speed-{slug}") as run:
            pass  # the model is logged outside the active run, as `tagger package` logs it
        uris[build.name] = log_pyfunc(build.artifacts, config, signature, run.info.run_id,
                                      folder / slug / "manifest").model_uri
    return uris


def measure_served(uris: dict[str, str], tracking_uri: str, csv: str, seconds: float, clients: int, logs: Path) -> dict:
    """Each build and a do-nothing pyfunc through `mlflow models serve`, one at a time (benchmarks/serving.py)."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    bodies = [request_body(row) for row in load_rows(csv)]
    options = {"tracking_uri": tracking_uri, "seconds": seconds, "clients": clients, "max_requests": 20000,
               "ready_timeout": 180.0}
    with tempfile.TemporaryDirectory(prefix="speed-noop-") as tmp:
        served = {NOOP_LABEL: bench_server(NOOP_LABEL, save_noop_model(Path(tmp) / "noop"), options, bodies, logs)}
    for name, uri in uris.items():
        served[name] = bench_server(name, uri, options, bodies, logs)
    return served


def summary_rows(results: dict[str, Any], clients: int) -> list[dict[str, Any]]:
    """One row per path: throughput and x floor, single row, F1, and the served figures."""
    floor, served = results["floor"]["rows_per_s"], results.get("served", {})
    rows = [{"path": "plain Ray Data pipeline (map_batches x2 + take_all)",
             "rows_per_s": results["ray_data_pipeline"]["rows_per_s"]},
            {"path": "fp32 floor (matmul rate / FLOPs per row)", "rows_per_s": floor}]
    for name, build in results["builds"].items():
        row = {"path": name, **{k: v for k, v in build.items() if k != "probabilities"}}
        if name in served:
            load = served[name]["load"]
            row |= {"served_p50_ms": load["1"]["p50_ms"], "served_p99_ms": load["1"]["p99_ms"],
                    "served_rows_per_s": load[str(clients)]["rows_per_s"], "ready_s": served[name]["ready_s"],
                    "rss_mb": served[name]["worker_rss_mb"]}
        rows.append(row)
    for row in rows:
        row["x_floor"] = row["rows_per_s"] / floor
    return rows


def markdown(rows: list[dict[str, Any]], served: dict[str, Any], clients: int) -> str:
    """The table: every path's figures, then the do-nothing server's."""
    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)

    head = ["path", "rows/s", "x floor", "1 row ms", "F1", "F1 change", "max dp", "batch dp", "served p50 ms",
            "served p99 ms", f"rows/s @{clients}", "ready s", "RSS MB"]
    keys = [("rows_per_s", ".0f"), ("x_floor", ".2f"), ("single_row_ms", ".1f"), ("f1", ".3f"), ("f1_change", "+.3f"),
            ("max_dp", ".1e"), ("batch_dp", ".1e"), ("served_p50_ms", ".1f"), ("served_p99_ms", ".1f"), ("served_rows_per_s", ".0f"),
            ("ready_s", ".1f"), ("rss_mb", ".0f")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([row["path"]] + [cell(row, k, s) for k, s in keys]) + " |" for row in rows]
    if NOOP_LABEL in served:
        noop = served[NOOP_LABEL]
        lines.append(f"| do-nothing pyfunc (same server) | | | | | | | | {noop['load']['1']['p50_ms']:.1f} | "
                     f"{noop['load']['1']['p99_ms']:.1f} | {noop['load'][str(clients)]['rows_per_s']:.0f} | "
                     f"{noop['ready_s']:.1f} | {noop['worker_rss_mb']:.0f} |")
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], served: dict[str, Any]) -> dict[str, bool]:
    """What a build should reach on a CPU, checked on this run's figures (PASS/FAIL per goal).

    In process: the reference within 0.85x of the fp32 floor (little overhead around the matrix
    products); the fastest build (teacher or student) whose holdout F1 is within 0.01 of the
    teacher's torch fp32 at 2x the floor; the fastest int8 build of the teacher at 1.6x the floor
    with batch-independent answers (1e-4). Served: the fastest build's 1-client p50 within 2.0x the
    do-nothing server's; the reference ready within 3 s of the do-nothing server and under 450 MB
    of worker RSS; each ONNX build (no torch in the server) ready within 1.5 s of it and within
    150 MB of its RSS.
    """
    builds = {row["path"]: row for row in rows if row["path"].removeprefix(STUDENT) in set(build_names())}
    keeping = [row for row in builds.values() if abs(row.get("f1_change", 0.0)) <= 0.01]
    fastest = max(keeping or builds.values(), key=lambda row: row["rows_per_s"])
    checks = {
        f"{REFERENCE} >= 0.85x floor": builds[REFERENCE]["x_floor"] >= 0.85,
        f"fastest within 0.01 F1 ({fastest['path']}) >= 2.0x floor": fastest["x_floor"] >= 2.0,
    }
    if "f1_change" in fastest:  # measured with --holdout-csv
        checks[f"fastest ({fastest['path']}) F1 within 0.01 of {REFERENCE}"] = abs(fastest["f1_change"]) <= 0.01
    int8 = [row for name, row in builds.items() if "int8" in name and not name.startswith(STUDENT)]
    if int8:
        best = max(int8, key=lambda row: row["rows_per_s"] if row.get("batch_dp", 0.0) <= 1e-4 else 0.0)
        checks[f"fastest batch-independent int8 teacher build ({best['path']}) >= 1.6x floor"] = (
            best["x_floor"] >= 1.6 and best.get("batch_dp", 0.0) <= 1e-4)
    if NOOP_LABEL in served and "served_p50_ms" in fastest:
        noop = served[NOOP_LABEL]
        checks["fastest served p50 <= 2.0x do-nothing"] = fastest["served_p50_ms"] <= 2.0 * noop["load"]["1"]["p50_ms"]
        if "ready_s" in builds[REFERENCE]:
            checks[f"{REFERENCE} ready <= do-nothing + 3 s"] = builds[REFERENCE]["ready_s"] <= noop["ready_s"] + 3
            checks[f"{REFERENCE} RSS <= 450 MB"] = builds[REFERENCE]["rss_mb"] <= 450
        for name in (build_name("onnx", precision) for precision in ENGINES["onnx"].precisions):
            if "ready_s" in builds.get(name, {}):
                checks[f"{name} ready <= do-nothing + 1.5 s"] = builds[name]["ready_s"] <= noop["ready_s"] + 1.5
                checks[f"{name} RSS <= do-nothing + 150 MB"] = builds[name]["rss_mb"] <= noop["worker_rss_mb"] + 150
    return checks


def compare_with_reference(results: dict[str, dict]) -> None:
    """Each build's F1 change and largest probability difference against torch fp32, on the holdout rows."""
    reference_f1, reference_probabilities = results[REFERENCE].get("f1"), results[REFERENCE].get("probabilities")
    for build in results.values():
        if "probabilities" in build:
            build["f1_change"] = build["f1"] - reference_f1
            build["max_dp"] = float(np.abs(build.pop("probabilities") - reference_probabilities).max())


@click.command()
@click.option("--tracking-uri", default=None, help="Store the --model-uri resolves against (default: MLFLOW_TRACKING_URI).")
@click.option("--model-uri", required=True, help="A registered torch build of a trained model (the teacher).")
@click.option("--builds", "teacher_builds", default=None, help="Comma-separated builds of the teacher to measure "
              "(default: every build; torch-fp32 is always measured, as the reference).")
@click.option("--student-uri", default=None, help="A registered build of a student distilled from it (`tagger distill`).")
@click.option("--student-builds", default="torch-fp32,onnx-fp32,onnx-int8", show_default=True,
              help="Comma-separated builds of the student to measure.")
@click.option("--serve", "serve_builds", default=None,
              help="Comma-separated paths to serve (default: every build); e.g. 'torch-fp32,onnx-int8,student onnx-int8'.")
@click.option("--csv", "csv_path", required=True, help="Rows to predict (title, description).")
@click.option("--holdout-csv", default=None, help="Labelled rows (title, description, tag) for each build's F1.")
@click.option("--repeats", default=3, show_default=True, help="Throughput: best of this many passes.")
@click.option("--rounds", default=3, show_default=True, help="Then this many more passes per build and of the floor, "
              "taking turns; each keeps its best (0: none).")
@click.option("--served-seconds", default=10.0, show_default=True, help="Length of each served load phase (0: skip serving).")
@click.option("--clients", default=32, show_default=True, help="Concurrent single-row clients of the served load phase.")
@click.option("--out", default="outputs/speed.json", show_default=True, help="Where to write the results as JSON.")
def main(tracking_uri: str | None, model_uri: str, teacher_builds: str | None, student_uri: str | None, student_builds: str,
         serve_builds: str | None, csv_path: str, holdout_csv: str | None, repeats: int, rounds: int, served_seconds: float,
         clients: int, out: str) -> None:
    """Measure every build of a trained model on this machine and print the table."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    frame, holdout = pd.read_csv(csv_path), pd.read_csv(holdout_csv) if holdout_csv else None
    results: dict[str, Any] = {"model_uri": model_uri, "rows": len(frame), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        reference, base = reference_artifacts(model_uri, Path(tmp) / "model")
        checks, calibration = (holdout if holdout is not None else frame).head(64), frame.sample(
            min(CALIBRATION_ROWS, len(frame)), random_state=0)
        names = sorted({REFERENCE, *teacher_builds.split(",")}) if teacher_builds else None
        builds = make_builds(reference, base, Path(tmp), checks, calibration, names=names)
        if student_uri:
            student, student_base = reference_artifacts(student_uri, Path(tmp) / "student")
            builds += make_builds(student, student_base, Path(tmp), checks, calibration,
                                  names=student_builds.split(","), prefix=STUDENT)
        results["builds"] = {b.name: measure_in_process(b, frame[list(INPUT_COLUMNS)], holdout, repeats) for b in builds}
        compare_with_reference(results["builds"])
        results["floor"] = fp32_floor(builds[0], frame)
        for name, rate in (interleaved_rates(builds, frame[list(INPUT_COLUMNS)], results["floor"], rounds) or {}).items():
            results["builds"][name]["rows_per_s"] = max(results["builds"][name]["rows_per_s"], rate)
        results["ray_data_pipeline"] = pipeline_rate(builds[0], frame)
        if served_seconds > 0:
            wanted = set(serve_builds.split(",")) if serve_builds else None
            uris = register_builds([b for b in builds if wanted is None or b.name in wanted], Path(tmp))
            logs = Path(out).parent / "speed-server-logs"
            results["served"] = measure_served(uris, mlflow.get_tracking_uri(), csv_path, served_seconds, clients, logs)
    results["load_after"] = os.getloadavg()[0]
    rows = summary_rows(results, clients)
    results["table"], results["goals"] = rows, goals(rows, results.get("served", {}))
    for name, server in results.get("served", {}).items():  # benchmarks/serving.py's goals, per served build
        if name != NOOP_LABEL:
            server["in_process_ms"] = results["builds"][name]["single_row_ms"]
            results["goals"] |= {f"{name}: {k}": ok for k, ok in
                                 serving_goals(server, results["served"][NOOP_LABEL], str(clients)).items()}
    print(f"rows {len(frame)}, {results['floor']['mean_tokens']:.1f} tokens/row, "
          f"{results['floor']['flops_per_row'] / 1e6:.0f} MFLOP/row, fp32 matmul {results['floor']['matmul_gflops']:.0f} "
          f"GFLOP/s; load average {results['load_before']:.2f} -> {results['load_after']:.2f}\n")
    print(markdown(rows, results.get("served", {}), clients))
    print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in results["goals"].items()))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
