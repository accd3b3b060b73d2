"""tagger's command line: `python packaging/cli.py --help` (MLproject entry points call it too)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
# Sibling modules of this folder, and the project root so mlflow_model/ and training/ import
# even where the project is not pip-installed (e.g. `mlflow run . --env-manager conda`).
sys.path[:0] = [str(HERE), str(HERE.parent)]

from mlflow_model.config import (  # noqa: E402
    MODEL_NAME,
    BatchPredictConfig,
    PackageConfig,
    PredictorConfig,
    QuickstartConfig,
    TrainConfig,
)
from mlflow.exceptions import MlflowException  # noqa: E402


class TaggerGroup(click.Group):
    """A click group that prints tagger's and MLflow's errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; a TaggerError or MlflowException becomes a one-line error, exit 1."""
        try:
            return super().invoke(ctx)
        except MlflowException as error:  # TaggerError included
            raise click.ClickException(f"{type(error).__name__}: {error.message}") from error


@click.group(cls=TaggerGroup)
def cli() -> None:
    """Train, package, register, promote and query the tagger model."""


@cli.command()
@click.option("--experiment-name", required=True, help="MLflow experiment holding the training runs.")
@click.option("--metric", default="val_loss", show_default=True, help="Run metric that ranks runs.")
@click.option("--mode", type=click.Choice(["ASC", "DESC"], case_sensitive=False), default="ASC", show_default=True)
@click.option("--model-name", default=MODEL_NAME, show_default=True, help="Registered model name.")
@click.option("--base-model", default="", help="Encoder folder or hub name (default: bundled all-MiniLM-L6-v2).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=PredictorConfig.threshold, show_default=True,
              help="Top probability under which the tag becomes 'other' (stored in the model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=PredictorConfig.batch_size, show_default=True)
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="int8: dynamic int8 Linear layers at load (faster on CPU); its F1 change is measured and tagged.")
@click.option("--eval-dataset", default="", help="Labelled CSV for int8's F1 change (default: data/projects.csv).")
def package(experiment_name, metric, mode, model_name, base_model, threshold, batch_size, quantize,
            eval_dataset) -> None:
    """Package the best run of an experiment and register it as a new model version."""
    from package import package_best_run

    config = PackageConfig(
        experiment_name=experiment_name, metric=metric, mode=mode.upper(), model_name=model_name,
        base_model=base_model or None, eval_dataset=eval_dataset or None,
        predictor=PredictorConfig(
            threshold=threshold, batch_size=batch_size, quantize=None if quantize == "none" else quantize
        ),
    )
    version = package_best_run(config)
    click.echo(f"Registered {version.name} version {version.version} from run {version.tags['source_run_id']}")
    if quantize == "int8":
        click.echo(f"int8 weighted F1 change: {version.tags.get('int8.f1_delta')} "
                   f"(fp32 {version.tags.get('fp32.f1', '-')}, int8 {version.tags.get('int8.f1', '-')})")


@cli.command()
@click.option("--model-name", default=MODEL_NAME, show_default=True)
@click.option("--version", default="", help="Version to promote (default: the newest).")
@click.option("--eval-dataset", default="",
              help="Labelled CSV: promote only if the version's F1 on it is not worse than the champion's.")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              help="With --eval-dataset: promote even if the challenger scores worse (`--force` or `--force true`).")
def promote(model_name, version, eval_dataset, force) -> None:
    """Promote a version: stage Production (previous one archived) and alias champion."""
    if eval_dataset:
        from gate import gated_promote

        promoted, decision = gated_promote(model_name, version or None, eval_dataset, force=force)
        champion = f"{decision.champion_f1:.4f} (version {decision.champion})" if decision.champion else "none"
        click.echo(f"Gate {decision.decision}: challenger F1 {decision.challenger_f1:.4f}, champion F1 {champion}")
    else:
        from registry import promote as promote_version

        promoted = promote_version(model_name, version or None)
    click.echo(f"{promoted.name} version {promoted.version} is now {promoted.current_stage} and @champion")


@cli.command()
@click.option("--title", required=True)
@click.option("--description", default="")
@click.option("--model-uri", default=f"models:/{MODEL_NAME}@champion", show_default=True)
def predict(title, description, model_uri) -> None:
    """Predict the tag of one project and print it as JSON."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    result = model.predict(pd.DataFrame({"title": [title], "description": [description]}))
    click.echo(json.dumps(result.to_dict(orient="records"), indent=2))


