"""A real `mlflow models serve` process on 127.0.0.1 serving the session's packaged model as models:/tagger/Production."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import CLASS_TO_INDEX, scoring_server

RECORDS = [
    {"title": "Transformer language model", "description": "bert text"},
    {"title": "Video object detection", "description": None},
]

pytestmark = pytest.mark.slow  # a real `mlflow models serve` process


@pytest.fixture(scope="module")
def server(packaged, tmp_path_factory) -> Iterator[str]:
    """The shared packaged model (promoted: stage Production), served; yields the base URL."""
    with scoring_server("models:/tagger/Production", packaged.tracking_uri, tmp_path_factory.mktemp("serving")) as url:
        yield url


def invoke(url: str, payload: dict) -> requests.Response:
    """POST a JSON payload to /invocations."""
    return requests.post(f"{url}/invocations", json=payload, timeout=60)


def check_predictions(body: dict, rows: int) -> None:
    """The seed's output shape: a tag and a probability for each tag, per row."""
    predictions = body["predictions"]
    assert len(predictions) == rows
    for item in predictions:
        assert item["prediction"] in CLASS_TO_INDEX
        assert set(item["probabilities"]) == set(CLASS_TO_INDEX)
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert item["prediction"] == max(item["probabilities"], key=item["probabilities"].get)


def test_dataframe_records_and_split_agree(server):
    records = invoke(server, {"dataframe_records": RECORDS})
    assert records.status_code == 200, records.text
    check_predictions(records.json(), len(RECORDS))
    split = invoke(server, {"dataframe_split": {
        "columns": ["title", "description"], "data": [[r["title"], r["description"]] for r in RECORDS]}})
    assert split.status_code == 200, split.text
    assert split.json() == records.json()


def test_params_reach_the_model(server):
    response = invoke(server, {"dataframe_records": RECORDS, "params": {"threshold": 1.0, "batch_size": 1}})
    assert response.status_code == 200, response.text
    assert [p["prediction"] for p in response.json()["predictions"]] == ["other", "other"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"dataframe_records": [{"title": "a"}]}, "description"),
        ({"dataframe_records": [{"title": 3, "description": "x"}]}, "title"),
        ({"dataframe_records": [{"title": "ok", "description": "x"}, {"title": "", "description": ""}]},
         "row 1: 'title' and 'description' are both empty"),
        ({"dataframe_records": [{"title": None, "description": "x"}]}, "row 0: column 'title' is null"),
        ({"dataframe_records": [{"title": "a", "description": 4.5}]}, "description"),
        ({"dataframe_records": [{"title": ["a", "b"], "description": "x"}]}, "title"),
        ({"dataframe_records": RECORDS, "params": {"threshold": 7}}, "param 'threshold'"),
        ({"dataframe_records": RECORDS, "params": {"batch_size": -1}}, "param 'batch_size'"),
    ],
)
def test_bad_input_is_a_400_without_traceback(server, payload, message):
    response = invoke(server, payload)
    assert response.status_code == 400, response.text
    body = response.json()
    assert message in body["message"]
    assert "stack_trace" not in body and "Traceback" not in response.text
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200  # still up
    assert invoke(server, {"dataframe_records": RECORDS[:1]}).status_code == 200


def test_a_request_over_the_row_limit_is_a_400_naming_it_and_batch_predict(server, packaged):
    max_rows = packaged.max_request_rows  # the packaged per-request row limit
    rows = [{"title": f"image model {i}", "description": "vision"} for i in range(max_rows + 1)]
    response = invoke(server, {"dataframe_records": rows})
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert f"at most {max_rows} rows" in message and "max_request_rows" in message and "batch-predict" in message
    full = invoke(server, {"dataframe_records": rows[:max_rows]})
    assert full.status_code == 200 and len(full.json()["predictions"]) == max_rows  # the limit itself is fine


def test_concurrent_clients_get_what_a_lone_client_gets(server):
    rows = [{"title": f"{word} project {i}", "description": "data " * (i % 7)}
            for i, word in enumerate(["bert", "vision", "deploy", "text", "image", "pipeline"] * 4)]
    alone = [invoke(server, {"dataframe_records": [row]}).json()["predictions"][0] for row in rows]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda row: invoke(server, {"dataframe_records": [row]}), rows * 3))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
    for expected, response in zip(alone * 3, responses):
        got = response.json()["predictions"][0]
        assert got["prediction"] == expected["prediction"]
        assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
