"""An authenticated tracking server: MLflow's `mlflow server --app-name basic-auth`.

The slow tests start a real basic-auth server (sqlite store, proxied artifacts, its own auth database)
and a `ray start --head` cluster started without any credentials, and drive tagger as users would, in
subprocesses: the admin trains on the cluster, packages and promotes; a user with READ on `tagger` is
refused at promote in one line and the champion stays; a wrong password is one line; then every
record, artifact and log of the run is searched for the passwords. The quick tests check the one-line
errors and how Ray workers get their credentials.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import requests
from helpers import ROOT, build_tiny_encoder, mlflow_store, write_tiny_csv
from leaks import basic_auth_forms, found_in_files, found_in_text, private_key_forms, record_texts
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED
from mlflow.tracking import MlflowClient

import services
from tagger.access import access_error, tracking_user
from tagger.errors import AuthenticationError, PermissionDeniedError
from tagger.sessions import secret_hook, worker_environment
from tagger.signing import generate_key_pair

# Distinctive, fresh for each session: any occurrence outside the server's memory is a leak.
ADMIN_PASSWORD = f"tagger-admin-pw-{secrets.token_hex(8)}"
READER_PASSWORD = f"tagger-reader-pw-{secrets.token_hex(8)}"
CREDENTIALS_HINT = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials"


def refused(endpoint: str, status: int) -> MlflowException:
    """The MlflowException MLflow's REST client raises when the server refuses a request."""
    body = "Permission denied" if status == 403 else "You are not authenticated."
    return MlflowException(f"API request to endpoint {endpoint} failed with error code {status} != 200. "
                           f"Response body: '{body}'",
                           error_code=PERMISSION_DENIED if status == 403 else UNAUTHENTICATED)


def http_error(method: str, url: str, status: int) -> requests.HTTPError:
    """The HTTPError MLflow's artifact client raises when the server refuses an up- or download."""
    response = requests.Response()
    response.status_code, response.request = status, requests.Request(method, url).prepare()
    return requests.HTTPError(f"{status} Client Error", response=response)


# ----------------------------------------------------------------------------------- quick checks


def test_a_refused_request_becomes_one_line_naming_user_action_and_permission(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", READER_PASSWORD)
    with mlflow_store("http://127.0.0.1:5999"):
        alias = access_error(refused("/api/2.0/mlflow/registered-models/alias", 403), "promote", {"model_name": None})
        wrapped = RuntimeError("the training failed")
        wrapped.__cause__ = refused("/api/2.0/mlflow/runs/create", 403)
        run = access_error(wrapped, "train", {"experiment_name": "team"})
        read = access_error(refused("/api/2.0/mlflow/registered-models/get", 403), "predict",
                            {"model_uri": "models:/tagger@champion"})
        login = access_error(refused("/api/2.0/mlflow/experiments/get-by-name", 401), "package", {})
        upload = access_error(http_error("PUT", "http://127.0.0.1:5999/api/2.0/mlflow-artifacts/artifacts/1/x", 403),
                              "package", {"experiment_name": "team"})
        teacher = access_error(refused("/api/2.0/mlflow/registered-models/get", 403), "distill",
                               {"teacher": "models:/team-tagger@champion", "experiment_name": "students"})
        assert access_error(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run"), "package", {}) is None
    assert isinstance(alias, PermissionDeniedError) and isinstance(login, AuthenticationError)
    assert alias.message == ("user 'reader' may not promote 'tagger': needs EDIT on the registered model 'tagger' "
                             "(the server refused /api/2.0/mlflow/registered-models/alias)")
    assert run.message == ("user 'reader' may not train in experiment 'team': needs EDIT on the experiment 'team' "
                           "(the server refused /api/2.0/mlflow/runs/create)")
    assert read.message.startswith("user 'reader' may not load models:/tagger@champion: needs READ on the "
                                   "registered model 'tagger'")
    assert login.message == ("the tracking server at http://127.0.0.1:5999 refused user 'reader': wrong username or "
                             f"password ({CREDENTIALS_HINT})")
    assert upload.message == ("user 'reader' may not package 'team' into 'tagger': needs EDIT on the experiment "
                              "'team' (the server refused PUT /api/2.0/mlflow-artifacts/artifacts/1/x)")
    assert teacher.message.startswith("user 'reader' may not distil models:/team-tagger@champion in experiment "
                                      "'students': needs READ on the registered model 'team-tagger'")
    assert all(READER_PASSWORD not in error.message for error in (alias, run, read, login, upload))


def test_the_user_is_the_one_mlflow_sends_from_the_environment_or_its_credentials_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert tracking_user() is None
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = from-file\nmlflow_tracking_password = {READER_PASSWORD}\n")
    assert tracking_user() == "from-file"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "from-env")
    assert tracking_user() == "from-env"


def test_workers_get_credentials_from_a_setup_hook_not_the_runtime_envs_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ci")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", READER_PASSWORD)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    env = worker_environment()
    assert env["AWS_ACCESS_KEY_ID"] == "key-id"  # not a secret: shown in the runtime env like the URI
    assert not {"MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME"} & set(env)
    from ray import cloudpickle

    hook = secret_hook()
    assert hook.__name__ == "set_credentials"  # Ray names the hook in its error messages
    shipped = cloudpickle.loads(cloudpickle.dumps(hook))  # as Ray stores it and a worker loads it
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    shipped()  # what each worker process runs before the job's code
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == READER_PASSWORD and os.environ["MLFLOW_TRACKING_USERNAME"] == "ci"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "aws-secret"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    assert secret_hook() is None  # nothing to hand over