@cli.command()
@click.option("--model-uri", default=f"models:/{MODEL_NAME}@champion", show_default=True,
              help="Model to evaluate: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model, ...")
@click.option("--dataset-loc", required=True, help="Labelled CSV (title, description, tag), a path or URL.")
def evaluate(model_uri, dataset_loc) -> None:
    """Score a model on a labelled CSV, log it to MLflow, tag the version, print the metrics as JSON."""
    from evaluate import evaluate_model

    click.echo(json.dumps(evaluate_model(model_uri, dataset_loc), indent=2))


class WholeNumber(click.ParamType):
    """An integer >= minimum that also accepts MLproject's float spelling ("2.0"), but not 2.5."""

    name = "integer"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if number < self.minimum or not number.is_integer():
            self.fail(f"{value!r} must be a whole number >= {self.minimum}", param, ctx)
        return int(number)


@cli.command("batch-predict")
@click.option("--model-uri", default=BatchPredictConfig.model_uri, show_default=True)
@click.option("--input", "input_path", required=True,
              help="CSV, Parquet or JSON-lines files: a path, a folder, a glob or a URI Ray Data reads (s3://...).")
@click.option("--output", required=True, help="A new or empty folder (or URI) that receives the Parquet files.")
@click.option("--concurrency", type=WholeNumber(), default=BatchPredictConfig.concurrency, show_default=True,
              help="Actors, each loading the model once.")
