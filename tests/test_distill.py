"""`tagger distill`: a student with fewer encoder layers, trained on Ray Train from a registered teacher, is an
ordinary run that links to its teacher and packages like any other (here as static int8)."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import build_tiny_checkpoint, copy_empty_store, log_training_run, mlflow_store, write_tiny_csv
from mlflow.tracking import MlflowClient

from mlflow_model.config import PredictorConfig
from tagger.cli import cli
from tagger.config import PackageConfig
from tagger.distill import layer_map, teacher_columns
from tagger.errors import OptionError
from tagger.package import package_best_run
from tagger.registry import promote
from tagger.train_loop import DISTILL_ALPHA_KEY, DISTILL_TEMPERATURE_KEY, TEACHER_LOGITS_KEY, make_loss


def test_student_layers_are_evenly_spaced_teacher_layers_with_the_last_kept():
    assert layer_map(6, 3) == [1, 3, 5]
    assert layer_map(6, 6) == list(range(6))
    assert layer_map(2, 1) == [1]
    with pytest.raises(OptionError, match="--layers"):
        layer_map(6, 7)


def test_teacher_columns_follow_the_students_label_map_and_refuse_other_tags():
    teacher = {"b": 0, "a": 1, "c": 2}
    assert teacher_columns(teacher, {"a": 0, "b": 1, "c": 2}) == [1, 0, 2]
    with pytest.raises(OptionError, match="differ from the teacher's"):
        teacher_columns(teacher, {"a": 0, "b": 1, "d": 2})


def test_distill_refuses_a_base_model_and_a_teacher_that_is_not_a_registered_version(tracking_uri):
    from tagger.config import DistillConfig, TrainConfig
    from tagger.distill import distill, teacher_version

    with pytest.raises(OptionError, match="--base-model"):
        distill(DistillConfig(train=TrainConfig(base_model="some-encoder")))
    with pytest.raises(OptionError, match="registered model URI"):
        teacher_version("runs:/abc/model")
    with pytest.raises(OptionError, match="names no registered version"):
        teacher_version("models:/tagger@champion")


def test_the_distillation_loss_mixes_soft_labels_and_true_tags():
    labels, teacher = [0, 1], [[4.0, 0.0], [0.0, 4.0]]
    logits, rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])
    plain = make_loss({"train_labels": labels})(logits, rows)
    hard = make_loss({"train_labels": labels, TEACHER_LOGITS_KEY: teacher, DISTILL_ALPHA_KEY: 0.0,
                      DISTILL_TEMPERATURE_KEY: 2.0})(logits, rows)
    soft = make_loss({"train_labels": labels, TEACHER_LOGITS_KEY: logits.tolist(), DISTILL_ALPHA_KEY: 1.0,
                      DISTILL_TEMPERATURE_KEY: 2.0})(logits, rows)
    assert float(hard) == pytest.approx(float(plain))  # alpha 0: only the true tags
    assert float(soft) == pytest.approx(0.0, abs=1e-6)  # alpha 1, student == teacher: nothing to learn


@pytest.mark.slow  # trains a student on Ray Train, packages it
def test_distill_trains_a_linked_student_that_packages_as_static_int8(tmp_path, tiny_encoder, empty_store):
    csv = write_tiny_csv(tmp_path / "tags.csv", rows_per_tag=6)
    with mlflow_store(copy_empty_store(empty_store, tmp_path), cwd=tmp_path):
        teacher_run = log_training_run("teachers", build_tiny_checkpoint(tmp_path / "teacher", tiny_encoder, 7), 0.5)
        teacher = promote("tagger", package_best_run(
            PackageConfig(experiment_name="teachers", base_model=str(tiny_encoder), eval_dataset=str(csv))).version)

        result = CliRunner().invoke(cli, [
            "distill", "--experiment-name", "students", "--dataset-loc", str(csv), "--layers", "1",
            "--num-epochs", "1", "--batch-size", "8", "--cpu-per-worker", "1", "--max-failures", "0",
        ])
        assert result.exit_code == 0, result.output
        summary = next(line for line in result.output.splitlines() if line.startswith('{"run_id"'))  # Ray may log after
        run = MlflowClient().get_run(json.loads(summary)["run_id"])
        tags = run.data.tags
        assert tags["distill.teacher_version"] == str(teacher.version) and tags["distill.teacher_model"] == "tagger"
        assert tags["distill.teacher_run_id"] == teacher_run and tags["distill.layers"] == "1 of 2"
        assert tags["distill.teacher_uri"] == "models:/tagger@champion" and run.info.status == "FINISHED"
        assert "best_val_loss" in run.data.metrics  # ranked like any run
        encoder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="encoder",
                                                           dst_path=str(tmp_path / "student")))
        assert json.loads((encoder / "config.json").read_text())["num_hidden_layers"] == 1

        version = package_best_run(PackageConfig(experiment_name="students", eval_dataset=str(csv),
                                                 predictor=PredictorConfig(engine="onnx", precision="int8")))
        assert version.tags["source_run_id"] == run.info.run_id
        assert version.tags["distill.teacher_version"] == str(teacher.version)
        assert version.tags["encoder"] == run.data.params["encoder"] == f"{tiny_encoder.name}-student-L1"
        model = mlflow.pyfunc.load_model(f"models:/tagger/{version.version}")
        assert model.model_config["calibration_rows"] > 0  # calibrated on the run's own training rows
        predictions = model.predict(pd.read_csv(csv).head(5)[["title", "description"]])
        assert len(predictions) == 5 and predictions["prediction"].notna().all()
