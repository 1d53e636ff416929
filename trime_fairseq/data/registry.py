"""The registry of batch orders (``--batching NAME``): :func:`register_batching` and the names registered.

A batching is a function ``(task, dataset, **options) -> EpochBatchIterator``; each order lives in its
own module of this package and registers itself here. :mod:`trime_fairseq.data.batching` imports every
order and dispatches a task's ``get_batch_iterator`` to the one asked for.
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
