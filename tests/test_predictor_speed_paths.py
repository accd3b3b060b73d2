"""The fast paths change speed, not answers: length-sorted batches, and int8 with its measured cost."""
from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import CLASS_TO_INDEX, build_tiny_checkpoint, log_training_run, varied_rows
from mlflow.tracking import MlflowClient
from sklearn.metrics import f1_score

from mlflow_model.config import PredictorConfig
from tagger.config import PackageConfig
from mlflow_model.predictor import Predictor
from tagger.package import package_best_run


def predictor(checkpoint, encoder, **config) -> Predictor:
    """A predictor of the tiny model with some config fields set."""
    return Predictor.from_directories(checkpoint, encoder, PredictorConfig(**config))


@pytest.mark.slow  # ~50 separate predictions
def test_sorted_batches_match_unsorted_in_input_order(tiny_checkpoint, tiny_encoder):
    rows = varied_rows(50, seed=0)
    fast = predictor(tiny_checkpoint, tiny_encoder, sort_by_length=True)
    plain = predictor(tiny_checkpoint, tiny_encoder, sort_by_length=False)
    lengths = [len(ids) for ids in fast.preprocess(rows).token_ids]
    assert len(set(lengths)) > 10 and lengths != sorted(lengths)  # the sort really reorders

    sorted_proba = fast.predict_proba(rows, {"batch_size": 8})
    plain_proba = plain.predict_proba(rows, {"batch_size": 8})
    one_by_one = np.vstack([plain.predict_proba(rows.iloc[[i]], {"batch_size": 1}) for i in range(len(rows))])
    np.testing.assert_allclose(sorted_proba, plain_proba, atol=1e-6, rtol=0)
    np.testing.assert_allclose(sorted_proba, one_by_one, atol=1e-6, rtol=0)  # row i is input row i

    fast_out, plain_out = fast.predict(rows, {"batch_size": 8}), plain.predict(rows, {"batch_size": 8})
    assert fast_out["prediction"].tolist() == plain_out["prediction"].tolist()
    for mine, theirs in zip(fast_out["probabilities"], plain_out["probabilities"]):
        assert mine.keys() == theirs.keys() == CLASS_TO_INDEX.keys()
        assert max(abs(mine[tag] - theirs[tag]) for tag in mine) <= 1e-6


@pytest.mark.slow  # quantizes the model
def test_int8_build_agrees_with_fp32(tiny_checkpoint, tiny_encoder):
    rows = varied_rows(100, seed=1)
    int8 = predictor(tiny_checkpoint, tiny_encoder, precision="int8-dynamic", forward="eager")
    assert any("quantized" in type(m).__module__ for m in int8.engine.model.modules())  # Linear layers are int8
    quantized, reference = int8.predict_proba(rows), predictor(tiny_checkpoint, tiny_encoder).predict_proba(rows)
    assert quantized.shape == reference.shape == (100, len(CLASS_TO_INDEX))
    assert not np.array_equal(quantized, reference)  # really another computation...
    np.testing.assert_allclose(quantized, reference, atol=5e-3)  # ...with close probabilities
    assert (quantized.argmax(axis=1) == reference.argmax(axis=1)).mean() >= 0.95


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8-dynamic", marks=pytest.mark.slow)])  # fp32: the default
def test_the_traced_model_answers_as_the_eager_one(tiny_checkpoint, tiny_encoder, precision):
    import torch

    rows = varied_rows(60, seed=4)
    traced = predictor(tiny_checkpoint, tiny_encoder, precision=precision)
    eager = predictor(tiny_checkpoint, tiny_encoder, precision=precision, forward="eager")
    assert isinstance(traced.engine.model, torch.jit.ScriptModule)  # the trace is what runs
    assert not isinstance(eager.engine.model, torch.jit.ScriptModule)
    for batch_size in (1, 7, 64):  # other batch sizes and widths than the trace's example
        np.testing.assert_allclose(
            traced.predict_proba(rows, {"batch_size": batch_size}), eager.predict_proba(rows, {"batch_size": batch_size}),
            atol=1e-5, rtol=0,
        )


def test_the_trace_saved_at_packaging_runs_with_the_checkpoint_weights(tmp_path, tiny_checkpoint, tiny_encoder):
    """The saved trace holds the graph, not the weights; one that cannot be used is an error naming it, not a fallback."""
    import torch

    from mlflow_model.checkpoint import load_finetuned
    from mlflow_model.config import TRACE_FILE
    from mlflow_model.traced import TraceError, save_trace

    rows = varied_rows(30, seed=6)
    expected = predictor(tiny_checkpoint, tiny_encoder, forward="eager").predict_proba(rows)
    other = build_tiny_checkpoint(tmp_path / "other", tiny_encoder, seed=1)  # same shapes, other weights
    save_trace(load_finetuned(other, tiny_encoder), tiny_checkpoint)
    saved = predictor(tiny_checkpoint, tiny_encoder, forward="shipped_trace")
    assert isinstance(saved.engine.model, torch.jit.ScriptModule)
    np.testing.assert_allclose(saved.predict_proba(rows), expected, atol=1e-5, rtol=0)  # this checkpoint's weights

    (tiny_checkpoint / TRACE_FILE).write_bytes(b"not a TorchScript archive")
    with pytest.raises(TraceError, match=f"cannot load the shipped trace .*{TRACE_FILE}"):
        predictor(tiny_checkpoint, tiny_encoder, forward="shipped_trace")
    (tiny_checkpoint / TRACE_FILE).unlink()
    with pytest.raises(TraceError, match=f"runs its shipped trace, but .*{TRACE_FILE} does not exist"):
        predictor(tiny_checkpoint, tiny_encoder, forward="shipped_trace")


