"""Batch inference on a real local Ray: several input files in, Parquet out, bad rows reported,
every row written once even when an actor process is killed mid-job."""
from __future__ import annotations

import glob
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray
from click.testing import CliRunner

from tagger.batch_predict import (
    STAGING_SUFFIX, SUCCESS_MARKER, TaggerActor, batch_predict, check_row_count, input_format,
)
from tagger.cli import cli
from tagger.config import BatchPredictConfig
from mlflow_model.errors import InvalidInputError
from tagger.errors import OptionError, ServiceError

TAGS = {"natural-language-processing", "computer-vision", "mlops", "other"}



@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs for this module's tests, shut down afterwards."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def champion(packaged_store) -> str:
    """The shared packaged model, aliased champion, its store the current one: what batch jobs tag with by default."""
    assert BatchPredictConfig(input="x.csv", output="o").model_uri == packaged_store.model_uri
    return packaged_store.model_uri


@pytest.fixture
def input_files(tmp_path) -> dict[str, pd.DataFrame]:
    """Two CSVs (bad rows 3, 5, 8), JSON lines without ids (one bad), Parquet whose description is all null."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    csv = pd.DataFrame({
        "id": [1, 2, 3, 4, 5, 6],
        "title": ["Transformer language model", "Video detection", None, "Deploy pipeline", "  ", "bert"],
        "description": ["bert text", "image vision", "no title here", None, "", "text " * 200],
    })
    csv.to_csv(folder / "a.csv", index=False)
    more_csv = pd.DataFrame({"id": [7, 8, 9], "title": ["image model", "  ", "data pipeline"],
                             "description": ["vision", "", "deploy"]})
    more_csv.to_csv(folder / "d.csv", index=False)
    json = pd.DataFrame({"title": ["image model 0", "", "image model 2"], "description": ["vision data", "", ""]})
    json.to_json(folder / "b.jsonl", orient="records", lines=True)
    parquet = pd.DataFrame({"id": [14, 15, 16], "title": [f"image model {i}" for i in range(3)],
                            "description": [np.nan] * 3})  # all-null: a float64 column in Parquet
    parquet.to_parquet(folder / "c.parquet")
    return {"csv": csv, "json": json, "parquet": parquet, "folder": folder}


def test_format_comes_from_the_extension_or_is_named():
    assert input_format("s3://bucket/x/*.csv") == "csv"
    assert input_format("data/part.jsonl") == "json"
    assert input_format("folder", "parquet") == "parquet"
    with pytest.raises(OptionError, match="pass --format") as refused:
        input_format("folder")
    assert not isinstance(refused.value, InvalidInputError)  # a command-line option, not a request's bad input


@pytest.mark.slow  # a real local Ray
def test_one_job_over_several_files_writes_every_row_once_in_parquet_with_bad_rows_reported(
    local_ray, champion, input_files, tmp_path
):
    out = tmp_path / "out"
    config = BatchPredictConfig(input=str(input_files["folder"] / "*.csv"), output=str(out), batch_size=4)
    summary = batch_predict(config)  # one job, two files
    written = pd.read_parquet(out)
    assert sorted(written["id"]) == list(range(1, 10))  # every row of both files, exactly once
    bad = written[written["error"].notna()].set_index("id")
    assert set(bad.index) == {3, 5, 8}
    assert bad.loc[3, "error"] == "row 3: column 'title' is null; it must be a string"
    assert bad.loc[5, "error"].startswith("row 5: ") and "both empty" in bad.loc[5, "error"]
    assert bad.loc[8, "error"].startswith("row 8: ") and "both empty" in bad.loc[8, "error"]
    assert bad["prediction"].isna().all() and bad["probabilities"].isna().all()
    good = written[written["error"].isna()]
    assert set(good["prediction"]) <= TAGS
    assert all(set(p) == TAGS and abs(sum(p.values()) - 1) < 1e-5 for p in good["probabilities"])
    assert list(written.columns[:3]) == ["id", "title", "description"]  # input columns kept, first
    assert (summary.rows, summary.bad_rows) == (9, 3) and sorted(summary.errors) == sorted(bad["error"])
    with pytest.raises(OptionError, match="already holds files"):
        batch_predict(config)  # a re-run never appends to (nor deletes) an earlier output
    assert sorted(pd.read_parquet(out)["id"]) == list(range(1, 10))


@pytest.mark.slow  # a real local Ray
def test_rows_without_ids_are_named_by_their_text_and_null_descriptions_are_predicted(
    local_ray, champion, input_files, tmp_path
):
    folder, out = input_files["folder"], tmp_path / "out"
    from_json = batch_predict(BatchPredictConfig(input=str(folder / "b.jsonl"), output=str(out / "j"), concurrency=2))
    from_parquet = batch_predict(BatchPredictConfig(input=str(folder / "c.parquet"), output=str(out / "p")))
    assert (from_json.rows, from_json.bad_rows, from_parquet.rows, from_parquet.bad_rows) == (3, 1, 3, 0)
    assert from_json.errors == ["row (title='', description=''): 'title' and 'description' are both empty"]
    parquet = pd.read_parquet(out / "p")
    assert sorted(parquet["id"]) == [14, 15, 16] and set(parquet["prediction"]) <= TAGS


def test_the_actor_predicts_good_rows_through_the_pyfunc_and_names_bad_ones(packaged):
    actor = object.__new__(TaggerActor)  # the actor's __call__ on the packaged pyfunc, without Ray
    actor.model, actor.id_column = packaged.model, "id"
    actor.probabilities_type = pa.struct([(tag, pa.float64()) for tag in packaged.model.metadata.metadata["labels"]])
    batch = pd.DataFrame({"id": [1, 2, 3], "title": ["image model", None, "bert text"], "description": [np.nan] * 3,
                          "extra": ["kept", "in", "output"]})
    rows = actor(batch)
    assert rows.column("error").to_pylist() == [None, "row 2: column 'title' is null; it must be a string", None]
    assert rows.column("extra").to_pylist() == ["kept", "in", "output"]
    expected = packaged.model.predict(pd.DataFrame({"title": ["image model", "bert text"], "description": [None, None]}))
    assert rows.column("prediction").to_pylist() == [expected["prediction"][0], None, expected["prediction"][1]]
    probabilities = rows.column("probabilities").to_pylist()
    assert probabilities[1] is None
    assert probabilities[0] == pytest.approx(expected["probabilities"][0])
    assert probabilities[2] == pytest.approx(expected["probabilities"][1])


@pytest.mark.slow  # a real local Ray
def test_cli_prints_the_bad_rows(local_ray, champion, input_files, tmp_path):
    result = CliRunner().invoke(cli, [
        "batch-predict", "--input", str(input_files["folder"] / "a.csv"), "--output", str(tmp_path / "o"),
        "--concurrency", "1.0", "--batch-size", "64.0",
    ])
    assert result.exit_code == 0, result.output
    assert "Wrote 6 rows" in result.output and "2 bad row(s)" in result.output
    assert "row 3: column 'title' is null" in result.output
    rows = pd.read_parquet(tmp_path / "o")
    assert len(rows) == 6 and rows["error"].notna().sum() == 2


def test_cli_rejects_a_fractional_concurrency(input_files, tmp_path):
    result = CliRunner().invoke(cli, ["batch-predict", "--input", "x.csv", "--output", "o", "--concurrency", "1.5"])
    assert result.exit_code == 2 and "must be a whole number >= 1" in result.output


@pytest.mark.slow  # a real local Ray
def test_actors_never_take_the_cpus_that_reading_and_writing_need(local_ray):
    from tagger.batch_predict import actor_resources

    assert actor_resources(BatchPredictConfig(input="x.csv", output="o", concurrency=1)) == (1, 0.75, 2)
    assert actor_resources(BatchPredictConfig(input="x.csv", output="o", concurrency=2)) == (2, 0.375, 1)
    assert actor_resources(BatchPredictConfig(input="x.csv", output="o")) == (2, 0.375, 1)  # one per core
    assert actor_resources(BatchPredictConfig(input="x.csv", output="o", cpus_per_actor=0.5)) == (1, 0.5, 1)
    with pytest.raises(OptionError, match="--concurrency 2 x --cpus-per-actor 1 needs more than the 0.75"):
        actor_resources(BatchPredictConfig(input="x.csv", output="o", concurrency=2, cpus_per_actor=1))


@pytest.fixture
def many_files(tmp_path) -> tuple[str, int]:
    """30 CSVs of 100 rows (ids 0..2999): a job still has most of its rows to predict when its first file is staged.

    (With 20 rows per file the tiny model's actor once finished every row before the first write
    landed in CI, so killing it then failed nothing.)
    """
    folder = tmp_path / "many"
    folder.mkdir()
    words = ["image model", "bert text", "deploy pipeline", "video detection", "data learning"]
    per_file = 100
    for number in range(30):
        ids = range(number * per_file, (number + 1) * per_file)
        pd.DataFrame({"id": list(ids), "title": [words[i % 5] for i in ids], "description": [f"row {i}" for i in ids]}
                     ).to_csv(folder / f"part-{number:02d}.csv", index=False)
    return str(folder / "*.csv"), 30 * per_file


@pytest.fixture
def mixed_files(tmp_path) -> tuple[str, pd.DataFrame]:
    """12 CSVs of 25 rows (ids 0..299, file k holds ids 25k..25k+24) with a row of no title every 29th."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    words = ["image model", "bert text", "deploy pipeline", "video detection", "data learning", "graph network"]
    ids = np.arange(300)
    rows = pd.DataFrame({"id": ids, "title": [None if i % 29 == 5 else f"{words[i % 6]} {i}" for i in ids],
                         "description": [" ".join(words[(i * 7 + k) % 6] for k in range(i % 9)) for i in ids]})
    for number in range(12):
        rows.iloc[number * 25 : number * 25 + 25].to_csv(folder / f"part-{number:02d}.csv", index=False)
    return str(folder / "*.csv"), rows