@click.option("--batch-size", type=WholeNumber(), default=BatchPredictConfig.batch_size, show_default=True)
@click.option("--cpus-per-actor", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Ray CPUs per actor (its torch threads: rounded); default: the cluster's CPUs shared out.")
@click.option("--format", "input_format", type=click.Choice(["csv", "parquet", "json"]), default=None,
              help="Input format (default: from the extension).")
@click.option("--id-column", default=BatchPredictConfig.id_column, show_default=True,
              help="Input column that names a row in the error report; without it, a row is named by its title and description (first 40 characters).")
@click.option("--address", default="", help="Ray cluster to join (e.g. auto, ray://head:10001); default: local Ray.")
def batch_predict(model_uri, input_path, output, concurrency, batch_size, cpus_per_actor, input_format, id_column,
                  address) -> None:
    """Tag every row of CSV/Parquet/JSON-lines files on Ray Data and write Parquet (bad rows get an error)."""
    from batch_predict import batch_predict as run_batch

    summary = run_batch(BatchPredictConfig(
        input=input_path, output=output, model_uri=model_uri, input_format=input_format, concurrency=concurrency,
        batch_size=batch_size, cpus_per_actor=cpus_per_actor, id_column=id_column, address=address or None,
    ))
    click.echo(f"Wrote {summary.rows} rows to {summary.output}; {summary.bad_rows} bad row(s)")
    for error in summary.errors:
        click.echo(f"  {error}")
    if summary.bad_rows > len(summary.errors):
        click.echo(f"  ... and {summary.bad_rows - len(summary.errors)} more (rows whose 'error' is not null)")


def _train_options(function):
    """Options shared by `train` and `sweep` (MLproject's `train` parameters, plus a few extras)."""
    T = TrainConfig  # noqa: N806

    options = [
        click.option("--experiment-name", default=T.experiment_name, show_default=True,
                     help="MLflow experiment that receives the run(s)."),
        click.option("--dataset-loc", default="",
                     help="CSV path or URL with title, description, tag (default: data/projects.csv)."),
        click.option("--base-model", default="",
                     help="Encoder folder or Hugging Face name (default: bundled all-MiniLM-L6-v2)."),
        click.option("--num-workers", type=WholeNumber(), default=T.num_workers, show_default=True,
                     help="Ray Train workers (data parallel)."),
        click.option("--cpu-per-worker", type=WholeNumber(), default=T.cpu_per_worker, show_default=True,
                     help="Ray CPUs per worker, also its torch threads."),
        click.option("--val-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=T.val_size,
                     show_default=True, help="Share of rows held out for validation (stratified)."),
        click.option("--max-length", type=WholeNumber(), default=T.max_length, show_default=True,
                     help="Tokens kept per text."),
        click.option("--scheduler", type=click.Choice(["linear", "cosine", "plateau", "constant"]),
                     default=T.scheduler, show_default=True, help="Learning-rate schedule."),
        click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), default=T.warmup_ratio,
                     show_default=True),
        click.option("--weight-decay", type=click.FloatRange(0), default=T.weight_decay, show_default=True),
        click.option("--num-samples", type=WholeNumber(), default=None, help="Use only the first N rows."),
        click.option("--storage-path", default="",
                     help="Folder for Ray Train's run files (default: a temporary folder, removed after)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _train_config(**values):
    """TrainConfig from CLI values ("" means the default)."""
    values = {k: v for k, v in values.items() if v is not None}
    for name in ("dataset_loc", "base_model", "storage_path"):
        values[name] = values.get(name) or None
    return TrainConfig(**values)


@cli.command()
@_train_options
@click.option("--num-epochs", type=WholeNumber(), default=TrainConfig.num_epochs, show_default=True)
@click.option("--batch-size", type=WholeNumber(), default=TrainConfig.batch_size, show_default=True,
              help="Global batch size (split between workers).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=TrainConfig.lr, show_default=True,
              help="Peak learning rate.")
@click.option("--dropout-p", type=click.FloatRange(0, 1, max_open=True), default=TrainConfig.dropout_p,
              show_default=True, help="Dropout before the head.")
@click.option("--seed", type=WholeNumber(minimum=0), default=TrainConfig.seed, show_default=True,
              help="Seed of the split, the head and the batch order.")
@click.option("--run-name", default="", help="MLflow run name.")
def train(run_name, **values) -> None:
    """Fine-tune the classifier on Ray Train; one MLflow run with metrics and its best checkpoint."""
    from training.train import train as train_model

    result = train_model(_train_config(**values), run_name=run_name or None)
    click.echo(json.dumps({
        "run_id": result.run_id, "best_epoch": result.best_epoch,
        "val_loss": round(result.best_metrics["val_loss"], 4), "val_f1": round(result.best_metrics["val_f1"], 4),
        "train_minutes": round(result.train_seconds / 60, 2),
    }))


def _number_list(kind):
    """Parse a comma-separated list of numbers ("1e-4,5e-5")."""
    def parse(ctx, param, value):
        if value in (None, ""):
            return []
        try:
            numbers = [float(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
        if kind is int:
            if any(n < 1 or not n.is_integer() for n in numbers):
                raise click.BadParameter(f"{value!r}: each value must be a positive whole number")
            numbers = [int(n) for n in numbers]
        return numbers
    return parse


@cli.command()
@_train_options
@click.option("--lr", "lrs", callback=_number_list(float), default="",
              help="Learning rates to try, comma-separated (default: TrainConfig.lr x 0.5, 1, 2).")
@click.option("--dropout-p", "dropouts", callback=_number_list(float), default="", help="Dropouts to try.")
@click.option("--batch-size", "batch_sizes", callback=_number_list(int), default="", help="Batch sizes to try.")
@click.option("--num-epochs", "epochs", callback=_number_list(int), default="", help="Epoch counts to try.")
@click.option("--seed", type=WholeNumber(minimum=0), default=TrainConfig.seed, show_default=True)
def sweep(lrs, dropouts, batch_sizes, epochs, **values) -> None:
    """Train every combination of the listed values, one MLflow run each, into one experiment."""
    from training.sweep import grid, sweep as run_sweep

    if not (lrs or dropouts or batch_sizes or epochs):
        lrs = [TrainConfig.lr * 0.5, TrainConfig.lr, TrainConfig.lr * 2]
    outcome = run_sweep(
        _train_config(**values), grid(lr=lrs, dropout_p=dropouts, batch_size=batch_sizes, num_epochs=epochs)
    )
    click.echo(json.dumps({
        "sweep_id": outcome.sweep_id, "runs": [r.run_id for r in outcome.results], "best_run_id": outcome.best.run_id,
        "best_val_loss": round(outcome.best.best_metrics["val_loss"], 4),
    }))


@cli.command()
@click.option("--workdir", default=QuickstartConfig.workdir, show_default=True,
              help="Folder that receives mlflow.db (tracking + registry) and mlruns/ (artifacts).")
@click.option("--experiment-name", default=QuickstartConfig.experiment_name, show_default=True)
@click.option("--num-epochs", type=click.IntRange(min=1), default=QuickstartConfig.num_epochs, show_default=True)
def quickstart(workdir, experiment_name, num_epochs) -> None:
    """Train on the shipped data, package, register, promote and predict: the whole flow."""
    from quickstart import quickstart as run_quickstart

    run_quickstart(QuickstartConfig(workdir=workdir, experiment_name=experiment_name, num_epochs=num_epochs))


if __name__ == "__main__":
    cli()
