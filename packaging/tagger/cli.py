"""tagger's command line: `tagger --help` or `python -m tagger --help` (MLproject entry points call it too).

Every option's default is the field default of a config dataclass (`tagger.config`), shown in
`--help`; an empty value ("", as MLproject passes for an unset parameter) means that default.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import click
from mlflow.exceptions import MlflowException

from mlflow_model.config import VERIFY_KEY_VARIABLE, PredictorConfig
from mlflow_model.engines import build_name, build_names, split_build
from tagger.config import (
    SCHEDULERS,
    BatchPredictConfig,
    DistillConfig,
    PackageConfig,
    QuickstartConfig,
    ServeConfig,
    TrainConfig,
    champion_uri,
)

SIGNING_KEY_VARIABLE = "TAGGER_SIGNING_KEY"  # `tagger package --signing-key`, as a variable (a CI secret file's path)


# Quiet by default (`tagger --verbose` shows them): set before a local Ray starts, its processes inherit them.
QUIET_ENV = {
    "RAY_LOGGER_LEVEL": "error",  # Python logs of Ray's processes (e.g. PlacementGroupCleaner's state-API warnings)
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # preemptible cluster nodes only; it logs an actor-restart warning
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # Hugging Face download and weight-loading bars
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # MLflow's artifact download bars
}
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)  # "token authentication is enabled"


def configure_output(verbose: bool) -> None:
    """Hide Ray's internal warnings and download bars unless verbose; epoch lines and batch progress stay."""
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class TaggerCommand(click.Command):
    """A command that first checks that the MLflow tracking server answers (MLflow itself retries for minutes),
    and reports a request the server refused (wrong password, missing permission) as one line."""

    own_store = ("quickstart", "keygen")  # commands that set up their own local store, or need none

    def invoke(self, ctx: click.Context) -> Any:
        """Check the tracking server (a one-line ServiceError naming it), then run the command; a 401 or 403
        becomes an AuthenticationError or PermissionDeniedError naming the user, action and permission."""
        from tagger.access import access_error
        from tagger.sessions import check_tracking_server

        if self.name not in self.own_store:
            check_tracking_server()
        try:
            return super().invoke(ctx)
        except Exception as error:
            refused = access_error(error, self.name, ctx.params)
            if refused is None or refused is error:
                raise
            raise refused from None  # the raw error names only the endpoint; the chain is not shown


class TaggerGroup(click.Group):
    """A click group that prints tagger's and MLflow's errors as one line instead of a traceback."""

    command_class = TaggerCommand

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a TaggerError or MlflowException becomes a one-line error, exit 1."""
        try:
            return super().invoke(ctx)
        except MlflowException as error:  # TaggerError included
            raise click.ClickException(f"{type(error).__name__}: {error.message}") from error


class WholeNumber(click.ParamType):
    """An integer >= minimum that also accepts MLproject's float spelling ("2.0"), but not 2.5."""

    name = "integer"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if number < self.minimum or not number.is_integer():
            self.fail(f"{value!r} must be a whole number >= {self.minimum}", param, ctx)
        return int(number)


class Blankable(click.ParamType):
    """Another param type that reads "" (MLproject's unset parameter) as None: the built-in default."""

    def __init__(self, inner: Any) -> None:
        self.inner = click.types.convert_type(inner)
        self.name = self.inner.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return None if value in ("", None) else self.inner.convert(value, param, ctx)


