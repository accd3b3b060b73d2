"""The model's signature: check a model folder against the team's public key with OpenSSF model-signing.

`tagger package --signing-key` signs every file of the logged model (MLmodel, the code, the
requirements, the artifacts) into `model.sig` at the folder's root. This module verifies such a
folder. It runs twice: in the installed tagger, on a downloaded copy before any of the model's code
is imported (the tamper defence), and in `load_context` when TAGGER_VERIFY_KEY is set (a check
against corruption only: whoever can rewrite the model can rewrite that copy of this module too).

`model_signing` and `cryptography` are imported only when a check runs, so a serving environment
without a verification key does not need them.
"""
from __future__ import annotations

import ast
import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

from mlflow_model.errors import ConfigError, SignatureError

SIGNATURE_FILE = "model.sig"  # at the model folder's root; the one file the signature does not cover
SIGNATURE_METADATA = "signature_file"  # MLmodel metadata of a model signed at packaging: where its signature is
FINGERPRINT_METADATA = "signing_key_fingerprint"  # ...and the fingerprint of the key that signed it
HASH_ALGORITHM = "blake3"  # per file; measured against sha256 in benchmarks/signing.py
BYTECODE_CACHE = "__pycache__"  # written by Python into the model's code folders when it imports them
REGISTERED_MODEL_META = "registered_model_meta"  # written by MLflow beside MLmodel on a models:/ download (into a
# local artifact store's own folder too); MLflow reads nothing from it
LISTED_FILES = 5  # files a message names before "and N more"
INSTALL_HINT = "pip install model-signing==1.1.1 pyOpenSSL==26.4.0"


def import_model_signing() -> Any:
    """The model_signing package, or a ConfigError saying how to install it."""
    try:
        import model_signing
    except ImportError as error:
        raise ConfigError(f"checking model signatures needs the model-signing package ({error}): {INSTALL_HINT}") from error
    return model_signing


def read_public_key(path: str | Path) -> bytes:
    """The PEM bytes of an elliptic-curve public key file; ConfigError naming the file (never its content)."""
    import_model_signing()  # and with it cryptography
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the verification key {path}: {error.strerror or error}") from error
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{path} holds a private key; verify with its public key (the .pub file of `tagger keygen`)")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path} is not an elliptic-curve public key (make one with `tagger keygen`)")
    return data


def fingerprint(public_key_pem: bytes) -> str:
    """SHA-256 of the public key's DER encoding, hex (as `openssl pkey -pubin -outform DER | sha256sum` prints it)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_key_pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def byproducts(folder: Path) -> list[Path]:
    """What MLflow and Python write into a model folder that is downloaded or imported, which no signature covers:
    MLflow's registered_model_meta and Python's byte-code caches. A verified copy is made without them."""
    found = [folder / REGISTERED_MODEL_META] if (folder / REGISTERED_MODEL_META).is_file() else []
    return found + sorted(p for p in folder.rglob(BYTECODE_CACHE) if p.is_dir())


def hashing_config(model_signing: Any, folder: Path, skip_byproducts: bool = False) -> Any:
    """How both sides hash a model: every file, git files included, the signature itself aside (and the byproducts,
    for the check inside a process that has already downloaded and imported the model in place)."""
    ignored = [SIGNATURE_FILE]
    if skip_byproducts:
        ignored += [p.relative_to(folder).as_posix() for p in byproducts(folder)]
    return (model_signing.hashing.Config()
            .set_ignored_paths(paths=ignored, ignore_git_paths=False)
            .use_file_serialization(hashing_algorithm=HASH_ALGORITHM))


def signed_by(folder: Path) -> str | None:
    """The key fingerprint MLmodel says the model was signed with (None: MLmodel says it was not signed)."""
    import yaml

    try:
        metadata = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("metadata") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return metadata.get(FINGERPRINT_METADATA) if metadata.get(SIGNATURE_METADATA) else None


def listed(paths: list[str]) -> str:
    """A few file names, then how many more."""
    shown = ", ".join(paths[:LISTED_FILES])
    return shown + (f" and {len(paths) - LISTED_FILES} more" if len(paths) > LISTED_FILES else "")


def mismatch_problems(message: str) -> str:
    """model-signing's "Signature mismatch: [...]" as `changed: a, b; added: c; removed: d`."""
    try:
        entries = ast.literal_eval(message.split(":", 1)[1].strip())
    except (ValueError, SyntaxError):
        return message
    found: dict[str, list[str]] = {"changed": [], "added": [], "removed": []}
    for entry in entries:
        if match := re.match(r"Hash mismatch for '(.*)': Expected", entry):
            found["changed"].append(match[1])
        elif match := re.match(r"Extra files found in model '.*?': (.*)$", entry):
            found["added"] += match[1].split(", ")
        elif match := re.match(r"Missing files in model '.*?': (.*)$", entry):
            found["removed"] += match[1].split(", ")
    return "; ".join(f"{kind}: {listed(sorted(names))}" for kind, names in found.items() if names) or message


def verify_model(folder: str | Path, public_key_pem: bytes, label: str | None = None,
                 skip_byproducts: bool = False) -> int:
    """Check every file of a model folder against its signature and the public key; the files checked.

    SignatureError, one line naming the problem: unsigned, signature removed, signed by another key,
    an unreadable signature, or files changed, added or removed since signing (named).
    """
    folder = Path(folder)
    label = label or str(folder)
    key = fingerprint(public_key_pem)
    if not (folder / SIGNATURE_FILE).is_file():
        if signer := signed_by(folder):
            raise SignatureError(f"{label}: its signature file {SIGNATURE_FILE} was removed (MLmodel says key "
                                 f"{signer} signed it); refusing to load it")
        raise SignatureError(f"{label} is not signed (no {SIGNATURE_FILE}); package it with --signing-key "
                             "(TAGGER_SIGNING_KEY) to serve it where a verification key is set")
    model_signing = import_model_signing()
    from cryptography.exceptions import InvalidSignature

    hashing = hashing_config(model_signing, folder, skip_byproducts)
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key.pub"
        key_file.write_bytes(public_key_pem)
        verifier = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key_file)
        try:
            verifier.set_hashing_config(hashing).verify(folder, folder / SIGNATURE_FILE)
        except InvalidSignature:
            raise SignatureError(f"{label}: its signature does not verify with key {key} (signed by another key, "
                                 f"or {SIGNATURE_FILE} was altered)") from None
        except ValueError as error:
            raise SignatureError(problem_message(str(error), label, key)) from None
        except (KeyError, TypeError, AttributeError) as error:  # a signature file of the wrong shape
            raise SignatureError(f"{label}: {SIGNATURE_FILE} is not a model-signing signature ({error!r})") from None
    skipped = byproducts(folder) if skip_byproducts else []
    return sum(1 for p in folder.rglob("*") if p.is_file() and p != folder / SIGNATURE_FILE
               and not any(p == s or s in p.parents for s in skipped))


def problem_message(message: str, label: str, key: str) -> str:
    """One line for one of model-signing's ValueErrors."""
    if message.startswith("Signature mismatch"):
        return f"{label}: files differ from what was signed (key {key}): {mismatch_problems(message)}"
    if message.startswith("Key mismatch"):
        return f"{label} was signed by another key, not by {key}"
    if "symlink" in message:
        return f"{label}: {message.splitlines()[0]} (a signed model has no symbolic links)"
    return f"{label}: {SIGNATURE_FILE} is not a readable signature ({message.splitlines()[0] if message else 'empty'})"
