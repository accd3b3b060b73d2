"""Calibration: the temperature fit and scores, where the temperature lives (checkpoint, every build, the
package) and what the served probabilities do with it."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from helpers import build_tiny_checkpoint, log_training_run, varied_rows, write_tiny_csv
from mlflow.tracking import MlflowClient

from mlflow_model.checkpoint import CALIBRATION_FILE, read_temperature, write_calibration
from mlflow_model.config import CHECKPOINT_ARTIFACT, ENCODER_ARTIFACT, PredictorConfig
from mlflow_model.errors import CheckpointError
from mlflow_model.predictor import Predictor
from tagger.calibration import brier, calibration_choice, ece, ece_noise_floor, fit_on_dataset, fit_temperature, nll, softmax
from tagger.config import PackageConfig
from tagger.errors import OptionError
from tagger.evaluate import threshold_sweep
from tagger.package import package_best_run

ROWS = varied_rows(24, seed=11)


def toy_logits(scale: float, rows: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose calibrated version is 1.5 x base (unit Gaussian noise, true class +1.5), times `scale`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, rows)
    base = rng.normal(size=(rows, 4))
    base[np.arange(rows), labels] += 1.5
    return base * scale, labels


@pytest.mark.parametrize("scale", [6.0, 0.5])  # overconfident (T > 1), underconfident (T < 1)
def test_the_fitted_temperature_calibrates_a_miscalibrated_model_and_keeps_its_answers(scale):
    logits, labels = toy_logits(scale)
    fitted = fit_temperature(logits, labels)
    assert fitted.temperature == pytest.approx(scale / 1.5, rel=0.15)  # the true calibrating factor
    assert fitted.nll_after < fitted.nll_before and fitted.nll_after == pytest.approx(nll(logits, labels, fitted.temperature))
    assert fitted.ece_before > 0.05 and fitted.ece_after < 0.03
    assert (softmax(logits, fitted.temperature).argmax(axis=1) == logits.argmax(axis=1)).all()
    held_out, held_labels = toy_logits(scale, seed=1)  # it generalises to rows it was not fitted on
    assert ece(softmax(held_out, fitted.temperature), held_labels) < ece(softmax(held_out), held_labels) / 2


def test_ece_and_brier_on_known_values():
    right = np.array([[0.9, 0.1]] * 10)
    assert ece(right, [0] * 9 + [1]) == pytest.approx(0.0)  # 90% confident, 90% right
    assert ece(right, [0] * 10) == pytest.approx(0.1)  # 90% confident, always right
    assert ece(np.array([[0.3, 0.7], [0.9, 0.1]]), [1, 1]) == pytest.approx(0.6)  # two bins: |1 - .7|, |0 - .9|
    assert ece_noise_floor(np.eye(3)) == 0.0  # certain and right: no noise
    assert 0.05 < ece_noise_floor(np.array([[0.7, 0.3]] * 20)) < 0.2  # 20 rows at 70%: ECE ~0.08 by chance alone
    assert brier(np.eye(3), [0, 1, 2]) == 0.0 and brier(np.eye(3), [1, 2, 0]) == pytest.approx(2.0)
    assert brier(np.array([[0.5, 0.5]]), [-1]) == pytest.approx(0.5)  # a tag the model does not answer


def test_threshold_sweep_counts_coverage_and_the_accuracy_of_what_it_keeps():
    probabilities = np.array([[0.95, 0.05], [0.85, 0.15], [0.6, 0.4], [0.55, 0.45]])
    sweep = threshold_sweep(probabilities, np.array([0, 1, 0, 1]), ["nlp", "other"], "other").set_index("threshold")
    assert sweep.loc[0.0, ["coverage", "accuracy_kept", "accuracy_all"]].tolist() == [1.0, 0.5, 0.5]
    assert sweep.loc[0.8, ["coverage", "accuracy_kept"]].tolist() == [0.5, 0.5]
    assert sweep.loc[0.8, "accuracy_all"] == 0.5  # rows 3 and 4 become "other": right for row 4 only
    assert sweep.loc[1.0, "coverage"] == 0.0 and np.isnan(sweep.loc[1.0, "accuracy_kept"])


def test_a_checkpoint_without_a_temperature_serves_with_one_and_a_bad_one_is_refused(tiny_checkpoint, tiny_encoder):
    assert not (tiny_checkpoint / CALIBRATION_FILE).exists() and read_temperature(tiny_checkpoint) == 1.0
    with Predictor.from_directories(tiny_checkpoint, tiny_encoder) as plain:
        assert plain.temperature == 1.0
        logits = plain.predict_logits(ROWS)
        np.testing.assert_allclose(plain.predict_proba(ROWS), softmax(logits), atol=1e-6)
    write_calibration(tiny_checkpoint, 0.25, source="test")
    with Predictor.from_directories(tiny_checkpoint, tiny_encoder) as sharp:
        got = sharp.predict(ROWS)
        expected = softmax(logits, 0.25)
        np.testing.assert_allclose(sharp.predict_proba(ROWS), expected, atol=1e-5)
        served = np.array([[row[tag] for tag in sharp.index_to_class] for row in got["probabilities"]])
        np.testing.assert_allclose(served, expected, atol=1e-5)
        assert list(got["prediction"]) == [sharp.index_to_class[i] for i in logits.argmax(axis=1)]
    for bad in (0, -1, "2", None):
        (tiny_checkpoint / CALIBRATION_FILE).write_text(json.dumps({"temperature": bad}))
        with pytest.raises(CheckpointError, match=r"calibration.json: 'temperature' must be a number > 0"):
            read_temperature(tiny_checkpoint)


def test_temperature_options_are_checked_before_anything_runs():
    assert calibration_choice("AUTO", None) == "auto" and calibration_choice("none", None) == "none"
    assert calibration_choice("1.7", None) == 1.7
    for bad in ("0", "-2", "hot", "inf"):
        with pytest.raises(OptionError, match="--temperature must be auto, none or a number > 0"):
            calibration_choice(bad, None)
    with pytest.raises(OptionError, match="--calibration-dataset refits the temperature: it needs --temperature auto"):
        calibration_choice("none", "cal.csv")


@pytest.mark.slow  # exports an ONNX graph
def test_torch_and_onnx_builds_apply_the_temperature_the_same_way(tmp_path, tiny_encoder):
    from mlflow_model.engines import onnx_engine
    from tagger.builds import sample_batches

    checkpoint = build_tiny_checkpoint(tmp_path / "checkpoint", tiny_encoder, seed=4, torch_format=False)
    write_calibration(checkpoint, 3.0, source="test")
    files = {CHECKPOINT_ARTIFACT: str(checkpoint), ENCODER_ARTIFACT: str(tiny_encoder)}
    config = PredictorConfig(engine="onnx", precision="fp32")
    onnx_files, onnx_config = onnx_engine.build(files, tmp_path / "onnx", config, sample_batches(files, config, ROWS))
    assert read_temperature(onnx_files[CHECKPOINT_ARTIFACT]) == 3.0  # the build carries it
    with Predictor.from_directories(checkpoint, tiny_encoder, PredictorConfig(forward="eager")) as torch_model, \
            Predictor.from_directories(onnx_files[CHECKPOINT_ARTIFACT], onnx_files[ENCODER_ARTIFACT],
                                       onnx_config) as onnx_model:
        for model in (torch_model, onnx_model):
            np.testing.assert_allclose(model.predict_proba(ROWS), softmax(model.predict_logits(ROWS), 3.0), atol=1e-5)
        np.testing.assert_allclose(onnx_model.predict_proba(ROWS), torch_model.predict_proba(ROWS), atol=1e-4)


def packaged_probabilities(version: str) -> np.ndarray:
    """A registered version's probabilities of ROWS, columns in its label order."""
    answers = mlflow.pyfunc.load_model(f"models:/tagger/{version}").predict(ROWS)["probabilities"]
    return np.array([list(row.values()) for row in answers])


