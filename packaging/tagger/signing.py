"""Signed models, build side: key pairs, signing a logged model at packaging, and fetching a verified copy.

A model is signed once, by `tagger package --signing-key`: its logged files are downloaded, signed
with OpenSSF model-signing (elliptic key) and the signature, `model.sig`, is uploaded into the
logged model's own artifacts, so every copy, download and `models:/` URI carries it. Loaders with a
verification key (`tagger verify`, `tagger fetch`, `tagger serve`, `tagger batch-predict`) download
the model's own files (a `models:/` URI resolved to its artifact location, so MLflow adds no
`registered_model_meta`), verify them with the installed `mlflow_model.signature`, and only then
load that very copy. Private key bytes are never printed, logged or stored: only the public key's
fingerprint.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

from mlflow_model.config import VERIFY_KEY_VARIABLE, verify_key_path
from mlflow_model.signature import (
    FINGERPRINT_METADATA, SIGNATURE_FILE, SIGNATURE_METADATA, byproducts, fingerprint, hashing_config,
    import_model_signing, read_public_key, verify_model,
)
from tagger.errors import OptionError, ServiceError, one_line

PRIVATE_KEY_FILE = "tagger-signing.pem"  # `tagger keygen`: the private key (0600), for CI's secret store
PUBLIC_KEY_FILE = "tagger-signing.pub"  # ...and the public key, for every server
VERIFIED_PREFIX = "tagger-verified-"  # temporary folders holding a verified copy that a loader loads
SIGNED_TAG = "signed"  # version tag: "true" when `model.sig` signs every file of the version, else "false"


def generate_key_pair(folder: str | Path) -> tuple[Path, Path]:
    """Write a new P-256 key pair into folder (the private key readable by its owner only); both paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    private, public = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    if private.exists() or public.exists():
        raise OptionError(f"{folder} already holds {PRIVATE_KEY_FILE} or {PUBLIC_KEY_FILE}; choose another folder")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(pem)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as error:
        raise OptionError(f"cannot write the key pair into {folder}: {error.strerror or error}") from None
    return private, public


def public_key_of(private_key: str | Path) -> bytes:
    """The PEM public half of a private key file; OptionError naming the file (never its content)."""
    import_model_signing()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = Path(private_key).read_bytes()
    except OSError as error:
        raise OptionError(f"cannot read the signing key {private_key}: {error.strerror or error}") from error
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted
        raise OptionError(f"signing key {private_key} is encrypted; tagger signs with an unencrypted key file "
                          "(keep it in your CI's secret store)") from None
    except ValueError:
        raise OptionError(f"signing key {private_key} is not a PEM private key (make one with `tagger keygen`)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise OptionError(f"signing key {private_key} is not an elliptic-curve key (make one with `tagger keygen`)")
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_folder(folder: str | Path, private_key: str | Path) -> str:
    """Sign every file of a model folder into folder/model.sig; the signing key's fingerprint."""
    model_signing = import_model_signing()
    folder = Path(folder)
    (model_signing.signing.Config()
     .use_elliptic_key_signer(private_key=Path(private_key))
     .set_hashing_config(hashing_config(model_signing, folder))
     .sign(folder, folder / SIGNATURE_FILE))
    return fingerprint(public_key_of(private_key))


def own_files_uri(model_uri: str) -> str:
    """Where a model's own files are: a `models:/` URI resolved to its artifact location, anything else as given."""
    if not model_uri.startswith("models:"):
        return model_uri
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    return ModelsArtifactRepository.get_underlying_uri(model_uri)


def download_model(model_uri: str, folder: str | Path) -> Path:
    """Copy the model's own files into folder (which must exist), without the byproducts MLflow and Python may
    have written into a local store's copy (never loaded: see mlflow_model.signature.byproducts); the folder
    holding MLmodel."""
    location = own_files_uri(model_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(folder)))
    if not (local / "MLmodel").is_file():
        raise ServiceError(f"{model_uri} is not an MLflow model (no MLmodel at {location})")
    for path in byproducts(local):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return local


def sign_logged_model(model_id: str, private_key: str | Path, work_dir: str | Path) -> str:
    """Sign a LoggedModel's files and upload model.sig beside them, then check that a fresh download verifies
    (what was signed is byte for byte what loaders get); the key's fingerprint."""
    client = mlflow.MlflowClient()
    signed = download_model(f"models:/{model_id}", Path(tempfile.mkdtemp(dir=work_dir)))
    key = sign_folder(signed, private_key)
    client.log_model_artifact(model_id, str(signed / SIGNATURE_FILE))
    shutil.rmtree(fetch_verified(f"models:/{model_id}", public_key_of(private_key), Path(work_dir) / "check"))
    return key


def signing_metadata(key: str | None) -> dict[str, str]:
    """MLmodel metadata of a model that will be signed: its signature file and the key's fingerprint (else none)."""
    return {SIGNATURE_METADATA: SIGNATURE_FILE, FINGERPRINT_METADATA: key} if key else {}


def signing_line(key: str | None) -> str:
    """The version description's line on its signature."""
    if not key:
        return "**Signed**: no (servers with a verification key refuse this version)"
    return (f"**Signed**: every file, in `{SIGNATURE_FILE}` (OpenSSF model-signing, elliptic key), by the key with "
            f"SHA-256 fingerprint `{key}`; check with `tagger verify --public-key KEY.pub --model-uri URI`")


def fetch_verified(model_uri: str, public_key_pem: bytes, dest: str | Path | None = None) -> Path:
    """Download a model and verify its signature; the verified copy (dest, else a new temporary folder).

    dest must not exist or be empty: the copy is made beside it and moved there only once it
    verified, so dest never holds an unverified model. SignatureError when it does not verify.
    """
    target = Path(dest) if dest else Path(tempfile.mkdtemp(prefix=VERIFIED_PREFIX))
    if dest and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OptionError(f"{target} already exists and is not an empty folder; name a new or empty folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OptionError(f"cannot make {target.parent}: {error.strerror or error}") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        try:
            local = download_model(model_uri, staging)
        except ServiceError:
            raise
        except Exception as error:  # an unknown version or alias, an unreachable store
            raise ServiceError(f"cannot download {model_uri}: {one_line(error)}") from error
        verify_model(local, public_key_pem, label=model_uri)
        if target.exists():
            target.rmdir()
        local.rename(target)
    except BaseException:
        if not dest:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_verified(model_uri: str, public_key_pem: bytes, **load_options: Any) -> Any:
    """`mlflow.pyfunc.load_model` of a copy verified first (no model code runs before the check); the copy is
    removed once loaded (the model holds what it read; mapped files stay readable until it closes)."""
    folder = fetch_verified(model_uri, public_key_pem)
    try:
        return mlflow.pyfunc.load_model(str(folder), **load_options)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_model(model_uri: str, **load_options: Any) -> Any:
    """What tagger's own commands load (predict, evaluate, the promotion gate, the quickstart): with a verification
    key in this process (TAGGER_VERIFY_KEY), a verified copy, else `mlflow.pyfunc.load_model` as it is."""
    key_path = verify_key_path()
    if key_path is None:
        return mlflow.pyfunc.load_model(model_uri, **load_options)
    return load_verified(model_uri, read_public_key(key_path), **load_options)


@contextlib.contextmanager
def verification_off() -> Iterator[None]:
    """Inside: no TAGGER_VERIFY_KEY, for MLflow's load of a model while it is logged (before it is signed)."""
    saved = os.environ.pop(VERIFY_KEY_VARIABLE, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[VERIFY_KEY_VARIABLE] = saved
