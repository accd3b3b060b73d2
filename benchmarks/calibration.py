"""Calibration benchmark: ECE, F1 and confidence of every build of one trained model, calibrated and at T = 1.

    python benchmarks/calibration.py --dataset your-train.csv --holdout your-holdout.csv \
        --output outputs/calibration.json
    python benchmarks/calibration.py --tracking-uri sqlite:///mlflow.db --experiment tagger --holdout your-holdout.csv

With --dataset it trains one default run (TrainConfig's defaults, the temperature fitted on its
validation split) into a throwaway store; with --tracking-uri and --experiment it takes that
experiment's best run. It packages the run once per build (`--temperature auto`, registered as
--model-name) and once as torch-fp32 with `--temperature none`, loads each as the server does
and scores the holdout: weighted F1, accuracy, ECE (15 bins), Brier and mean confidence with the
packaged temperature and at T = 1 (the same build's logits). Then coverage and accuracy of the
answers a threshold keeps. Targets: ECE <= 0.03 (torch-fp32), <= 0.035 every build, F1 within
0.002 of T = 1, mean confidence within 0.02 of accuracy; `--check` exits 1 if one is missed.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUILDS = ("torch-fp32", "torch-bf16", "torch-int8", "onnx-fp32", "onnx-int8")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
GOAL_ECE, GOAL_ECE_ANY_BUILD, GOAL_F1_CHANGE, GOAL_CONFIDENCE_GAP = 0.03, 0.035, 0.002, 0.02


def scores_at(logits: np.ndarray, temperature: float, labels: np.ndarray, tags: list[str]) -> dict:
    """Weighted F1, accuracy, ECE, Brier, mean confidence of softmax(logits / temperature)."""
    from tagger.calibration import brier, ece, softmax, top_confidence
    from tagger.metrics import scores

    probabilities = softmax(logits, temperature)
    confidence, correct = top_confidence(probabilities, labels)
    predicted = [tags[i] for i in probabilities.argmax(axis=1)]
    truth = [tags[i] for i in labels]
    return {"temperature": temperature, "f1": scores(truth, predicted)["f1"], "accuracy": float(correct.mean()),
            "ece": ece(probabilities, labels), "brier": brier(probabilities, labels),
            "mean_confidence": float(confidence.mean()),
            "thresholds": {t: {"coverage": float((confidence >= t).mean()),
                               "accuracy": float(correct[confidence >= t].mean())} for t in THRESHOLDS}}


def build_scores(model_uri: str, holdout) -> tuple[np.ndarray, np.ndarray, dict]:
    """A packaged build's logits and served probabilities of the holdout, and its scores, calibrated and at T = 1."""
    import mlflow

    from tagger.calibration import label_indices, softmax

    model = mlflow.pyfunc.load_model(model_uri)
    predictor = model.unwrap_python_model().predictor
    try:
        logits = predictor.predict_logits(holdout[["title", "description"]])
        served = predictor.predict_proba(holdout[["title", "description"]])
    finally:
        predictor.close()
    labels = label_indices(list(holdout["tag"]), predictor.index_to_class, "holdout")
    calibrated = scores_at(logits, predictor.temperature, labels, predictor.index_to_class)
    assert np.abs(served - softmax(logits, predictor.temperature)).max() < 1e-5  # what it serves is what we score
    return logits, served, {"calibrated": calibrated,
                            "uncalibrated": scores_at(logits, 1.0, labels, predictor.index_to_class)}


def table(report: dict) -> str:
    """The report as plain-text tables."""
    head = (f"{'build':11} {'T':>6} {'F1 T=1':>7} {'F1':>7} {'acc':>6} {'ECE T=1':>8} {'ECE':>7} "
            f"{'conf T=1':>8} {'conf':>6} {'Brier T=1':>9} {'Brier':>6}")
    lines = [head]
    for build, s in report["builds"].items():
        u, c = s["uncalibrated"], s["calibrated"]
        lines.append(f"{build:11} {c['temperature']:6.3f} {u['f1']:7.4f} {c['f1']:7.4f} {c['accuracy']:6.3f} "
                     f"{u['ece']:8.4f} {c['ece']:7.4f} {u['mean_confidence']:8.3f} {c['mean_confidence']:6.3f} "
                     f"{u['brier']:9.4f} {c['brier']:6.4f}")
    reference = report["builds"]["torch-fp32"]
    lines += ["", "torch-fp32, answers a threshold keeps (the rest become 'other'): coverage / their accuracy",
              f"{'threshold':>9} {'T=1':>16} {'calibrated':>16}"]
    for t in THRESHOLDS:
        u, c = reference["uncalibrated"]["thresholds"][t], reference["calibrated"]["thresholds"][t]
        lines.append(f"{t:9.1f} {u['coverage']:7.1%} / {u['accuracy']:6.1%} {c['coverage']:7.1%} / {c['accuracy']:6.1%}")
    lines += ["", f"--temperature none (torch-fp32) serves T=1: max |p - softmax(logits)| = {report['none_check']:.2e}",
              "targets: " + ("MET" if report["goals_met"] else "MISSED")]
    return "\n".join(lines)


