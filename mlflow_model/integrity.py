"""The model's integrity manifest: SHA-256 of every artifact file, written at packaging, checked at load.

Artifact stores are copied, synced and migrated; a flipped byte in the weights or a lost
tokenizer file would otherwise load and serve wrong answers without a word. The manifest maps
`<artifact>/<relative path>` to the file's SHA-256 and is itself the model's `manifest` artifact
(`manifest.json`). Models packaged before it was an artifact hold it in their `model_config`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow_model.errors import IntegrityError

MANIFEST_ARTIFACT = "manifest"  # the model artifact holding the manifest
MANIFEST_FILE = "manifest.json"
LEGACY_MANIFEST_KEY = "artifact_sha256"  # model_config key of the manifest in older packages
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(artifacts: Mapping[str, str]) -> dict[str, Path]:
    """Every file of the artifacts (a file or a folder each; the manifest itself aside), keyed `<artifact>/<path>`."""
    files = {}
    for name, location in sorted(artifacts.items()):
        root = Path(location)
        if name == MANIFEST_ARTIFACT:
            continue
        if root.is_file():
            files[name] = root
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            files[f"{name}/{path.relative_to(root).as_posix()}"] = path
    return files


def write_manifest(artifacts: Mapping[str, str], folder: str | Path) -> dict[str, str]:
    """The artifacts with the manifest of their files as they are now (at packaging) added, written into folder."""
    manifest = {key: sha256(path) for key, path in artifact_files(artifacts).items()}
    path = Path(folder) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return {**artifacts, MANIFEST_ARTIFACT: str(path)}


def read_manifest(artifacts: Mapping[str, str], model_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The packaged manifest: the `manifest` artifact, else an older package's model_config entry."""
    if MANIFEST_ARTIFACT in artifacts:
        try:
            return dict(json.loads(Path(artifacts[MANIFEST_ARTIFACT]).read_text()))
        except (OSError, ValueError) as error:
            raise IntegrityError(f"cannot read the model's integrity manifest {artifacts[MANIFEST_ARTIFACT]}: {error}") from error
    manifest = (model_config or {}).get(LEGACY_MANIFEST_KEY)
    if not manifest:
        raise IntegrityError(f"the model has no integrity manifest ({MANIFEST_FILE}); repackage it")
    return dict(manifest)


def verify_artifacts(artifacts: Mapping[str, str], model_config: Mapping[str, Any] | None = None) -> int:
    """Check the files against the manifest before anything reads them; the number of files checked.

    A changed, missing or unexpected file raises IntegrityError naming it.
    """
    manifest = read_manifest(artifacts, model_config)
    present = artifact_files(artifacts)
    missing = sorted(set(manifest) - set(present))
    unexpected = sorted(set(present) - set(manifest))
    changed = sorted(key for key in set(manifest) & set(present) if sha256(present[key]) != manifest[key])
    problems = [f"changed: {k}" for k in changed] + [f"missing: {k}" for k in missing]
    problems += [f"unexpected: {k}" for k in unexpected]
    if problems:
        raise IntegrityError("the model's files differ from what was packaged (integrity check): " + "; ".join(problems))
    return len(present)