def field_default(config: type, name: str) -> Any:
    """The default of a dataclass field, as stated in tagger.config."""
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def setting(flag: str, config: type, kind: Any = str, help: str = "", name: str | None = None,
            envvar: str | None = None) -> Any:
    """An option for a config field (or, if set, the environment variable): unset or "" means the field's
    default, which --help shows."""
    name = name or flag.lstrip("-").replace("-", "_")
    default = field_default(config, name)
    shown = "" if default is None else f" [default: {default}]"
    return click.option(flag, name, type=Blankable(kind), default=None, help=f"{help}{shown}".strip(),
                        envvar=envvar, show_envvar=envvar is not None)


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user set (None: not given, keep the config's default)."""
    return {k: v for k, v in values.items() if v is not None}


@click.group(cls=TaggerGroup)
@click.option("--verbose", is_flag=True, help="Show Ray's internal log lines and download progress bars.")
def cli(verbose: bool) -> None:
    """Train, package, register, promote and query the tagger model."""
    configure_output(verbose)


@cli.command()
@click.option("--experiment-name", required=True, help="MLflow experiment holding the training runs.")
@setting("--metric", PackageConfig, help="Run metric that ranks runs.")
@setting("--mode", PackageConfig, click.Choice(["ASC", "DESC"], case_sensitive=False), help="ASC: lowest first.")
@setting("--model-name", PackageConfig, help="Registered model name.")
@setting("--base-model", PackageConfig, help="Encoder folder or hub name (default: the run's, else bundled all-MiniLM-L6-v2).")
@setting("--threshold", PredictorConfig, click.FloatRange(0, 1),
         help="Top probability under which the tag becomes 'other' (stored in the model).")
@setting("--batch-size", PredictorConfig, WholeNumber(), help="Rows per forward pass (stored in the model).")
@click.option("--build", "build", type=Blankable(click.Choice(build_names())), default=None,
              help=f"Engine and precision of the served model: {', '.join(build_names())}. A build other than "
                   "torch-fp32 gets its F1 change "
                   f"against torch-fp32 measured and tagged. [default: {build_name('torch', 'fp32')}]")
@setting("--trace", PackageConfig, click.BOOL,
         help="torch builds: run a TorchScript trace of the model, checked against it at packaging (fp32: shipped "
              "in the model, so serving needs no transformers; bf16/int8-dynamic: traced at load). false: run it eagerly.")
@setting("--max-batch-rows", PredictorConfig, WholeNumber(), help="Serving: most rows of waiting requests run at once.")
@setting("--max-wait-ms", PredictorConfig, click.FloatRange(0), help="Serving: longest wait for more requests to batch.")
@setting("--max-request-rows", PredictorConfig, WholeNumber(),
         help="Serving: most rows one request may hold (default: measured at packaging, half the request timeout's worth).")
@setting("--eval-dataset", PackageConfig,
         help="Labelled CSV for a build's F1 change (default: the shipped tagger/datasets/projects.csv).")
@setting("--temperature", PackageConfig, help="Calibration: auto (the temperature fitted on the training run's "
         "validation split, or refitted on --calibration-dataset), none (1: off) or a number > 0 the logits are "
         "divided by before the softmax.")
@setting("--calibration-dataset", PackageConfig, help="Labelled CSV to refit the temperature on (with --temperature "
         "auto); not the CSV you evaluate the model on.")
@setting("--run-id", PackageConfig, help="Package this run of the experiment (default: the best run whose checkpoint "
         "downloads; runs whose checkpoint cannot be downloaded are skipped, each named with the reason).")
@setting("--signing-key", PackageConfig, envvar=SIGNING_KEY_VARIABLE,
         help="Private key file (PEM, elliptic curve; `tagger keygen`) that signs every file of the model into its "
              "model.sig (default: not signed).")
def package(experiment_name: str, **values: Any) -> None:
    """Package the best run of an experiment and register it as a new model version."""
    from mlflow_model.signature import FINGERPRINT_METADATA
    from tagger.package import SIGNED_TAG, package_best_run

    values = given(values)
    engine, precision = split_build(values.pop("build", build_name("torch", "fp32")))
    serving = {name for name in PredictorConfig.__dataclass_fields__ if name in values}
    predictor = PredictorConfig(engine=engine, precision=precision, **{name: values.pop(name) for name in serving})
    if "mode" in values:
        values["mode"] = values["mode"].upper()
    version = package_best_run(PackageConfig(experiment_name=experiment_name, predictor=predictor, **values))
    click.echo(f"Registered {version.name} version {version.version} ({build_name(predictor.engine, predictor.precision)}, "
               f"forward path {version.tags.get('forward')}) from run {version.tags['source_run_id']}")
    if version.tags.get(SIGNED_TAG) == "true":
        click.echo(f"signed with the key whose fingerprint is {version.tags[FINGERPRINT_METADATA]}")
    click.echo(f"Temperature {version.tags['temperature']} ({version.tags['temperature.source']})")
    if "accuracy.f1_delta" in version.tags:
        click.echo(f"weighted F1 change against torch fp32: {version.tags['accuracy.f1_delta']} "
                   f"(torch fp32 {version.tags.get('accuracy.reference_f1', '-')}, "
                   f"this build {version.tags.get('accuracy.f1', '-')})")


@cli.command()
@setting("--model-name", PackageConfig, help="Registered model name.")
@click.option("--version", type=Blankable(str), default=None, help="Version to promote (default: the newest).")
@click.option("--eval-dataset", type=Blankable(str), default=None,
              help="Labelled CSV: promote only if the version's F1 on it is not worse than the champion's, and its "
                   "ECE not more than 0.02 worse.")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              help="With --eval-dataset: promote even if the challenger scores or calibrates worse "
                   "(`--force` or `--force true`).")
