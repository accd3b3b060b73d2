"""`tagger serve`: a registered model on Ray Serve, with the HTTP contract of `mlflow models serve`.

One deployment, `TaggerServer`, is both the HTTP ingress and the model: each replica loads the
packaged pyfunc with `mlflow.pyfunc.load_model` (so the manifest check and the engines are the
one code path `mlflow models serve` runs) and answers `/invocations` with MLflow's own scoring
server function (`mlflow.pyfunc.scoring_server.invocations`): the same parsing, schema enforcement,
status codes and error bodies. `predict` runs in a thread per request, so the model's own
inference threads batch the rows of concurrent requests (one batching layer, not two).

A replica serving an alias (`models:/tagger@champion`) or a stage polls the registry every
`poll_s` seconds; when the alias moves it loads the new version beside the old one and then
switches, so no request fails. A version that fails to load leaves the old one serving; the
failure is logged, counted (`tagger_model_load_failures`) and shown by `GET /health`. A pinned
URI (`models:/tagger/3`, `runs:/...`) never reloads.

Every response carries `X-Tagger-Model-Version: <name>/<version>` (the URI itself for a model
that is not registered).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlflow

from tagger.config import ServeConfig
from tagger.errors import ServiceError, one_line

APP_NAME = "tagger"
DEPLOYMENT_NAME = "TaggerServer"
VERSION_HEADER = "X-Tagger-Model-Version"
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
STAGE_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<stage>[A-Za-z][^/@]*)/?$")
BUILDER_IMPORT_PATH = "tagger.serve:build_app"
# Ray Serve's proxy sends every request to a replica on its own node while that one has room
# (max_ongoing_requests): with one proxy (HeadOnly) the other nodes' replicas would idle. Read by
# the proxy when it starts: a local Ray inherits it from `tagger serve`; on a cluster, set it in the
# environment of `ray start` on the head node.
SPREAD_ENV = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0"}
_log = logging.getLogger("tagger.serve")


# ---------------------------------------------------------------- which version a URI names now


@dataclass(frozen=True)
class Resolved:
    """A concrete model: the URI to load and the label the header and metrics show."""

    load_uri: str
    label: str


def resolve(model_uri: str) -> Resolved:
    """The version `model_uri` names now: an alias or stage is looked up in the registry."""
    if match := VERSION_URI.match(model_uri):
        return Resolved(model_uri, f"{match['name']}/{match['version']}")
    client = mlflow.MlflowClient()
    if match := ALIAS_URI.match(model_uri):
        version = client.get_model_version_by_alias(match["name"], match["alias"]).version
        return Resolved(f"models:/{match['name']}/{version}", f"{match['name']}/{version}")
    if match := STAGE_URI.match(model_uri):  # models:/NAME/Production, models:/NAME/latest
        stages = None if match["stage"].lower() == "latest" else [match["stage"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages still work; aliases are the recommended path
            versions = client.get_latest_versions(match["name"], stages)
        if not versions:
            raise ServiceError(f"{model_uri}: no version of {match['name']!r} is in stage {match['stage']!r}")
        version = max(versions, key=lambda v: int(v.version)).version
        return Resolved(f"models:/{match['name']}/{version}", f"{match['name']}/{version}")
    return Resolved(model_uri, model_uri)


def is_movable(model_uri: str) -> bool:
    """True for URIs whose version can change (an alias or a stage); a pinned version never reloads."""
    return bool(ALIAS_URI.match(model_uri) or (STAGE_URI.match(model_uri) and not VERSION_URI.match(model_uri)))


def inference_threads(replica_cpus: float) -> int:
    """A replica's model runs as many inference threads as the replica has CPUs (at least one)."""
    return max(1, int(round(replica_cpus)))


# ---------------------------------------------------------------- the model a replica serves


