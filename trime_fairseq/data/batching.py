"""A task's ``get_batch_iterator`` for ``--batching NAME``: every registered order, one dispatch.

:func:`batch_iterator` passes every argument of fairseq's ``get_batch_iterator`` by name (with
fairseq's defaults) plus ``fallback()``, the task's own iterator for those arguments, to the
batching registered under the name (:mod:`trime_fairseq.data.registry`), so a batching names the
ones it reads and takes ``**_`` for the rest; ``shuffled`` (fairseq's own order) needs none.
Importing this module registers every order of the package.
"""

import inspect
import logging
from typing import Callable

from fairseq.data import iterators
from fairseq.tasks import FairseqTask

from trime_fairseq.data import bm25_batching, consecutive, stream  # noqa: F401  (register their batchings)
from trime_fairseq.data.registry import BATCHINGS, batching_names  # noqa: F401  (batching_names re-exported)
from trime_fairseq.memory.gathered import DUMMY_BATCH

logger = logging.getLogger(__name__)

#: The task options that choose a training order (``--batching`` and the options of its orders), at the values that
#: read a split in its own order. A tool that rebuilds a trained model's task from its checkpoint to read a split
#: (``trime-build-datastore``, ``trime-neighbours``) sets them, whatever order the model was trained with: the
#: tasks refuse an order's option without its order (``--consecutive-segments`` without ``--batching consecutive``).
EVALUATION_ORDER = {"batching": "shuffled", "bm25_order": None, "bm25_fill": "padded", "consecutive_segments": 1,
                    "cross_documents": False}

_SIGNATURE = inspect.signature(FairseqTask.get_batch_iterator)


def batch_iterator(task, name: str, dataset, task_iterator: Callable, args, kwargs):
    """``task.get_batch_iterator(dataset, *args, **kwargs)`` for ``--batching name``;
    ``task_iterator`` is the task's own (fairseq's) method, used for ``shuffled``."""
    # fairseq passes its options positionally or by name: hand them over by name, with fairseq's
    # defaults, so a batching declares only the ones it reads (and **_ for the rest)
    call = _SIGNATURE.bind(task, dataset, *args, **kwargs)
    call.apply_defaults()
    options = {k: v for k, v in call.arguments.items() if k not in ("self", "dataset")}
    options = _every_item_of_evaluation_splits(task, dataset, options)
    batching = BATCHINGS.get(name)
    if batching is None:
        return _with_dummy_marked(task, task_iterator(dataset, **options))
    itr = batching(task, dataset, fallback=lambda: task_iterator(dataset, **options), **options)
    return _with_dummy_marked(task, itr)


def _every_item_of_evaluation_splits(task, dataset, options: dict) -> dict:
    """fairseq 0.12's ``batch_by_size`` drops a last batch whose size is not a multiple of
    ``--required-batch-size-multiple`` (8 by default; fairseq#5036): ``fairseq-generate`` silently
    leaves up to 7 sentences of a test set untranslated (the longest: batches are sorted by length)
    and validation skips items. Every split but the task's training split (``train_subset``) is
    therefore batched with a multiple of 1; the training split keeps the option as given."""
    if options["required_batch_size_multiple"] <= 1:
        return options
    train = task.datasets.get(getattr(task.args, "train_subset", "train"))  # both tasks' config is task.args
    if dataset is train:
        return options
    logger.info(f"this split is batched without --required-batch-size-multiple "
                f"{options['required_batch_size_multiple']} so that every one of its {len(dataset)} items is "
                "evaluated (fairseq 0.12 would drop a last batch that is not a multiple of it)")
    return dict(options, required_batch_size_multiple=1)


_MARKING_CLASSES = {}


def _with_dummy_marked(task, itr):
    """With the criterion's --memory-across-workers: ``itr`` with its ``first_batch`` marked
    :data:`~trime_fairseq.memory.gathered.DUMMY_BATCH`.

    fairseq's trainer runs ``first_batch`` on a worker whose shard of an epoch (or of a validation
    split) has run out, so that every worker takes part in every step's collectives; the memory
    across workers must then leave that batch's entries out. ``first_batch`` is read for nothing else
    (``trainer.reset_dummy_batch``). The iterator's class becomes a subclass that only overrides it."""
    base = type(itr)
    if (not getattr(task, "memory_across_workers", False) or not isinstance(itr, iterators.EpochBatchIterator)
            or base in _MARKING_CLASSES.values()):
        return itr
    if base not in _MARKING_CLASSES:

        def first_batch(self):
            batch = super(marking, self).first_batch
            return {**batch, DUMMY_BATCH: True} if isinstance(batch, dict) and batch else batch

        marking = type(f"DummyMarking{base.__name__}", (base,), {"first_batch": property(first_batch)})
        _MARKING_CLASSES[base] = marking
    itr.__class__ = _MARKING_CLASSES[base]
    return itr
