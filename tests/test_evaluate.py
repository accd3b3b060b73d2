"""Evaluation (metrics, MLflow run, version tags) and the promotion gate, on a real sqlite store."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import CLASS_TO_INDEX, build_tiny_checkpoint
from mlflow.tracking import MlflowClient

from tagger.bundle import final_settings, log_pyfunc, stage_artifacts
from tagger.cli import cli
from tagger.evaluate import evaluate_model, slice_masks
from tagger.gate import decide, gated_promote
from mlflow_model.checkpoint import read_checkpoint, write_calibration, write_checkpoint
from mlflow_model.config import PredictorConfig
from tagger.config import EvaluateConfig
from mlflow_model.errors import TaggerError
from tagger.errors import PromotionRefused, RunSelectionError
from mlflow_model.preprocess import prepare_texts
from tagger.registry import champion_version, promote, register_version

NLP, CV, MLOPS, OTHER = CLASS_TO_INDEX  # "other" is absent from the evaluation CSV
ROWS = [
    ("Transformer language model", "Fine-tuning BERT for text classification.", NLP),
    ("Sentiment of reviews", "A text classifier for product reviews with a small model.", NLP),
    ("Chat with an LLM", "A GPT assistant.", NLP),
    ("Summaries of long news", "Sequence to sequence summarization of articles and reports.", NLP),
    ("Entity tagging", "Named entities in legal text.", NLP),
    ("Translation", "Machine translation between languages using an encoder decoder.", NLP),
    ("Video object detection", "Detect cars in video frames.", CV),
    ("Image segmentation", "Label every pixel of street images with a U-Net.", CV),
    ("Face detection", "Find faces in photos.", CV),
    ("Deploy a model pipeline", "Serve the model behind an API with Docker and monitoring.", MLOPS),
    ("Experiment tracking", "Log runs, metrics and artifacts.", MLOPS),
]
NUM_NLP = sum(tag == NLP for *_, tag in ROWS)
NAME = "tagger"


@pytest.fixture
def eval_csv(tmp_path) -> str:
    """A labelled CSV whose majority tag is NLP and which has no 'other' row."""
    path = tmp_path / "eval.csv"
    pd.DataFrame(ROWS, columns=["title", "description", "tag"]).to_csv(path, index=False)
    return str(path)


def constant_checkpoint(folder: Path, encoder: Path, tag: str) -> Path:
    """A checkpoint whose head ignores the text and always predicts `tag` (zero weights, one big bias)."""
    checkpoint = read_checkpoint(build_tiny_checkpoint(folder / "random", encoder, seed=0))
    checkpoint.state_dict["fc1.weight"] = torch.zeros_like(checkpoint.state_dict["fc1.weight"])
    bias = torch.zeros_like(checkpoint.state_dict["fc1.bias"])
    bias[CLASS_TO_INDEX[tag]] = 10.0
    checkpoint.state_dict["fc1.bias"] = bias
    return write_checkpoint(folder / "constant", checkpoint.state_dict, checkpoint.args, checkpoint.class_to_index)


def register(checkpoint: Path, encoder: Path, tmp_path: Path) -> str:
    """Bundle a checkpoint as a pyfunc of a package run and register it as a new version of NAME."""
    out = tmp_path / f"model-{checkpoint.parent.name}"
    artifacts = stage_artifacts(checkpoint, str(encoder), out)
    config, signature = final_settings(artifacts, PredictorConfig(max_request_rows=100))
    with mlflow.start_run(run_name="package") as run:
        pass
    info = log_pyfunc(artifacts, config, signature, run.info.run_id, out / "manifest")
    return str(register_version(info.model_uri, NAME, {}, "test version").version)


@pytest.fixture
def better_and_worse(tmp_path, tiny_encoder, tracking_uri) -> dict[str, str]:
    """Version 1 always answers the CSV's majority tag (NLP), version 2 always a tag absent from it."""
    better = constant_checkpoint(tmp_path / "better", tiny_encoder, NLP)
    worse = constant_checkpoint(tmp_path / "worse", tiny_encoder, OTHER)
    return {"better": register(better, tiny_encoder, tmp_path), "worse": register(worse, tiny_encoder, tmp_path)}


