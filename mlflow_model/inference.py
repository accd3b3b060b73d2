"""Inference threads: they run every forward pass, on rows gathered from waiting requests.

Server threads call `submit`; an inference thread gathers the rows of all waiting requests (up to
`max_batch_rows`, waiting at most `max_wait_ms` after the first) into one `forward` call, like
Ray Serve's @serve.batch or Triton's dynamic batcher. The thread waits for more rows only while
requests overlap (its last batch served several): a lone client is never delayed. There is one
inference thread per core by default (`PredictorConfig.thread_count`), each running its engine on
one intra-op thread: they take batches from the one queue side by side, with no OpenMP barriers
that a busy server thread could stall. The `warmup` hook runs first, on the first thread: the
predictor builds its engine there, so that the thread that loads the weights also runs them
(torch gives each thread that runs a parallel kernel its own OpenMP team; an idle loader's team
beside the serving ones would cost cores). A forward pass that starts while no other runs and no rows
wait is told it runs `alone`: an engine may then spread that one pass over every core the model has
(the ONNX engine does), so that a lone client's request does not leave the other cores idle.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
from mlflow_model.config import PredictorConfig
from mlflow_model.errors import InferenceError, TaggerError

Forward = Callable[[list[list[int]], int, bool], np.ndarray]  # (token ids, batch_size, alone) -> logits
_STOP = object()  # queue sentinel: the thread ends when it reaches it
_log = logging.getLogger(__name__)


class _Request:
    """One submit call: its rows, its answer (filled chunk by chunk) or its error."""

    def __init__(self, token_ids: list[list[int]], batch_size: int, chunks: int) -> None:
        self.token_ids = token_ids
        self.batch_size = batch_size
        self.result: np.ndarray | None = None
        self.error: str | None = None
        self.pending = chunks  # chunks not answered yet
        self.done = threading.Event()

    def deliver(self, start: int, logits: np.ndarray) -> None:
        """Store one chunk's rows; the request is done when its last chunk arrives."""
        if self.result is None:
            self.result = np.empty((len(self.token_ids), *logits.shape[1:]), logits.dtype)
        self.result[start : start + len(logits)] = logits
        self.pending -= 1
        if self.pending == 0:
            self.done.set()

    def fail(self, reason: str) -> None:
        """Answer with an error (the first one wins)."""
        if self.error is None:
            self.error = reason
        self.done.set()


class _Chunk:
    """Rows [start, stop) of one request: the unit the thread gathers into a batch."""

    def __init__(self, request: _Request, start: int, stop: int) -> None:
        self.request, self.start, self.stop = request, start, stop

    @property
    def rows(self) -> list[list[int]]:
        """This chunk's token ids."""
        return self.request.token_ids[self.start : self.stop]


