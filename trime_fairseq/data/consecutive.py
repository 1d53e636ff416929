"""``--batching consecutive``: TRIME's batches for long-term memory (TRIMELM_long, §4.2).

A batch of B segments of length L holds b = B // m *runs*; a run is m consecutive
segments of one document, in order, on adjacent rows, so that the criterion can
reshape the rows (B, T) -> (B/m, m·T) and give every token the preceding tokens
of its segment plus all tokens of the run's earlier segments as memory
(``trime_long_loss``).

* Documents: found in the split's token stream by WikiText's `` = Title = ``
  heading rule (:mod:`trime_fairseq.memory.documents`, through the dictionary's
  ``=``). Segments never cross a document end; a document's last segment may be
  shorter than L and its last run is completed with empty filler segments (no loss,
  no memory). ``--cross-documents`` treats the split as one stream instead (blocks
  of L as fairseq's ``--sample-break-mode none``; the original TRIME setting, and
  the one for data without headings such as enwik8). A split without any heading
  is an error unless ``--cross-documents`` is given.
* Order: the runs are shuffled every epoch with ``numpy.random.default_rng([seed,
  epoch])`` (fairseq's ``--seed``) and taken in that order, step after step (no
  second shuffle of the batches). It depends only on (seed, epoch), so resuming
  from a checkpoint (which stores the epoch and the position inside it) replays
  the same batches on every worker.
* Workers (W data-parallel workers, B segments each): step k takes the next runs
  of the order and deals them as W batches, worker w getting batch k·W + w
  (fairseq's ``ShardedIterator``). Each worker's batch holds B // m whole runs, so
  the memory of a run never needs another worker -- unless the criterion has
  ``--memory-across-workers`` (``task.memory_across_workers``): a step then holds
  (W·B) // m runs, laid out as one batch and cut into W contiguous pieces, so a run
  may span workers (B < m: TRIME's long memories beyond one GPU) and one worker with
  W·B segments gets exactly the same step. A worker without a batch in the last step
  gets fairseq's dummy batch.
* Batch size: B = ``--batch-size``, or ``--max-tokens // L`` (the smaller if both
  are given); B must be >= m (W·B >= m across workers). ``--required-batch-size-multiple``
  is not used (a batch is a multiple of m by construction).
* The task's own blocks (``--sample-break-mode``) are not used: segments are cut
  from the split's lines (fairseq-preprocess output, each line ending with eos).
"""

import functools
import logging
import weakref
from typing import List, Optional

import numpy as np
from fairseq.data import iterators

from trime_fairseq.data.registry import register_batching
from trime_fairseq.memory.documents import DocumentBoundaries
from trime_fairseq.data.segments import SegmentDataset, TokenStream, plan_runs

logger = logging.getLogger(__name__)

_SEGMENTS = weakref.WeakKeyDictionary()  # task dataset -> SegmentDataset (built once per split)


def validate_options(cfg) -> None:
    """Errors for option combinations that cannot work (called by the task)."""
    m = getattr(cfg, "consecutive_segments", 1)
    if m is None or m < 1:
        raise ValueError(f"--consecutive-segments must be >= 1, got {m}")
    batching = getattr(cfg, "batching", "shuffled")
    if batching != "consecutive":
        if m != 1:
            raise ValueError("--consecutive-segments needs --batching consecutive")
        if getattr(cfg, "cross_documents", False):
            raise ValueError("--cross-documents needs --batching consecutive")


def lines_of(dataset):
    """The line dataset under fairseq's MonolingualDataset(TokenBlockDataset(lines))."""
    blocks = getattr(dataset, "dataset", None)
    lines = getattr(blocks, "dataset", None)
    if lines is None or not hasattr(lines, "sizes") or not hasattr(blocks, "block_to_dataset_index"):
        raise ValueError(
            f"--batching consecutive needs a language-modeling split (MonolingualDataset over a "
            f"TokenBlockDataset); got {type(dataset).__name__}. It is a training order: evaluate "
            "with the default --batching (fairseq-eval-lm keeps the stream order)."
        )
    if getattr(dataset, "add_bos_token", False):
        raise ValueError("--batching consecutive does not support --add-bos-token")
    return lines


