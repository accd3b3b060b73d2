"""InferenceThread: one thread runs every forward pass, on rows gathered from concurrent requests."""
from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest

from mlflow_model.config import PredictorConfig
from mlflow_model.errors import InferenceError
from mlflow_model.inference import InferenceThread


def fake_probabilities(token_ids: list[list[int]]) -> np.ndarray:
    """Deterministic per-row 'probabilities' derived from the token ids alone."""
    rows = np.array([[sum(ids) % 7 + 1, len(ids) + 1, (ids[0] if ids else 0) % 5 + 1] for ids in token_ids], float)
    rows = rows.reshape(len(token_ids), 3)
    return (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)


class FakeForward:
    """A forward that records each call (rows, batch_size, thread) and can be held or made to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []
        self.lengths: list[list[int]] = []  # per call: the length of each row it got
        self.alone: list[bool] = []  # per call: whether the thread said it ran alone
        self.release = threading.Event()
        self.release.set()
        self.fail_next: Exception | None = None

    def __call__(self, token_ids: list[list[int]], batch_size: int, alone: bool = False) -> np.ndarray:
        self.alone.append(alone)
        self.calls.append((len(token_ids), batch_size, threading.current_thread().name))
        self.lengths.append([len(ids) for ids in token_ids])
        self.release.wait(30)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return fake_probabilities(token_ids)


def request_rows(seed: int, count: int) -> list[list[int]]:
    """`count` rows of 1-20 token ids."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=int(rng.integers(1, 21))).tolist() for _ in range(count)]


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll until condition() is true; fail the test if it never is (a hang guard, not a speed check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout:g} s: the threads hang")
        time.sleep(0.001)


@pytest.fixture
def forward():
    return FakeForward()


@pytest.fixture
def make_thread():
    """Build InferenceThreads that are closed after the test."""
    made = []

    def make(forward, warmup=None, name="tagger-inference", **settings) -> InferenceThread:
        settings.setdefault("inference_threads", 1)
        made.append(InferenceThread(forward, PredictorConfig(**settings), warmup=warmup, name=name))
        return made[-1]

    yield make
    for thread in made:
        thread.close()


def test_concurrent_submits_get_what_sequential_calls_get(forward, make_thread):
    inference = make_thread(forward, max_batch_rows=16, max_wait_ms=5)
    requests = [request_rows(seed, count=1 + seed % 4) for seed in range(64)]
    expected = [fake_probabilities(rows) for rows in requests]
    answers: dict[int, np.ndarray] = {}
    start = threading.Barrier(16)

    def client(index: int) -> None:
        start.wait()
        for i in range(index, len(requests), 16):
            answers[i] = inference.submit(requests[i], batch_size=8)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(30)
    assert sorted(answers) == list(range(len(requests)))
    for i, rows in enumerate(requests):
        np.testing.assert_array_equal(answers[i], expected[i])
    assert len(forward.calls) < len(requests)  # some requests really shared a forward
    assert all(rows <= 16 for rows, _, _ in forward.calls)
    assert {name for _, _, name in forward.calls} == {"tagger-inference"}


def test_waiting_requests_are_gathered_into_one_forward(forward, make_thread):
    inference = make_thread(forward, max_batch_rows=64, max_wait_ms=50)
    forward.release.clear()  # the first request holds the thread while five more queue up
    results: dict[int, np.ndarray] = {}
    requests = {i: request_rows(i, count=2) for i in range(6)}

    def client(i: int) -> None:
        results[i] = inference.submit(requests[i], batch_size=32 - i)

    first = threading.Thread(target=client, args=(0,))
    first.start()
    wait_until(lambda: len(forward.calls) == 1)
    others = [threading.Thread(target=client, args=(i,)) for i in range(1, 6)]
    for c in others:
        c.start()
    wait_until(lambda: inference._queue.qsize() == 5)
    forward.release.set()
    for c in [first, *others]:
        c.join(10)
    assert [(rows, size) for rows, size, _ in forward.calls] == [(2, 32), (10, 27)]  # smallest batch_size wins
    for i, rows in requests.items():
        np.testing.assert_array_equal(results[i], fake_probabilities(rows))


