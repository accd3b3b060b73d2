"""Batch inference on Ray Data: CSV / Parquet / JSON-lines files in, Parquet out.

The dataset streams through a pool of actors, each of which loads the registered model once
(`mlflow.pyfunc.load_model`) and calls its predict, the same path as online requests, with
`bad_rows="report"`: rows that fail the model's own validation get an `error` (row id + reason)
instead of failing their batch. Output: the input columns + `prediction`, `probabilities` (a struct, one field per
tag) and `error` (null when the row was predicted). The output folder must be new or empty, so
that it holds exactly one run's rows. Without an id column, an error names its row by its
(truncated) title and description.

With a verification key (`--verify-key`, TAGGER_VERIFY_KEY) the job first checks the model's
signature, then each actor loads only a downloaded copy whose signature it verified itself.

Exactly once: an actor whose process dies is restarted and its unfinished batches retried (Ray
Data's actor fault tolerance, bounded by `actor_max_restarts` / `actor_max_task_retries`). The job
writes into a staging folder beside the output (`<output>-incomplete-<id>`), checks that it holds
as many rows as the input, then moves the files into the output and writes `_SUCCESS` there. A job
that fails leaves the output empty and removes its staging folder.
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
import pyarrow as pa

from mlflow.exceptions import MlflowException

from mlflow_model.errors import CheckpointError
from mlflow_model.preprocess import INPUT_COLUMNS, is_missing
from mlflow_model.signature import read_public_key
from tagger.config import BatchPredictConfig
from tagger.errors import OptionError, ServiceError, one_line
from tagger.sessions import absolute_tracking_uri, ray_session
from tagger.signing import fetch_verified, load_verified

EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "json",
              ".ndjson": "json"}
NO_PREDICTIONS = pd.DataFrame(columns=["prediction", "probabilities", "error"])  # for an empty batch
STAGING_SUFFIX = "-incomplete-"  # <output>-incomplete-<id>: where a job writes before its rows are checked
SUCCESS_MARKER = "_SUCCESS"  # written into the output last: the output is complete


@dataclass
class BatchSummary:
    """What a batch job did: rows written, and the bad rows (all counted, the first few listed)."""

    rows: int
    bad_rows: int
    errors: list[str]
    output: str


def input_format(path: str, declared: str | None = None) -> str:
    """csv, parquet or json: as declared, else from the file extension."""
    if declared:
        if declared not in set(EXTENSIONS.values()):
            raise OptionError(f"--format must be one of csv, parquet, json; got {declared!r}")
        return declared
    extension = os.path.splitext(path.rstrip("/"))[1].lower()
    if extension not in EXTENSIONS:
        raise OptionError(f"cannot tell the format of input {path!r} from its extension; pass --format")
    return EXTENSIONS[extension]


def expand_paths(path: str) -> list[str]:
    """The files a glob matches (any fsspec filesystem), or the path itself when it has no wildcard."""
    if not any(char in path for char in "*?["):
        return [path]
    import fsspec

    filesystem, _ = fsspec.core.url_to_fs(path)
    matches = sorted(filesystem.unstrip_protocol(p) if "://" in path else p for p in filesystem.glob(path))
    if not matches:
        raise OptionError(f"input {path!r} matches no file")
    return matches


def read_input(path: str, declared_format: str | None = None, num_cpus: float = 1.0):
    """A Ray Dataset over the input files; CSV title/description are read as strings."""
    import pyarrow.csv
    import ray.data

    paths, kind = expand_paths(path), input_format(path, declared_format)
    if kind == "csv":
        strings = pyarrow.csv.ConvertOptions(  # empty fields are nulls, as pandas.read_csv reads them
            column_types={column: pa.string() for column in INPUT_COLUMNS}, strings_can_be_null=True
        )
        return ray.data.read_csv(paths, convert_options=strings, num_cpus=num_cpus)
    if kind == "parquet":
        return ray.data.read_parquet(paths, num_cpus=num_cpus)
    return ray.data.read_json(paths, lines=True, num_cpus=num_cpus)


def check_output(output: str) -> None:
    """Refuse an output that is a file or a folder holding files (write_parquet would add to them)."""
    import fsspec

    filesystem, folder = fsspec.core.url_to_fs(output)
    if not filesystem.exists(folder):
        return
    if not filesystem.isdir(folder):
        raise OptionError(f"--output {output!r} is a file; name a new or empty folder")
    if filesystem.find(folder):
        raise OptionError(
            f"--output {output!r} already holds files (an earlier run's?); name a new or empty folder"
        )


def row_reference(row: pd.Series, id_column: str) -> str:
    """'row <id>', or without an id: 'row (title=..., description=...)', texts cut to 40 characters."""
    def shown(value: Any) -> str:
        if isinstance(value, str):
            return repr(value if len(value) <= 40 else value[:40] + "...")
        return "null" if is_missing(value) else repr(value)

    if not is_missing(row.get(id_column)):
        return f"row {row[id_column]}"
    return "row (" + ", ".join(f"{c}={shown(row.get(c))}" for c in INPUT_COLUMNS) + ")"


def check_columns(dataset: Any, path: str) -> None:
    """Refuse, before any work, input files that lack a column the model needs."""
    schema = dataset.schema()  # reads the first block only
    missing = [column for column in INPUT_COLUMNS if schema is None or column not in schema.names]
    if missing:
        raise OptionError(
            f"input {path!r} has no column(s) {missing}; the model needs {list(INPUT_COLUMNS)}"
        )


class TaggerActor:
    """A Ray Data actor: loads the model once, then tags each batch through the model's own predict."""

    def __init__(self, model_uri: str, tracking_uri: str, registry_uri: str, num_threads: int, id_column: str,
                 verify_key_pem: str | None = None):
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        # The actor's own CPUs and nothing more; no online request-size limit for a batch job.
        settings = {"num_threads": num_threads, "inference_threads": 1, "max_request_rows": None}
        if verify_key_pem:  # only a copy whose signature verified, checked here before any model code runs
            self.model = load_verified(model_uri, verify_key_pem.encode(), model_config=settings)
        else:
            self.model = mlflow.pyfunc.load_model(model_uri, model_config=settings)
        labels = (self.model.metadata.metadata or {}).get("labels")
        if not labels:
            raise CheckpointError(f"{model_uri} records no labels in its metadata; repackage it with `tagger package`")
        self.probabilities_type = pa.struct([(tag, pa.float64()) for tag in labels])
        self.id_column = id_column

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        """The batch's columns + prediction, probabilities and error (bad rows are reported, not predicted)."""
        table = pa.Table.from_pandas(batch, preserve_index=False)
        if batch.empty:
            predictions = NO_PREDICTIONS
        else:  # object columns: a column of nulls is a bad row each, not a type error of the whole batch
            inputs = batch[list(INPUT_COLUMNS)].astype(object)
            predictions = self.model.predict(inputs, params={"bad_rows": "report"})
        errors = [
            None if problem is None else f"{row_reference(batch.iloc[position], self.id_column)}: {problem}"
            for position, problem in enumerate(predictions["error"])
        ]
        table = table.append_column("prediction", pa.array(predictions["prediction"].tolist(), pa.string()))
        table = table.append_column(
            "probabilities", pa.array(predictions["probabilities"].tolist(), self.probabilities_type)
        )
        return table.append_column("error", pa.array(errors, pa.string()))