def test_a_model_whose_trace_differs_is_not_traced():
    """Python control flow on the input's shape freezes in a trace: the check sees it, and the build runs eagerly."""
    import torch

    from mlflow_model.traced import TraceError, trace_checked

    class ShapeDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(1, 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = (input_ids * attention_mask).float().mean(dim=1, keepdim=True)
            return self.head(x * 2 if input_ids.shape[1] > 8 else x)  # traced at width 6: branch frozen

    with pytest.raises(TraceError, match="the model's trace differs from it by"):
        trace_checked(ShapeDependent())


@pytest.fixture
def labelled_csv(tmp_path) -> str:
    """A small labelled CSV (title, description, tag), 12 rows per tag."""
    rows = varied_rows(48, seed=2).assign(tag=[tag for tag in CLASS_TO_INDEX for _ in range(12)])
    rows.to_csv(tmp_path / "eval.csv", index=False)
    return str(tmp_path / "eval.csv")


@pytest.mark.slow  # packages a model
def test_int8_packaging_records_its_accuracy_change(tmp_path, tiny_encoder, tracking_uri, labelled_csv):
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", tiny_encoder, seed=3)
    log_training_run("exp", checkpoint, 0.5)
    config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder), eval_dataset=labelled_csv,
                           predictor=PredictorConfig(precision="int8-dynamic"))
    version = package_best_run(config)

    frame = pd.read_csv(labelled_csv)
    expected = {
        name: f1_score(frame["tag"], predictor(checkpoint, tiny_encoder, precision=name).predict(frame)["prediction"],
                       average="weighted")
        for name in ("fp32", "int8-dynamic")
    }
    tags = version.tags
    assert (tags["engine"], tags["precision"]) == ("torch", "int8-dynamic")
    assert float(tags["accuracy.reference_f1"]) == pytest.approx(expected["fp32"], abs=1e-6)
    assert float(tags["accuracy.f1"]) == pytest.approx(expected["int8-dynamic"], abs=1e-6)
    assert float(tags["accuracy.f1_delta"]) == pytest.approx(expected["int8-dynamic"] - expected["fp32"], abs=2e-6)
    assert tags["accuracy.dataset"] == "eval.csv" and tags["accuracy.rows"] == "48"  # a name, not a local path

    info = mlflow.models.get_model_info(f"models:/tagger/{version.version}")
    assert info.metadata["precision"] == "int8-dynamic" and info.metadata["accuracy.f1_delta"] == tags["accuracy.f1_delta"]
    metrics = MlflowClient().get_run(tags["package_run_id"]).data.metrics
    assert metrics["accuracy.f1_delta"] == pytest.approx(float(tags["accuracy.f1_delta"]))
    served = mlflow.pyfunc.load_model(f"models:/tagger/{version.version}")
    assert served.model_config["precision"] == "int8-dynamic"


@pytest.mark.slow  # packages a model
def test_int8_packaging_without_a_labelled_csv_says_not_measured(tmp_path, tiny_encoder, tracking_uri, caplog):
    log_training_run("exp", build_tiny_checkpoint(tmp_path / "ckpt", tiny_encoder, seed=3), 0.5)
    config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder), eval_dataset=str(tmp_path / "no.csv"),
                           predictor=PredictorConfig(precision="int8-dynamic"))
    version = package_best_run(config)
    assert version.tags["accuracy.f1_delta"] == "not measured" and "accuracy.reference_f1" not in version.tags
    assert "no labelled CSV" in caplog.text


def onednn_cache_misses(checkpoint, encoder, env: dict[str, str]) -> int:
    """oneDNN kernels compiled (cache misses) in a fresh process predicting 6 rows of distinct lengths, then the first again."""
    script = f"""
import pandas as pd
from mlflow_model.config import PredictorConfig
from mlflow_model.predictor import Predictor
predictor = Predictor.from_directories({str(checkpoint)!r}, {str(encoder)!r}, PredictorConfig())
titles = [" ".join(["graph"] * n) for n in (2, 5, 8, 11, 14, 17, 2)]
for title in titles:  # one forward per row: one batch shape per length
    predictor.predict(pd.DataFrame({{"title": [title], "description": [""]}}))
"""
    run_env = {key: value for key, value in os.environ.items() if not key.startswith("ONEDNN_")}
    run_env.update(ONEDNN_VERBOSE="2", **env)
    output = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True, check=True)
    created = [line for line in output.stdout.splitlines() if line.startswith("onednn_verbose") and ",create:" in line]
    assert created and all("eltwise_gelu" in line for line in created)  # GELU is what an fp32 forward runs on oneDNN
    return sum(",create:cache_miss," in line for line in created)


@pytest.mark.slow  # two new processes
def test_onednn_keeps_a_bounded_number_of_kernels(tiny_checkpoint, tiny_encoder):
    """oneDNN's default cache kept a kernel per batch shape forever (memory grew with traffic); the predictor caps it."""
    kept = onednn_cache_misses(tiny_checkpoint, tiny_encoder, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    capped = onednn_cache_misses(tiny_checkpoint, tiny_encoder, {})
    assert kept >= 6  # oneDNN's own default: one kernel per new shape, and the repeated shape found cached
    assert capped == kept + 1  # capped: the first row's shape, 5 shapes back, was evicted and compiled again