class InferenceThread:
    """A daemon thread that runs every forward pass, batching the rows of concurrent requests."""

    def __init__(
        self,
        forward: Forward,
        config: PredictorConfig | None = None,
        warmup: Callable[[], None] | None = None,
        name: str = "tagger-inference",
        warmup_timeout_s: float = 600.0,
    ) -> None:
        """Start the threads; `config` gives max_batch_rows, max_wait_ms, timeout_s and the thread count."""
        config = config or PredictorConfig()
        self.forward, self.max_batch_rows = forward, config.max_batch_rows
        self.max_wait_s, self.timeout_s = config.max_wait_ms / 1000.0, config.timeout_s
        self.on_batch: Callable[[int], None] | None = None  # told the rows of each forward batch (a server's metrics)
        threads = config.thread_count
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit's puts against close's sentinel
        self._closed = False
        self._started = threading.Event()
        self._warmup_error: Exception | None = None
        self._overlapping = False  # the last batch served several requests: worth waiting for more
        self._running = 0  # forward passes running now, on all the threads
        self._threads = [threading.Thread(target=self._run, args=(warmup,), name=name, daemon=True)]
        self._threads[0].start()
        if not self._started.wait(warmup_timeout_s):
            with self._lock:  # the thread stops once warmup returns
                self._closed = True
                self._queue.put(_STOP)
            raise InferenceError(f"inference thread warmup did not finish within {warmup_timeout_s:g} s")
        if isinstance(self._warmup_error, TaggerError):  # typed (e.g. CheckpointError): the caller's own message
            raise self._warmup_error
        if self._warmup_error is not None:
            error = self._warmup_error
            raise InferenceError(f"inference warmup failed: {type(error).__name__}: {error}") from error
        for index in range(1, threads):  # after warmup: they run the engine the first thread built
            self._threads.append(threading.Thread(target=self._run, args=(None,), name=f"{name}-{index}", daemon=True))
            self._threads[-1].start()

    def submit(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Logits of these rows (rows x classes, input order), computed on the inference thread.

        A request of more than `max_batch_rows` rows is length-sorted as a whole before it is cut into
        chunks, so that each chunk holds rows of similar length (less padding than unsorted chunks).
        """
        if len(token_ids) <= self.max_batch_rows:
            return self._submit(token_ids, batch_size)
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        sorted_result = self._submit([token_ids[i] for i in order], batch_size)
        result = np.empty_like(sorted_result)
        result[order] = sorted_result
        return result

    def _submit(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Queue the rows as chunks of at most max_batch_rows and wait for all of them."""
        starts = range(0, max(len(token_ids), 1), self.max_batch_rows)
        request = _Request(token_ids, batch_size, len(starts))
        with self._lock:
            if self._closed:
                raise InferenceError("inference thread is closed")
            for start in starts:
                self._queue.put(_Chunk(request, start, min(start + self.max_batch_rows, len(token_ids))))
        if not request.done.wait(self.timeout_s):
            request.fail("timeout")  # its chunks not yet run are skipped
            raise InferenceError(f"inference did not answer within {self.timeout_s:g} s (timeout)")
        if request.error is not None:
            raise InferenceError(f"inference failed: {request.error}")
        return request.result

    def close(self) -> None:
        """Stop the threads after the requests already queued (waits at most timeout_s)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(self.timeout_s)

    @property
    def alive(self) -> bool:
        """Whether any inference thread is still running."""
        return any(thread.is_alive() for thread in self._threads)

    def _run(self, warmup: Callable[[], None] | None) -> None:
        """Thread body: warm up (the first thread), then gather and run batches until a sentinel."""
        try:
            if warmup is not None:
                warmup()
        except Exception as error:  # noqa: BLE001 - reported by __init__ to the loader
            self._warmup_error = error
            self._closed = True
            return
        finally:
            self._started.set()
        carry = None
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is _STOP:
                break
            batch, carry = self._gather(first)
            self._execute(batch)
        self._fail_queued("inference thread is closed")

    def _gather(self, first: _Chunk) -> tuple[list[_Chunk], object | None]:
        """The chunks of one batch, starting with `first`, and the item that did not fit (or None)."""
        batch, rows = [first], first.stop - first.start
        deadline = time.monotonic() + (self.max_wait_s if self._overlapping else 0.0)
        while rows < self.max_batch_rows:
            remaining = deadline - time.monotonic()
            try:  # after the deadline, still take what is already queued
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return batch, None
            if item is _STOP or rows + item.stop - item.start > self.max_batch_rows:
                return batch, item
            batch.append(item)
            rows += item.stop - item.start
        return batch, None

    def _execute(self, batch: list[_Chunk]) -> None:
        """One forward over the live chunks of the batch; deliver each chunk's rows or fail their requests."""
        batch = [chunk for chunk in batch if chunk.request.error is None]
        if not batch:
            return
        self._overlapping = len({id(chunk.request) for chunk in batch}) > 1
        token_ids = [ids for chunk in batch for ids in chunk.rows]
        try:
            batch_size = min(chunk.request.batch_size for chunk in batch)
            logits = self._forward(token_ids, batch_size)
            if len(logits) != len(token_ids):
                raise ValueError(f"forward returned {len(logits)} rows for {len(token_ids)}")
            if self.on_batch is not None:
                self.on_batch(len(token_ids))
        except Exception as error:  # noqa: BLE001 - fails this batch only; the thread keeps serving
            _log.exception("inference failed on a batch of %d rows", len(token_ids))
            for chunk in batch:
                chunk.request.fail(f"{type(error).__name__}: {error}")
            return
        offset = 0
        for chunk in batch:
            size = chunk.stop - chunk.start
            if chunk.request.error is None:
                chunk.request.deliver(chunk.start, logits[offset : offset + size])
            offset += size

    def _forward(self, token_ids: list[list[int]], batch_size: int) -> np.ndarray:
        """Run one forward pass, telling it whether it runs alone (no other pass running, no rows waiting)."""
        with self._lock:
            alone = self._running == 0 and self._queue.empty()
            self._running += 1
        try:
            return self.forward(token_ids, batch_size, alone)
        finally:
            with self._lock:
                self._running -= 1

    def _fail_queued(self, reason: str) -> None:
        """Fail every request still queued (after close); the other threads' sentinels go back in the queue."""
        stops = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stops += 1
            else:
                item.request.fail(reason)
        for _ in range(stops):
            self._queue.put(_STOP)
