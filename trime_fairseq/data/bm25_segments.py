"""Training segments exactly as ``trime_lm`` / ``language_modeling`` cut them.

fairseq's language-modeling task concatenates the binarized split and cuts it
into blocks with :class:`fairseq.data.TokenBlockDataset` (``--tokens-per-sample L``,
``--sample-break-mode``). Dataset item i -- the segment id used by the BM25
order file -- is block i; its target tokens are ``flat[slice_indices[i]]``.
"""

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from trime_fairseq.checksums import dictionary_checksum  # noqa: F401  (re-exported)


@dataclass
class Segments:
    tokens: np.ndarray  # (T,) int64, the segments' tokens end to end
    offsets: np.ndarray  # (N+1,) int64, segment i = tokens[offsets[i]:offsets[i+1]]
    dictionary: object  # fairseq Dictionary of the data
    tokens_per_sample: int
    sample_break_mode: str
    split: str

    @property
    def num_segments(self) -> int:
        return len(self.offsets) - 1

    def segment(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def _flat_tokens(dataset) -> np.ndarray:
    """All items of an indexed dataset end to end, (T,) int64."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    sizes = np.asarray(dataset.sizes, dtype=np.int64)
    if isinstance(dataset, MMapIndexedDataset):  # items are stored back to back: one read
        index = dataset._index
        pointers = np.asarray(index._pointers, dtype=np.int64)
        itemsize = np.dtype(index.dtype).itemsize
        if len(pointers) and pointers[0] == 0 and np.array_equal(pointers[1:], np.cumsum(sizes)[:-1] * itemsize):
            return np.frombuffer(dataset._bin_buffer, dtype=index.dtype, count=int(sizes.sum())).astype(np.int64)
    parts = [np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def load_segments(data: str, split: str, tokens_per_sample: int, sample_break_mode: str = "none",
                  dataset_impl: Optional[str] = None) -> Segments:
    """Segments of a fairseq-binarized split (``data``/``split``.{bin,idx}, ``data``/dict.txt)."""
    from fairseq.data import Dictionary, TokenBlockDataset, data_utils

    dict_path = os.path.join(data, "dict.txt")
    if not os.path.isfile(dict_path):
        raise FileNotFoundError(f"no dictionary at {dict_path}: --data must be a fairseq-preprocess output folder")
    if tokens_per_sample < 1:
        raise ValueError(f"--tokens-per-sample must be >= 1, got {tokens_per_sample}")
    dictionary = Dictionary.load(dict_path)
    split_path = os.path.join(data, split)
    dataset = data_utils.load_indexed_dataset(split_path, dictionary, dataset_impl)
    if dataset is None:
        raise FileNotFoundError(f"dataset split not found: {split_path}.{{bin,idx}}")
    blocks = TokenBlockDataset(
        dataset, dataset.sizes, tokens_per_sample, pad=dictionary.pad(), eos=dictionary.eos(),
        break_mode=sample_break_mode, include_targets=True,
    )
    flat = _flat_tokens(dataset)
    slices = np.asarray(blocks.slice_indices, dtype=np.int64)  # (N, 2) into flat
    lengths = slices[:, 1] - slices[:, 0]
    offsets = np.zeros(len(slices) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(slices) and np.array_equal(slices[1:, 0], slices[:-1, 1]) and slices[0, 0] == 0:
        tokens = flat[slices[0, 0]:slices[-1, 1]]  # contiguous blocks (the usual case)
    else:
        index = np.concatenate([np.arange(s, e) for s, e in slices]) if len(slices) else np.zeros(0, np.int64)
        tokens = flat[index]
    return Segments(tokens, offsets, dictionary, tokens_per_sample, sample_break_mode, split)
