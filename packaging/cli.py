"""tagger's command line: `python packaging/cli.py --help` (MLproject entry points call it too)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules of this folder

from mlflow_model.config import MODEL_NAME, PackageConfig, PredictorConfig  # noqa: E402
from mlflow_model.errors import TaggerError  # noqa: E402


class TaggerGroup(click.Group):
    """A click group that prints tagger's typed errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TaggerError as error:
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
def package(experiment_name, metric, mode, model_name, base_model, threshold, batch_size) -> None:
    """Package the best run of an experiment and register it as a new model version."""
    from package import package_best_run

    config = PackageConfig(
        experiment_name=experiment_name, metric=metric, mode=mode.upper(), model_name=model_name,
        base_model=base_model or None,
        predictor=PredictorConfig(threshold=threshold, batch_size=batch_size),
    )
    version = package_best_run(config)
    click.echo(f"Registered {version.name} version {version.version} from run {version.tags['source_run_id']}")


@cli.command()
@click.option("--model-name", default=MODEL_NAME, show_default=True)
@click.option("--version", default="", help="Version to promote (default: the newest).")
def promote(model_name, version) -> None:
    """Promote a version: stage Production (previous one archived) and alias champion."""
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


if __name__ == "__main__":
    cli()