def promote(model_name: str | None, version: str | None, eval_dataset: str | None, force: bool) -> None:
    """Promote a version: stage Production (previous one archived) and alias champion, in a promote run."""
    from tagger.gate import gated_promote

    model_name = model_name or field_default(PackageConfig, "model_name")
    promoted, decision = gated_promote(model_name, version, eval_dataset or None, force=force)
    if decision is not None:
        if decision.champion_error:
            champion = f"unknown (version {decision.champion} cannot be loaded: {decision.champion_error})"
        else:
            champion = (f"{decision.champion_f1:.4f}, ECE {decision.champion_ece:.4f} (version {decision.champion})"
                        if decision.champion else "none")
        worse = f" ({decision.shortfalls})" if decision.shortfalls else ""
        click.echo(f"Gate {decision.decision}: challenger F1 {decision.challenger_f1:.4f}, ECE "
                   f"{decision.challenger_ece:.4f}; champion F1 {champion}{worse}")
    click.echo(f"{promoted.name} version {promoted.version} is now {promoted.current_stage} and @champion")


@cli.command()
@click.option("--title", required=True)
@click.option("--description", default="")
@click.option("--model-uri", type=Blankable(str), default=None, help=f"Model to query. [default: {champion_uri()}]")
def predict(title: str, description: str, model_uri: str | None) -> None:
    """Predict the tag of one project and print it as JSON."""
    import pandas as pd

    from tagger.signing import load_model

    model = load_model(model_uri or champion_uri())
    result = model.predict(pd.DataFrame({"title": [title], "description": [description]}))
    click.echo(json.dumps(result.to_dict(orient="records"), indent=2))


@cli.command()
@click.option("--model-uri", type=Blankable(str), default=None,
              help=f"models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model, ... [default: {champion_uri()}]")
@click.option("--dataset-loc", required=True, help="Labelled CSV (title, description, tag), a path or URL.")
def evaluate(model_uri: str | None, dataset_loc: str) -> None:
    """Score a model on a labelled CSV, log it to MLflow, tag the version, print the metrics as JSON."""
    from tagger.evaluate import evaluate_model

    click.echo(json.dumps(evaluate_model(model_uri or champion_uri(), dataset_loc), indent=2))


def verify_key_option(flag: str) -> Any:
    """--public-key / --verify-key: the public key a model's signature must verify against (or TAGGER_VERIFY_KEY)."""
    return click.option(flag, "verify_key", type=Blankable(click.Path(dir_okay=False)), default=None,
                        envvar=VERIFY_KEY_VARIABLE, show_envvar=True,
                        help="Public key file (PEM): refuse a model whose signature does not verify against it.")


@cli.command()
@click.option("--model-uri", type=Blankable(str), default=None, help=f"Model to check. [default: {champion_uri()}]")
@verify_key_option("--public-key")
def verify(model_uri: str | None, verify_key: str | None) -> None:
    """Check a model's signature against a public key (if given), then its files against the SHA-256 manifest."""
    import tempfile
    from pathlib import Path

    from mlflow_model.signature import fingerprint, read_public_key
    from tagger.bundle import verify_folder, verify_package
    from tagger.signing import fetch_verified

    uri = model_uri or champion_uri()
    if not verify_key:
        click.echo(f"{uri}: {verify_package(uri)} artifact files match the manifest recorded at packaging")
        return
    key = read_public_key(verify_key)
    with tempfile.TemporaryDirectory() as tmp:  # a copy, as every loader checks it (a local folder too)
        checked = verify_folder(fetch_verified(uri, key, Path(tmp) / "model"))
    click.echo(f"{uri}: every file matches the signature of key {fingerprint(key)}; "
               f"{checked} artifact files match the manifest recorded at packaging")