class Served:
    """A loaded pyfunc as MLflow's scoring function sees it (`.predict`, `.metadata`), measured.

    `predict` records the request's rows, the rows predicted and the seconds the model took,
    labelled with the model version.
    """

    def __init__(self, model: Any, label: str, load_uri: str, metrics: Metrics | None) -> None:
        self.model = model
        self.metadata = model.metadata
        self.input_schema = model.metadata.get_input_schema()
        self.label = label
        self.load_uri = load_uri
        self.metrics = metrics
        self.loaded_at = time.time()

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """The pyfunc's predict, timed and counted."""
        rows = len(data) if hasattr(data, "__len__") else 1
        start = time.perf_counter()
        result = self.model.predict(data, params=params)
        if self.metrics is not None:
            self.metrics.predicted(self.label, rows, time.perf_counter() - start)
        return result

    def close(self) -> None:
        """Stop the model's threads if the pyfunc offers a way (a `close` on its python model)."""
        if close := model_method(self.model, "close"):
            close()


def model_method(model: Any, name: str) -> Any:
    """A method of the pyfunc's python model (tagger's TaggerModel has `close` and `observe_batches`), or None."""
    try:
        method = getattr(model.unwrap_python_model(), name, None)
    except Exception:  # not a python_model flavor
        return None
    return method if callable(method) else None


class Metrics:
    """tagger's Prometheus metrics, exported by Ray on each node's metrics port (prefixed `ray_`).

    Ray Serve adds the deployment, replica and application labels; tagger adds `model_version`.
    """

    ROW_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    SECOND_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

    def __init__(self) -> None:
        from ray.serve import metrics

        keys = ("model_version",)
        self.rows = metrics.Counter("tagger_rows_predicted", "Rows predicted.", tag_keys=keys)
        self.request_rows = metrics.Histogram(
            "tagger_request_rows", "Rows per /invocations request.", boundaries=self.ROW_BOUNDARIES, tag_keys=keys)
        self.seconds = metrics.Histogram(
            "tagger_forward_seconds", "Seconds the model took per request (wait for its batch + forward pass).",
            boundaries=self.SECOND_BOUNDARIES, tag_keys=keys)
        self.load_failures = metrics.Counter(
            "tagger_model_load_failures", "Versions that failed to load (the old one kept serving).",
            tag_keys=keys)
        self.loaded = metrics.Gauge("tagger_model_loaded", "1 for the version this replica serves.", tag_keys=keys)
        self.batch_rows = metrics.Histogram(
            "tagger_batch_rows", "Rows per forward batch (the rows of concurrent requests, gathered by the model).",
            boundaries=self.ROW_BOUNDARIES, tag_keys=keys)

    def predicted(self, label: str, rows: int, seconds: float) -> None:
        tags = {"model_version": label}
        self.rows.inc(rows, tags=tags)
        self.request_rows.observe(rows, tags=tags)
        self.seconds.observe(seconds, tags=tags)


def load(resolved: Resolved, threads: int, metrics: Metrics | None) -> Served:
    """Load a version through the public pyfunc interface, its inference threads fitted to the replica."""
    model = mlflow.pyfunc.load_model(
        resolved.load_uri, model_config={"inference_threads": threads, "num_threads": 1}
    )
    if metrics is not None and (observe := model_method(model, "observe_batches")):
        observe(lambda rows: metrics.batch_rows.observe(rows, tags={"model_version": resolved.label}))
    return Served(model, resolved.label, resolved.load_uri, metrics)