@pytest.mark.slow  # a real local Ray
def test_many_files_and_blocks_give_every_row_once_bad_rows_once_and_the_in_process_predictions(
    local_ray, champion, mixed_files, tmp_path
):
    pattern, rows = mixed_files
    out = tmp_path / "out"
    summary = batch_predict(BatchPredictConfig(input=pattern, output=str(out), batch_size=16, max_reported_errors=50))
    written = pd.read_parquet(out)
    assert sorted(written["id"]) == rows["id"].tolist()  # every row of every file, exactly once
    bad = set(rows.loc[rows["title"].isna(), "id"])
    assert set(written.loc[written["error"].notna(), "id"]) == bad
    assert summary.bad_rows == len(bad) == len(set(summary.errors)) == len(summary.errors)  # each reported once
    assert sorted(summary.errors) == sorted(f"row {i}: column 'title' is null; it must be a string" for i in bad)
    by_id = written.set_index("id").loc[rows["id"]]  # each output row carries its own input columns
    assert by_id["title"].fillna("").tolist() == rows["title"].fillna("").tolist()
    assert by_id["description"].fillna("").tolist() == rows["description"].tolist()
    # Row order across batches is Ray Data's (preserve_order off: batches run side by side), so no order is asserted.
    good = rows[rows["title"].notna()]
    import mlflow

    in_process = mlflow.pyfunc.load_model(champion, model_config={"max_request_rows": None})  # as the actors load it
    expected = in_process.predict(good[["title", "description"]])
    batch = by_id.loc[good["id"]]
    assert batch["prediction"].tolist() == expected["prediction"].tolist()  # the batch path is the in-process one
    for got, want in zip(batch["probabilities"], expected["probabilities"]):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.slow  # a real local Ray
