"""Helpers that look for secrets where they must not be (not a test module): every file under some
folders, every text MLflow keeps about runs and models, and what commands printed.

A secret is given as the text itself; add a new kind (a private key's PEM bytes, ...) by passing it
in the list. Findings name the place and the secret's position in the list, never the secret.
"""
from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path

from mlflow.tracking import MlflowClient


def basic_auth_forms(user: str, password: str) -> list[str]:
    """The password and the HTTP Basic credentials that carry it (base64 of user:password)."""
    return [password, base64.b64encode(f"{user}:{password}".encode()).decode()]


def private_key_forms(path: Path) -> list[bytes]:
    """A PEM private key as it could leak: each line of its base64 body and the raw private number's bytes."""
    from cryptography.hazmat.primitives import serialization

    pem = path.read_bytes()
    lines = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    key = serialization.load_pem_private_key(pem, password=None)
    number = key.private_numbers().private_value
    return lines + [number.to_bytes((number.bit_length() + 7) // 8, "big")]


def _as_bytes(secret: str | bytes) -> bytes:
    """A secret as the bytes a file would hold."""
    return secret if isinstance(secret, bytes) else secret.encode()


def found_in_text(secrets: list[str | bytes], texts: Iterable[tuple[str, str]]) -> list[str]:
    """'where: secret #i' for each (where, text) that holds one of the secrets."""
    return [f"{where}: secret #{i}" for where, text in texts for i, secret in enumerate(secrets)
            if _as_bytes(secret) in (text or "").encode()]


def found_in_files(secrets: list[str | bytes], *roots: Path) -> list[str]:
    """'path: secret #i' for each file under the roots (recursively; a root may be a file) that holds one."""
    found = []
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        for path in files:
            try:
                data = path.read_bytes()
            except OSError:  # a socket or a file removed meanwhile
                continue
            found += [f"{path}: secret #{i}" for i, secret in enumerate(secrets) if _as_bytes(secret) in data]
    return found


def record_texts(client: MlflowClient) -> list[tuple[str, str]]:
    """Every param, tag and description MLflow keeps about the runs and registered models of a store."""
    texts = []
    experiments = client.search_experiments()
    for experiment in experiments:
        texts += [(f"experiment {experiment.name} tag {k}", v) for k, v in experiment.tags.items()]
    for run in client.search_runs([e.experiment_id for e in experiments]):
        where = f"run {run.info.run_id}"
        texts += [(f"{where} param {k}", v) for k, v in run.data.params.items()]
        texts += [(f"{where} tag {k}", v) for k, v in run.data.tags.items()]  # the description: mlflow.note.content
    for model in client.search_registered_models():
        texts += [(f"model {model.name} description", model.description)]
        texts += [(f"model {model.name} tag {k}", v) for k, v in model.tags.items()]
        for version in client.search_model_versions(f"name = '{model.name}'"):
            where = f"model {model.name} v{version.version}"
            texts += [(f"{where} description", version.description)]
            texts += [(f"{where} tag {k}", v) for k, v in version.tags.items()]
    return texts