@pytest.mark.slow  # packages four models
def test_package_temperature_auto_none_value_and_refit_are_shipped_and_recorded(tmp_path, tiny_encoder, tracking_uri):
    checkpoint = build_tiny_checkpoint(tmp_path / "checkpoint", tiny_encoder, seed=6)
    write_calibration(checkpoint, 2.0, fitted_on="validation split", ece_before=0.2, ece_after=0.01)
    log_training_run("exp", checkpoint, 0.5)
    calibration_csv = str(write_tiny_csv(tmp_path / "calibration.csv", rows_per_tag=6))

    def package(**options: object) -> tuple[dict, dict, dict]:
        """Package with options: the version's tags, the package run's params, the shipped calibration.json."""
        config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder), eval_dataset=calibration_csv,
                               predictor=PredictorConfig(max_request_rows=100), **options)
        version = package_best_run(config)
        params = MlflowClient().get_run(version.tags["package_run_id"]).data.params
        shipped = mlflow.artifacts.load_dict(f"models:/tagger/{version.version}/artifacts/checkpoint/{CALIBRATION_FILE}")
        return version.tags | {"version": str(version.version)}, params, shipped

    auto, params, shipped = package()
    assert (auto["temperature"], auto["temperature.source"], params["calibration.temperature"]) == ("2", "checkpoint", "2")
    assert shipped == {"temperature": 2.0, "source": "checkpoint", "fitted_on": "validation split",
                       "ece_before": 0.2, "ece_after": 0.01}
    off, params, shipped = package(temperature="none")
    assert (off["temperature"], params["calibration.source"], shipped["temperature"]) == ("1", "none", 1.0)
    given, _, shipped = package(temperature="0.5")
    assert (given["temperature"], given["temperature.source"], shipped["temperature"]) == ("0.5", "given", 0.5)
    refit, params, shipped = package(calibration_dataset=calibration_csv)
    expected = fit_on_dataset(str(checkpoint), str(tiny_encoder), calibration_csv)
    assert (refit["temperature.source"], shipped["fitted_on"]) == ("refit", calibration_csv)
    assert shipped["temperature"] == pytest.approx(expected.temperature, rel=1e-6)
    assert float(params["calibration.temperature"]) == pytest.approx(expected.temperature, rel=1e-5)

    # What each version serves: softmax(logits / T), logits being the same model's
    logits = np.log(packaged_probabilities(off["version"]))
    for version, temperature in ((auto["version"], 2.0), (given["version"], 0.5)):
        np.testing.assert_allclose(packaged_probabilities(version), softmax(logits, temperature), atol=1e-5)
    assert "temperature 2 (fitted on the training run's validation split)" in \
        MlflowClient().get_model_version("tagger", auto["version"]).description