@pytest.mark.slow  # packages and registers models
def test_evaluation_is_logged_and_attached_to_the_version(tmp_path, tiny_encoder, tracking_uri, eval_csv):
    version = register(build_tiny_checkpoint(tmp_path / "random" / "c", tiny_encoder, seed=3), tiny_encoder, tmp_path)
    promote(NAME, version)
    results = evaluate_model(f"models:/{NAME}@champion", eval_csv)

    assert str(results["version"]) == version and results["overall"]["num_samples"] == len(ROWS)
    for values in [results["overall"], *results["per_class"].values(), results["slices"]["nlp_llm"]]:
        assert all(0.0 <= values[k] <= 1.0 for k in ("precision", "recall", "f1"))
    assert {NLP, CV, MLOPS} <= set(results["per_class"])
    assert results["per_class"][NLP]["num_samples"] == NUM_NLP
    assert results["slices"]["nlp_llm"]["num_samples"] == 2  # "transformer ... bert", "llm gpt"

    client = MlflowClient()
    run = client.get_run(results["run_id"])
    assert run.info.run_name == f"evaluate-{NAME}-v{version}-eval.csv"
    assert (run.data.tags["model_name"], run.data.tags["model_version"]) == (NAME, str(version))
    assert run.data.params["model"] == f"{NAME}-v{version}" and run.data.params["uri"] == f"models:/{NAME}@champion"
    assert f"**{NAME} v{version}**" in run.data.tags["mlflow.note.content"]
    assert set(run.data.metrics) == {"accuracy", "precision", "recall", "f1", "ece", "ece_noise_floor", "brier",
                                     "mean_confidence", "top_accuracy"}  # the rest is tables
    assert run.data.metrics["f1"] == pytest.approx(results["overall"]["f1"])
    calibration = results["calibration"]
    assert run.data.metrics["ece"] == pytest.approx(calibration["ece"]) and 0 <= calibration["ece"] <= 1
    assert 0 <= calibration["brier"] <= 2 and 0.25 <= calibration["mean_confidence"] <= 1
    logged = {a.path for a in client.list_artifacts(results["run_id"])}
    figures = {"confusion_matrix.png", "reliability_diagram.png", "per_tag_precision_recall.png", "threshold_sweep.png"}
    assert figures | {"evaluation.json", "evaluation_table.json", "threshold_sweep.json"} <= logged
    table = mlflow.load_table("evaluation_table.json", run_ids=[results["run_id"]])
    assert list(table["scope"]) == ["overall"] + ["tag"] * len(results["per_class"]) + ["slice", "slice"]
    nlp_row = table[(table["scope"] == "tag") & (table["name"] == NLP)].iloc[0]
    assert nlp_row["recall"] == pytest.approx(results["per_class"][NLP]["recall"], abs=1e-4)
    assert nlp_row["rows"] == NUM_NLP
    for figure in figures:
        png = mlflow.artifacts.download_artifacts(run_id=results["run_id"], artifact_path=figure)
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = mlflow.load_table("threshold_sweep.json", run_ids=[results["run_id"]])
    assert sweep["coverage"].iloc[0] == 1.0 and sweep["coverage"].is_monotonic_decreasing
    assert "ECE" in run.data.tags["mlflow.note.content"] and "threshold_sweep.png" in run.data.tags["mlflow.note.content"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["eval.csv"]

    model_version = client.get_model_version(NAME, version)
    assert float(model_version.tags["eval.f1"]) == pytest.approx(results["overall"]["f1"], abs=1e-4)
    assert model_version.tags["eval.run_id"] == results["run_id"]
    assert model_version.tags["eval.dataset"] == "eval.csv"  # its name, not a local path
    assert float(model_version.tags["eval.ece"]) == pytest.approx(calibration["ece"], abs=1e-4)
    headline = model_version.description.splitlines()[0]
    report = f"(#/experiments/{run.info.experiment_id}/runs/{results['run_id']})"
    assert headline.startswith(f"F1 {results['overall']['f1']:.4f}, ECE {calibration['ece']:.4f} on eval.csv "
                               f"([evaluation report]{report}) — ")
    assert "test version" in model_version.description  # the description given at registration stays below it
    assert model_version.source == f"models:/{results['model_id']}"  # the LoggedModel behind the version
    model_metrics = {m.key: m.value for m in mlflow.get_logged_model(results["model_id"]).metrics}
    assert model_metrics["f1"] == pytest.approx(results["overall"]["f1"])


def promote_runs(version: str) -> list:
    """The promote runs of a version, newest first."""
    return mlflow.search_runs(filter_string=f"attributes.run_name = 'promote-{NAME}-v{version}'",
                              search_all_experiments=True, output_format="list")


@pytest.mark.slow  # packages and registers models
def test_gate_refuses_worse_accepts_better_and_force_overrides(better_and_worse, eval_csv):
    better, worse = better_and_worse["better"], better_and_worse["worse"]
    client = MlflowClient()

    promoted, decision = gated_promote(NAME, better, eval_csv)  # no champion yet: accepted
    assert (str(promoted.version), decision.decision, decision.champion) == (better, "accepted", None)
    share = NUM_NLP / len(ROWS)  # always NLP: precision `share`, recall 1 on NLP rows, 0 elsewhere
    assert decision.challenger_f1 == pytest.approx(share * 2 * share / (1 + share))
    (run,) = promote_runs(better)
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("model_version", "previous_champion", "gate.decision", "gate.dataset")} == {
        "model_version": str(better), "previous_champion": "none", "gate.decision": "accepted",
        "gate.dataset": "eval.csv",
    }
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                  search_all_experiments=True, output_format="list")
    assert [child.info.run_name for child in children] == [f"evaluate-{NAME}-v{better}-eval.csv"]

    with pytest.raises(PromotionRefused, match=rf"version {worse} has F1 0.0000.*champion \(version {better}\)"):
        gated_promote(NAME, worse, eval_csv)
    assert champion_version(NAME) == better
    (refused,) = promote_runs(worse)  # the refusal is recorded too, and the run itself did not fail
    assert (refused.info.status, refused.data.tags["gate.decision"]) == ("FINISHED", "refused")
    assert refused.data.tags["previous_champion"] == str(better)
    assert "Refused" in refused.data.tags["mlflow.note.content"]
    assert client.get_model_version(NAME, better).current_stage == "Production"
    assert client.get_model_version(NAME, worse).tags["gate.decision"] == "refused"
    assert client.get_model_version(NAME, worse).tags["eval.f1"] == "0.0000"  # always "other", absent from the CSV

    promoted, decision = gated_promote(NAME, worse, eval_csv, force=True)
    assert (decision.decision, champion_version(NAME)) == ("forced", worse)
    assert decision.champion_f1 > decision.challenger_f1

    promoted, decision = gated_promote(NAME, better, eval_csv)  # better challenger replaces the champion
    assert (decision.decision, decision.champion, champion_version(NAME)) == ("accepted", worse, better)
    assert client.get_model_version(NAME, worse).current_stage == "Archived"
    assert f"v{worse}, the champion before it, is archived" in promote_runs(better)[0].data.tags["mlflow.note.content"]

    _, again = gated_promote(NAME, better, eval_csv)  # the champion itself: evaluated once, compared with itself
    assert (again.decision, again.champion, again.champion_f1) == ("accepted", better, again.challenger_f1)
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{promote_runs(better)[0].info.run_id}'",
                                  search_all_experiments=True, output_format="list")
    assert len(children) == 1


