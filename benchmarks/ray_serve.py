"""`tagger serve` (Ray Serve, 1 replica) next to `mlflow models serve` (1 and 2 workers) and the do-nothing pyfunc.

    python benchmarks/ray_serve.py --tracking-uri sqlite:///$PWD/mlflow.db \
        --model-uri models:/tagger@champion --csv your-holdout.csv \
        --seconds 15 --out outputs/ray_serve.json

One server at a time, each serving the model from the same local folder (downloaded once; the
do-nothing pyfunc of benchmarks/noop_model.py served by `mlflow models serve`): time to ready
(launch to the first /ping 200), the total RSS of every process it started (for `tagger serve`:
the CLI driver, Ray's GCS, raylet, dashboard processes, the Serve controller, proxy and replica),
then 1 client and --clients concurrent clients sending single-row `dataframe_records` for
--seconds: rows/s, p50/p99 ms, errors and mismatches (the load loop and its checks are
benchmarks/serving.py's). Prints a markdown table with the goals it checks and writes JSON.
With --serve-batch-size N, tagger serve runs once more with Ray Serve's @serve.batch (N requests,
2 ms) gathering requests in front of the model's own batching.
`tagger serve` runs with a local Ray and --replica-cpus = the machine's cores (its model's
inference threads), as one replica would on a machine of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402  (benchmarks/serving.py: rows, load loop, do-nothing model)

ROOT = serving.ROOT


def total_rss_mb(process: subprocess.Popen) -> dict[str, float]:
    """RSS of the launched process and all its descendants, in MB, and how many processes that is."""
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    rss = 0
    for member in family:
        try:
            rss += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {"total_rss_mb": round(rss / 1e6, 1), "processes": len(family)}


@contextmanager
def launched(command: list[str], env: dict[str, str], log_file: Path) -> Iterator[dict[str, Any]]:
    """Run a server command in its own process group; stop the group at the end (SIGTERM, then SIGKILL)."""
    with open(log_file, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=str(log_file.parent))
        try:
            yield {"process": process, "started": started, "log": str(log_file)}
        finally:
            if process.poll() is None:
                process.send_signal(2)  # SIGINT: tagger serve takes its application and local Ray down
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            serving.stop_group(process)


def mlflow_command(folder: str, port: int, workers: int) -> list[str]:
    """`mlflow models serve` with the worker count as MLFLOW_MODELS_WORKERS: the model's workers then share the cores."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    return ["env", f"MLFLOW_MODELS_WORKERS={workers}", str(mlflow_cli), "models", "serve", "-m", folder,
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]


def tagger_command(folder: str, port: int, replica_cpus: int, serve_batch_size: int = 0) -> list[str]:
    return [sys.executable, "-m", "tagger", "serve", "--model-uri", folder, "--port", str(port),
            "--replicas", "1", "--replica-cpus", str(replica_cpus), "--serve-batch-size", str(serve_batch_size)]


def bench(label: str, command: list[str], port: int, options: dict, bodies: list[bytes], logs: Path) -> dict:
    """Launch one server and measure it: ready time, total RSS, then 1 and N concurrent clients."""
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{label.replace(' ', '_').replace('/', '_')}.log"
    mlflow_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([mlflow_bin, os.environ.get("PATH", "")])}
    with launched(command, env, log_file) as server:
        server["port"] = port
        result: dict[str, Any] = {"label": label, "command": " ".join(command), "log": str(log_file)}
        result["ready_s"] = round(serving.wait_ready(server, options["ready_timeout"]), 2)
        time.sleep(1)
        result.update(total_rss_mb(server["process"]))
        refs = serving.references(port, bodies)
        family = [psutil.Process(server["process"].pid), *psutil.Process(server["process"].pid).children(recursive=True)]
        result["load"] = {
            str(n): serving.run_load(port, bodies, refs, n, options["seconds"], options["max_requests"], family)
            for n in (1, options["clients"])
        }
        result["after_load"] = total_rss_mb(server["process"])
        print(f"  {label}: {json.dumps({k: v for k, v in result.items() if k not in ('log', 'command')})}", flush=True)
        return result


