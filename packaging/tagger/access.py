"""Who the tracking server says the user is and what it lets them do, as one line (MLflow's basic-auth server).

MLflow's `basic-auth` server answers 401 to an unknown user or a wrong password and 403 to a user who
lacks a permission; MLflow's client raises both as an MlflowException that names only the REST endpoint.
`access_error` turns them into an AuthenticationError or PermissionDeniedError naming the user, the
action and the permission it needs; `require` checks an action's permissions up front (a few GETs),
so that a refused `package` or `promote` stops before it builds or evaluates anything.

The user is the one MLflow's own credential lookup finds (MLFLOW_TRACKING_USERNAME, else
~/.mlflow/credentials); the password is never read here beyond what MLflow sends.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
from mlflow.utils.rest_utils import http_request

from tagger.config import MODEL_NAME, champion_uri
from tagger.errors import AuthenticationError, PermissionDeniedError
from tagger.sessions import shown_uri

# The basic-auth app's own REST API (mlflow.server.auth.routes; not imported: that module loads the server).
USER_API = "/api/2.0/mlflow/users/get"  # the caller's own account: is_admin
PERMISSION_API = "/api/3.0/mlflow/users/permissions/get"  # a user's effective permission on one resource
# Permissions that include a capability (mlflow.server.auth.permissions: READ < USE < EDIT < MANAGE).
GRANTS = {"READ": ("READ", "USE", "EDIT", "MANAGE"), "EDIT": ("EDIT", "MANAGE")}
KIND_WORDS = {"registered_model": "registered model", "experiment": "experiment"}
CREDENTIALS_HINT = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials"
REFUSED = re.compile(r"endpoint (\S+) failed with error code (401|403)")
# REST endpoints whose 403 means a missing EDIT (MLflow 3.17's BEFORE_REQUEST_HANDLERS: runs, their
# artifacts and logged models need EDIT on the experiment; versions, tags, stages and aliases need EDIT
# on the registered model); any other refused request needed READ.
WRITES = ("/create", "/update", "/delete", "/set-tag", "/delete-tag", "/outputs", "/transition-stage", "/alias",
          "/rename", "/restore", "/finalize")
ACTIONS = {  # command -> what the user tried, from the command's options
    "train": "train in experiment {experiment}", "sweep": "run a sweep in experiment {experiment}",
    "package": "package {experiment} into {model}", "promote": "promote {model}", "evaluate": "evaluate {uri}",
    "predict": "load {uri}", "batch-predict": "load {uri}", "serve": "serve {uri}", "verify": "read {uri}",
    "fetch": "download {uri}", "distill": "distil {teacher} in experiment {experiment}",
}


@dataclass(frozen=True)
class Need:
    """A permission an action needs on one resource (resource_id: what the permission API calls it)."""

    permission: str  # READ or EDIT
    kind: str  # registered_model or experiment
    name: str | None  # shown to the user; None: not known here
    resource_id: str | None = None

    def __str__(self) -> str:
        """E.g. "EDIT on the registered model 'tagger'"."""
        named = f" {self.name!r}" if self.name else ""
        return f"{self.permission} on the {KIND_WORDS[self.kind]}{named}"


def tracking_user() -> str | None:
    """The user MLflow sends to the tracking server (its own lookup: environment, then ~/.mlflow/credentials)."""
    return read_mlflow_creds().username


def server_of(uri: str) -> str | None:
    """scheme://host:port of an http(s) tracking URI (None: a database or file store, which has no users)."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}" \
        if parts.scheme in ("http", "https") else None


def authentication_error(server: str, user: str | None) -> AuthenticationError:
    """The one line for a 401: no user sent, or a wrong username or password."""
    if user is None:
        return AuthenticationError(f"the tracking server at {server} needs a user and password: {CREDENTIALS_HINT}")
    return AuthenticationError(
        f"the tracking server at {server} refused user {user!r}: wrong username or password ({CREDENTIALS_HINT})")


def _get(uri: str, endpoint: str, params: dict[str, str]) -> dict[str, Any] | None:
    """GET a basic-auth API endpoint as the current user: its JSON, None if the server does not offer it."""
    response = http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, params=params)
    if response.status_code == 401:
        raise authentication_error(server_of(uri), tracking_user())
    return response.json() if response.status_code == 200 else None


