"""Helpers the tests share (not a test module): a tiny BERT encoder and checkpoints built in-test,
labelled rows, training runs as the trainer leaves them, an MLflow store switched in and out, and
a real `mlflow models serve` process.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


def make_empty_store(folder: Path) -> Path:
    """An empty sqlite tracking store + registry at folder/mlflow.db, its tables created (MLflow's migrations
    take seconds; copies of this file, made by copy_empty_store, take milliseconds)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # creates the tables, touches no global
    return folder / "mlflow.db"


def copy_empty_store(empty: Path, folder: Path) -> str:
    """A new store at folder/mlflow.db, a copy of the empty one whose Default experiment keeps its
    artifacts in folder/mlruns/0 (as a store made in folder would); its URI."""
    database = folder / "mlflow.db"
    shutil.copyfile(empty, database)
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (str(folder / "mlruns" / "0"),))
    return f"sqlite:///{database}"


@contextlib.contextmanager
def mlflow_store(uri: str, cwd: Path | None = None) -> Iterator[str]:
    """Use the tracking store + registry at `uri` inside the block, then give back exactly what was there before.

    MLflow keeps the store in globals *and* environment variables (set_tracking_uri sets
    MLFLOW_TRACKING_URI, set_registry_uri MLFLOW_REGISTRY_URI, set_experiment MLFLOW_EXPERIMENT_ID):
    all of them are restored, so a store used by a session fixture never leaks into the tests that
    run after it.
    """
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_uri, previous_experiment = tracking_utils._tracking_uri, fluent._active_experiment_id
    previous_registry = registry_utils._registry_uri
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_REGISTRY_URI"):  # the registry follows the tracking store
            patch.setenv(name, "")  # recorded, so the end restores what was there (or nothing), even when...
            patch.delenv(name)  # ...code in the block sets it (delenv of an absent variable records nothing)
        if cwd is not None:
            patch.chdir(cwd)  # a new store's default artifact root, ./mlruns, lands in cwd
        fluent._active_experiment_id = None  # forget the experiment an earlier store made active
        registry_utils._registry_uri = None  # ...and a registry set inside a block (a batch actor built in-process)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(previous_uri)
            fluent._active_experiment_id = previous_experiment
            registry_utils._registry_uri = previous_registry
    # leaving the MonkeyPatch context restored MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID / MLFLOW_REGISTRY_URI
    # and the cwd


@dataclass(frozen=True)
class PackagedModel:
    """The session's one packaged tiny model (torch fp32), registered as version 1 and promoted to @champion.

    Read-only for the tests that share it: a test that tampers with files copies `local` first, and
    a test that registers, evaluates or promotes versions makes a store of its own.
    """

    tracking_uri: str  # sqlite store + registry, artifacts under `folder`
    folder: Path
    model_uri: str  # models:/tagger@champion (resolves only with tracking_uri in use)
    version: str
    run_id: str  # the training run it was packaged from
    checkpoint: Path  # that run's checkpoint, as built
    model: mlflow.pyfunc.PyFuncModel  # loaded once
    local: Path  # a downloaded copy of the model (MLmodel, artifacts/, ...)
    max_request_rows: int  # the per-request row limit it was packaged with


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    import socket

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
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_REGISTRY_URI"):  # the registry is the given store's
        env.pop(name, None)
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
                if process.poll() is not None:
                    pytest.fail(f"the scoring server exited with code {process.returncode}: {log.read_text()[-3000:]}")
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.5)
                if time.monotonic() > deadline:  # a hang guard, not a speed check
                    pytest.fail(f"the scoring server did not answer /ping in {timeout_s:g} s: {log.read_text()[-3000:]}")
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)
