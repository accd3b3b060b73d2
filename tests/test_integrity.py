"""The integrity manifest: a package whose files changed after packaging is refused at load, naming the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from mlflow_model.errors import CheckpointError, IntegrityError
from tagger.cli import cli

ROWS = pd.DataFrame({"title": ["bert text", "image video"], "description": ["language", None]})


def flip_bytes(path: Path) -> None:
    """Flip 64 bytes in the middle of a file (same size: only a checksum notices)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def change_label_map(path: Path) -> None:
    """Swap two tags' indices: a valid label map that would mislabel every prediction."""
    labels = json.loads(path.read_text())
    first, second = list(labels)[:2]
    labels[first], labels[second] = labels[second], labels[first]
    path.write_text(json.dumps(labels))


TAMPERINGS = {
    "changed: checkpoint/model.safetensors": lambda root: flip_bytes(root / "checkpoint" / "model.safetensors"),
    "changed: checkpoint/model.torchscript": lambda root: flip_bytes(root / "checkpoint" / "model.torchscript"),
    "missing: encoder/tokenizer.json": lambda root: (root / "encoder" / "tokenizer.json").unlink(),
    "unexpected: encoder/extra.txt": lambda root: (root / "encoder" / "extra.txt").write_text("x"),
    "changed: checkpoint/class_to_index.json": lambda root: change_label_map(root / "checkpoint" / "class_to_index.json"),
}


@pytest.mark.parametrize("problem", sorted(TAMPERINGS))
def test_a_tampered_package_is_refused_at_load_naming_the_file(packaged, tmp_path, problem):
    copy = Path(shutil.copytree(packaged.local, tmp_path / "model"))  # the shared copy stays as packaged
    TAMPERINGS[problem](copy / "artifacts")
    with pytest.raises(IntegrityError, match=problem) as refused:
        mlflow.pyfunc.load_model(str(copy))
    assert isinstance(refused.value, CheckpointError)  # a model that cannot be loaded as packaged
    outcome = CliRunner().invoke(cli, ["verify", "--model-uri", str(copy)])
    assert outcome.exit_code == 1 and problem in outcome.output and "Traceback" not in outcome.output


def test_a_clean_package_loads_and_verifies(packaged):
    model = mlflow.pyfunc.load_model(str(packaged.local))
    got, expected = model.predict(ROWS), packaged.model.predict(ROWS)  # the copy answers as the registered model
    assert list(got["prediction"]) == list(expected["prediction"])
    for mine, theirs in zip(got["probabilities"], expected["probabilities"]):
        assert mine == pytest.approx(theirs, abs=1e-6)
    outcome = CliRunner().invoke(cli, ["verify", "--model-uri", str(packaged.local)])
    assert outcome.exit_code == 0 and "8 artifact files match" in outcome.output, outcome.output


def test_the_manifest_is_one_artifact_naming_every_file(packaged, tmp_path):
    artifacts = packaged.local / "artifacts"
    manifest = json.loads((artifacts / "manifest.json").read_text())
    files = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == files and len(files) == 8  # every artifact file, the manifest itself aside
    assert "checkpoint/calibration.json" in manifest  # the temperature is checked like the weights
    assert all(len(digest) == 64 for digest in manifest.values())  # SHA-256, hex
    assert "artifact_sha256" not in packaged.model.metadata.flavors["python_function"]["config"]  # not in model_config
    copy = Path(shutil.copytree(packaged.local, tmp_path / "model"))
    (copy / "artifacts" / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="cannot read the model's integrity manifest"):
        mlflow.pyfunc.load_model(str(copy))