@pytest.mark.slow  # packages and registers models
def test_gate_refuses_a_worse_calibrated_challenger_with_the_same_f1_unless_forced(tmp_path, tiny_encoder, tracking_uri,
                                                                                   eval_csv):
    """Both versions always answer NLP (the same F1); the champion's temperature makes its confidence the share of
    NLP rows (ECE ~0), the challenger is ~100% sure (ECE ~0.45)."""
    share = NUM_NLP / len(ROWS)
    calibrated = constant_checkpoint(tmp_path / "calibrated", tiny_encoder, NLP)  # logits (10, 0, 0, 0)
    write_calibration(calibrated, 10.0 / math.log(3 * share / (1 - share)))  # softmax(logits / T)[NLP] == share
    champion = register(calibrated, tiny_encoder, tmp_path)
    challenger = register(constant_checkpoint(tmp_path / "sure", tiny_encoder, NLP), tiny_encoder, tmp_path)
    gated_promote(NAME, champion, eval_csv)

    with pytest.raises(PromotionRefused, match=rf"version {challenger} has F1 .* ECE 0.45.*champion \(version "
                                               rf"{champion}\) with F1 .* ECE 0.0000: ECE 0.45.. is more than 0.02 above"):
        gated_promote(NAME, challenger, eval_csv)
    assert champion_version(NAME) == champion
    tags = MlflowClient().get_model_version(NAME, challenger).tags
    assert tags["gate.decision"] == "refused" and tags["gate.challenger_f1"] == tags["gate.champion_f1"]
    assert float(tags["gate.champion_ece"]) < 0.001 and float(tags["gate.challenger_ece"]) == pytest.approx(1 - share, abs=1e-3)
    assert "F1" not in tags["gate.shortfalls"] and "ECE" in tags["gate.shortfalls"]
    (refused,) = promote_runs(challenger)
    assert refused.data.tags["gate.challenger_ece"] == tags["gate.challenger_ece"]

    _, decision = gated_promote(NAME, challenger, eval_csv, force=True)
    assert (decision.decision, champion_version(NAME)) == ("forced", challenger)
    assert decide(0.9, 0.9, force=False, challenger_ece=0.05, champion_ece=0.02) == "refused"
    assert decide(0.9, 0.9, force=False, challenger_ece=0.04, champion_ece=0.02) == "accepted"  # within 0.02
    assert decide(0.9, 0.9, force=True, challenger_ece=0.2, champion_ece=0.02) == "forced"


