"""``--batching bm25``: train on TRIME's BM25 chain (§4.3) from ``--bm25-order FILE``.

The order file (``trime-bm25-batches``) is a chain of all training items in
which neighbours are lexically similar: the segments of a language-modelling
split (``trime_lm``), or the target sentences of a language pair
(``trime_translation``, Appendix B). Batches are consecutive pieces of the
chain: ``batch_size`` segments, or as many sentences as ``--max-tokens`` /
``--batch-size`` allow (padding counted, as fairseq's ``batch_by_size``). One update consumes ``update_freq × world
size`` consecutive batches (fairseq gives batch j to worker j mod W and each
worker accumulates ``update_freq`` of its batches), so the chain is cut into
groups of that many batches and only whole groups are shuffled: BM25
neighbours land in the same update, across gradient accumulation and workers.

Per epoch (seeded by fairseq's ``--seed`` and the epoch): the cyclic chain is
rotated by a random offset (batch boundaries move between epochs), and the
order of the full groups is shuffled; the one partial group, if any, stays last
so that every later update still starts on a group boundary. Every segment is
used exactly once per epoch; resuming from a checkpoint replays the same order.

Only the split the order file was built for (``train``) is reordered; other
splits (validation) keep fairseq's default iterator.
"""

import logging
from typing import Callable, List, Optional

import numpy as np
from fairseq.data import iterators

from trime_fairseq.data.registry import register_batching
from trime_fairseq.data.bm25 import read_order_file
from trime_fairseq.checksums import dictionary_checksum

logger = logging.getLogger(__name__)

#: how a batch of sentences counts its tokens against --max-tokens (chain_token_batches)
BM25_FILLS = ("padded", "real")


def _rotate(chain: np.ndarray, rng, shuffle: bool) -> np.ndarray:
    chain = np.asarray(chain, dtype=np.int64)
    return np.roll(chain, -int(rng.integers(len(chain)))) if shuffle and len(chain) else chain


def _shuffle_groups(batches: List[np.ndarray], group: int, rng, shuffle: bool, full_size=None) -> List[np.ndarray]:
    """Groups of ``group`` consecutive batches in a shuffled order; the last, partial group (fewer
    batches, or a last batch smaller than ``full_size``) stays last."""
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}")
    groups = [batches[i:i + group] for i in range(0, len(batches), group)]
    full = [g for g in groups if len(g) == group and (full_size is None or len(g[-1]) == full_size)]
    rest = groups[len(full):]
    if shuffle:
        full = [full[j] for j in rng.permutation(len(full))]
    return [b for g in full + rest for b in g]