def report(results: dict[str, dict], clients: str) -> str:
    """The markdown table and the goals for tagger serve (against one `mlflow models serve` worker)."""
    noop = results["do-nothing (mlflow models serve)"]
    lines = ["| server | ready s | total RSS MB (processes) | RSS after load MB | 1-client p50 ms | 1-client p99 ms "
             f"| rows/s @{clients} | p50 @{clients} ms | p99 @{clients} ms | errors | server cores @{clients} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        one, many = r["load"]["1"], r["load"][clients]
        lines.append(f"| {label} | {r['ready_s']} | {r['total_rss_mb']} ({r['processes']}) | "
                     f"{r['after_load']['total_rss_mb']} | {one['p50_ms']} | {one['p99_ms']} | {many['rows_per_s']} | "
                     f"{many['p50_ms']} | {many['p99_ms']} | {one['errors'] + many['errors'] + many['mismatches']} | "
                     f"{many['server_cores']} |")
    tagger = results.get("tagger serve, 1 replica")
    mlflow1 = results.get("mlflow models serve, 1 worker")
    if tagger and mlflow1:
        ratio = tagger["load"][clients]["rows_per_s"] / mlflow1["load"][clients]["rows_per_s"]
        p50 = tagger["load"]["1"]["p50_ms"] - mlflow1["load"]["1"]["p50_ms"]
        lines += ["", f"tagger serve / mlflow models serve (1 worker): rows/s @{clients} {ratio:.2f}x (goal >= 0.75: "
                      f"{'PASS' if ratio >= 0.75 else 'FAIL'}); 1-client p50 {p50:+.1f} ms (goal <= +10: "
                      f"{'PASS' if p50 <= 10 else 'FAIL'}); x do-nothing rows/s "
                      f"{tagger['load'][clients]['rows_per_s'] / noop['load'][clients]['rows_per_s']:.2f}"]
    return "\n".join(lines)


@click.command()
@click.option("--tracking-uri", required=True, help="MLflow tracking/registry URI the models:/ URI resolves against.")
@click.option("--model-uri", required=True, help="Model to serve (downloaded once; every server serves that folder).")
@click.option("--csv", required=True, help="CSV with title and description columns: the request rows.")
@click.option("--seconds", default=15.0, show_default=True, help="Length of each load phase.")
@click.option("--clients", default=32, show_default=True, help="Concurrent clients of the second phase.")
@click.option("--max-requests", default=20000, show_default=True, help="Request budget of each phase.")
@click.option("--ready-timeout", default=240.0, show_default=True, help="Give up waiting for /ping after this long.")
@click.option("--replica-cpus", default=psutil.cpu_count(), show_default=True,
              help="tagger serve's replica CPUs (its model's inference threads).")
@click.option("--serve-batch-size", default=16, show_default=True,
              help="Also run tagger serve with Ray Serve's @serve.batch of this size in front of the model (0: don't).")
@click.option("--out", default="outputs/ray_serve.json", show_default=True, help="JSON results file.")
def main(tracking_uri: str, model_uri: str, csv: str, seconds: float, clients: int, max_requests: int,
         ready_timeout: float, replica_cpus: int, serve_batch_size: int, out: str) -> None:
    """Benchmark tagger serve against mlflow models serve (1 and 2 workers) and the do-nothing pyfunc."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    rows = serving.load_rows(csv)
    bodies = [serving.request_body(row) for row in rows]
    options = {"seconds": seconds, "clients": clients, "max_requests": max_requests, "ready_timeout": ready_timeout}
    logs = Path(out).resolve().parent / "ray-serve-logs"
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ray-serve-bench-") as tmp:
        noop = serving.save_noop_model(Path(tmp) / "noop")
        folder = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(Path(tmp) / "model"))
        port = serving.free_port
        servers = [
            ("do-nothing (mlflow models serve)", lambda p: mlflow_command(noop, p, 1)),
            ("mlflow models serve, 1 worker", lambda p: mlflow_command(folder, p, 1)),
            ("mlflow models serve, 2 workers", lambda p: mlflow_command(folder, p, 2)),
            ("tagger serve, 1 replica", lambda p: tagger_command(folder, p, replica_cpus)),
        ]
        if serve_batch_size:
            servers.append((f"tagger serve, 1 replica, @serve.batch {serve_batch_size}",
                            lambda p: tagger_command(folder, p, replica_cpus, serve_batch_size)))
        for label, command in servers:
            chosen = port()
            results[label] = bench(label, command(chosen), chosen, options, bodies, logs)
    text = report(results, str(clients))
    print(text)
    flags = sorted({flag for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for flag in line.split(":", 1)[1].split() if flag.startswith(("avx", "amx")) or flag == "fma"})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({
        "rows": len(rows), "cpus": psutil.cpu_count(), "cpu_flags": flags, "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "options": options, "model_uri": model_uri, "servers": results,
        "markdown": text}, indent=2))
    print(f"cpu flags: {' '.join(flags)}\nwrote {out}")


if __name__ == "__main__":
    main()