def test_a_request_larger_than_max_batch_rows_is_split_and_reassembled(forward, make_thread):
    inference = make_thread(forward, max_batch_rows=4, max_wait_ms=1)
    rows = request_rows(7, count=10)
    np.testing.assert_array_equal(inference.submit(rows, batch_size=64), fake_probabilities(rows))
    assert [calls for calls, _, _ in forward.calls] == [4, 4, 2]


def test_a_large_request_is_length_sorted_as_a_whole_before_it_is_split(forward, make_thread):
    inference = make_thread(forward, max_batch_rows=8, max_wait_ms=0)
    rows = request_rows(11, count=40)
    np.testing.assert_array_equal(inference.submit(rows, batch_size=64), fake_probabilities(rows))
    assert [n for n, _, _ in forward.calls] == [8] * 5
    seen = [length for call in forward.lengths for length in call]
    assert seen == sorted(len(ids) for ids in rows)  # chunk after chunk, shortest rows first


def test_empty_request_returns_no_rows(forward, make_thread):
    inference = make_thread(forward)
    assert inference.submit([], batch_size=8).shape == (0, 3)


def test_a_failing_forward_fails_its_batch_only(forward, make_thread):
    inference = make_thread(forward, max_wait_ms=1)
    forward.fail_next = RuntimeError("boom")
    with pytest.raises(InferenceError, match=r"^inference failed: RuntimeError: boom$") as error:
        inference.submit(request_rows(1, 3), batch_size=8)
    assert error.value.get_http_status_code() == 500
    rows = request_rows(2, 3)
    np.testing.assert_array_equal(inference.submit(rows, batch_size=8), fake_probabilities(rows))
    assert inference.alive


def test_a_forward_with_the_wrong_row_count_is_an_error(make_thread):
    inference = make_thread(lambda token_ids, batch_size, alone: np.zeros((1, 3)), max_wait_ms=0)
    with pytest.raises(InferenceError, match="forward returned 1 rows for 2"):
        inference.submit([[1], [2]], batch_size=8)


def overlap_two_requests(inference: InferenceThread, forward: FakeForward) -> None:
    """Make the thread's last batch one that served two requests."""
    forward.release.clear()
    first = threading.Thread(target=inference.submit, args=([[1]], 8))
    first.start()
    wait_until(lambda: len(forward.calls) >= 1)
    calls = len(forward.calls)
    second = threading.Thread(target=inference.submit, args=([[2]], 8))
    third = threading.Thread(target=inference.submit, args=([[3]], 8))
    second.start(), third.start()
    wait_until(lambda: inference._queue.qsize() == 2)
    forward.release.set()
    for t in (first, second, third):
        t.join(10)
    assert forward.calls[calls][0] == 2  # the two queued requests shared one forward


def test_while_requests_overlap_the_thread_waits_for_more_rows(forward, make_thread):
    inference = make_thread(forward, max_batch_rows=2, max_wait_ms=60_000)
    overlap_two_requests(inference, forward)  # now the thread waits for more rows
    calls = len(forward.calls)
    first = threading.Thread(target=inference.submit, args=([[4, 5]], 8))
    first.start()
    wait_until(lambda: inference._queue.qsize() == 0)  # taken by the thread, which now waits for a second row
    assert len(forward.calls) == calls and first.is_alive()
    inference.submit([[6]], batch_size=8)  # fills the batch: both run in one forward, long before max_wait
    first.join(10)
    assert [rows for rows, _, _ in forward.calls[calls:]] == [2]