def segment_dataset(task, dataset) -> SegmentDataset:
    """The split's runs (cached per task dataset)."""
    cached = _SEGMENTS.get(dataset)
    if cached is not None:
        return cached
    cfg = task.args
    m, seg_len = int(cfg.consecutive_segments), int(cfg.tokens_per_sample)
    stream = TokenStream(lines_of(dataset))
    total = len(stream)
    if getattr(cfg, "cross_documents", False):
        starts = np.zeros(1, dtype=np.int64)
    else:
        boundaries = DocumentBoundaries.from_dictionary(task.source_dictionary)
        starts = boundaries.starts_in_tokens(stream.tokens)
        if len(starts) < 2:
            raise ValueError(
                "found no document boundary (WikiText ' = Title = ' heading) in the split; pass "
                "--cross-documents to cut runs from the whole stream"
            )
    runs = plan_runs(starts, total, seg_len, m)
    segments = SegmentDataset(stream, runs, task.source_dictionary.pad(), task.source_dictionary.eos())
    logger.info(
        f"consecutive batching: {len(starts)} documents, {segments.num_runs} runs of {m} segments "
        f"(L={seg_len}), {int(segments.is_filler.sum())} filler segments, {total} tokens"
    )
    _SEGMENTS[dataset] = segments
    return segments


def runs_per_step(m: int, seg_len: int, max_tokens: Optional[int], max_sentences: Optional[int], num_shards: int,
                  across_workers: bool) -> int:
    """Runs in one step of ``num_shards`` workers: B // m per worker, or (W·B) // m across workers."""
    limits = []
    if max_sentences is not None:
        limits.append(int(max_sentences))
    if max_tokens is not None:
        limits.append(int(max_tokens) // seg_len)
    if not limits:
        raise ValueError("--batching consecutive needs --batch-size or --max-tokens")
    segments = min(limits)
    if across_workers:
        if segments * num_shards < m:
            raise ValueError(
                f"a step of {num_shards} workers x {segments} segments cannot hold a run of --consecutive-segments {m}; "
                f"give at least {m} segments per step"
            )
        return segments * num_shards // m
    if segments < m:
        raise ValueError(
            f"a batch of {segments} segments (--batch-size / --max-tokens // L={seg_len}) cannot hold a run of "
            f"--consecutive-segments {m}; give at least {m} segments ({m * seg_len} tokens) per batch"
            + (", or let runs span workers (trime_long_loss --memory-across-workers)" if num_shards > 1 else "")
        )
    return segments // m * num_shards


def run_order(num_runs: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of runs: a function of (seed, epoch) only."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_runs)


def batches_for_epoch(segments: SegmentDataset, runs_per: int, num_shards: int, seed: int, epoch: int,
                      across_workers: bool) -> List[np.ndarray]:
    """Every worker's batches of the epoch in step order: step k is batches k·W .. k·W + W - 1 (worker w
    gets k·W + w). A step holds ``runs_per`` runs in the epoch's order, rows of a run adjacent and in
    order; each worker gets whole runs, or (``across_workers``) a contiguous piece of the step's rows.
    Workers left without rows in the last step get an empty batch (fairseq's dummy batch)."""
    order = run_order(segments.num_runs, seed, epoch)
    m = segments.m
    batches = []
    for start in range(0, len(order), runs_per):
        runs = order[start:start + runs_per]
        rows = (runs[:, None] * m + np.arange(m)[None, :]).reshape(-1)  # (runs·m,) in run order
        if across_workers:
            batches += np.array_split(rows, num_shards)
        else:
            size = runs_per // num_shards * m
            batches += [rows[w * size:(w + 1) * size] for w in range(num_shards)]
    return batches


@register_batching("consecutive")
def consecutive_batches(task, dataset, *, max_tokens, max_sentences, max_positions, seed, num_shards, shard_id,
                        num_workers, epoch, data_buffer_size, skip_remainder_batch, grouped_shuffling, **_):
    segments = segment_dataset(task, dataset)
    seg_len = int(task.args.tokens_per_sample)
    limit = max_positions if not isinstance(max_positions, (tuple, list)) else min(p for p in max_positions if p)
    if limit is not None and seg_len > limit:
        raise ValueError(f"segments of {seg_len} tokens exceed the model's {limit} positions")
    across = bool(getattr(task, "memory_across_workers", False))
    runs_per = runs_per_step(segments.m, seg_len, max_tokens, max_sentences, num_shards, across)
    return iterators.EpochBatchIterator(
        dataset=segments,
        collate_fn=functools.partial(segments.collater, whole_runs=not across),
        batch_sampler=lambda ds, ep: batches_for_epoch(segments, runs_per, num_shards, seed, ep, across),
        disable_shuffling=True,  # the runs are shuffled per epoch; a step's batches stay together
        seed=seed,
        num_shards=num_shards,
        shard_id=shard_id,
        num_workers=num_workers,
        epoch=epoch,
        buffer_size=data_buffer_size,
        skip_remainder_batch=skip_remainder_batch,
        grouped_shuffling=grouped_shuffling,
        reuse_dataloader=getattr(task.args, "reuse_dataloader", True),
        persistent_workers=getattr(task.args, "persistent_workers", True),
    )