def chain_batches(chain: np.ndarray, batch_size: int, group: int, seed: int, epoch: int,
                  shuffle: bool = True) -> List[np.ndarray]:
    """The epoch's batches: consecutive pieces of ``batch_size`` segments of the (rotated) chain,
    in groups of ``group`` batches whose order is shuffled (the partial group stays last)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    chain = _rotate(chain, rng, shuffle)
    batches = [chain[i:i + batch_size] for i in range(0, len(chain), batch_size)]
    return _shuffle_groups(batches, group, rng, shuffle, full_size=batch_size)


def chain_token_batches(chain: np.ndarray, num_tokens: np.ndarray, max_tokens: Optional[int],
                        max_sentences: Optional[int], group: int, seed: int, epoch: int,
                        shuffle: bool = True, fill: str = "padded") -> List[np.ndarray]:
    """The epoch's batches of sentences: the (rotated) chain cut into consecutive pieces that hold
    at most ``max_sentences`` items and ``max_tokens`` tokens, in groups of ``group`` batches whose
    order is shuffled. ``fill``: ``padded`` counts a batch as items x the longest item's
    ``num_tokens`` (fairseq's rule); ``real`` counts the sum of its items' ``num_tokens``, so that
    a chain of sentences of mixed lengths carries as many real tokens per batch as fairseq's
    length-sorted batches (which hold little padding) at the same ``max_tokens``."""
    if fill not in BM25_FILLS:
        raise ValueError(f"--bm25-fill must be one of {BM25_FILLS}, got {fill!r}")
    if not max_tokens and not max_sentences:
        raise ValueError("--batching bm25 needs --max-tokens or --batch-size")
    rng = np.random.default_rng([seed, epoch])
    chain = _rotate(chain, rng, shuffle)
    batches, current, longest, total = [], [], 0, 0
    for item in chain.tolist():
        n = int(num_tokens[item])
        if max_tokens and n > max_tokens:
            raise ValueError(f"item {item} has {n} tokens, more than --max-tokens {max_tokens}")
        wider = max(longest, n)
        size = (len(current) + 1) * wider if fill == "padded" else total + n  # the batch's tokens with the item
        if current and ((max_tokens and size > max_tokens) or (max_sentences and len(current) >= max_sentences)):
            batches.append(np.asarray(current, dtype=np.int64))
            current, wider, total = [], n, 0
        current.append(item)
        longest, total = wider, total + n
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return _shuffle_groups(batches, group, rng, shuffle)


class ChainEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's EpochBatchIterator with the epoch's batches from ``make_batches(epoch, shuffle)``
    (:func:`chain_batches` or :func:`chain_token_batches`)."""

    def __init__(self, dataset, collate_fn, make_batches: Callable[[int, bool], List[np.ndarray]], seed=1,
                 num_shards=1, shard_id=0, num_workers=0, epoch=1, buffer_size=0, skip_remainder_batch=False):
        self.make_batches = make_batches
        super().__init__(dataset, collate_fn, make_batches(epoch, False), seed=seed, num_shards=num_shards,
                         shard_id=shard_id, num_workers=num_workers, epoch=epoch, buffer_size=buffer_size,
                         skip_remainder_batch=skip_remainder_batch)

    def ordered_batches(self, epoch, fix_batches_to_gpus, shuffle):
        if fix_batches_to_gpus:
            raise ValueError("--batching bm25 fixes its own batch order: do not use --fix-batches-to-gpus")
        batches = self.make_batches(epoch, shuffle)
        batches = list(iterators.ShardedIterator(batches, self.num_shards, self.shard_id, fill_value=[]))
        if getattr(self.dataset, "supports_prefetch", False):
            self.dataset.prefetch([i for b in batches for i in b])
        return batches


def validate_options(cfg) -> None:
    """Errors for option combinations that cannot work (called by the task)."""
    batching = getattr(cfg, "batching", "shuffled")
    order = getattr(cfg, "bm25_order", None)
    if batching == "bm25" and not order:
        raise ValueError("--batching bm25 needs --bm25-order FILE (made by trime-bm25-batches)")
    if order and batching != "bm25":
        raise ValueError("--bm25-order needs --batching bm25")
    if str(getattr(cfg, "bm25_fill", "padded")) != "padded" and batching != "bm25":
        raise ValueError("--bm25-fill applies to --batching bm25 only")


def _update_freq(task) -> List[int]:
    try:
        value = getattr(task.args, "update_freq", None)
    except Exception as e:  # an unresolved ${optimization.update_freq}
        raise ValueError(f"--batching bm25 cannot read --update-freq from the task config ({e})") from None
    if value is None or isinstance(value, str):  # absent, or an interpolation outside a full config
        raise ValueError("--batching bm25 needs --update-freq in the task config (optimization.update_freq); "
                         f"got {value!r}")
    value = [int(value)] if isinstance(value, int) else [int(v) for v in value]
    if not value or min(value) < 1:
        raise ValueError(f"--update-freq must be >= 1, got {value}")
    return value


def _batch_size(dataset, max_tokens: Optional[int], max_sentences: Optional[int], multiple: int) -> int:
    longest = int(np.max(dataset.sizes)) if len(dataset) else 1
    sizes = [s for s in (max_sentences, (max_tokens // longest) if max_tokens else None) if s is not None]
    if not sizes:
        raise ValueError("--batching bm25 needs --batch-size or --max-tokens")
    size = min(sizes)
    if multiple > 1 and size >= multiple:
        size -= size % multiple
    if size < 1:
        raise ValueError(f"--max-tokens {max_tokens} is smaller than one segment ({longest} tokens)")
    return size


def _order_file(task, path: str):
    """(order, header) of ``path``, read once per task."""
    cache = getattr(task, "_trime_bm25_order", None)
    if cache is None or cache[0] != path:
        order, meta = read_order_file(path)
        cache = task._trime_bm25_order = (path, order, meta)
    return cache[1], cache[2]


def is_language_pair(dataset) -> bool:
    """A translation split (items = sentence pairs; BM25 items = target sentences)."""
    return getattr(dataset, "tgt_sizes", None) is not None


def load_order(task, path: str, dataset) -> np.ndarray:
    """The chain of ``path``, checked against the training dataset and the task."""
    order, meta = _order_file(task, path)
    problems = []
    if meta["num_segments"] != len(dataset):
        problems.append(f"{meta['num_segments']} items vs {len(dataset)} in the training set")
    pair = is_language_pair(dataset)
    if pair != (meta.get("items") == "target_sentences"):
        problems.append(f"an order of {meta.get('items', 'segments')} for a "
                        f"{'translation' if pair else 'language-modelling'} split")
    if pair:
        for key, mine in (("source_lang", getattr(task.cfg, "source_lang", None)),
                          ("target_lang", getattr(task.cfg, "target_lang", None))):
            if key in meta and mine is not None and meta[key] != mine:
                problems.append(f"--{key.replace('_', '-')} {meta[key]} vs {mine}")
        tokens = int(np.sum(dataset.tgt_sizes))
    else:
        for key in ("tokens_per_sample", "sample_break_mode"):
            mine = getattr(task.args, key, None)
            if key in meta and mine is not None and str(meta[key]) != str(mine):
                problems.append(f"--{key.replace('_', '-')} {meta[key]} vs {mine}")
        tokens = int(np.sum(dataset.sizes))
    if "num_tokens" in meta and tokens != meta["num_tokens"]:
        problems.append(f"{meta['num_tokens']} tokens vs {tokens}")
    if "dictionary_sha256" in meta and meta["dictionary_sha256"] != dictionary_checksum(task.target_dictionary):
        problems.append("a different dictionary")
    if problems:
        raise ValueError(f"--bm25-order {path} was built for other training data: " + "; ".join(problems)
                         + ". Rebuild it with trime-bm25-batches and the training options.")
    return order


@register_batching("bm25")
def bm25_batch_iterator(task, dataset, fallback, **options):
    """``options``: fairseq's get_batch_iterator arguments, by name (the task passes them all)."""
    max_tokens, max_sentences, max_positions = options["max_tokens"], options["max_sentences"], options["max_positions"]
    seed, num_shards, shard_id, epoch = options["seed"], options["num_shards"], options["shard_id"], options["epoch"]
    path = getattr(task.args, "bm25_order", None)
    if not path:
        raise ValueError("--batching bm25 needs --bm25-order FILE (made by trime-bm25-batches)")
    split = _order_file(task, path)[1].get("split", "train")
    if task.datasets.get(split) is not dataset:  # validation / test / eval-lm / generate: fairseq's order
        logger.info(f"--batching bm25 reorders only the '{split}' split; this dataset keeps fairseq's order")
        return fallback()

    can_reuse = (not options["disable_iterator_cache"] and not options["update_epoch_batch_itr"]
                 and task.can_reuse_epoch_itr(dataset))
    if can_reuse and dataset in task.dataset_to_epoch_iter:
        return task.dataset_to_epoch_iter[dataset]
    chain = load_order(task, path, dataset)
    if max_positions is not None:
        kept = task.filter_indices_by_size(np.arange(len(dataset)), dataset, max_positions,
                                           options["ignore_invalid_inputs"])
        if len(kept) != len(dataset):
            raise ValueError(f"{len(dataset) - len(kept)} training items exceed the model's max positions "
                             f"{max_positions}; --batching bm25 needs every item")
    freqs = _update_freq(task)

    def group_size(e: int) -> int:
        return freqs[min(e, len(freqs)) - 1] * num_shards

    if is_language_pair(dataset):  # sentences: batches filled up to --max-tokens along the chain
        num_tokens = np.maximum(np.asarray(dataset.src_sizes), np.asarray(dataset.tgt_sizes))
        fill = str(getattr(task.args, "bm25_fill", "padded"))
        per_batch = f"up to {max_tokens} tokens ({fill}) / {max_sentences} sentences"

        def make_batches(e: int, shuffle: bool):
            return chain_token_batches(chain, num_tokens, max_tokens, max_sentences, group_size(e), seed, e, shuffle,
                                       fill=fill)
    else:  # fixed-length segments
        batch_size = _batch_size(dataset, max_tokens, max_sentences, options["required_batch_size_multiple"])
        per_batch = f"{batch_size}"

        def make_batches(e: int, shuffle: bool):
            return chain_batches(chain, batch_size, group_size(e), seed, e, shuffle)

    dataset.set_epoch(epoch)
    itr = ChainEpochBatchIterator(dataset, dataset.collater, make_batches, seed=seed, num_shards=num_shards,
                                  shard_id=shard_id, num_workers=options["num_workers"], epoch=epoch,
                                  buffer_size=options["data_buffer_size"],
                                  skip_remainder_batch=options["skip_remainder_batch"])
    logger.info(f"bm25 batching: {len(chain)} items, {per_batch} per batch, "
                f"{group_size(epoch)} consecutive batches per update")
    if can_reuse:
        task.dataset_to_epoch_iter[dataset] = itr
    return itr