def held_permission(uri: str, user: str, need: Need) -> str | None:
    """The user's effective permission on the resource (READ, EDIT, ...); None: unknown (not a basic-auth server)."""
    params = {"username": user, "resource_type": need.kind, "resource_id": need.resource_id or need.name}
    answer = _get(uri, PERMISSION_API, params)
    return answer.get("permission") if answer else None


def require(action: str, needs: list[Need]) -> None:
    """Refuse `action` before it starts, in one line, when the tracking server says the user lacks a need.

    Nothing is checked on a database or file store, on a server without basic-auth, or for an admin
    (who may do everything); an unknown user or wrong password is an AuthenticationError.
    """
    uri = mlflow.get_tracking_uri()
    if server_of(uri) is None:
        return
    user = tracking_user()
    if user is None:
        account = None  # a server with basic-auth answers 401 to the first request; without it, all is allowed
    else:
        account = _get(uri, USER_API, {"username": user})
    if account is None or account.get("user", {}).get("is_admin"):
        return
    for need in needs:
        held = held_permission(uri, user, need)
        if held is not None and held not in GRANTS[need.permission]:
            raise PermissionDeniedError(f"user {user!r} may not {action}: needs {need} (has {held})")


def registry_needs(model: str, experiment_id: str | None) -> list[Need]:
    """What package and promote need: EDIT on the registered model (versions, their tags, stage and alias)
    and on the experiment that receives their run."""
    needs = [Need("EDIT", "registered_model", model)]
    if experiment_id is not None and server_of(mlflow.get_tracking_uri()) is not None:
        name = MlflowClient().get_experiment(experiment_id).name
        needs.append(Need("EDIT", "experiment", name, experiment_id))
    return needs


def refused_request(error: BaseException) -> tuple[int, str] | None:
    """(401 or 403, the refused endpoint) if the error, or one it came from, is the server refusing a request."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)  # requests' HTTPError: artifact up- and downloads
        if getattr(response, "status_code", None) in (401, 403):
            return response.status_code, f"{response.request.method} {urlsplit(response.request.url).path}"
        found = REFUSED.search(error.message if isinstance(error, MlflowException) else str(error))
        if found:
            return int(found.group(2)), found.group(1)
        error = error.__cause__ or error.__context__ or getattr(error, "cause", None)
    return None


def model_of(params: dict[str, Any]) -> str:
    """The registered model a command works on: --model-name, the name in a models:/ URI (a teacher's too), else
    tagger."""
    uri = params.get("model_uri") or params.get("teacher") or ""
    if uri.startswith("models:/"):
        return re.split(r"[/@]", uri.removeprefix("models:/"), maxsplit=1)[0]
    return params.get("model_name") or MODEL_NAME


def need_of(endpoint: str, params: dict[str, Any]) -> Need:
    """What a refused request needed: EDIT for a write, else READ, on the model or the experiment it concerns."""
    path = endpoint.split()[-1]
    write = endpoint.startswith(("PUT", "POST", "DELETE")) or path.endswith(WRITES) or "/log-" in path
    if "/registered-models/" in path or "/model-versions/" in path:
        return Need("EDIT" if write else "READ", "registered_model", model_of(params))
    return Need("EDIT" if write else "READ", "experiment", params.get("experiment_name"))


def action_of(command: str, params: dict[str, Any]) -> str:
    """What the user tried, in words, e.g. "promote 'tagger'"."""
    words = {"experiment": repr(params.get("experiment_name") or "tagger"), "model": repr(model_of(params)),
             "uri": params.get("model_uri") or champion_uri(model_of(params)),
             "teacher": params.get("teacher") or champion_uri()}
    return ACTIONS.get(command, f"run {command}").format(**words)


def access_error(error: BaseException, command: str, params: dict[str, Any]) -> MlflowException | None:
    """The one-line AuthenticationError or PermissionDeniedError for a request the tracking server refused
    while `command` ran with `params` (None: the error is something else)."""
    if isinstance(error, (AuthenticationError, PermissionDeniedError)):
        return error
    refused = refused_request(error)
    if refused is None:
        return None
    status, endpoint = refused
    user, server = tracking_user(), server_of(mlflow.get_tracking_uri()) or shown_uri(mlflow.get_tracking_uri())
    if status == 401:
        return authentication_error(server, user)
    return PermissionDeniedError(
        f"user {user!r} may not {action_of(command, params)}: needs {need_of(endpoint, params)} "
        f"(the server refused {endpoint})")