def test_a_pass_is_alone_only_while_no_other_pass_runs_and_no_rows_wait(forward, make_thread):
    """A lone request may take every core; a pass that starts beside another, or with rows queued, may not."""
    inference = make_thread(forward, max_wait_ms=0, inference_threads=2)
    inference.submit([[1]], batch_size=8)
    assert forward.alone == [True]
    forward.release.clear()  # the next pass holds one thread...
    first = threading.Thread(target=inference.submit, args=([[2]], 8))
    first.start()
    wait_until(lambda: len(forward.calls) == 2)
    second = threading.Thread(target=inference.submit, args=([[3]], 8))
    second.start()  # ...so the other thread runs this one beside it
    wait_until(lambda: len(forward.calls) == 3)
    forward.release.set()
    first.join(10), second.join(10)
    assert forward.alone == [True, True, False]
    inference.submit([[4]], batch_size=8)  # both passes ended: alone again
    assert forward.alone[-1] is True


def test_a_lone_client_is_not_delayed_by_max_wait(forward, make_thread):
    # A lone request that waited max_wait (60 s) would fail at the 5 s timeout instead of answering.
    inference = make_thread(forward, max_batch_rows=64, max_wait_ms=60_000, timeout_s=5)
    for i in range(5):
        np.testing.assert_array_equal(inference.submit([[i, 1]], batch_size=8), fake_probabilities([[i, 1]]))


def test_a_hanging_forward_times_out(forward, make_thread):
    inference = make_thread(forward, timeout_s=0.3)
    forward.release.clear()
    try:
        with pytest.raises(InferenceError, match=r"within 0.3 s \(timeout\)"):
            inference.submit([[1, 2]], batch_size=8)
    finally:
        forward.release.set()


def test_warmup_runs_on_the_inference_thread_before_any_request(forward, make_thread):
    seen = []
    make_thread(forward, warmup=lambda: seen.append(threading.current_thread().name), name="warm-test")
    assert seen == ["warm-test"]  # __init__ returned after warmup ran, on the named thread


def test_a_failing_warmup_fails_the_load():
    def warmup() -> None:
        raise OSError("no weights")

    with pytest.raises(InferenceError, match="inference warmup failed: OSError: no weights"):
        InferenceThread(lambda ids, size, alone: fake_probabilities(ids), warmup=warmup, name="bad-warmup")
    wait_until(lambda: "bad-warmup" not in {t.name for t in threading.enumerate()})


def test_a_typed_warmup_error_reaches_the_loader_unchanged():
    from mlflow_model.errors import CheckpointError

    def warmup() -> None:
        raise CheckpointError("weights in /x do not fit the encoder")

    with pytest.raises(CheckpointError, match="do not fit the encoder"):
        InferenceThread(lambda ids, size, alone: fake_probabilities(ids), warmup=warmup, name="typed-warmup")


def test_the_predictor_builds_its_engine_on_the_inference_thread(tiny_checkpoint, tiny_encoder):
    """The thread that loads the weights is the one that runs them: one OpenMP team, not two."""
    from mlflow_model.checkpoint import index_to_class
    from mlflow_model.predictor import Predictor

    class Engine:
        def __init__(self) -> None:
            self.built_on = threading.current_thread().name
            self.ran_on: set[str] = set()

        def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, alone: bool = False) -> np.ndarray:
            self.ran_on.add(threading.current_thread().name)
            return np.zeros((len(input_ids), 4), np.float32)

    labels = index_to_class(tiny_checkpoint)
    with Predictor(Engine, tiny_encoder, labels, PredictorConfig(inference_threads=1)) as predictor:
        predictor.predict_proba(pd.DataFrame({"title": ["a"], "description": ["b"]}))
        assert predictor.engine.built_on == "tagger-inference"
        assert predictor.engine.ran_on == {"tagger-inference"}


