"""The MLflow and Ray sessions every command shares: tracking URI, experiment, run, Ray connection."""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow_model
import tagger
from tagger.errors import ServiceError, one_line

# What Ray workers on another machine need to import: the served model's code and this package. Both are
# found where Python imports them from (a source checkout, an editable install or an installed wheel).
RUNTIME_PACKAGE = Path(mlflow_model.__file__).resolve().parent
BUILD_PACKAGE = Path(tagger.__file__).resolve().parent
DEFAULT_EXPERIMENT = "tagger"  # train's experiment when none is named and no `mlflow run` names one
# Driver settings that Ray workers of a joined cluster get through the runtime env (plus every AWS_* but
# the secret ones). Ray shows a runtime env's env_vars in its job info (dashboard, `ray list jobs`) and
# logs them (runtime_env_agent.log), so secrets go another way: see secret_hook.
WORKER_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS")
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
CONNECT_TIMEOUT_S = 10.0  # an unreachable tracking server or Ray cluster is reported after this


def shown_uri(uri: str) -> str:
    """A URI as tagger prints it: a password inside it (postgresql://user:PASSWORD@host/db) replaced by ***."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def absolute_tracking_uri(uri: str) -> str:
    """The tracking URI with a relative sqlite/file path made absolute (Ray workers run elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + os.path.abspath(uri[len("file:"):])
    if "://" not in uri and not uri.startswith(("databricks", "file:", "sqlite:")):
        return os.path.abspath(uri)
    return uri


def check_reachable(what: str, host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ServiceError naming `what` unless a TCP connection to host:port opens within `timeout`."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise ServiceError(f"{what} is not reachable: {reason} (tried {host}:{port} for up to {timeout:g} s)") from None


def check_tracking_server() -> None:
    """Fail fast, naming the URI, when the tracking or registry server (http, database) is unreachable.

    MLflow itself retries an unreachable server for minutes; a file or sqlite store needs no check.
    """
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    servers = [("MLflow tracking server", tracking)] + ([("MLflow registry server", registry)] if registry != tracking else [])
    for what, uri in servers:
        parts = urlsplit(uri)
        scheme = parts.scheme.split("+")[0]
        if scheme in DEFAULT_PORTS and parts.hostname:
            port = parts.port or DEFAULT_PORTS[scheme]
            check_reachable(f"{what} {scheme}://{parts.hostname}:{port}", parts.hostname, port)


def experiment_for_run(client: MlflowClient, name: str | None) -> str:
    """The experiment a training logs into: `name`; else that of the run `mlflow run` made (or the
    active run); else MLFLOW_EXPERIMENT_NAME; else DEFAULT_EXPERIMENT."""
    if name:
        return name
    active = mlflow.active_run()
    parent_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
    if parent_id:
        return client.get_experiment(client.get_run(parent_id).info.experiment_id).name
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the experiment, created if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def open_run(
    client: MlflowClient, experiment_name: str, run_name: str | None, tags: dict[str, str], reuse_parent: bool = True
) -> tuple[str, str, bool]:
    """(run_id, experiment_id, owned): the MLflow run a training logs into.

    An active run or MLFLOW_RUN_ID (set by `mlflow run`) in the same experiment is used as it is
    (with reuse_parent); otherwise a new run is made in `experiment_name`, nested under that
    parent when they share the experiment. `owned`: the caller ends the run.
    """
    active = mlflow.active_run()
    parent_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
    experiment = experiment_id(client, experiment_name)
    parent = client.get_run(parent_id) if parent_id else None
    same_experiment = parent is not None and parent.info.experiment_id == experiment
    if reuse_parent and same_experiment:
        for key, value in tags.items():
            client.set_tag(parent_id, key, value)
        return parent_id, experiment, active is None
    run_tags = dict(tags)
    if same_experiment:
        run_tags["mlflow.parentRunId"] = parent_id
    elif parent is not None:
        run_tags["launched_by_run_id"] = parent_id
        print(
            f"MLflow run {parent_id} belongs to another experiment; training logs a new run into "
            f"experiment {experiment_name!r}"
        )
    run = client.create_run(experiment, run_name=run_name, tags=run_tags)
    if parent is not None and not same_experiment:
        client.set_tag(parent_id, "training_run_id", run.info.run_id)
    return run.info.run_id, experiment, True


def ray_address(address: str | None) -> str | None:
    """The Ray cluster to join: `address`, else RAY_ADDRESS, else None (start a local Ray)."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not address:
        return None
    if address.startswith("ray://"):
        raise ServiceError(
            f"Ray address {address!r}: Ray Client (ray://) is not supported (Ray Train and Data jobs need a driver "
            "on the cluster); run tagger on a cluster node with the address `ray start` prints (host:port), or "
            "submit it with `ray job submit`"
        )
    if address != "auto" and not address.rpartition(":")[2].isdigit():
        raise ServiceError(f"Ray address {address!r} is neither host:port (as `ray start` prints it) nor auto")
    return address


def use_ray_token_auth() -> None:
    """Send the Ray auth token to a cluster named by host:port, as Ray itself does only for "auto".

    `ray start` enables token auth by default. When RAY_AUTH_MODE is unset and a token exists
    (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), Ray's own helper for "auto" turns
    token mode on (setting RAY_AUTH_MODE=token alone is not enough once ray is imported: its
    config is cached); a cluster without auth ignores the token.
    """
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def worker_environment() -> dict[str, str]:
    """The driver's MLflow and S3 settings but no secret, for workers of a cluster that was started without them."""
    env = {k: v for k, v in os.environ.items()
           if (k in WORKER_VARIABLES or k.startswith("AWS_")) and k not in SECRET_VARIABLES}
    env["MLFLOW_TRACKING_URI"] = absolute_tracking_uri(mlflow.get_tracking_uri())
    return env


def worker_secrets() -> dict[str, str]:
    """The driver's credentials: the MLflow user and password as MLflow finds them (environment, else
    ~/.mlflow/credentials), its token and the secret AWS variables."""
    from mlflow.utils.credentials import read_mlflow_creds

    user, password = read_mlflow_creds()
    found = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    found |= {k: os.environ.get(k) for k in SECRET_VARIABLES if k not in found}
    return {k: v for k, v in found.items() if v}


def secret_hook() -> Callable[[], None] | None:
    """A Ray `worker_process_setup_hook` that sets the driver's credentials in each worker process (None: none).

    Ray stores the hook pickled in the cluster's internal store and shows only its key in the job's runtime
    env, its logs and its dashboard, so the credentials reach the workers' environment without being
    printed; each worker runs it before anything of the job.
    """
    secrets = worker_secrets()
    if not secrets:
        return None

    def set_credentials() -> None:
        """Set the driver's credentials as this worker's environment variables."""
        os.environ.update(secrets)

    return set_credentials


def join_cluster(address: str) -> None:
    """ray.init on a running cluster, its workers given both packages and the driver's settings."""
    import ray

    if address != "auto":
        host, _, port = address.rpartition(":")
        check_reachable(f"Ray cluster at {address}", host.strip("[]"), int(port))
    use_ray_token_auth()
    runtime_env = {"py_modules": [str(RUNTIME_PACKAGE), str(BUILD_PACKAGE)], "env_vars": worker_environment()}
    hook = secret_hook()
    if hook is not None:
        runtime_env["worker_process_setup_hook"] = hook
    try:
        ray.init(address=address, logging_level="warning", runtime_env=runtime_env)
    except Exception as error:  # ConnectionError, auth errors, a version mismatch: one line naming the cluster
        raise ServiceError(f"cannot join the Ray cluster at {address}: {one_line(error)}") from error
    print(f"Ray: joined the cluster at {address} ({ray.cluster_resources().get('CPU', 0):g} CPUs)", flush=True)


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, init_options: dict[str, Any] | None = None
) -> Iterator[bool]:
    """Join the cluster at `address` or RAY_ADDRESS, else start a local Ray (no dashboard, no usage stats,
    plus `init_options` for ray.init); yields True if local.

    A no-op when this process is already connected. The connection made here is closed at the end
    (a local Ray stops; a joined cluster keeps running).
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = ray_address(address)
    if address is None:  # local workers import both packages from this environment and inherit its variables
        cpus = max(os.cpu_count() or 1, num_cpus or 0)
        # "local": a Ray of its own even when `ray start` runs on this machine (ray.init() would join that one,
        # and then refuse num_cpus); joining a cluster takes RAY_ADDRESS or --ray-address.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="warning",
                 **(init_options or {}))
    else:
        join_cluster(address)
    try:
        yield address is None
    finally:
        ray.shutdown()