def goals_met(builds: dict) -> bool:
    """ECE <= 0.03 (torch-fp32) and <= 0.035 (each build), F1 within 0.002 of T=1, |confidence - accuracy| <= 0.02."""
    reference = builds["torch-fp32"]["calibrated"]
    ok = reference["ece"] <= GOAL_ECE
    for s in builds.values():
        c, u = s["calibrated"], s["uncalibrated"]
        ok &= c["ece"] <= GOAL_ECE_ANY_BUILD and abs(c["f1"] - u["f1"]) <= GOAL_F1_CHANGE
        ok &= abs(c["mean_confidence"] - c["accuracy"]) <= GOAL_CONFIDENCE_GAP
    return bool(ok)


def trained_store(dataset: str, tmp: str) -> tuple[str, str]:
    """Train one default run on dataset into a throwaway store; (tracking URI, experiment)."""
    import mlflow

    from tagger.config import TrainConfig
    from tagger.sessions import ray_session
    from tagger.train import train

    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with ray_session(num_cpus=TrainConfig.cpu_per_worker):
        train(TrainConfig(experiment_name="calibration-benchmark", dataset_loc=dataset))
    return uri, "calibration-benchmark"


@click.command()
@click.option("--holdout", required=True, help="Labelled CSV to score (never trained, tuned or calibrated on).")
@click.option("--dataset", default="", help="Training CSV: train one default run first (else --tracking-uri).")
@click.option("--tracking-uri", default="", help="Store holding --experiment's trained runs.")
@click.option("--experiment", default="", help="Experiment whose best run (by val_loss) is packaged.")
@click.option("--model-name", default="tagger-calibration", show_default=True, help="Registered model of the builds.")
@click.option("--builds", default=",".join(BUILDS), show_default=True, help="Comma-separated builds.")
@click.option("--output", default=str(ROOT / "outputs" / "calibration.json"), show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 unless every target is met.")
def main(holdout, dataset, tracking_uri, experiment, model_name, builds, output, check) -> None:
    """Package every build of one run, score each on --holdout calibrated and at T=1, print tables, write JSON."""
    import mlflow

    from mlflow_model.config import PredictorConfig
    from mlflow_model.engines import split_build
    from tagger.config import PackageConfig
    from tagger.data import load_data
    from tagger.package import package_best_run

    if not dataset and not (tracking_uri and experiment):
        raise click.UsageError("give --dataset (train a run) or --tracking-uri and --experiment")
    frame = load_data(holdout)
    with tempfile.TemporaryDirectory(prefix="tagger-calibration-") as tmp:
        tracking_uri, experiment = trained_store(dataset, tmp) if dataset else (tracking_uri, experiment)
        mlflow.set_tracking_uri(tracking_uri)
        results, logits = {}, {}
        for build in builds.split(","):
            engine, precision = split_build(build)
            config = PackageConfig(experiment_name=experiment, model_name=model_name,
                                   predictor=PredictorConfig(engine=engine, precision=precision))
            version = package_best_run(config)
            logits[build], _, results[build] = build_scores(f"models:/{model_name}/{version.version}", frame)
            results[build]["version"] = str(version.version)
        off = package_best_run(PackageConfig(experiment_name=experiment, model_name=model_name, temperature="none"))
        _, off_served, _ = build_scores(f"models:/{model_name}/{off.version}", frame)
    from tagger.calibration import softmax

    report = {"holdout": holdout, "experiment": experiment, "builds": results,
              "none_check": float(np.abs(off_served - softmax(logits["torch-fp32"])).max())}
    report["goals_met"] = goals_met(results)
    click.echo(table(report))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(report, indent=2, default=str))
    click.echo(f"report written to {output}")
    if check and not report["goals_met"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