def test_input_without_a_model_column_is_refused_before_any_work(local_ray, champion, tmp_path):
    pd.DataFrame({"id": [1], "title": ["image model"], "body": ["vision"]}).to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(OptionError, match=r"has no column\(s\) \['description'\]"):
        batch_predict(BatchPredictConfig(input=str(tmp_path / "in.csv"), output=str(tmp_path / "out")))
    assert not glob.glob(str(tmp_path / "out*"))


class Job(threading.Thread):
    """batch_predict in a thread, keeping its summary or its error."""

    def __init__(self, config: BatchPredictConfig):
        super().__init__(daemon=True)
        self.config, self.summary, self.error = config, None, None

    def run(self) -> None:
        try:
            self.summary = batch_predict(self.config)
        except Exception as error:  # noqa: BLE001 - the test asserts on it
            self.error = error


def actor_pids() -> set[int]:
    """PIDs of the batch actors of this test's local Ray (its processes descend from this one)."""
    import psutil

    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if "TaggerActor" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.Error:
            pass
    return pids


def kill_an_actor_mid_job(job: Job, output: str, timeout: float = 180) -> tuple[int, int, set[int]]:
    """Once the job has staged its first file, SIGKILL its actor; returns (pid, files staged then, actor pids seen after)."""
    job.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.is_alive():
        staged = glob.glob(f"{output}{STAGING_SUFFIX}*/*.parquet")
        pids = actor_pids()
        if staged and pids:
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the job never staged a file with an actor alive (error: {job.error})")
    later: set[int] = set()
    while job.is_alive() and time.monotonic() < deadline:
        later |= actor_pids()
        time.sleep(0.1)
    job.join(max(deadline - time.monotonic(), 1))
    return victim, len(staged), later - {victim}


