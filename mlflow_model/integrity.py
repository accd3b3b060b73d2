"""The model's integrity manifest: SHA-256 of every artifact file, written at packaging, checked at load.

Artifact stores are copied, synced and migrated; a flipped byte in the weights or a lost
tokenizer file would otherwise load and serve wrong answers without a word. The manifest maps
`<artifact>/<relative path>` to the file's SHA-256 and travels in the model's `model_config`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from mlflow_model.errors import CheckpointError

MANIFEST_KEY = "artifact_sha256"  # model_config key holding the manifest
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(artifacts: Mapping[str, str]) -> dict[str, Path]:
    """Every file of the artifacts (a file or a folder each), keyed `<artifact>/<relative path>`."""
    files = {}
    for name, location in sorted(artifacts.items()):
        root = Path(location)
        if root.is_file():
            files[name] = root
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            files[f"{name}/{path.relative_to(root).as_posix()}"] = path
    return files


def build_manifest(artifacts: Mapping[str, str]) -> dict[str, str]:
    """The manifest of the artifacts as they are now (at packaging)."""
    return {key: sha256(path) for key, path in artifact_files(artifacts).items()}


def verify_manifest(artifacts: Mapping[str, str], manifest: Mapping[str, str] | None) -> int:
    """Check the files against the manifest before anything reads them; the number of files checked.

    A changed, missing or unexpected file raises CheckpointError naming it.
    """
    if not manifest:
        raise CheckpointError(f"the model has no integrity manifest ({MANIFEST_KEY} in its model_config); repackage it")
    present = artifact_files(artifacts)
    missing = sorted(set(manifest) - set(present))
    unexpected = sorted(set(present) - set(manifest))
    changed = sorted(key for key in set(manifest) & set(present) if sha256(present[key]) != manifest[key])
    problems = [f"changed: {k}" for k in changed] + [f"missing: {k}" for k in missing]
    problems += [f"unexpected: {k}" for k in unexpected]
    if problems:
        raise CheckpointError(
            "the model's files differ from what was packaged (integrity check): " + "; ".join(problems)
        )
    return len(present)
