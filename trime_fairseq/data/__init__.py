"""Batch orders for ``trime_lm`` (``--batching NAME``).

A batching is a function ``(task, dataset, **options) -> EpochBatchIterator`` registered with
:func:`register_batching`; the task passes every argument of fairseq's ``get_batch_iterator`` by
name (with fairseq's defaults), so a batching names the ones it reads and takes ``**_`` for the rest; ``shuffled`` (fairseq's own order) needs none.
Each order lives in its own module of this package, imported below.
"""

from typing import Callable, Dict

BATCHINGS: Dict[str, Callable] = {}


def register_batching(name: str):
    def wrap(fn):
        if name in BATCHINGS:
            raise ValueError(f"batching '{name}' registered twice")
        BATCHINGS[name] = fn
        return fn

    return wrap


def batching_names():
    return ("shuffled",) + tuple(sorted(BATCHINGS))

from trime_fairseq.data import consecutive  # noqa: E402,F401  (registers --batching consecutive)
from trime_fairseq.data import stream  # noqa: E402,F401  (registers --batching stream)
from trime_fairseq.data import bm25_batching  # noqa: E402,F401  (registers --batching bm25)
