"""`tagger serve`: a registered model on Ray Serve, with the HTTP contract of `mlflow models serve`.

One deployment, `TaggerServer`, is both the HTTP ingress and the model: each replica loads the
packaged pyfunc with `mlflow.pyfunc.load_model` (so the manifest check and the engines are the
one code path `mlflow models serve` runs) and answers `/invocations` with MLflow's own scoring
server function (`mlflow.pyfunc.scoring_server.invocations`): the same parsing, schema enforcement,
status codes and error bodies. `predict` runs in a thread per request, so the model's own
inference threads batch the rows of concurrent requests (one batching layer, not two).

Which version a replica serves, and how it switches when an alias moves: `tagger.rollout`.

With a verification key (`--verify-key`, TAGGER_VERIFY_KEY) `tagger serve` verifies the version
before Ray starts, and each replica loads only a downloaded copy whose signature it verified
(`tagger.signing.load_verified`); the replicas get the public key's PEM text, not a path.

Every response carries `X-Tagger-Model-Version: <name>/<version>` (the URI itself for a model
that is not registered).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow

from tagger.config import ServeConfig
from tagger.errors import ServiceError
from tagger.rollout import Metrics, ModelHolder, Served, inference_threads, resolve

APP_NAME = "tagger"
DEPLOYMENT_NAME = "TaggerServer"
VERSION_HEADER = "X-Tagger-Model-Version"
BUILDER_IMPORT_PATH = "tagger.serve:build_app"
# Ray Serve's proxy sends every request to a replica on its own node while that one has room
# (max_ongoing_requests): with one proxy (HeadOnly) the other nodes' replicas would idle. Read by
# the proxy when it starts: a local Ray inherits it from `tagger serve`; on a cluster, set it in the
# environment of `ray start` on the head node.
SPREAD_ENV = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0"}
_log = logging.getLogger("tagger.serve")


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
                 serve_batch_size: int = 0, serve_batch_wait_s: float = 0.002,
                 verify_key_pem: str | None = None) -> None:
        from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = "true"  # as the scoring server sets it
        self.timeout_s = request_timeout_s or MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
        self.executor = ThreadPoolExecutor(max_workers=max_ongoing_requests, thread_name_prefix="tagger-predict")
        public_key = verify_key_pem.encode() if verify_key_pem else None  # a public key: no secret travels here
        self.holder = ModelHolder(model_uri, inference_threads(replica_cpus), poll_s, Metrics(), public_key=public_key)
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
    from mlflow_model.signature import read_public_key
    from tagger.sessions import absolute_tracking_uri

    registry = mlflow.get_registry_uri()
    tracking = absolute_tracking_uri(mlflow.get_tracking_uri())
    return {
        "model_uri": config.model_uri, "poll_s": config.poll_s, "replica_cpus": config.replica_cpus,
        "max_ongoing_requests": config.max_ongoing_requests, "request_timeout_s": config.request_timeout_s,
        "tracking_uri": tracking, "registry_uri": absolute_tracking_uri(registry) if registry != tracking else None,
        "serve_batch_size": config.serve_batch_size,
        "verify_key_pem": read_public_key(config.verify_key).decode() if config.verify_key else None,
    }


def application(config: ServeConfig) -> Any:
    """The Ray Serve application of `config`."""
    from ray import serve

    deployment = serve.deployment(TaggerServer, **deployment_options(config))
    return deployment.bind(**replica_args(config))


CONFIG_FIELDS = ("model_uri", "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "replica_cpus",
                 "max_ongoing_requests", "poll_s", "request_timeout_s", "serve_batch_size",
                 "verify_key")  # verify_key: a public key file on the node that builds the application


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
            # the nodes need tagger and mlflow_model importable (installed, or add py_modules here), and the
            # credentials in their own environment: a file is no place for a password
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


def check_signature(config: ServeConfig) -> None:
    """Download the version the URI names now and verify its signature (SignatureError if it does not)."""
    from mlflow_model.signature import read_public_key
    from tagger.signing import fetch_verified

    shutil.rmtree(fetch_verified(resolve(config.model_uri).load_uri, read_public_key(config.verify_key)))


def run_in_foreground(config: ServeConfig, ready: Any = print) -> None:
    """`tagger serve`: deploy, say the URL, wait for SIGINT/SIGTERM, then take the application down.

    A local Ray started here stops at the end; a joined cluster keeps running without the application.
    """
    from tagger.sessions import absolute_tracking_uri, ray_session

    if config.verify_key:  # refuse an unverifiable model here, in one line, before Ray starts
        check_signature(config)
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