def actor_resources(config: BatchPredictConfig) -> tuple[int, float, int]:
    """(actors, Ray CPUs per actor, torch threads per actor); the CPUs always leave room for Ray Data's own tasks.

    By default one single-threaded actor per core: small matrices scale poorly across threads, and
    any other process stalls a multi-threaded pass (docs/benchmarks.md compares the two). Actors that hold every Ray CPU starve the file listing,
    read and write tasks and the job never ends, so actors share what `reserved_cpus` leaves; each
    actor's threads are its node's cores shared among the actors placed there (I/O tasks are short).
    """
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]] or [0.0]
    free = total - config.reserved_cpus
    if config.concurrency:
        actors = config.concurrency
    elif config.cpus_per_actor:
        actors = max(1, int(free // config.cpus_per_actor))
    else:
        actors = max(1, int(sum(nodes)))
    cpus = config.cpus_per_actor or min(max(nodes), free / actors)
    if cpus <= 0 or cpus * actors > free + 1e-9:
        raise OptionError(
            f"--concurrency {actors} x --cpus-per-actor {cpus:g} needs more than the {max(free, 0):g} "
            f"of {total:g} Ray CPUs left to actors (Ray Data's I/O tasks keep {config.reserved_cpus:g}); "
            "lower one of them"
        )
    if config.cpus_per_actor:
        return actors, cpus, max(1, round(cpus))
    actors_per_node = math.ceil(actors / len(nodes))
    return actors, cpus, max(1, int(max(nodes) // actors_per_node))


def parquet_files(folder: str) -> Any:
    """The Parquet files of a folder or URI as one pyarrow dataset (row counts come from their footers)."""
    import fsspec
    import pyarrow.dataset

    filesystem, path = fsspec.core.url_to_fs(folder)
    return pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet")  # skips _SUCCESS


def summarize(output: str, config: BatchPredictConfig) -> BatchSummary:
    """Count the rows written and collect the bad ones from the output's `error` column."""
    import pyarrow.dataset

    written = parquet_files(output)
    bad = written.to_table(columns=["error"], filter=pyarrow.dataset.field("error").is_valid())
    errors = bad.column("error").to_pylist()
    return BatchSummary(rows=written.count_rows(), bad_rows=len(errors), errors=errors[: config.max_reported_errors],
                        output=output)


def batch_predict(config: BatchPredictConfig) -> BatchSummary:
    """Tag every row of the input files with the model and write Parquet; return the summary."""
    check_output(config.output)
    if config.verify_key:  # refuse an unverifiable model in one line before any work; each actor checks its copy
        shutil.rmtree(fetch_verified(config.model_uri, read_public_key(config.verify_key)))
    with ray_session(config.address):
        return run_job(config)


def run_job(config: BatchPredictConfig) -> BatchSummary:
    """Tag into a staging folder, check every input row is there once, publish it, summarize the output."""
    staging = f"{config.output.rstrip('/')}{STAGING_SUFFIX}{uuid.uuid4().hex[:8]}"
    try:
        write_predictions(config, staging)
        check_row_count(config, staging)
        publish(staging, config.output)
    except MlflowException:  # tagger's own errors (bad input, resources) are already one line
        raise
    except Exception as error:  # e.g. an actor that died more often than it may be restarted
        raise ServiceError(f"batch job failed, nothing written to {config.output}: {one_line(error)}") from error
    finally:
        remove_folder(staging)
    return summarize(config.output, config)


@contextmanager
def block_size(megabytes: float) -> Iterator[None]:
    """Ray Data's largest block, for the datasets made inside: small blocks reach the actors and the
    output files early (Ray Data's 128 MB default makes one block of a whole input file)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    default, context.target_max_block_size = context.target_max_block_size, int(megabytes * 2**20)
    try:
        yield
    finally:
        context.target_max_block_size = default


def write_predictions(config: BatchPredictConfig, folder: str) -> None:
    """Read, tag (actors restarted and batches retried after a crash) and write Parquet into folder."""
    actors, cpus, threads = actor_resources(config)
    # Ray 2.60 takes these only as **ray_remote_args of map_batches (deprecated, no named parameter yet).
    retries = {"max_restarts": config.actor_max_restarts}
    if config.actor_max_restarts != 0:  # an actor that is not restarted has no batches to retry
        retries["max_task_retries"] = config.actor_max_task_retries
    with warnings.catch_warnings(), block_size(config.block_mb):
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        dataset = read_input(config.input, config.input_format, config.io_cpus)
        check_columns(dataset, config.input)
        dataset = dataset.map_batches(
            TaggerActor,
            fn_constructor_kwargs={
                "model_uri": config.model_uri,
                "tracking_uri": absolute_tracking_uri(mlflow.get_tracking_uri()),
                "registry_uri": absolute_tracking_uri(mlflow.get_registry_uri()),
                "num_threads": threads,
                "id_column": config.id_column,
                "verify_key_pem": read_public_key(config.verify_key).decode() if config.verify_key else None,
            },
            concurrency=actors,
            batch_size=config.batch_size,
            batch_format="pandas",
            num_cpus=cpus,
            **retries,
        )
        dataset.write_parquet(folder, ray_remote_args={"num_cpus": config.io_cpus})


def check_row_count(config: BatchPredictConfig, folder: str) -> None:
    """Refuse a staged output whose row count differs from the input's (a lost or duplicated batch)."""
    expected = read_input(config.input, config.input_format, config.io_cpus).count()
    written = parquet_files(folder).count_rows() if expected else 0
    if written != expected:
        raise ServiceError(
            f"the job wrote {written} rows for {expected} input rows (a lost or repeated batch); "
            f"nothing written to {config.output}"
        )


def publish(staging: str, output: str) -> None:
    """Move the staged files into the output folder, then mark it complete with _SUCCESS."""
    import fsspec

    filesystem, folder = fsspec.core.url_to_fs(staging)
    _, target = fsspec.core.url_to_fs(output)
    filesystem.makedirs(target, exist_ok=True)
    for path in filesystem.find(folder):
        filesystem.mv(path, f"{target.rstrip('/')}/{os.path.relpath(path, folder)}")
    filesystem.pipe_file(f"{target.rstrip('/')}/{SUCCESS_MARKER}", b"")


def remove_folder(path: str) -> None:
    """Delete a folder and its files if it exists (a staging folder after the job)."""
    import fsspec

    filesystem, folder = fsspec.core.url_to_fs(path)
    if filesystem.exists(folder):
        filesystem.rm(folder, recursive=True)
