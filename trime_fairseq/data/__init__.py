"""Data of ``trime_lm`` and ``trime_translation``: batch orders (``--batching NAME``), segments, streams,
BM25 chains, SPALM's neighbour files.

* :mod:`.registry` -- :func:`register_batching` (re-exported here) and the registered names;
* :mod:`.batching` -- :func:`~trime_fairseq.data.batching.batch_iterator`, a task's iterator for
  ``--batching NAME``; it imports every order: :mod:`.consecutive`, :mod:`.stream`, :mod:`.bm25_batching`.

This package module imports nothing of its own modules but the registry, so an order's module
importing ``register_batching`` from here closes no circle.
"""

from trime_fairseq.data.registry import BATCHINGS, batching_names, register_batching  # noqa: F401
