"""Signed models: `tagger package --signing-key` signs every file of the model, and each loader with a
verification key (`tagger verify`, `tagger fetch`, `tagger serve`, `tagger batch-predict`, `load_context`)
refuses the seven tamperings of the issue's targets, each with one line naming the problem.

One real signed package per module (a fresh store, `tagger package` with TAGGER_SIGNING_KEY); each
case tampers with its own copy of the verified download. Tests of that package are slow (they package
a model beyond the shared fixture); the quick loop signs a copy of the shared package instead.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
from pathlib import Path

import blake3
import mlflow
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from helpers import build_tiny_checkpoint, copy_empty_store, log_training_run, mlflow_store, scoring_server

from mlflow_model.config import VERIFY_KEY_VARIABLE
from mlflow_model.errors import SignatureError
from mlflow_model.signature import SIGNATURE_FILE, fingerprint, verify_model
from tagger.cli import cli
from tagger.signing import fetch_verified, generate_key_pair, load_verified, own_files_uri, sign_folder

slow = pytest.mark.slow  # the tests of the module's own signed package
ROWS = pd.DataFrame({"title": ["bert text", "image video"], "description": ["language", None]})
WEIGHTS = Path("artifacts/checkpoint/model.safetensors")
MANIFEST = Path("artifacts/manifest.json")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """The team's key pair and another one, made by `tagger keygen`."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("team", "other"):
        outcome = CliRunner().invoke(cli, ["keygen", "--out", str(folder / name)])
        assert outcome.exit_code == 0, outcome.output
    return {name: (folder / name / "tagger-signing.pem", folder / name / "tagger-signing.pub") for name in ("team", "other")}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, tiny_encoder, empty_store, keys):
    """A tiny model packaged by `tagger package` with TAGGER_SIGNING_KEY set: tagger v1 in a store of its own;
    yields (store URI, the version, a verified download of it)."""
    folder = tmp_path_factory.mktemp("signed")
    with mlflow_store(copy_empty_store(empty_store, folder), cwd=folder) as uri:
        log_training_run("exp", build_tiny_checkpoint(folder / "checkpoint", tiny_encoder, seed=2), 0.4)
        outcome = CliRunner().invoke(
            cli, ["package", "--experiment-name", "exp", "--base-model", str(tiny_encoder), "--max-request-rows", "100"],
            env={"TAGGER_SIGNING_KEY": str(keys["team"][0])})
        assert outcome.exit_code == 0, outcome.output
        assert f"signed with the key whose fingerprint is {fingerprint(keys['team'][1].read_bytes())}" in outcome.output
        version = mlflow.MlflowClient().get_model_version("tagger", "1")
        local = fetch_verified("models:/tagger/1", keys["team"][1].read_bytes(), folder / "verified")
    yield uri, version, local


