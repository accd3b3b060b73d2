"""Serving load benchmark: `mlflow models serve` of a model against a do-nothing pyfunc, same machine, same run.

    python benchmarks/serving.py --tracking-uri sqlite:///$PWD/mlflow.db \
        --model-uri models:/tagger@champion --csv your-holdout.csv --seconds 15 --out outputs/serving.json

The do-nothing pyfunc (benchmarks/noop_model.py) answers a constant: served the same way, it
measures the scoring server's own cost (HTTP, JSON, schema checks), so a model's figures read as
ratios to it and compare across machines. For it and each --model-uri (repeatable; downloaded to
a temporary folder first, the download timed apart), one server at a time, each served from its
local folder: ready time (launch to the first /ping 200), RSS of the uvicorn worker and of the
`mlflow` CLI process beside it, then 1 client and --clients concurrent clients sending single-row
`dataframe_records` requests for --seconds (at most --max-requests each): rows/s, p50/p99 ms,
errors, and mismatches against the answer the same server gave for that row alone, sent
sequentially before the load. Prints a markdown table with the ratios to the do-nothing server and
the goals each model should meet (see `goals`), and writes JSON. A machine's speed drifts within
minutes when other work runs on it: with --rounds N all of that runs N times in turn, each model
paired with the do-nothing server of its round, then a summary gives the medians over the rounds.
With --turns N instead, every server is up at once and they take turns N times (one client for
1 s, then --clients clients for 3 s each): the finest pairing, for comparing two versions whose
difference is smaller than the machine's drift.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np
import pandas as pd
import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
NOOP_LABEL = "do-nothing"
TAGS = ("natural-language-processing", "computer-vision", "mlops", "other")  # the noop's answer shape
TOLERANCE = 1e-3  # probabilities may differ this much from the single-request answer


# ---------- rows and answers ----------

def load_rows(csv: str) -> list[dict[str, Any]]:
    """The distinct title/description rows of the CSV, as JSON-ready records (null for NaN)."""
    frame = pd.read_csv(csv, usecols=["title", "description"]).drop_duplicates()
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict(orient="records")


def request_body(row: dict[str, Any]) -> bytes:
    """The JSON of a single-row request."""
    return json.dumps({"dataframe_records": [row]}).encode()


def answer_of(payload: bytes) -> dict[str, Any]:
    """The one prediction of a response body."""
    predictions = json.loads(payload)["predictions"]
    if len(predictions) != 1:
        raise ValueError(f"expected 1 prediction, got {len(predictions)}")
    return predictions[0]


def same_answer(answer: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Same tag and probabilities within TOLERANCE of the reference answer."""
    if answer.get("prediction") != reference.get("prediction"):
        return False
    mine, theirs = answer.get("probabilities") or {}, reference.get("probabilities") or {}
    return mine.keys() == theirs.keys() and all(abs(mine[k] - theirs[k]) <= TOLERANCE for k in mine)