def test_several_inference_threads_share_the_queue_and_answer_every_request_in_order(forward):
    """Threads that each run whole batches side by side: every caller gets its own rows, in order."""
    inference = InferenceThread(forward, PredictorConfig(max_batch_rows=4, max_wait_ms=1, inference_threads=3), name="pool-test")
    try:
        names = {t.name for t in threading.enumerate() if t.name.startswith("pool-test")}
        assert names == {"pool-test", "pool-test-1", "pool-test-2"}
        requests = [request_rows(seed, count) for seed, count in enumerate([1, 3, 9, 2, 17, 5] * 4)]
        answers: dict[int, np.ndarray] = {}
        callers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, inference.submit(requests[i], 8)))
                   for i in range(len(requests))]
        forward.release.clear()  # a thread holding a batch leaves the queue to the others
        for caller in callers:
            caller.start()
        wait_until(lambda: len({name for _, _, name in forward.calls}) == 3)  # all three run a batch at once
        forward.release.set()
        for caller in callers:
            caller.join(30)
        for i, rows in enumerate(requests):
            np.testing.assert_array_equal(answers[i], fake_probabilities(rows))
    finally:
        inference.close()
    assert not inference.alive  # every thread stopped: each got its own sentinel
    assert not {t.name for t in threading.enumerate() if t.name.startswith("pool-test")}


def test_close_ends_the_daemon_thread(forward):
    inference = InferenceThread(forward, name="close-test")
    thread = next(t for t in threading.enumerate() if t.name == "close-test")
    assert thread.daemon
    inference.close()
    assert not thread.is_alive() and not inference.alive
    with pytest.raises(InferenceError, match="closed"):
        inference.submit([[1]], batch_size=8)
    inference.close()  # twice is harmless


def test_tiny_torch_model_on_the_inference_thread(tiny_checkpoint, tiny_encoder, make_thread):
    import torch

    from mlflow_model.predictor import Predictor

    predictor = Predictor.from_directories(tiny_checkpoint, tiny_encoder, PredictorConfig(num_threads=1))
    frame = pd.DataFrame({"title": [f"bert text {'image ' * i}" for i in range(12)], "description": ["data"] * 12})
    token_ids = predictor.preprocess(frame).token_ids
    expected = predictor.forward(token_ids, batch_size=4)
    threads_seen = []

    def warmup() -> None:
        torch.set_num_threads(1)
        threads_seen.append(torch.get_num_threads())

    inference = make_thread(lambda ids, size, alone: predictor.forward(ids, size), max_batch_rows=8, max_wait_ms=5,
                            warmup=warmup)
    answers: dict[int, np.ndarray] = {}
    clients = [
        threading.Thread(target=lambda i=i: answers.__setitem__(i, inference.submit([token_ids[i]], batch_size=4)))
        for i in range(len(token_ids))
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join(30)
    assert threads_seen == [1]
    np.testing.assert_allclose(np.vstack([answers[i] for i in range(len(token_ids))]), expected, atol=1e-5, rtol=0)


def test_a_slow_warmup_fails_the_load_after_timeout():
    release = threading.Event()  # the warmup hangs until the load has given up on it
    try:
        with pytest.raises(InferenceError, match="warmup did not finish within 0.1 s"):
            InferenceThread(lambda ids, size, alone: fake_probabilities(ids), warmup_timeout_s=0.1,
                            warmup=lambda: release.wait(60), name="slow-warmup")
    finally:
        release.set()
    wait_until(lambda: "slow-warmup" not in {t.name for t in threading.enumerate()})  # the thread ends once released


def test_the_scoring_servers_workers_share_the_cores(monkeypatch):
    from mlflow_model.config import usable_cores

    monkeypatch.delenv("MLFLOW_MODELS_WORKERS", raising=False)
    assert PredictorConfig().thread_count == usable_cores()  # one inference thread per core
    monkeypatch.setenv("MLFLOW_MODELS_WORKERS", str(usable_cores() * 2))
    assert PredictorConfig().thread_count == 1  # at least one, never more workers x threads than cores
    monkeypatch.setenv("MLFLOW_MODELS_WORKERS", "2")
    assert PredictorConfig().thread_count == max(1, usable_cores() // 2)
    assert PredictorConfig(inference_threads=3).thread_count == 3  # what the model_config says wins
