"""``--batching stream``: every batch row continues one contiguous stream of the data.

For recurrent-memory models (``trime_transformer_xl``, ``lamemo``), as in
Transformer-XL's training and fairseq's ``examples/truncated_bptt``: the blocks
of the dataset (``--tokens-per-sample`` tokens each, ``--sample-break-mode none``)
are cut into S = B × num_shards contiguous streams, and batch k holds block k of
each of this shard's B streams, row b always stream b. Nothing is shuffled or
dropped: streams differ in length by at most one block, and a stream that has
ended contributes an all-padding row, so every batch has B rows (the memory
owner drops the memory when the batch size changes).

B is ``--batch-size`` (``--batch-size-valid`` for validation), else
``--max-tokens`` // ``--tokens-per-sample``. ``fairseq-eval-lm`` gets the same
order (``eval_lm_dataloader`` calls ``get_batch_iterator``); ``--context-window``
is refused: the memory provides the context.

With this batching ``trime_lm`` enables the model's recurrence memory and resets
it at every epoch and validation pass (:func:`enable_stream_memory`,
:func:`reset_stream_memory`).
"""

import logging
from typing import List, Optional

import torch
from fairseq.data import FairseqDataset, iterators
from fairseq.data.lm_context_window_dataset import LMContextWindowDataset

from trime_fairseq.data.registry import register_batching
from trime_fairseq.models.recurrent_memory import RecurrentMemory

logger = logging.getLogger(__name__)

EMPTY_ROW = -1


def stream_layout(num_items: int, num_streams: int) -> List[range]:
    """Contiguous item ranges of ``num_streams`` streams; the first ``num_items % num_streams`` are one longer."""
    if num_streams < 1:
        raise ValueError(f"need at least one stream, got {num_streams}")
    base, extra = divmod(num_items, num_streams)
    ranges, start = [], 0
    for s in range(num_streams):
        length = base + (1 if s < extra else 0)
        ranges.append(range(start, start + length))
        start += length
    return ranges


def stream_batch_indices(num_items: int, batch_size: int, num_shards: int = 1, shard_id: int = 0) -> List[List[int]]:
    """Batches of item indices (``EMPTY_ROW`` for a stream that has ended) for one shard."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} out of range for {num_shards} shards")
    every = stream_layout(num_items, batch_size * num_shards)
    streams = every[shard_id * batch_size : (shard_id + 1) * batch_size]
    steps = len(every[0])  # all shards yield the same number of batches
    return [[stream[k] if k < len(stream) else EMPTY_ROW for stream in streams] for k in range(steps)]


class StreamRowsDataset(FairseqDataset):
    """Wraps a language-modeling dataset; index ``EMPTY_ROW`` collates to an all-padding row."""

    def __init__(self, dataset, pad: int):
        super().__init__()
        self.dataset = dataset
        self.pad = pad

    def __getitem__(self, index):
        return None if index == EMPTY_ROW else self.dataset[index]

    def __len__(self):
        return len(self.dataset)

    def num_tokens(self, index):
        return self.dataset.num_tokens(index)

    def size(self, index):
        return self.dataset.size(index)

    @property
    def sizes(self):
        return self.dataset.sizes

    def collater(self, samples):
        real = [s for s in samples if s is not None]
        empty = len(samples) - len(real)
        if any(s is None for s in samples[: len(real)]):
            raise ValueError("ended streams must be the last rows of a batch")
        batch = self.dataset.collater(real)
        if not batch or empty == 0:
            return batch

        def pad_rows(t: torch.Tensor, value) -> torch.Tensor:
            return torch.cat([t, t.new_full((empty,) + tuple(t.shape[1:]), value)], dim=0)

        batch["id"] = pad_rows(batch["id"], EMPTY_ROW)
        net_input = batch["net_input"]
        net_input["src_tokens"] = pad_rows(net_input["src_tokens"], self.pad)
        if "src_lengths" in net_input:
            net_input["src_lengths"] = pad_rows(net_input["src_lengths"], 0)
        fills = net_input_padding(self.dataset)
        for name in set(net_input) - {"src_tokens", "src_lengths"}:  # e.g. SPALM's neighbours
            if name not in fills:
                raise ValueError(f"no fill value for the batch field '{name}' of an ended stream's row: "
                                 "the dataset must name it in its net_input_padding")
            net_input[name] = pad_rows(net_input[name], fills[name])
        if torch.is_tensor(batch.get("target")):
            batch["target"] = pad_rows(batch["target"], self.pad)
        return batch


def net_input_padding(dataset) -> dict:
    """Fill values of the extra ``net_input`` fields of a dataset (or of one it wraps): ``{name: value}``."""
    while dataset is not None:
        fills = getattr(dataset, "net_input_padding", None)
        if fills is not None:
            return fills
        dataset = getattr(dataset, "dataset", None)
    return {}


def _batch_size(task, max_tokens: Optional[int], max_sentences: Optional[int]) -> int:
    if max_sentences is not None and max_sentences > 0:
        return int(max_sentences)
    cfg = getattr(task, "args", None) or task.cfg
    tokens_per_sample = getattr(cfg, "tokens_per_sample", None)
    if max_tokens is None or not tokens_per_sample:
        raise ValueError("--batching stream needs --batch-size (or --max-tokens and --tokens-per-sample)")
    return max(1, int(max_tokens) // int(tokens_per_sample))


@register_batching("stream")
def stream_batches(task, dataset, *, max_tokens, max_sentences, seed, num_shards, shard_id, num_workers, epoch,
                   data_buffer_size, **_):
    if isinstance(dataset, LMContextWindowDataset):
        raise ValueError(
            "--context-window does not combine with --batching stream: the recurrence memory gives "
            "the context (set mem_len, e.g. --model-overrides \"{'mem_len': 640}\")"
        )
    batch_size = _batch_size(task, max_tokens, max_sentences)
    batches = stream_batch_indices(len(dataset), batch_size, num_shards, shard_id)
    logger.info(
        "stream batching: %d blocks in %d streams of this shard, %d batches", len(dataset), batch_size, len(batches)
    )
    rows = StreamRowsDataset(dataset, task.source_dictionary.pad())
    return iterators.EpochBatchIterator(
        dataset=rows,
        collate_fn=rows.collater,
        batch_sampler=batches,
        seed=seed,
        num_workers=num_workers,
        epoch=epoch,
        buffer_size=data_buffer_size,
        disable_shuffling=True,
    )


# -- the model side: which memories follow the stream -------------------------------------


def recurrent_memories(model) -> List[RecurrentMemory]:
    """Every distinct :class:`RecurrentMemory` owned by a module of ``model``."""
    found = {}
    for module in model.modules():
        memory = module.__dict__.get("recurrent_memory")
        if isinstance(memory, RecurrentMemory):
            found[id(memory)] = memory
    return list(found.values())


def enable_stream_memory(model, enabled: bool) -> None:
    """Carry memory across batches (stream order) or start every batch empty (any other order)."""
    memories = recurrent_memories(model)
    for memory in memories:
        memory.enable(enabled)
    if memories:
        logger.info("recurrence memory across batches: %s", "on (stream)" if enabled else "off")


def reset_stream_memory(model) -> None:
    for memory in recurrent_memories(model):
        memory.reset()
