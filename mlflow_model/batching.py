"""Length-sorted, padded micro-batches: the one loop that runs token ids through a model."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> logits


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a batch to its longest row: (input_ids, attention_mask) int64 arrays."""
    width = max(len(row) for row in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


def padded_batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, sort_by_length: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(row indices, input_ids, attention_mask) per micro-batch; sorted, rows of similar length share one."""
    order = np.arange(len(token_ids))
    if sort_by_length:
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield (rows, *pad_batch([token_ids[i] for i in rows], pad_id))


def batched_logits(
    logits_fn: LogitsFn, token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, sort_by_length: bool = True
) -> np.ndarray:
    """Logits of every row, in input order, computed micro-batch by micro-batch (little padding when sorted)."""
    logits: np.ndarray | None = None
    for rows, input_ids, mask in padded_batches(token_ids, batch_size, pad_id, sort_by_length):
        batch = logits_fn(input_ids, mask)
        if logits is None:
            logits = np.empty((len(token_ids), batch.shape[1]), dtype=np.float32)
        logits[rows] = batch
    if logits is None:
        raise ValueError("no rows to run")
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
