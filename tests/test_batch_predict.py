"""Batch inference on a real local Ray: several input files in, Parquet out, bad rows reported."""
from __future__ import annotations

import pandas as pd
import pytest
import ray
from click.testing import CliRunner
from conftest import build_tiny_checkpoint, log_training_run

from batch_predict import batch_predict, input_format
from cli import cli
from mlflow_model.config import BatchPredictConfig, PackageConfig, PredictorConfig
from mlflow_model.errors import InvalidInputError
from package import package_best_run
from registry import promote

TAGS = {"natural-language-processing", "computer-vision", "mlops", "other"}


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs for this module's tests, shut down afterwards."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def champion(tmp_path, tiny_encoder, tracking_uri) -> str:
    """A tiny model packaged from a training run, registered and aliased champion."""
    log_training_run("exp", build_tiny_checkpoint(tmp_path / "ckpt", tiny_encoder, seed=0), 0.5)
    config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder), predictor=PredictorConfig())
    version = package_best_run(config)
    promote(version.name, version.version)
    return "models:/tagger@champion"


@pytest.fixture
def input_files(tmp_path) -> dict[str, pd.DataFrame]:
    """Three files (CSV, JSON lines, Parquet); the CSV has rows 3 (null title) and 5 (both empty) bad."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    csv = pd.DataFrame({
        "id": [1, 2, 3, 4, 5, 6],
        "title": ["Transformer language model", "Video detection", None, "Deploy pipeline", "  ", "bert"],
        "description": ["bert text", "image vision", "no title here", None, "", "text " * 200],
    })
    csv.to_csv(folder / "a.csv", index=False)
    more = pd.DataFrame({"id": [10 + i for i in range(7)], "title": [f"image model {i}" for i in range(7)],
                         "description": ["vision data"] * 7})
    more.iloc[:4].to_json(folder / "b.jsonl", orient="records", lines=True)
    more.iloc[4:].to_parquet(folder / "c.parquet")
    return {"csv": csv, "json": more.iloc[:4], "parquet": more.iloc[4:], "folder": folder}


def test_format_comes_from_the_extension_or_is_named():
    assert input_format("s3://bucket/x/*.csv") == "csv"
    assert input_format("data/part.jsonl") == "json"
    assert input_format("folder", "parquet") == "parquet"
    with pytest.raises(InvalidInputError, match="pass --format"):
        input_format("folder")


def test_every_row_once_in_parquet_and_bad_rows_reported(local_ray, champion, input_files, tmp_path):
    folder, out = input_files["folder"], tmp_path / "out"
    summaries = [
        batch_predict(BatchPredictConfig(input=str(folder / "*.csv"), output=str(out / "csv"), batch_size=4)),
        batch_predict(BatchPredictConfig(input=str(folder / "b.jsonl"), output=str(out / "json"), concurrency=2)),
        batch_predict(BatchPredictConfig(input=str(folder / "c.parquet"), output=str(out / "parquet"))),
    ]
    written = pd.concat([pd.read_parquet(out / kind) for kind in ("csv", "json", "parquet")])
    assert sorted(written["id"]) == sorted([*range(1, 7), *range(10, 17)])  # every row exactly once
    bad = written[written["error"].notna()].set_index("id")
    assert set(bad.index) == {3, 5}
    assert "row 3" in bad.loc[3, "error"] and "'title' is null" in bad.loc[3, "error"]
    assert "row 5" in bad.loc[5, "error"] and "both empty" in bad.loc[5, "error"]
    assert bad["prediction"].isna().all() and bad["probabilities"].isna().all()
    good = written[written["error"].isna()]
    assert set(good["prediction"]) <= TAGS
    assert all(set(p) == TAGS and abs(sum(p.values()) - 1) < 1e-5 for p in good["probabilities"])
    assert list(written.columns[:3]) == ["id", "title", "description"]  # input columns kept, first
    assert [(s.rows, s.bad_rows) for s in summaries] == [(6, 2), (4, 0), (3, 0)]
    assert sorted(summaries[0].errors) == sorted(bad["error"])


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
    assert result.exit_code == 2 and "positive whole number" in result.output


def test_actors_never_take_the_cpus_that_reading_and_writing_need(local_ray):
    from batch_predict import actor_resources

    assert actor_resources(BatchPredictConfig(input="x.csv", output="o", concurrency=1)) == (0.75, 2)
    assert actor_resources(BatchPredictConfig(input="x.csv", output="o", concurrency=2)) == (0.375, 1)
    with pytest.raises(InvalidInputError, match="--concurrency 2 x --cpus-per-actor 1 needs more than the 0.75"):
        actor_resources(BatchPredictConfig(input="x.csv", output="o", concurrency=2, cpus_per_actor=1))