class ModelHolder:
    """The version a replica serves now, and the poller that swaps in a new one when an alias moves."""

    def __init__(self, model_uri: str, threads: int, poll_s: float, metrics: Metrics | None,
                 close_after_s: float = 120.0) -> None:
        self.model_uri = model_uri
        self.threads = threads
        self.poll_s = poll_s
        self.metrics = metrics
        self.close_after_s = close_after_s  # the old version is closed after its last requests had time to end
        self.current = load(resolve(model_uri), threads, metrics)  # a replica that cannot load fails to start
        self.last_error: dict[str, Any] | None = None
        self.failed_label: str | None = None
        self.swaps = 0
        self._stop = threading.Event()
        self.announced: str | None = None  # the version the tagger_model_loaded gauge shows
        self.movable = is_movable(model_uri) and poll_s > 0
        if self.movable:
            threading.Thread(target=self._poll, name="tagger-registry-poll", daemon=True).start()

    def announce(self) -> None:
        """Point the tagger_model_loaded gauge at the version serving (from a request: a gauge set while the
        replica is being constructed is not exported)."""
        label = self.current.label
        if self.metrics is not None and self.announced != label:
            if self.announced is not None:
                self.metrics.loaded.set(0, tags={"model_version": self.announced})
            self.metrics.loaded.set(1, tags={"model_version": label})
            self.announced = label

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def check(self) -> bool:
        """Look the URI up once; load and switch to a new version. True if it switched."""
        try:
            target = resolve(self.model_uri)
        except Exception as error:  # registry unreachable: keep serving, say why
            self._failed(None, f"cannot look up {self.model_uri}: {one_line(error)}")
            return False
        if target.label == self.current.label:
            self.failed_label = self.last_error = None  # (back) on what serves: nothing is wrong any more
            return False
        if target.label == self.failed_label:
            return False  # failed already; retried only when the alias moves again
        _log.warning("tagger serve: %s now names %s; loading it beside %s", self.model_uri, target.label,
                     self.current.label)
        try:
            new = load(target, self.threads, self.metrics)
        except Exception as error:
            self._failed(target.label, f"{target.label} failed to load, {self.current.label} keeps serving: "
                                       f"{type(error).__name__}: {one_line(error)}")
            return False
        old, self.current = self.current, new
        self.failed_label, self.last_error, self.swaps = None, None, self.swaps + 1
        _log.warning("tagger serve: switched from %s to %s", old.label, new.label)
        closer = threading.Timer(self.close_after_s, old.close)
        closer.daemon = True
        closer.start()
        return True

    def _failed(self, label: str | None, message: str) -> None:
        _log.error("tagger serve: %s", message)
        self.failed_label = label
        self.last_error = {"version": label, "message": message, "at": time.time()}
        if self.metrics is not None and label is not None:
            self.metrics.load_failures.inc(tags={"model_version": label})

    def stop(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------- the HTTP side, MLflow's own functions


def json_response(body: Any, status: int, headers: dict[str, str]) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def invoke(served: Served, body: bytes, content_type: str | None) -> tuple[str, int, str]:
    """`mlflow models serve`'s /invocations: MLflow's `invocations`, its MlflowException bodies included."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        result = scoring_server.invocations(body, content_type, served, served.input_schema)
        return result.response, result.status, result.mimetype
    except MlflowException as error:  # what scoring_server._async_catch_mlflow_exception answers
        return error.serialize_as_json(), error.get_http_status_code(), "application/json"


ALONE = object()  # a batched request that must be answered on its own (its batch failed as a whole)


def parse_plain_request(served: Served, body: bytes, content_type: str | None) -> Any:
    """The DataFrame of a plain JSON request without params (None: anything else, answered on its own)."""
    from mlflow.pyfunc import scoring_server

    if (content_type or "").split(";")[0].strip() != "application/json" or ";" in (content_type or ""):
        return None
    try:
        parsed = scoring_server._parse_json_data(body, served.metadata, served.input_schema)
    except Exception:  # answered on its own: MLflow's own error
        return None
    if parsed.params or parsed.is_unified_llm_input or not hasattr(parsed.data, "iloc"):
        return None
    return parsed.data


def predict_together(served: Served, frames: list[Any]) -> list[Any]:
    """One predict over the rows of several requests; each request's own rows back, as MLflow's JSON.

    Any error (a bad row, a batch over max_request_rows) answers every request ALONE, so each gets
    exactly the error (or the answer) `mlflow models serve` would give it.
    """
    import io

    import pandas as pd
    from mlflow.pyfunc import scoring_server

    try:
        result = served.predict(pd.concat(frames, ignore_index=True))
    except Exception:
        return [ALONE] * len(frames)
    answers, start = [], 0
    for frame in frames:
        output = io.StringIO()
        scoring_server.predictions_to_json(result.iloc[start : start + len(frame)], output)
        answers.append(output.getvalue())
        start += len(frame)
    return answers


class TaggerServer:
    """A Ray Serve replica: the model, loaded once, behind `mlflow models serve`'s routes."""

    def __init__(self, model_uri: str, poll_s: float = 10.0, replica_cpus: float = 1.0,
                 max_ongoing_requests: int = 64, request_timeout_s: float | None = None,
                 tracking_uri: str | None = None, registry_uri: str | None = None,
                 serve_batch_size: int = 0, serve_batch_wait_s: float = 0.002) -> None:
        from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = "true"  # as the scoring server sets it
        self.timeout_s = request_timeout_s or MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
        self.executor = ThreadPoolExecutor(max_workers=max_ongoing_requests, thread_name_prefix="tagger-predict")
        self.holder = ModelHolder(model_uri, inference_threads(replica_cpus), poll_s, Metrics())
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.batched = None
        if serve_batch_size > 0:  # measured against the model's own batching: see benchmarks/ray_serve.py
            from ray import serve

            self.batched = serve.batch(max_batch_size=serve_batch_size, batch_wait_timeout_s=serve_batch_wait_s)(
                self._predict_batch)

    async def _predict_batch(self, items: list[tuple[Served, Any]]) -> list[Any]:
        """@serve.batch: the waiting requests' rows in one predict call (per model version)."""
        loop = asyncio.get_running_loop()
        answers: list[Any] = [None] * len(items)
        for served in {id(item[0]): item[0] for item in items}.values():
            indices = [i for i, item in enumerate(items) if item[0] is served]
            together = await loop.run_in_executor(
                self.executor, predict_together, served, [items[i][1] for i in indices])
            for index, answer in zip(indices, together):
                answers[index] = answer
        return answers

    async def _invoke_batched(self, served: Served, body: bytes, content_type: str | None) -> tuple[str, int, str]:
        frame = parse_plain_request(served, body, content_type)
        if frame is not None:
            answer = await self.batched((served, frame))
            if answer is not ALONE:
                return answer, 200, "application/json"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, invoke, served, body, content_type)

    def health(self) -> dict[str, Any]:
        holder = self.holder
        return {
            "status": "ok", "model_uri": holder.model_uri, "model_version": holder.current.label,
            "loaded_at": holder.current.loaded_at, "swaps": holder.swaps, "polls_registry": holder.movable,
            "last_error": holder.last_error, "pid": os.getpid(), "node_id": self.node_id,
        }

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        served = self.holder.current  # one version answers the whole request, even during a switch
        if self.holder.announced != served.label:
            self.holder.announce()
        headers = {VERSION_HEADER: served.label}
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/invocations":
            if method != "POST":
                return json_response({"detail": "Method Not Allowed"}, 405, headers | {"allow": "POST"})
            body = await request.body()
            content_type = request.headers.get("content-type")
            if self.batched is not None:
                work = self._invoke_batched(served, body, content_type)
            else:
                work = asyncio.get_running_loop().run_in_executor(self.executor, invoke, served, body, content_type)
            try:
                content, status, mimetype = await asyncio.wait_for(work, self.timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                content, status, mimetype = "Request processing time exceeded limit", 504, "application/json"
            except Exception:  # what uvicorn answers for an error outside MLflow's handling (e.g. no content type)
                _log.exception("tagger serve: /invocations failed")
                content, status, mimetype = "Internal Server Error", 500, "text/plain"
            return Response(content, status_code=status, media_type=mimetype, headers=headers)
        if method not in ("GET", "HEAD"):
            return json_response({"detail": "Method Not Allowed"}, 405, headers | {"allow": "GET"})
        if path == "/ping":
            return Response("\n", status_code=200, media_type="application/json", headers=headers)
        if path == "/health":
            return json_response(self.health(), 200, headers)
        if path == "/version":
            return Response(mlflow.__version__, status_code=200, media_type="application/json", headers=headers)
        return json_response({"detail": "Not Found"}, 404, headers)

    def __del__(self) -> None:
        holder = getattr(self, "holder", None)
        if holder is not None:
            holder.stop()


# ---------------------------------------------------------------- the application, its config file, the CLI


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve options: fixed replicas, or autoscaling on ongoing requests; the replica's CPUs."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": config.replica_cpus},
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 5.0,
        "logging_config": {"enable_access_log": False},  # one line per request costs the replica CPU
    }
    if config.min_replicas is not None or config.max_replicas is not None:
        low = config.min_replicas if config.min_replicas is not None else 1
        high = config.max_replicas if config.max_replicas is not None else max(low, 1)
        if high < max(low, 1):
            raise ServiceError(f"--max-replicas {high} is below --min-replicas {low}")
        options["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.replicas
    return options


def replica_args(config: ServeConfig) -> dict[str, Any]:
    """The constructor arguments of every replica."""
    from tagger.sessions import absolute_tracking_uri

    registry = mlflow.get_registry_uri()
    tracking = absolute_tracking_uri(mlflow.get_tracking_uri())
    return {
        "model_uri": config.model_uri, "poll_s": config.poll_s, "replica_cpus": config.replica_cpus,
        "max_ongoing_requests": config.max_ongoing_requests, "request_timeout_s": config.request_timeout_s,
        "tracking_uri": tracking, "registry_uri": absolute_tracking_uri(registry) if registry != tracking else None,
        "serve_batch_size": config.serve_batch_size,
    }


def application(config: ServeConfig) -> Any:
    """The Ray Serve application of `config`."""
    from ray import serve

    deployment = serve.deployment(TaggerServer, **deployment_options(config))
    return deployment.bind(**replica_args(config))


CONFIG_FIELDS = ("model_uri", "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "replica_cpus",
                 "max_ongoing_requests", "poll_s", "request_timeout_s", "serve_batch_size")


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for a Serve config file (`import_path: tagger.serve:build_app`, `args: {...}`)."""
    values = {k: v for k, v in args.items() if k in CONFIG_FIELDS and v is not None}
    tracking = args.get("tracking_uri")
    if tracking:
        mlflow.set_tracking_uri(tracking)
    return application(ServeConfig(**values))


def serve_config(config: ServeConfig) -> dict[str, Any]:
    """A Ray Serve config file's content, for `serve deploy FILE` on a running cluster."""
    from tagger.sessions import absolute_tracking_uri, worker_environment

    args = {k: getattr(config, k) for k in CONFIG_FIELDS if getattr(config, k) is not None}
    args["tracking_uri"] = absolute_tracking_uri(mlflow.get_tracking_uri())
    return {
        "proxy_location": config.proxy_location,
        "http_options": {"host": config.host, "port": config.port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": BUILDER_IMPORT_PATH,
            "args": args,
            # the nodes need tagger and mlflow_model importable (installed, or add py_modules here)
            "runtime_env": {"env_vars": worker_environment()},
        }],
    }