@cli.command()
@verify_key_option("--verify-key")
@click.argument("model_uri")
@click.argument("dest", type=click.Path(file_okay=False))
def fetch(verify_key: str | None, model_uri: str, dest: str) -> None:
    """Download MODEL_URI into DEST and verify its signature: DEST then holds the verified copy, to serve with
    `mlflow models serve -m DEST` (DEST is made only if the model verifies)."""
    from mlflow_model.signature import fingerprint, read_public_key
    from tagger.signing import fetch_verified

    if not verify_key:
        raise click.UsageError(f"give the public key: --verify-key FILE (or {VERIFY_KEY_VARIABLE})")
    key = read_public_key(verify_key)
    folder = fetch_verified(model_uri, key, dest)
    click.echo(f"{model_uri}: verified with key {fingerprint(key)} into {folder}; serve that copy: "
               f"mlflow models serve -m {folder} --env-manager local")


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder that receives the private key (tagger-signing.pem, mode 0600) and the public key (.pub).")
def keygen(out: str) -> None:
    """Make a key pair to sign models with (P-256): the private key for CI, the public key for every server."""
    from mlflow_model.signature import fingerprint
    from tagger.signing import generate_key_pair

    private, public = generate_key_pair(out)
    click.echo(f"Private key: {private} (only its owner may read it; keep it in CI's secret store and give it to "
               f"`tagger package` as {SIGNING_KEY_VARIABLE})")
    click.echo(f"Public key:  {public} (copy it to every server: {VERIFY_KEY_VARIABLE} or --verify-key)")
    click.echo(f"Fingerprint: {fingerprint(public.read_bytes())}")


@cli.command("batch-predict")
@setting("--model-uri", BatchPredictConfig, help="Model to run.")
@click.option("--input", "input", required=True,
              help="CSV, Parquet or JSON-lines files: a path, a folder, a glob or a URI Ray Data reads (s3://...).")
@click.option("--output", required=True, help="A new or empty folder (or URI) that receives the Parquet files.")
@setting("--concurrency", BatchPredictConfig, WholeNumber(),
         help="Actors, each loading the model once (default: one per CPU core of the cluster, one thread each).")
@setting("--batch-size", BatchPredictConfig, WholeNumber(), help="Rows per call of an actor (length-sorted together before they run).")
@setting("--cpus-per-actor", BatchPredictConfig, click.FloatRange(min=0, min_open=True),
         help="Ray CPUs per actor (its torch threads: rounded); default: the cluster's CPUs shared out.")
@setting("--format", BatchPredictConfig, click.Choice(["csv", "parquet", "json"]), name="input_format",
         help="Input format (default: from the extension).")
@setting("--id-column", BatchPredictConfig,
         help="Input column that names a row in the error report; without it, a row is named by its text.")
@setting("--address", BatchPredictConfig, help="Ray cluster to join: host:port as `ray start` prints it, or auto "
         "(default: RAY_ADDRESS, else a local Ray).")
@verify_key_option("--verify-key")
def batch_predict(**values: Any) -> None:
    """Tag every row of CSV/Parquet/JSON-lines files on Ray Data and write Parquet (bad rows get an error)."""
    from tagger.batch_predict import batch_predict as run_batch

    summary = run_batch(BatchPredictConfig(**given(values)))
    click.echo(f"Wrote {summary.rows} rows to {summary.output}; {summary.bad_rows} bad row(s)")
    for error in summary.errors:
        click.echo(f"  {error}")
    if summary.bad_rows > len(summary.errors):
        click.echo(f"  ... and {summary.bad_rows - len(summary.errors)} more (rows whose 'error' is not null)")