@pytest.mark.slow  # packages and registers models
def test_promote_without_a_gate_is_recorded_in_a_promote_run(better_and_worse):
    promoted, decision = gated_promote(NAME, better_and_worse["worse"], None)
    assert decision is None and champion_version(NAME) == better_and_worse["worse"]
    (run,) = promote_runs(better_and_worse["worse"])
    assert (run.data.tags["gate.decision"], run.data.tags["previous_champion"]) == ("not gated", "none")


@pytest.mark.slow  # packages and registers models
def test_cli_evaluate_prints_json_and_promote_refusal_is_one_line(better_and_worse, eval_csv):
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--model-uri", f"models:/{NAME}/1", "--dataset-loc", eval_csv])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["overall"]["f1"] > 0.3

    promote(NAME, better_and_worse["better"])
    args = ["promote", "--version", better_and_worse["worse"], "--eval-dataset", eval_csv]
    refused = runner.invoke(cli, args)
    assert refused.exit_code == 1 and "PromotionRefused: " in refused.output and "Traceback" not in refused.output
    forced = runner.invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0 and "Gate forced" in forced.output, forced.output
    assert champion_version(NAME) == better_and_worse["worse"]


def test_bad_inputs_raise_typed_errors(tmp_path, tracking_uri, eval_csv):
    with pytest.raises(RunSelectionError, match="models:/tagger@champion"):
        evaluate_model("models:/tagger@champion", eval_csv)
    unlabelled = tmp_path / "unlabelled.csv"
    pd.DataFrame({"title": ["a"], "description": ["b"]}).to_csv(unlabelled, index=False)
    with pytest.raises(TaggerError, match=r"missing column\(s\) \['tag'\]"):
        evaluate_model("models:/tagger/1", str(unlabelled))
    assert champion_version("tagger") is None


def test_decide_and_slices():
    assert decide(0.5, None, force=False) == "accepted"
    assert decide(0.5, 0.5, force=False) == "accepted"
    assert decide(0.4, 0.5, force=False) == "refused"
    assert decide(0.4, 0.5, force=True) == "forced"
    assert decide(0.45, 0.5, force=False, tolerance=0.1) == "accepted"
    frame = pd.DataFrame(ROWS, columns=["title", "description", "tag"])
    masks = slice_masks(frame["tag"], prepare_texts(frame), EvaluateConfig(short_text_max_words=6))
    assert masks["nlp_llm"].tolist() == [True, False, True, False, False, False, False, False, False, False, False]
    assert masks["short_texts"].tolist() == [i in (2, 8) for i in range(len(ROWS))]  # cleaned: 4 and 5 words