def write_config(config: ServeConfig, path: str) -> None:
    """Write the Serve config file (YAML)."""
    import yaml

    with open(path, "w") as handle:
        handle.write("# tagger serve --write-config: deploy with `serve deploy FILE` on the cluster's head node\n")
        yaml.safe_dump(serve_config(config), handle, sort_keys=False)


def start_application(config: ServeConfig) -> str:
    """Start Serve (HTTP on host:port) and deploy the application on the connected Ray; return its URL once ready."""
    from ray import serve

    serve.start(proxy_location=config.proxy_location, http_options={"host": config.host, "port": config.port})
    serve.run(application(config), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


def stop_application(local: bool) -> None:
    """Delete the application; a Serve that this process's local Ray runs is shut down with it."""
    from ray import serve

    try:
        serve.delete(APP_NAME)
    finally:
        if local:
            serve.shutdown()


def run_in_foreground(config: ServeConfig, ready: Any = print) -> None:
    """`tagger serve`: deploy, say the URL, wait for SIGINT/SIGTERM, then take the application down.

    A local Ray started here stops at the end; a joined cluster keeps running without the application.
    """
    from tagger.sessions import absolute_tracking_uri, ray_session

    os.environ["MLFLOW_TRACKING_URI"] = absolute_tracking_uri(mlflow.get_tracking_uri())  # local replicas inherit it
    for name, value in SPREAD_ENV.items():
        os.environ.setdefault(name, value)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    init = {"_metrics_export_port": config.metrics_export_port} if config.metrics_export_port else {}
    try:
        with ray_session(config.ray_address, init_options=init) as local:
            try:
                url = start_application(config)
                ready(f"tagger serve: {config.model_uri} is served at {url} (POST {url}/invocations; "
                      f"GET {url}/health). Ctrl-C stops it.")
                while not stop.wait(1.0):
                    pass
                ready("tagger serve: stopping")
            finally:
                stop_application(local)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def describe(config: ServeConfig) -> str:
    """One line naming the deployment's shape (for logs)."""
    return json.dumps(dataclasses.asdict(config))