def train_options(function: Any) -> Any:
    """Options shared by `train` and `sweep` (MLproject's `train` parameters, plus a few extras)."""
    T = TrainConfig  # noqa: N806
    options = [
        setting("--experiment-name", T, help="MLflow experiment that receives the run(s) (default: under `mlflow "
                "run`, the experiment of its run; else tagger)."),
        setting("--dataset-loc", T, help="CSV path or URL with title, description, tag (default: the shipped "
                "tagger/datasets/projects.csv)."),
        setting("--base-model", T, help="Encoder folder or Hugging Face name (default: bundled all-MiniLM-L6-v2)."),
        setting("--num-workers", T, WholeNumber(), help="Ray Train workers (data parallel)."),
        setting("--cpu-per-worker", T, WholeNumber(), help="Ray CPUs per worker, also its torch threads."),
        setting("--val-size", T, click.FloatRange(0, 1, min_open=True, max_open=True),
                help="Share of rows held out for validation (stratified)."),
        setting("--max-length", T, WholeNumber(), help="Tokens kept per text."),
        setting("--scheduler", T, click.Choice(SCHEDULERS), help="Learning-rate schedule."),
        setting("--warmup-ratio", T, click.FloatRange(0, 1, max_open=True)),
        setting("--weight-decay", T, click.FloatRange(0)),
        setting("--num-samples", T, WholeNumber(), help="Use only the first N rows."),
        setting("--storage-path", T, help="Folder or URI (s3://...) for Ray Train's checkpoints; on a multi-node "
                "cluster, storage every node reaches (default: a temporary folder, removed after)."),
        setting("--ray-address", T, help="Ray cluster to join: host:port as `ray start` prints it, or auto "
                "(default: RAY_ADDRESS, else a local Ray)."),
        setting("--max-failures", T, WholeNumber(minimum=0),
                help="Worker failures to recover from, resuming at the last epoch's checkpoint."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def single_run_options(function: Any) -> Any:
    """The hyperparameters of one run, shared by `train` and `distill` (`sweep` takes lists of them)."""
    T = TrainConfig  # noqa: N806
    options = [
        setting("--num-epochs", T, WholeNumber()),
        setting("--batch-size", T, WholeNumber(), help="Global batch size (split between workers)."),
        setting("--lr", T, click.FloatRange(0, min_open=True), help="Peak learning rate."),
        setting("--dropout-p", T, click.FloatRange(0, 1, max_open=True), help="Dropout before the head."),
        setting("--seed", T, WholeNumber(minimum=0), help="Seed of the split, the head and the batch order."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def echo_run_summary(result: Any) -> None:
    """The finished run as one JSON line: its id, best epoch and scores, and how long it trained."""
    click.echo(json.dumps({
        "run_id": result.run_id, "best_epoch": result.best_epoch,
        "val_loss": round(result.best_metrics["val_loss"], 4), "val_f1": round(result.best_metrics["val_f1"], 4),
        "train_minutes": round(result.train_seconds / 60, 2),
    }))


@cli.command()
@train_options
@single_run_options
@click.option("--run-name", type=Blankable(str), default=None, help="MLflow run name.")
def train(run_name: str | None, **values: Any) -> None:
    """Fine-tune the classifier on Ray Train; one MLflow run with metrics and its best checkpoint."""
    from tagger.train import train as train_model

    result = train_model(TrainConfig(**given(values)), run_name=run_name)
    echo_run_summary(result)


@cli.command()
@train_options
@single_run_options
@setting("--teacher", DistillConfig, help="Registered teacher version: models:/NAME@ALIAS, models:/NAME/N or "
         "models:/NAME/STAGE.")
@setting("--layers", DistillConfig, WholeNumber(), help="Encoder layers of the student (evenly spaced teacher "
         "layers, the last kept).")
@setting("--alpha", DistillConfig, click.FloatRange(0, 1), help="Weight of the teacher's soft labels in the loss "
         "(the rest: the true tags).")
@setting("--soft-temperature", DistillConfig, click.FloatRange(0, min_open=True), help="Softens both logits for the "
         "soft-label loss (not the calibration temperature, which the run fits on its validation rows).")
@click.option("--run-name", type=Blankable(str), default=None, help="MLflow run name.")
def distill(run_name: str | None, **values: Any) -> None:
    """Distil a registered teacher into a student with fewer encoder layers: one ordinary training run on Ray Train."""
    from tagger.distill import distill as distill_model

    values = given(values)
    own = {name: values.pop(name) for name in ("teacher", "layers", "alpha", "soft_temperature") if name in values}
    result = distill_model(DistillConfig(train=TrainConfig(**values), **own), run_name=run_name)
    echo_run_summary(result)


def number_list(kind: type) -> Any:
    """Parse a comma-separated list of numbers ("1e-4,5e-5")."""
    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> list:
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
@train_options
@click.option("--lr", "lrs", callback=number_list(float), default="",
              help="Learning rates to try, comma-separated (default: TrainConfig.lr x 0.5, 1, 2).")
@click.option("--dropout-p", "dropouts", callback=number_list(float), default="", help="Dropouts to try.")
@click.option("--batch-size", "batch_sizes", callback=number_list(int), default="", help="Batch sizes to try.")
@click.option("--num-epochs", "epochs", callback=number_list(int), default="", help="Epoch counts to try.")
@setting("--seed", TrainConfig, WholeNumber(minimum=0))
def sweep(lrs: list, dropouts: list, batch_sizes: list, epochs: list, **values: Any) -> None:
    """Train every combination of the listed values, one MLflow run each, into one experiment."""
    from tagger.sweep import grid, sweep as run_sweep

    if not (lrs or dropouts or batch_sizes or epochs):
        lrs = [TrainConfig.lr * 0.5, TrainConfig.lr, TrainConfig.lr * 2]
    outcome = run_sweep(
        TrainConfig(**given(values)), grid(lr=lrs, dropout_p=dropouts, batch_size=batch_sizes, num_epochs=epochs)
    )
    click.echo(json.dumps({
        "sweep_id": outcome.sweep_id, "runs": [r.run_id for r in outcome.results], "best_run_id": outcome.best.run_id,
        "best_val_loss": round(outcome.best.best_metrics["val_loss"], 4),
    }))


@cli.command()
@setting("--model-uri", ServeConfig, help="Model to serve: an alias or stage is followed (polled), models:/NAME/N is pinned.")
@setting("--host", ServeConfig, help="Address Ray Serve's HTTP proxy listens on.")
@setting("--port", ServeConfig, click.IntRange(1, 65535))
@setting("--replicas", ServeConfig, WholeNumber(), help="Fixed number of replicas.")
@setting("--min-replicas", ServeConfig, WholeNumber(minimum=0), help="Autoscale on ongoing requests from this many...")
@setting("--max-replicas", ServeConfig, WholeNumber(), help="...to this many replicas.")
@setting("--replica-cpus", ServeConfig, click.FloatRange(min=0, min_open=True),
         help="Ray CPUs per replica, also its model's inference threads (rounded, at least 1).")
@setting("--max-ongoing-requests", ServeConfig, WholeNumber(), help="Requests one replica takes at once.")
@setting("--poll-s", ServeConfig, click.FloatRange(min=0),
         help="Serving an alias or stage: look it up this often and roll out a new version (0: never).")
@setting("--serve-batch-size", ServeConfig, WholeNumber(minimum=0),
         help="Also batch requests with Ray Serve's @serve.batch, up to this many (0: only the model's own batching).")
@setting("--proxy-location", ServeConfig, click.Choice(["HeadOnly", "EveryNode"]),
         help="One HTTP proxy on the head node, or one per node (behind a load balancer).")
@setting("--ray-address", ServeConfig, help="Ray cluster to join: host:port as `ray start` prints it, or auto "
         "(default: RAY_ADDRESS, else a local Ray).")
@setting("--metrics-export-port", ServeConfig, click.IntRange(1, 65535),
         help="A local Ray's Prometheus metrics port (a cluster's: `ray start --metrics-export-port`).")
@click.option("--write-config", type=Blankable(click.Path(dir_okay=False)), default=None,
              help="Write a Ray Serve config file for `serve deploy FILE` instead of serving.")
@verify_key_option("--verify-key")
def serve(write_config: str | None, **values: Any) -> None:
    """Serve a registered model on Ray Serve (the HTTP API of `mlflow models serve`) until Ctrl-C."""
    from tagger.serve import run_in_foreground, write_config as write_serve_config

    values = given(values)
    if "replicas" in values and ({"min_replicas", "max_replicas"} & set(values)):
        raise click.UsageError("give --replicas N, or --min-replicas/--max-replicas (autoscaling), not both")
    config = ServeConfig(**values)
    if write_config:
        write_serve_config(config, write_config)
        click.echo(f"Wrote {write_config}: deploy it with `serve deploy {write_config}` on the cluster")
        return
    run_in_foreground(config, ready=lambda line: click.echo(line))


@cli.command()
@setting("--workdir", QuickstartConfig, help="Folder that receives mlflow.db (tracking + registry) and mlruns/ (artifacts).")
@setting("--experiment-name", QuickstartConfig)
@setting("--num-epochs", QuickstartConfig, click.IntRange(min=1))
def quickstart(**values: Any) -> None:
    """Train on the shipped data, package, register, promote and predict: the whole flow."""
    from tagger.quickstart import quickstart as run_quickstart

    run_quickstart(QuickstartConfig(**given(values)))


if __name__ == "__main__":
    cli()