@pytest.mark.slow  # a real local Ray
def test_a_killed_actor_is_restarted_and_every_row_is_written_once(local_ray, champion, many_files, tmp_path):
    pattern, rows = many_files
    out = str(tmp_path / "out")
    job = Job(BatchPredictConfig(input=pattern, output=out, batch_size=5))
    victim, staged_at_kill, restarted = kill_an_actor_mid_job(job, out)
    assert job.error is None, job.error
    assert restarted, f"no actor replaced the killed one ({victim})"
    written = pd.read_parquet(out)
    assert sorted(written["id"]) == list(range(rows))  # every row, exactly once
    assert staged_at_kill < len(glob.glob(f"{out}/*.parquet"))  # it was killed with work left
    assert os.path.exists(f"{out}/{SUCCESS_MARKER}") and not glob.glob(f"{out}{STAGING_SUFFIX}*")
    assert job.summary.rows == rows and written["error"].isna().all()


@pytest.mark.slow  # a real local Ray
def test_a_job_whose_actor_may_not_restart_fails_clearly_and_leaves_no_output(local_ray, champion, many_files, tmp_path):
    pattern, _ = many_files
    out = str(tmp_path / "out")
    job = Job(BatchPredictConfig(input=pattern, output=out, batch_size=5, actor_max_restarts=0))
    kill_an_actor_mid_job(job, out)
    assert isinstance(job.error, ServiceError), job.error
    assert job.error.message.startswith(f"batch job failed, nothing written to {out}: ")
    assert "\n" not in job.error.message
    assert not glob.glob(f"{out}/*") and not glob.glob(f"{out}{STAGING_SUFFIX}*")  # nothing that looks complete


@pytest.mark.slow  # a real local Ray
def test_a_staged_output_with_a_repeated_batch_is_refused(local_ray, tmp_path):
    rows = pd.DataFrame({"id": [1, 2, 3], "title": ["a", "b", "c"], "description": ["x", "y", "z"]})
    rows.to_csv(tmp_path / "in.csv", index=False)
    staged = tmp_path / "staged"
    staged.mkdir()
    rows.to_parquet(staged / "part-0.parquet")
    config = BatchPredictConfig(input=str(tmp_path / "in.csv"), output=str(tmp_path / "out"))
    check_row_count(config, str(staged))  # every row once: accepted
    rows.head(1).to_parquet(staged / "part-0-retried.parquet")  # a batch written twice
    with pytest.raises(ServiceError, match="wrote 4 rows for 3 input rows"):
        check_row_count(config, str(staged))
