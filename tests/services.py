"""Real services for the team-stack tests, each started here and stopped by its own PID.

PostgreSQL (run as a dedicated user: initdb refuses root), a moto server as the S3 stand-in, a
real `mlflow server` on postgresql:// with --artifacts-destination s3://..., and a `ray start
--head` cluster with its own temp dir and ports. Nothing here runs `ray stop` (it would stop every
Ray of the machine's users).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

BIN = Path(sys.executable).parent  # the venv's own mlflow, moto_server and ray
PG_USER = "tagger-pg"  # initdb and postgres refuse to run as root
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def base_environment() -> dict[str, str]:
    """This process's environment without the MLflow, AWS and Ray settings a test sets itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_"))}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, what: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll check() until it is true; fail naming `what` (and the end of its log) if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready{log_tail(process)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} was not ready after {timeout:.0f} s{log_tail(process)}")


def log_tail(process: subprocess.Popen, size: int = 3000) -> str:
    """The end of the log file a service started by start() writes, for an error message."""
    path = getattr(process, "log_path", None)
    return f"; {path} ends:\n{Path(path).read_text(errors='replace')[-size:]}" if path else ""


def http_ok(url: str) -> bool:
    """True when GET url answers 200."""
    return requests.get(url, timeout=2).status_code == 200


def process_family(pid: int) -> list:
    """The process and all its descendants (psutil.Process objects), as they are now."""
    import psutil

    try:
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Stop a service and every process it started, by their PIDs: `sig` first, SIGKILL after `timeout`."""
    import psutil

    family = process_family(process.pid)
    if process.poll() is None:
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(10)


def start(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a service in its own session (a Ctrl-C of the tests does not reach it), output to a log file."""
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    process.log_path = log
    return process


def postgres_bin(name: str) -> str | None:
    """Path of a PostgreSQL server program (on PATH or in Debian's /usr/lib/postgresql/*/bin)."""
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


def postgres_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: the current one, or as root a dedicated user (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
        return pwd.getpwnam(PG_USER)


def as_user(account: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run a program as `account` (nothing when it is the current user)."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "cwd": "/tmp"}


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 with its data under /tmp; yields its postgresql:// URL."""
    initdb, server = postgres_bin("initdb"), postgres_bin("postgres")
    if not (initdb and server):
        raise RuntimeError("PostgreSQL server programs (initdb, postgres) not found: apt-get install postgresql")
    account = postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="tagger-pg-", dir="/tmp"))
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    port = free_port()
    subprocess.run(
        [initdb, "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True, **as_user(account),
    )
    process = start(
        [server, "-D", str(folder / "data"), "-c", "listen_addresses=127.0.0.1", "-p", str(port),
         "-k", str(folder), "-c", "fsync=off", "-c", "full_page_writes=off"],
        folder / "postgres.log", **as_user(account),
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        import psycopg

        wait_until(lambda: psycopg.connect(url, connect_timeout=2).close() is None, "postgres", process, 60)
        yield url
    finally:
        stop(process, signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def http_service(command: list[str], port: int, health: str, name: str, log: Path, timeout: float,
                 **kwargs) -> Iterator[str]:
    """Start a server that listens on 127.0.0.1:port, wait until its health path answers, yield its URL, stop it."""
    process = start(command, log, **kwargs)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}{health}"), name, process, timeout)
        yield url
    finally:
        stop(process)


def moto_s3(log_dir: Path) -> contextlib.AbstractContextManager[str]:
    """A moto server standing in for S3 on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    return http_service(command, port, "/moto-api/", "moto server", log_dir / "moto.log", 60)


def s3_environment(endpoint: str) -> dict[str, str]:
    """What every client of that S3 sets: MLflow's endpoint, the AWS one (boto3, pyarrow, s3fs), credentials."""
    return {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, **S3_CREDENTIALS}


# MLflow 3's server starts a job runner and a pool of huey consumers (server-side jobs) beside itself by default:
# tagger uses no server jobs, and on 2 cores their start-up slows every test that starts a server.
NO_SERVER_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server(backend_store: str, artifacts: str, env: dict[str, str], log_dir: Path
                  ) -> contextlib.AbstractContextManager[str]:
    """A real `mlflow server` (tracking + registry in backend_store, proxied artifacts); yields its URL."""
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store, "--artifacts-destination",
               artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return http_service(command, port, "/health", "mlflow server", log_dir / "mlflow-server.log", 180,
                        env=base_environment() | NO_SERVER_JOBS | env)


@dataclass
class AuthServer:
    """A running `mlflow server --app-name basic-auth`: its URL, admin account and the files it keeps."""

    url: str
    admin: str
    admin_password: str
    secret_key: str  # MLFLOW_FLASK_SERVER_SECRET_KEY
    folder: Path  # mlflow.db (tracking + registry), auth.db (users, password hashes, permissions), artifacts/
    log: Path


@contextlib.contextmanager
def auth_mlflow_server(folder: Path, admin_password: str, log_dir: Path) -> Iterator[AuthServer]:
    """A real `mlflow server --app-name basic-auth` on 127.0.0.1: sqlite tracking store and auth database in
    `folder`, proxied artifacts in folder/artifacts, a random Flask secret key; the admin's password comes
    from the environment (MLFLOW_AUTH_ADMIN_PASSWORD), so the ini file holds no secret."""
    import secrets

    folder.mkdir(parents=True, exist_ok=True)
    ini = folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    key = secrets.token_hex(16)
    env = base_environment() | NO_SERVER_JOBS | {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": key,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
               str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = log_dir / "mlflow-auth-server.log"
    with http_service(command, port, "/health", "mlflow server --app-name basic-auth", log, 240, env=env) as url:
        yield AuthServer(url, "admin", admin_password, key, folder, log)


@dataclass
class RayCluster:
    """A running `ray start --head`: its address as `ray start` printed it, and its temp dir."""

    address: str
    temp_dir: Path


@contextlib.contextmanager
def ray_head(num_cpus: int, env: dict[str, str], log_dir: Path) -> Iterator[RayCluster]:
    """`ray start --head --block` on free ports with its own temp dir, without MLflow or AWS settings
    (beyond `env`); stopped by its PIDs, never `ray stop`."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    low = free_port()
    workers = range(low, low + 201)  # worker ports; every other port must lie outside them
    ports: dict[str, int] = {}
    for flag in ("--port", "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
        while (port := free_port()) in workers or port in ports.values():
            pass
        ports[flag] = port
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
               "--temp-dir", str(temp_dir), "--min-worker-port", str(workers[0]), "--max-worker-port", str(workers[-1])]
    command += [str(part) for flag, port in ports.items() for part in (flag, port)]
    log = log_dir / "ray-head.log"
    process = start(command, log, env=base_environment() | env | {"RAY_USAGE_STATS_ENABLED": "0"})
    printed: list[str] = []

    def started() -> bool:
        printed[:] = re.findall(r"ray start --address='([^']+)'", log.read_text(errors="replace"))
        return bool(printed)

    try:
        wait_until(started, "ray start --head", process, 120)
        yield RayCluster(address=printed[0], temp_dir=temp_dir)
    finally:
        stop(process, timeout=5)  # SIGTERM makes Ray drain for up to 30 s; its processes are killed after 5
        shutil.rmtree(temp_dir, ignore_errors=True)


def model_server(model_uri: str, env: dict[str, str], log_dir: Path) -> contextlib.AbstractContextManager[str]:
    """`mlflow models serve --env-manager local` of model_uri on 127.0.0.1; yields its URL."""
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port)]
    return http_service(command, port, "/ping", "mlflow models serve", log_dir / "model-server.log", 180, env=env)
