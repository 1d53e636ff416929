"""Batch orders for ``trime_lm`` and ``trime_translation`` (``--batching NAME``).

A batching is a function ``(task, dataset, **options) -> EpochBatchIterator`` registered with
:func:`register_batching`; :func:`batch_iterator` passes every argument of fairseq's
``get_batch_iterator`` by name (with fairseq's defaults) plus ``fallback()``, the task's own
iterator for those arguments, so a batching names the ones it reads and takes ``**_`` for the
rest; ``shuffled`` (fairseq's own order) needs none. Each order lives in its own module of this
package, imported below.
"""

import inspect
from typing import Callable, Dict

from fairseq.tasks import FairseqTask

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


_SIGNATURE = inspect.signature(FairseqTask.get_batch_iterator)


def batch_iterator(task, name: str, dataset, task_iterator: Callable, args, kwargs):
    """``task.get_batch_iterator(dataset, *args, **kwargs)`` for ``--batching name``;
    ``task_iterator`` is the task's own (fairseq's) method, used for ``shuffled``."""
    batching = BATCHINGS.get(name)
    if batching is None:
        return task_iterator(dataset, *args, **kwargs)
    # fairseq passes its options positionally or by name: hand them over by name, with fairseq's
    # defaults, so a batching declares only the ones it reads (and **_ for the rest)
    call = _SIGNATURE.bind(task, dataset, *args, **kwargs)
    call.apply_defaults()
    options = {k: v for k, v in call.arguments.items() if k not in ("self", "dataset")}
    return batching(task, dataset, fallback=lambda: task_iterator(dataset, **options), **options)

from trime_fairseq.data import consecutive  # noqa: E402,F401  (registers --batching consecutive)
from trime_fairseq.data import stream  # noqa: E402,F401  (registers --batching stream)
from trime_fairseq.data import bm25_batching  # noqa: E402,F401  (registers --batching bm25)
