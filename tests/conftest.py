"""Shared fixtures: a tiny BERT encoder and checkpoints built in-test, and a sqlite MLflow store."""
from __future__ import annotations

import contextlib
import os
import random
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from mlflow_model.checkpoint import write_checkpoint
from mlflow_model.model import FinetunedLLM, ModelArgs

ROOT = Path(__file__).resolve().parent.parent

CLASS_TO_INDEX = {"natural-language-processing": 0, "computer-vision": 1, "mlops": 2, "other": 3}
WORDS = "transformer bert language text vision image detection video pipeline deploy model learning data".split()
HIDDEN = 32
TAG_WORDS = {
    "natural-language-processing": ["transformer", "bert", "language", "text"],
    "computer-vision": ["vision", "image", "detection", "video"],
    "mlops": ["pipeline", "deploy", "model"],
    "other": ["learning", "data"],
}


def write_tiny_csv(path: Path, rows_per_tag: int = 10, seed: int = 0) -> Path:
    """A labelled CSV whose texts use each tag's own words (so even a tiny model can learn it)."""
    rng = random.Random(seed)
    rows = []
    for tag, words in TAG_WORDS.items():
        for i in range(rows_per_tag):
            rows.append({
                "id": len(rows),
                "title": " ".join(rng.choices(words, k=3)),
                "description": " ".join(rng.choices(words, k=4)) if i % 3 else None,
                "tag": tag,
            })
    rng.shuffle(rows)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def varied_rows(count: int, seed: int) -> pd.DataFrame:
    """Rows from 1 to ~60 tokens long, shuffled so that lengths are not in order."""
    rng = np.random.default_rng(seed)
    titles = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(count)]
    descriptions = [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 40)))) for _ in range(count)]
    return pd.DataFrame({"title": titles, "description": descriptions})


def build_tiny_encoder(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT config + a tokenizer whose vocab spells any word letter by letter."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *(f"##{c}" for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=64).save_pretrained(folder)
    BertConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    ).save_pretrained(folder)
    return folder


def build_tiny_checkpoint(folder: Path, encoder: Path, seed: int, torch_format: bool = True) -> Path:
    """A randomly initialised FinetunedLLM saved in the Made With ML checkpoint layout."""
    torch.manual_seed(seed)
    args = ModelArgs(dropout_p=0.1, embedding_dim=HIDDEN, num_classes=len(CLASS_TO_INDEX))
    model = FinetunedLLM(BertModel(BertConfig.from_pretrained(encoder)), args)
    return write_checkpoint(folder, model.state_dict(), args, CLASS_TO_INDEX, torch_format=torch_format)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """Folder with the tiny encoder's config and tokenizer."""
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_encoder) -> Path:
    """A checkpoint folder of a tiny model (seed 0)."""
    return build_tiny_checkpoint(tmp_path / "checkpoint", tiny_encoder, seed=0)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store + registry with local artifacts, used by this test alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # forget the experiment id an earlier test made active
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def packaged_model(tmp_path_factory, tiny_encoder) -> mlflow.pyfunc.PyFuncModel:
    """One tiny model packaged and loaded once per module, for tests that only call predict."""
    from tagger.config import PackageConfig
    from tagger.package import package_best_run

    folder = tmp_path_factory.mktemp("packaged")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        log_training_run("exp", build_tiny_checkpoint(folder / "checkpoint", tiny_encoder, seed=2), 0.4)
        version = package_best_run(PackageConfig(experiment_name="exp", base_model=str(tiny_encoder)))
        model = mlflow.pyfunc.load_model(f"models:/tagger/{version.version}")
        mlflow.set_experiment("Default")
    mlflow.set_tracking_uri(None)
    return model


def log_training_run(experiment: str, checkpoint: Path | None, val_loss: float | None, tag: bool = True) -> str:
    """A finished MLflow run as the trainer leaves it: val_loss and the checkpoint as artifacts."""
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        if val_loss is not None:
            mlflow.log_metric("val_loss", val_loss)
        if checkpoint is not None:
            mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
            if tag:
                mlflow.set_tag("checkpoint_path", "checkpoint")
    return run.info.run_id


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def scoring_server(model_uri: str, tracking_uri: str, folder: Path, timeout_s: float = 180) -> Iterator[str]:
    """A real `mlflow models serve` process on 127.0.0.1 (stopped at the end); yields its base URL."""
    port = free_port()
    # The scoring server runs `uvicorn` from PATH: put this interpreter's bin folder first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1"}
    log = folder / f"server-{port}.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=folder, stdout=output, stderr=subprocess.STDOUT,
        )
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
            while True:
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.5)
                assert time.monotonic() < deadline, "server did not answer /ping: " + log.read_text()[-3000:]
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)