def flip(path: Path) -> None:
    """Flip 64 bytes in the middle of a file (same size: only a checksum notices)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def rewrite_weights_and_manifest(root: Path) -> None:
    """What an attacker with write access does: new weights, and the manifest in the model rewritten to match."""
    flip(root / WEIGHTS)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["checkpoint/model.safetensors"] = hashlib.sha256((root / WEIGHTS).read_bytes()).hexdigest()
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def skip_the_checks(root: Path) -> None:
    """load_context made to skip its checks, in both copies of the pyfunc the model ships."""
    for path in (root / "pyfunc.py", root / "code" / "mlflow_model" / "pyfunc.py"):
        text = path.read_text()
        assert "if key_path := verify_key_path():" in text
        path.write_text(text.replace("if key_path := verify_key_path():", "if key_path := None:")
                        .replace("verify_artifacts(context.artifacts, context.model_config)", "pass"))


def unsigned(root: Path, packaged_local: Path) -> None:
    """An unsigned package: what `tagger package` makes without a key (the session's shared model)."""
    shutil.rmtree(root)
    shutil.copytree(packaged_local, root, ignore=shutil.ignore_patterns("registered_model_meta"))


# the seven tamperings: (what is done to a copy of the signed model, what the one-line refusal says)
CASES = {
    "flipped weight bytes": (lambda root, keys, packaged: flip(root / WEIGHTS), f"changed: {WEIGHTS.as_posix()}"),
    "weights and manifest rewritten together": (
        lambda root, keys, packaged: rewrite_weights_and_manifest(root),
        f"changed: {WEIGHTS.as_posix()}, {MANIFEST.as_posix()}"),
    "the model's code edited": (lambda root, keys, packaged: skip_the_checks(root),
                                "changed: code/mlflow_model/pyfunc.py, pyfunc.py"),
    "an unsigned package": (lambda root, keys, packaged: unsigned(root, packaged), "is not signed (no model.sig)"),
    "signed with another key": (lambda root, keys, packaged: sign_folder(root, keys["other"][0]),
                                "was signed by another key, not by"),
    "a removed signature": (lambda root, keys, packaged: (root / SIGNATURE_FILE).unlink(),
                            "its signature file model.sig was removed (MLmodel says key"),
    "an added file": (lambda root, keys, packaged: (root / "code" / "mlflow_model" / "sitecustomize.py").write_text("x"),
                      "added: code/mlflow_model/sitecustomize.py"),
}


@pytest.fixture(params=sorted(CASES))
def tampered(request, signed, keys, packaged, tmp_path) -> tuple[Path, str]:
    """A copy of the signed model with one tampering done; and what its refusal must say."""
    action, message = CASES[request.param]
    root = Path(shutil.copytree(signed[2], tmp_path / "model"))
    action(root, keys, packaged.local)
    return root, message


@slow
def test_tagger_verify_refuses_each_tampering_in_one_line(tampered, keys):
    root, message = tampered
    outcome = CliRunner().invoke(cli, ["verify", "--public-key", str(keys["team"][1]), "--model-uri", str(root)])
    assert outcome.exit_code == 1 and message in outcome.output, outcome.output
    assert outcome.output.startswith("Error: SignatureError: ") and outcome.output.count("\n") == 1, outcome.output
    if MANIFEST.as_posix() in message:  # the manifest alone is fooled: it was rewritten to match
        assert CliRunner().invoke(cli, ["verify", "--model-uri", str(root)]).exit_code == 0


@slow
def test_tagger_fetch_refuses_each_tampering_and_leaves_no_folder(tampered, keys, tmp_path):
    root, message = tampered
    dest = tmp_path / "fetched"
    outcome = CliRunner().invoke(cli, ["fetch", "--verify-key", str(keys["team"][1]), str(root), str(dest)])
    assert outcome.exit_code == 1 and message in outcome.output and outcome.output.count("\n") == 1, outcome.output
    assert not dest.exists() and not list(tmp_path.glob(".fetched.partial-*"))  # nothing unverified is left


@slow
def test_loaders_with_a_key_refuse_each_tampering_before_the_models_code_runs(tampered, keys, monkeypatch):
    """tagger serve's replicas and batch-predict's actors load through load_verified; with TAGGER_VERIFY_KEY set,
    load_context checks too, but only where the model's own code still runs its check."""
    root, message = tampered
    with pytest.raises(SignatureError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_verified(str(root), keys["team"][1].read_bytes())
    monkeypatch.setenv(VERIFY_KEY_VARIABLE, str(keys["team"][1]))
    if "pyfunc.py" in message:  # the model's code edited: the edit switched load_context's checks off
        assert mlflow.pyfunc.load_model(str(root)).predict(ROWS) is not None  # why the tamper defence is elsewhere
        return
    with pytest.raises(SignatureError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mlflow.pyfunc.load_model(str(root))


@slow
def test_load_context_refuses_an_edited_code_file_that_leaves_its_check_on(signed, keys, tmp_path, monkeypatch):
    root = Path(shutil.copytree(signed[2], tmp_path / "model"))
    with open(root / "code" / "mlflow_model" / "predictor.py", "a") as handle:
        handle.write("\n# edited\n")
    monkeypatch.setenv(VERIFY_KEY_VARIABLE, str(keys["team"][1]))
    with pytest.raises(SignatureError, match="changed: code/mlflow_model/predictor.py"):
        mlflow.pyfunc.load_model(str(root))


@slow
def test_a_signed_version_verifies_byte_for_byte_from_the_registry_and_says_it_is_signed(signed, keys, tmp_path):
    uri, version, local = signed
    team = fingerprint(keys["team"][1].read_bytes())
    assert version.tags["signed"] == "true" and version.tags["signing_key_fingerprint"] == team
    assert f"fingerprint `{team}`" in version.description
    private = keys["team"][0].read_bytes()
    records = json.dumps([version.tags, version.description, (local / "MLmodel").read_text()])
    assert private.decode() not in records and b"PRIVATE KEY" not in (local / SIGNATURE_FILE).read_bytes()
    assert stat.S_IMODE(keys["team"][0].stat().st_mode) == 0o600
    body = private.splitlines()[1]  # a line of the key's base64: in no file of the store, its database included
    assert not [p for p in Path(uri.removeprefix("sqlite:///")).parent.rglob("*") if p.is_file() and body in p.read_bytes()]
    assert not (local / "registered_model_meta").exists()  # the model's own files, nothing MLflow adds
    files = verify_model(local, keys["team"][1].read_bytes())
    assert files == sum(1 for p in local.rglob("*") if p.is_file()) - 1 > 20  # every file but model.sig
    with mlflow_store(uri, cwd=tmp_path):
        for model_uri in ("models:/tagger/1", f"models:/{version.source.split('/')[-1]}"):
            outcome = CliRunner().invoke(cli, ["verify", "--public-key", str(keys["team"][1]), "--model-uri", model_uri])
            assert outcome.exit_code == 0 and f"matches the signature of key {team}" in outcome.output, outcome.output
        outcome = CliRunner().invoke(cli, ["verify", "--model-uri", "models:/tagger/1"])  # without a key: as before
        assert outcome.exit_code == 0 and "artifact files match the manifest" in outcome.output, outcome.output
        # MLflow wrote registered_model_meta into the local store's own copy; a verified copy leaves it out
        assert (Path(own_files_uri("models:/tagger/1")) / "registered_model_meta").is_file()
        copy = fetch_verified("models:/tagger/1", keys["team"][1].read_bytes())
        assert not (copy / "registered_model_meta").exists()
        shutil.rmtree(copy)


def test_a_signed_copy_verifies_and_a_changed_byte_is_named(packaged, keys, tmp_path):
    """The quick loop's check: the shared package's files signed by tagger's signer, then one byte flipped."""
    root = Path(shutil.copytree(packaged.local, tmp_path / "model", ignore=shutil.ignore_patterns("registered_model_meta")))
    assert sign_folder(root, keys["team"][0]) == fingerprint(keys["team"][1].read_bytes())
    assert verify_model(root, keys["team"][1].read_bytes()) == sum(1 for p in root.rglob("*") if p.is_file()) - 1
    flip(root / WEIGHTS)
    with pytest.raises(SignatureError, match=f"files differ from what was signed .*: changed: {WEIGHTS.as_posix()}$"):
        verify_model(root, keys["team"][1].read_bytes())
    with pytest.raises(SignatureError, match="was signed by another key"):
        verify_model(root, keys["other"][1].read_bytes())
    # an attacker who rewrites the signed manifest inside model.sig to match cannot sign it again
    bundle = json.loads((root / SIGNATURE_FILE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    weights = next(r for r in statement["predicate"]["resources"] if r["name"] == WEIGHTS.as_posix())
    weights["digest"] = blake3.blake3((root / WEIGHTS).read_bytes()).hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (root / SIGNATURE_FILE).write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="its signature does not verify with key .* or model.sig was altered"):
        verify_model(root, keys["team"][1].read_bytes())


def test_a_bad_key_is_one_line_naming_the_file_never_its_content(packaged, keys, tmp_path):
    root = packaged.local
    outcome = CliRunner().invoke(cli, ["verify", "--public-key", str(keys["team"][0]), "--model-uri", str(root)])
    assert outcome.exit_code == 1 and "holds a private key; verify with its public key" in outcome.output
    assert keys["team"][0].read_text().splitlines()[1] not in outcome.output
    assert generate_key_pair(tmp_path / "k")[0].exists()
    outcome = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "k")])  # never overwrites a key
    assert outcome.exit_code == 1 and "already holds" in outcome.output, outcome.output


@slow
def test_fetch_then_mlflow_models_serve_serves_the_verified_copy(signed, keys, tmp_path, monkeypatch):
    uri, _, _ = signed
    dest = tmp_path / "served"
    with mlflow_store(uri, cwd=tmp_path):
        outcome = CliRunner().invoke(cli, ["fetch", "models:/tagger/1", str(dest)],
                                     env={VERIFY_KEY_VARIABLE: str(keys["team"][1])})
    assert outcome.exit_code == 0 and f"mlflow models serve -m {dest}" in outcome.output, outcome.output
    monkeypatch.setenv(VERIFY_KEY_VARIABLE, str(keys["team"][1]))  # the server's load_context checks it too
    with scoring_server(str(dest), uri, tmp_path) as url:
        answer = requests.post(f"{url}/invocations", json={"dataframe_records": ROWS.fillna("").to_dict(orient="records")},
                               timeout=60)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2, answer.text


def test_tagger_serve_and_batch_predict_refuse_an_unsigned_model_before_ray_starts(packaged_store, keys, tmp_path):
    import ray

    model = shutil.copytree(packaged_store.local, tmp_path / "unsigned", ignore=shutil.ignore_patterns("registered_model_meta"))
    pd.DataFrame({"title": ["x"], "description": ["y"]}).to_csv(tmp_path / "in.csv", index=False)
    for command in (["serve", "--model-uri", str(model)],
                    ["batch-predict", "--model-uri", str(model), "--input", str(tmp_path / "in.csv"),
                     "--output", str(tmp_path / "out")]):
        outcome = CliRunner().invoke(cli, [*command, "--verify-key", str(keys["team"][1])])
        assert outcome.exit_code == 1 and "SignatureError" in outcome.output and "is not signed" in outcome.output
        assert outcome.output.count("\n") == 1, outcome.output
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_taggers_own_commands_load_only_a_verified_copy_when_a_key_is_set(packaged_store, keys, tmp_path):
    model = shutil.copytree(packaged_store.local, tmp_path / "unsigned", ignore=shutil.ignore_patterns("registered_model_meta"))
    pd.DataFrame({"title": ["x"], "description": ["y"], "tag": ["mlops"]}).to_csv(tmp_path / "l.csv", index=False)
    for command in (["predict", "--title", "bert", "--model-uri", str(model)],
                    ["evaluate", "--model-uri", str(model), "--dataset-loc", str(tmp_path / "l.csv")]):
        outcome = CliRunner().invoke(cli, command, env={VERIFY_KEY_VARIABLE: str(keys["team"][1])})
        assert outcome.exit_code == 1 and "SignatureError" in outcome.output and "is not signed" in outcome.output
        assert outcome.output.count("\n") == 1, outcome.output
    answered = CliRunner().invoke(cli, ["predict", "--title", "bert", "--model-uri", str(model)],
                                  env={VERIFY_KEY_VARIABLE: ""})  # without a key: as before
    assert answered.exit_code == 0 and '"prediction"' in answered.output, answered.output


@slow
def test_a_replica_and_an_actor_load_a_signed_version_and_refuse_an_unsigned_one(signed, packaged, keys, tmp_path):
    from tagger.batch_predict import TaggerActor
    from tagger.rollout import ModelHolder

    uri, _, _ = signed
    key = keys["team"][1].read_bytes()
    with mlflow_store(uri, cwd=tmp_path):
        holder = ModelHolder("models:/tagger/1", threads=1, poll_s=0, metrics=None, public_key=key)
        assert len(holder.current.predict(ROWS)) == 2
        holder.current.close()
        actor = TaggerActor("models:/tagger/1", uri, uri, 1, "id", verify_key_pem=key.decode())
        assert actor(ROWS.assign(id=[1, 2])).num_rows == 2
        actor.model.unwrap_python_model().close()
    with pytest.raises(SignatureError, match="is not signed"):
        ModelHolder(str(packaged.local), threads=1, poll_s=0, metrics=None, public_key=key)