# ---------- one server ----------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(model_uri: str, tracking_uri: str, log_file: Path) -> Iterator[dict[str, Any]]:
    """Run `mlflow models serve` in its own process group; stop the group on exit, even on error."""
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    # The CLI runs `uvicorn` from PATH: put this interpreter's bin folder first (venv not activated).
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": os.pathsep.join([str(mlflow_cli.parent), os.environ.get("PATH", "")])}
    with open(log_file, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield {"process": process, "port": port, "started": started, "log": str(log_file)}
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            os.killpg(process.pid, 0)  # raises once every process of the group is gone
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass


def wait_ready(server: dict[str, Any], timeout_s: float) -> float:
    """Seconds from launch to the first /ping 200 (RuntimeError if the server dies or times out)."""
    url = f"http://127.0.0.1:{server['port']}/ping"
    while time.perf_counter() - server["started"] < timeout_s:
        if server["process"].poll() is not None:
            raise RuntimeError(f"server exited with {server['process'].returncode}; see {server['log']}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return time.perf_counter() - server["started"]
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no /ping 200 within {timeout_s:g} s; see {server['log']}")


def rss_mb(process: subprocess.Popen) -> dict[str, float]:
    """RSS of the mlflow CLI process and of its worker processes (its descendants), in MB."""
    parent = psutil.Process(process.pid)
    workers = parent.children(recursive=True)
    return {
        "cli_rss_mb": round(parent.memory_info().rss / 1e6, 1),
        "worker_rss_mb": round(sum(w.memory_info().rss for w in workers) / 1e6, 1),
        "workers": len(workers),
    }


# ---------- load ----------

class Client:
    """One keep-alive HTTP connection to /invocations."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, body: bytes) -> tuple[int, bytes]:
        """POST one request body; (status, response body). Reconnects once after a dropped connection."""
        for attempt in (0, 1):
            try:
                self.connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                self.connection.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


def references(port: int, bodies: list[bytes]) -> list[dict[str, Any]]:
    """Each row's answer when sent alone, sequentially (RuntimeError on a failed request)."""
    client, answers = Client(port), []
    for body in bodies:
        status, payload = client.send(body)
        if status != 200:
            raise RuntimeError(f"reference request failed with HTTP {status}: {payload[:300]!r}")
        answers.append(answer_of(payload))
    return answers


def client_loop(port: int, bodies: list[bytes], refs: list[dict], start: int, stop: dict, out: dict) -> None:
    """Send rows from `start` on, round-robin, until the deadline or the request budget is spent."""
    client, index = Client(port), start
    while time.perf_counter() < stop["deadline"] and next(stop["budget"]) < stop["max_requests"]:
        row = index % len(bodies)
        index += 1
        began = time.perf_counter()
        try:
            status, payload = client.send(bodies[row])
        except (OSError, http.client.HTTPException):
            out["errors"] += 1
            continue
        if status != 200:
            out["errors"] += 1
        elif not same_answer(answer_of(payload), refs[row]):
            out["mismatches"] += 1
        else:
            out["latencies"].append(time.perf_counter() - began)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds used so far by these processes."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def drive(port: int, bodies: list[bytes], refs: list[dict], clients: int, seconds: float,
          max_requests: int) -> tuple[list[dict], float]:
    """`clients` threads for `seconds` (at most max_requests requests in all): each thread's latencies,
    errors and mismatches, and the seconds it all took."""
    import itertools

    stop = {"deadline": time.perf_counter() + seconds, "budget": itertools.count(), "max_requests": max_requests}
    outs = [{"latencies": [], "errors": 0, "mismatches": 0} for _ in range(clients)]
    offsets = [i * len(bodies) // clients for i in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(port, bodies, refs, offsets[i], stop, outs[i]), daemon=True)
               for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 180)
    return outs, time.perf_counter() - began


def run_load(port: int, bodies: list[bytes], refs: list[dict], clients: int, seconds: float, max_requests: int,
             workers: list[psutil.Process]) -> dict:
    """`clients` threads for `seconds` (at most max_requests requests in all): rows/s, p50/p99, errors, CPU."""
    server_cpu, client_cpu = cpu_seconds(workers), time.process_time()
    outs, elapsed = drive(port, bodies, refs, clients, seconds, max_requests)
    server_cpu, client_cpu = cpu_seconds(workers) - server_cpu, time.process_time() - client_cpu
    latencies = np.array([x for out in outs for x in out["latencies"]]) * 1000
    errors, mismatches = sum(o["errors"] for o in outs), sum(o["mismatches"] for o in outs)
    return {
        "clients": clients,
        "requests": len(latencies) + errors + mismatches,
        "rows_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else math.nan,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if len(latencies) else math.nan,
        "errors": errors,
        "mismatches": mismatches,
        "server_cores": round(server_cpu / elapsed, 2),  # worker CPU seconds per second
        "server_cpu_ms_per_row": round(1000 * server_cpu / max(len(latencies), 1), 2),
        "client_cpu_ms_per_row": round(1000 * client_cpu / max(len(latencies), 1), 2),
    }


# ---------- one model, end to end ----------

def in_process_single_row_ms(model_uri: str, rows: list[dict[str, Any]], count: int = 50) -> float:
    """Median time of `pyfunc.load_model(uri).predict` on one row, in this process."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    frames = [pd.DataFrame([row]) for row in rows[:count]]
    model.predict(frames[0])
    times = []
    for frame in frames:
        began = time.perf_counter()
        model.predict(frame)
        times.append(time.perf_counter() - began)
    return round(float(np.median(times)) * 1000, 2)


@contextmanager
def local_copy(model_uri: str) -> Iterator[tuple[str, float | None]]:
    """The model as a local folder, and the seconds its download took (None for a folder already).

    Both servers then start from a local folder: ready time is the server's own start-up, and the
    registry's download, which the do-nothing model (saved locally) never pays, is reported apart.
    """
    import mlflow

    if Path(model_uri).is_dir():
        yield model_uri, None
        return
    with tempfile.TemporaryDirectory(prefix="serving-model-") as tmp:
        started = time.perf_counter()
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        yield local, round(time.perf_counter() - started, 2)


def bench_server(label: str, model_uri: str, options: dict, bodies: list[bytes], workdir: Path) -> dict:
    """Serve one model from a local folder and measure it: ready time, RSS, then 1 and N concurrent clients."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / f"server-{len(list(workdir.glob('server-*.log')))}.log"
    with local_copy(model_uri) as (folder, download_s), served(folder, options["tracking_uri"], log_file) as server:
        result = {"label": label, "model_uri": model_uri, "download_s": download_s, "log": str(log_file)}
        result["ready_s"] = round(wait_ready(server, options["ready_timeout"]), 2)
        result.update(rss_mb(server["process"]))
        refs = references(server["port"], bodies)
        workers = psutil.Process(server["process"].pid).children(recursive=True)
        result["load"] = {
            str(n): run_load(server["port"], bodies, refs, n, options["seconds"], options["max_requests"], workers)
            for n in (1, options["clients"])
        }
        result["after_load"] = rss_mb(server["process"])
        print(f"  {label}: {json.dumps({k: v for k, v in result.items() if k != 'log'})}", flush=True)
        return result


def save_noop_model(folder: Path) -> str:
    """The do-nothing pyfunc, saved (models from code) to folder; its path as a model URI."""
    import mlflow

    example = pd.DataFrame({"title": ["a title"], "description": ["a description"]})
    mlflow.pyfunc.save_model(
        path=str(folder), python_model=str(ROOT / "benchmarks" / "noop_model.py"),
        input_example=example, model_config={"tags": list(TAGS)},
    )
    return str(folder)


def taking_turns(uris: dict[str, str], options: dict, bodies: list[bytes], workdir: Path, turns: int) -> dict:
    """Every server up at once, then `turns` rounds in which each in turn gets one client for 1 s, then
    --clients clients for 3 s: drift in the machine's speed falls on all of them alike. Per server: p50/p90
    over every turn's requests, rows/s under load, errors and mismatches."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as running:
        servers = {}
        for index, (label, uri) in enumerate(uris.items()):
            folder, _ = running.enter_context(local_copy(uri))
            log = workdir / f"turns-{index}.log"
            servers[label] = running.enter_context(served(folder, options["tracking_uri"], log))
        for server in servers.values():
            wait_ready(server, options["ready_timeout"])
        refs = {label: references(server["port"], bodies) for label, server in servers.items()}
        totals = {label: {"single": [], "rows": 0, "seconds": 0.0, "errors": 0, "mismatches": 0} for label in servers}
        for _ in range(turns):
            for clients, seconds in ((1, 1.0), (options["clients"], 3.0)):
                for label, server in servers.items():
                    outs, elapsed = drive(server["port"], bodies, refs[label], clients, seconds,
                                          options["max_requests"])
                    total = totals[label]
                    if clients == 1:
                        total["single"] += outs[0]["latencies"]
                    else:
                        total["rows"] += sum(len(o["latencies"]) for o in outs)
                        total["seconds"] += elapsed
                    total["errors"] += sum(o["errors"] for o in outs)
                    total["mismatches"] += sum(o["mismatches"] for o in outs)
    return {label: {"p50_ms": round(float(np.percentile(t["single"], 50)) * 1000, 2),
                    "p90_ms": round(float(np.percentile(t["single"], 90)) * 1000, 2),
                    "rows_per_s": round(t["rows"] / t["seconds"], 1), "requests_1_client": len(t["single"]),
                    "errors": t["errors"], "mismatches": t["mismatches"]} for label, t in totals.items()}


def turns_markdown(results: dict[str, dict], clients: int) -> str:
    """The taking-turns table: each server against the do-nothing one."""
    noop = results[NOOP_LABEL]["p50_ms"]
    lines = [f"| server | 1 client p50 ms | x do-nothing | p90 ms | rows/s @{clients} | errors | mismatches |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {label} | {r['p50_ms']:.2f} | {r['p50_ms'] / noop:.2f} | {r['p90_ms']:.2f} | {r['rows_per_s']:.1f} "
              f"| {r['errors']} | {r['mismatches']} |" for label, r in results.items()]
    return "\n".join(lines)


# ---------- report ----------

def goals(model: dict, noop: dict, clients: str) -> dict[str, bool]:
    """What a served model should reach against the do-nothing server of the same round (PASS/FAIL per goal).

    Under --clients clients: at least 0.45x the do-nothing server's rows/s (batching makes up for
    the model's work), p99 within 4x p50, no errors, and every answer equal to the row's lone answer.
    With one client: p50 within the do-nothing server's p50 plus 1.2x the model's own in-process
    time for one row (the server adds little to the model).
    """
    many, one, base_many, base_one = model["load"][clients], model["load"]["1"], noop["load"][clients], noop["load"]["1"]
    checks = {
        f"{clients}_clients_rows_per_s_vs_noop>=0.45": many["rows_per_s"] >= 0.45 * base_many["rows_per_s"],
        "no_errors": many["errors"] + one["errors"] == 0,
        "no_mismatches": many["mismatches"] + one["mismatches"] == 0,
        f"{clients}_clients_p99<=4x_p50": many["p99_ms"] <= 4 * many["p50_ms"],
    }
    if model.get("in_process_ms") is not None:
        checks["1_client_p50<=noop_p50+1.2x_in_process"] = one["p50_ms"] <= base_one["p50_ms"] + 1.2 * model["in_process_ms"]
    return checks


def markdown(results: list[dict], clients: str) -> str:
    """The table: each server's load figures, with ratios to the do-nothing server."""
    noop = results[0]
    lines = [
        "| server | clients | rows/s | x noop rows/s | p50 ms | p50 - noop ms | p99 ms | errors | mismatches "
        "| server cores | server CPU ms/row |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for n in ("1", clients):
            load, base = result["load"][n], noop["load"][n]
            lines.append(
                f"| {result['label']} | {n} | {load['rows_per_s']:.1f} | {load['rows_per_s'] / base['rows_per_s']:.2f} | "
                f"{load['p50_ms']:.1f} | {load['p50_ms'] - base['p50_ms']:+.1f} | {load['p99_ms']:.1f} | "
                f"{load['errors']} | {load['mismatches']} | {load['server_cores']} | {load['server_cpu_ms_per_row']} |"
            )
    lines += ["", "| server | download s | ready s | worker RSS MB | CLI RSS MB | worker RSS after load MB "
              "| in-process 1 row ms |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['download_s'] or '-'} | {r['ready_s']} | {r['worker_rss_mb']} | "
                     f"{r['cli_rss_mb']} | {r['after_load']['worker_rss_mb']} | {r.get('in_process_ms', '-')} |")
    for r in results[1:]:
        lines.append("")
        lines.append(f"goals for {r['label']}: " + ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in r["goals"].items()))
    return "\n".join(lines)


def summary(rounds: list[list[dict]], clients: str) -> str:
    """Per model, over the rounds: median (and range) of its figures against the do-nothing server of each round."""
    lines = ["", f"over {len(rounds)} rounds, each model against the do-nothing server of its round: median (min - max)",
             "", f"| server | rows/s @{clients} x noop | 1 client p50 - noop ms | ready - noop s | worker RSS MB "
             "| RSS after load MB | rounds with every goal met |", "|---|---|---|---|---|---|---|"]

    def spread(values: list[float], digits: int) -> str:
        return f"{np.median(values):.{digits}f} ({min(values):.{digits}f} - {max(values):.{digits}f})"

    for index, label in enumerate(r["label"] for r in rounds[0][1:]):
        pairs = [(results[0], results[index + 1]) for results in rounds]
        ratio = [m["load"][clients]["rows_per_s"] / n["load"][clients]["rows_per_s"] for n, m in pairs]
        p50 = [m["load"]["1"]["p50_ms"] - n["load"]["1"]["p50_ms"] for n, m in pairs]
        ready = [m["ready_s"] - n["ready_s"] for n, m in pairs]
        met = sum(all(m["goals"].values()) for _, m in pairs)
        lines.append(f"| {label} | {spread(ratio, 2)} | {spread(p50, 1)} | {spread(ready, 1)} | "
                     f"{spread([m['worker_rss_mb'] for _, m in pairs], 0)} | "
                     f"{spread([m['after_load']['worker_rss_mb'] for _, m in pairs], 0)} | {met} of {len(pairs)} |")
    return "\n".join(lines)


@click.command()
@click.option("--tracking-uri", required=True, help="MLflow tracking/registry URI the models:/ URIs resolve against.")
@click.option("--model-uri", "model_uris", multiple=True, required=True, help="Model to serve (repeatable).")
@click.option("--csv", required=True, help="CSV with title and description columns: the request rows.")
@click.option("--seconds", default=15.0, show_default=True, help="Length of each load phase.")
@click.option("--clients", default=32, show_default=True, help="Concurrent clients of the second phase.")
@click.option("--max-requests", default=20000, show_default=True, help="Request budget of each phase.")
@click.option("--ready-timeout", default=180.0, show_default=True, help="Give up waiting for /ping after this long.")
@click.option("--in-process/--no-in-process", default=True, show_default=True,
              help="Also time pyfunc predict of one row in this process (the 1-client goal needs it).")
@click.option("--rounds", default=1, show_default=True,
              help="Serve the do-nothing pyfunc and every model this many times, in turn: ratios pair each "
                   "model with the do-nothing server of its round, and a summary gives their medians.")
@click.option("--turns", default=0, show_default=True,
              help="Instead: every server up at once, taking turns (1 client 1 s, then --clients clients 3 s) this many "
                   "times; p50 over all turns (best against a machine whose speed drifts).")
@click.option("--out", default="outputs/serving.json", show_default=True, help="JSON results file.")
def main(tracking_uri: str, model_uris: tuple[str, ...], csv: str, seconds: float, clients: int,
         max_requests: int, ready_timeout: float, in_process: bool, rounds: int, turns: int, out: str) -> None:
    """Benchmark `mlflow models serve` of each model against a do-nothing pyfunc."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    rows = load_rows(csv)
    bodies = [request_body(row) for row in rows]
    options = {"tracking_uri": tracking_uri, "seconds": seconds, "clients": clients,
               "max_requests": max_requests, "ready_timeout": ready_timeout}
    load_before = os.getloadavg()
    logs = Path(out).parent / "serving-logs"  # server logs are kept: read them when a server fails
    if turns:
        with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
            uris = {NOOP_LABEL: save_noop_model(Path(tmp) / "noop"), **{uri: uri for uri in model_uris}}
            results = taking_turns(uris, options, bodies, logs, turns)
        print(turns_markdown(results, clients))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"rows": len(rows), "options": options, "turns": turns, "loadavg_before":
                                         load_before, "loadavg_after": os.getloadavg(), "servers": results}, indent=2))
        print(f"wrote {out}")
        return
    timings = {uri: in_process_single_row_ms(uri, rows) if in_process else None for uri in dict.fromkeys(model_uris)}
    all_rounds = []
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        noop_uri = save_noop_model(Path(tmp) / "noop")
        for _ in range(rounds):
            results = [bench_server(NOOP_LABEL, noop_uri, options, bodies, logs)]
            results += [{**bench_server(uri, uri, options, bodies, logs), "in_process_ms": timings[uri]} for uri in model_uris]
            for result in results[1:]:
                result["goals"] = goals(result, results[0], str(clients))
            print(markdown(results, str(clients)), flush=True)
            all_rounds.append(results)
    if rounds > 1:
        print(summary(all_rounds, str(clients)))
    report = {"rows": len(rows), "cpus": psutil.cpu_count(), "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "options": options, "rounds": all_rounds, "servers": all_rounds[0]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