# --------------------------------------------------------------------------- the real server


@dataclass
class AuthStack:
    """The running server and cluster, the tiny training inputs and every command's output."""

    server: services.AuthServer
    ray: services.RayCluster
    data: Path
    logs: Path
    signing_key: Path
    outputs: list[str] = field(default_factory=list)

    def run(self, user: str | None, password: str | None, *args: str,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """`python -m tagger ARGS` as `user` (None: no credentials), from the project folder; output kept."""
        env = services.base_environment() | {
            "PATH": f"{services.BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "HOME": str(self.data),  # no ~/.mlflow/credentials of this machine's user
            "MLFLOW_TRACKING_URI": self.server.url, "RAY_ADDRESS": self.ray.address,
        }
        token = Path.home() / ".ray" / "auth_token"  # the cluster's token, which `ray start` keeps in the real home
        env |= {"RAY_AUTH_TOKEN_PATH": str(token)} if token.is_file() else {}
        env |= {"MLFLOW_TRACKING_USERNAME": user} if user else {}
        env |= {"MLFLOW_TRACKING_PASSWORD": password} if password else {}
        result = subprocess.run([sys.executable, "-m", "tagger", *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=timeout)
        self.outputs += [result.stdout, result.stderr]
        return result

    def job_runtime_envs(self) -> str:
        """The runtime env of every job the cluster knows (what its dashboard and `ray list jobs` show)."""
        script = (
            "import ray; from tagger.sessions import use_ray_token_auth; use_ray_token_auth(); "
            f"ray.init(address={self.ray.address!r}, logging_level='error'); "
            "infos = ray._private.worker.global_worker.gcs_client.get_all_job_info(); "
            "print('\\n'.join(i.config.runtime_env_info.serialized_runtime_env for i in infos.values()))"
        )
        token = Path.home() / ".ray" / "auth_token"
        env = services.base_environment() | ({"RAY_AUTH_TOKEN_PATH": str(token)} if token.is_file() else {})
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, output_of(result)
        return result.stdout

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        """A tagger command as the admin, with --verbose."""
        return self.run(self.server.admin, self.server.admin_password, "--verbose", *args)

    def client(self, monkeypatch) -> MlflowClient:
        """An MlflowClient of the server, as the admin (for this test)."""
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", self.server.admin)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", self.server.admin_password)
        return MlflowClient(self.server.url, registry_uri=self.server.url)


def output_of(result: subprocess.CompletedProcess) -> str:
    """The end of a finished command's output, for an assertion message."""
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def auth(tmp_path_factory) -> AuthStack:
    """A basic-auth server and a Ray cluster started without credentials; the admin trains on the cluster
    (1 epoch of a tiny encoder), packages and promotes version 1 through the gate."""
    from transformers import BertConfig, BertModel

    logs, data = tmp_path_factory.mktemp("auth-logs"), tmp_path_factory.mktemp("auth-data")
    with contextlib.ExitStack() as running:
        server = running.enter_context(services.auth_mlflow_server(
            tmp_path_factory.mktemp("auth-server"), ADMIN_PASSWORD, logs))
        cluster = running.enter_context(services.ray_head(2, {}, logs))
        # CI's signing key, kept outside every folder the secret search reads (as in a secret store)
        signing_key, _ = generate_key_pair(tmp_path_factory.mktemp("ci-secrets"))
        stack = AuthStack(server, cluster, data, logs, signing_key)
        encoder = build_tiny_encoder(data / "encoder")
        BertModel(BertConfig.from_pretrained(encoder)).save_pretrained(encoder)
        dataset = write_tiny_csv(data / "projects.csv")
        trained = stack.admin("train", "--experiment-name", "auth", "--dataset-loc", str(dataset), "--base-model",
                              str(encoder), "--num-epochs", "1", "--batch-size", "8", "--cpu-per-worker", "1")
        assert trained.returncode == 0, output_of(trained)
        packaged = stack.admin("package", "--experiment-name", "auth", "--signing-key", str(signing_key))
        assert packaged.returncode == 0 and "Registered tagger version 1" in packaged.stdout, output_of(packaged)
        assert "signed with the key whose fingerprint is" in packaged.stdout, output_of(packaged)
        promoted = stack.admin("promote", "--eval-dataset", str(dataset))
        assert promoted.returncode == 0, output_of(promoted)
        yield stack


@pytest.mark.slow
def test_the_admin_trains_on_a_cluster_without_credentials_packages_and_promotes(auth, monkeypatch):
    client = auth.client(monkeypatch)
    assert client.get_model_version_by_alias("tagger", "champion").version == "1"
    experiment = client.get_experiment_by_name("auth")
    training = [r for r in client.search_runs([experiment.experiment_id]) if "checkpoint_path" in r.data.tags]
    assert len(training) == 1 and training[0].info.status == "FINISHED"
    # the epoch's metrics were logged by the Ray Train worker, which had only the setup hook's credentials
    assert client.get_metric_history(training[0].info.run_id, "val_loss")


@pytest.mark.slow
def test_a_read_only_user_is_refused_at_promote_and_the_champion_stays_while_the_admin_promotes(auth, monkeypatch):
    from mlflow.server import get_app_client

    client = auth.client(monkeypatch)
    admin = get_app_client("basic-auth", tracking_uri=auth.server.url)
    admin.create_user("reader", READER_PASSWORD)
    admin.grant_user_permission("reader", resource_type="registered_model", resource_id="tagger", permission="READ")
    second = client.copy_model_version("models:/tagger/1", "tagger")  # a challenger
    experiment = client.get_experiment_by_name("auth").experiment_id
    runs_before = len(client.search_runs([experiment]))

    gated = auth.run("reader", READER_PASSWORD, "promote", "--version", second.version,
                     "--eval-dataset", str(auth.data / "projects.csv"))
    assert gated.returncode == 1, output_of(gated)
    assert gated.stderr.strip() == ("Error: PermissionDeniedError: user 'reader' may not promote 'tagger': needs "
                                    "EDIT on the registered model 'tagger' (has READ)"), output_of(gated)
    assert len(client.search_runs([experiment])) == runs_before  # refused before any evaluation or promote run
    assert client.get_model_version_by_alias("tagger", "champion").version == "1"

    evaluated = auth.run("reader", READER_PASSWORD, "evaluate", "--model-uri", "models:/tagger/1",
                         "--dataset-loc", str(auth.data / "projects.csv"))
    assert evaluated.returncode == 1, output_of(evaluated)
    assert evaluated.stderr.strip() == (
        "Error: PermissionDeniedError: user 'reader' may not evaluate models:/tagger/1: needs EDIT on the "
        "experiment (the server refused /api/2.0/mlflow/runs/create)"), output_of(evaluated)

    promoted = auth.admin("promote", "--version", second.version)
    assert promoted.returncode == 0, output_of(promoted)
    assert client.get_model_version_by_alias("tagger", "champion").version == second.version


@pytest.mark.slow
def test_a_wrong_password_or_no_user_is_one_line(auth):
    wrong = auth.run("reader", "not-the-password", "package", "--experiment-name", "auth")
    nobody = auth.run(None, None, "promote")
    assert wrong.returncode == nobody.returncode == 1
    assert wrong.stderr.strip() == (
        f"Error: AuthenticationError: the tracking server at {auth.server.url} refused user 'reader': wrong username "
        f"or password ({CREDENTIALS_HINT})"), output_of(wrong)
    assert nobody.stderr.strip() == (
        f"Error: AuthenticationError: the tracking server at {auth.server.url} needs a user and password: "
        f"{CREDENTIALS_HINT}"), output_of(nobody)


@pytest.mark.slow
def test_no_password_or_private_key_in_any_record_artifact_or_log_of_the_whole_run(auth, monkeypatch):
    predicted = auth.admin("predict", "--title", "bert text", "--description", "language model")
    assert predicted.returncode == 0 and '"prediction"' in predicted.stdout, output_of(predicted)
    client = auth.client(monkeypatch)
    with mlflow_store(auth.server.url):  # the champion's files as a user downloads them, MLmodel included
        model = Path(mlflow.artifacts.download_artifacts("models:/tagger@champion", dst_path=str(auth.data / "model")))
    assert (model / "MLmodel").is_file()
    secrets_ = (basic_auth_forms(auth.server.admin, ADMIN_PASSWORD) + basic_auth_forms("reader", READER_PASSWORD)
                + [auth.server.secret_key] + private_key_forms(auth.signing_key))
    jobs = auth.job_runtime_envs()
    assert "worker_process_setup_hook" in jobs, jobs  # the cluster's job info, as its dashboard shows it
    texts = record_texts(client) + [(f"command output #{i}", text) for i, text in enumerate(auth.outputs)]
    texts.append(("the cluster's job info", jobs))
    # the server's folder: its tracking store (runs, params, tags, descriptions), the artifacts (every model
    # file) and the auth database, which keeps password hashes only; Ray's session logs of the cluster, the
    # server's log and the downloads
    places = [auth.server.folder, auth.ray.temp_dir, auth.logs, auth.data]
    assert len(texts) > 50 and (auth.server.folder / "auth.db").is_file() and list(auth.ray.temp_dir.rglob("*.log"))
    assert found_in_text(secrets_, texts) == []
    assert found_in_files(secrets_, *places) == []
