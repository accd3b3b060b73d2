"""Which version a `tagger serve` replica serves, and how it switches when an alias moves.

A replica serving an alias (`models:/tagger@champion`) or a stage polls the registry every
`poll_s` seconds; when the alias moves it loads the new version beside the old one and then
switches, so no request fails. A version that fails to load leaves the old one serving; the
failure is logged, counted (`tagger_model_load_failures`) and shown by `GET /health`; with a
verification key, so is a version whose signature does not verify (it never loads). A pinned
URI (`models:/tagger/3`, `runs:/...`) never reloads. The model is used through the public pyfunc
interface only; tagger's metrics are labelled with the version that answered.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import mlflow

from tagger.errors import ServiceError, one_line
from tagger.signing import load_verified

ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
STAGE_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<stage>[A-Za-z][^/@]*)/?$")
_log = logging.getLogger("tagger.serve")


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


def load(resolved: Resolved, threads: int, metrics: Metrics | None, public_key: bytes | None = None) -> Served:
    """Load a version through the public pyfunc interface, its inference threads fitted to the replica; with a
    public key, only a downloaded copy whose signature verified."""
    settings = {"inference_threads": threads, "num_threads": 1}
    if public_key:
        model = load_verified(resolved.load_uri, public_key, model_config=settings)
    else:
        model = mlflow.pyfunc.load_model(resolved.load_uri, model_config=settings)
    if metrics is not None and (observe := model_method(model, "observe_batches")):
        observe(lambda rows: metrics.batch_rows.observe(rows, tags={"model_version": resolved.label}))
    return Served(model, resolved.label, resolved.load_uri, metrics)


class ModelHolder:
    """The version a replica serves now, and the poller that swaps in a new one when an alias moves."""

    def __init__(self, model_uri: str, threads: int, poll_s: float, metrics: Metrics | None,
                 close_after_s: float = 120.0, public_key: bytes | None = None) -> None:
        self.model_uri = model_uri
        self.public_key = public_key  # set: every version is verified against it before it loads
        self.threads = threads
        self.poll_s = poll_s
        self.metrics = metrics
        self.close_after_s = close_after_s  # the old version is closed after its last requests had time to end
        self.current = load(resolve(model_uri), threads, metrics, public_key)  # a replica that cannot load fails to start
        self.last_error: dict[str, Any] | None = None
        self.failed_label: str | None = None
        self.swaps = 0
        self._stop = threading.Event()
        self.announced: str | None = None  # the version the tagger_model_loaded gauge shows
        self.movable = is_movable(model_uri) and poll_s > 0
        if self.movable:
            threading.Thread(target=self._poll, name="tagger-registry-poll", daemon=True).start()

    def announce(self) -> None:
        """Point the tagger_model_loaded gauge at the version serving, from each request: a gauge set only while
        the replica was constructed, or long ago, is not reliably exported."""
        if self.metrics is None:
            return
        label = self.current.label
        if self.announced not in (None, label):
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
            new = load(target, self.threads, self.metrics, self.public_key)
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
