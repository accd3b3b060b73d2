"""The integrity manifest: a package whose files changed after packaging is refused at load, naming the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import build_tiny_checkpoint, log_training_run

from mlflow_model.errors import CheckpointError
from tagger.cli import cli
from tagger.config import PackageConfig
from tagger.package import package_best_run

ROWS = pd.DataFrame({"title": ["bert text", "image video"], "description": ["language", None]})


@pytest.fixture(scope="module")
def packaged_folder(tmp_path_factory, tiny_encoder) -> Path:
    """A packaged tiny model, downloaded to a local folder (each test tampers with its own copy)."""
    folder = tmp_path_factory.mktemp("integrity")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        log_training_run("exp", build_tiny_checkpoint(folder / "ckpt", tiny_encoder, seed=4), 0.5)
        version = package_best_run(PackageConfig(experiment_name="exp", base_model=str(tiny_encoder)))
        local = mlflow.artifacts.download_artifacts(f"models:/tagger/{version.version}", dst_path=str(folder / "model"))
        mlflow.set_experiment("Default")
    mlflow.set_tracking_uri(None)
    return Path(local)


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
def test_a_tampered_package_is_refused_at_load_naming_the_file(packaged_folder, tmp_path, problem):
    copy = Path(shutil.copytree(packaged_folder, tmp_path / "model"))
    TAMPERINGS[problem](copy / "artifacts")
    with pytest.raises(CheckpointError, match=problem):
        mlflow.pyfunc.load_model(str(copy))
    outcome = CliRunner().invoke(cli, ["verify", "--model-uri", str(copy)])
    assert outcome.exit_code == 1 and problem in outcome.output and "Traceback" not in outcome.output


def test_a_clean_package_loads_and_verifies(packaged_folder):
    model = mlflow.pyfunc.load_model(str(packaged_folder))
    assert len(model.predict(ROWS)) == 2
    outcome = CliRunner().invoke(cli, ["verify", "--model-uri", str(packaged_folder)])
    assert outcome.exit_code == 0 and "7 artifact files match" in outcome.output, outcome.output
