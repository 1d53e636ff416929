"""Training segments cut inside documents, grouped into runs of consecutive segments.

* :class:`TokenStream` -- the flat token stream of a split (its lines, each ending
  with ``eos``, concatenated; the stream fairseq's ``TokenBlockDataset`` cuts with
  ``--sample-break-mode none``).
* :func:`plan_runs` -- documents -> runs of ``m`` consecutive segments of length
  ``<= L`` (a document's last run is completed with empty *filler* segments).
* :class:`SegmentDataset` -- a FairseqDataset whose item ``r * m + j`` is segment
  ``j`` of run ``r``, collated like fairseq's ``MonolingualDataset`` (source =
  target shifted right by one, padding on the right). A filler segment is the
  single input token ``eos`` with a ``pad`` target: it is no position of the loss
  and no memory entry, and it keeps every row of a batch non-empty.
"""

import logging
from typing import Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils

logger = logging.getLogger(__name__)


class TokenStream:
    """Random access to the concatenated lines of a (binarized) line dataset."""

    def __init__(self, lines):
        self.lines = lines
        self.sizes = np.asarray(lines.sizes, dtype=np.int64)
        self._tokens: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def tokens(self) -> np.ndarray:
        """The whole stream: a zero-copy view of fairseq's mmap file when the lines are
        stored contiguously (fairseq-preprocess output), else one concatenated copy."""
        if self._tokens is None:
            self._tokens = _mmap_view(self.lines, self.sizes)
            if self._tokens is None:
                self._tokens = np.concatenate(
                    [np.asarray(self.lines[i], dtype=np.int64) for i in range(len(self.lines))]
                    or [np.zeros(0, dtype=np.int64)]
                )
        return self._tokens

    def __getstate__(self):  # DataLoader workers rebuild the view instead of pickling it
        return {"lines": self.lines, "sizes": self.sizes, "_tokens": None}


def _mmap_view(lines, sizes) -> Optional[np.ndarray]:
    index = getattr(lines, "_index", None)
    buffer = getattr(lines, "_bin_buffer", None)
    pointers = getattr(index, "_pointers", None)
    if index is None or buffer is None or pointers is None or len(sizes) == 0:
        return None
    itemsize = np.dtype(index.dtype).itemsize
    contiguous = pointers[0] == 0 and np.array_equal(np.diff(pointers), sizes[:-1] * itemsize)
    if not contiguous:
        return None
    return np.frombuffer(buffer, dtype=index.dtype, count=int(sizes.sum()))


def plan_runs(doc_starts: np.ndarray, total: int, seg_len: int, m: int) -> np.ndarray:
    """(R, m, 2) int64 [start, end) stream ranges of the segments of every run.

    Each document [a, b) is cut into segments [a + i·L, min(a + (i+1)·L, b)); each
    run holds m consecutive segments of one document, in order; the last run of a
    document is completed with empty filler segments (start = end = b).
    """
    if seg_len < 1 or m < 1:
        raise ValueError(f"segment length and run length must be >= 1, got L={seg_len}, m={m}")
    starts = np.asarray(doc_starts, dtype=np.int64)
    ends = np.append(starts[1:], total)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    n_seg = -(-(ends - starts) // seg_len)  # ceil
    n_runs = -(-n_seg // m)
    slots = n_runs * m  # segments incl. fillers, per document
    doc = np.repeat(np.arange(len(starts)), slots)
    within = np.arange(int(slots.sum())) - np.repeat(np.cumsum(slots) - slots, slots)
    seg_start = np.minimum(starts[doc] + within * seg_len, ends[doc])
    seg_end = np.minimum(seg_start + seg_len, ends[doc])
    return np.stack([seg_start, seg_end], -1).reshape(-1, m, 2)


class SegmentDataset(FairseqDataset):
    """Segments of a token stream in run order: item r·m + j is segment j of run r."""

    def __init__(self, stream: TokenStream, runs: np.ndarray, pad: int, eos: int):
        self.stream = stream
        self.runs = runs  # (R, m, 2)
        self.m = runs.shape[1]
        self.segments = runs.reshape(-1, 2)
        self.pad, self.eos = pad, eos
        lengths = self.segments[:, 1] - self.segments[:, 0]
        self.sizes = np.maximum(lengths, 1)  # a filler is one input token
        self.is_filler = lengths == 0

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def num_runs(self) -> int:
        return len(self.runs)

    def __getitem__(self, index):
        s, e = (int(v) for v in self.segments[index])
        tokens = self.stream.tokens
        if s == e:  # filler
            source, target = np.array([self.eos]), np.array([self.pad])
        else:
            target = np.asarray(tokens[s:e], dtype=np.int64)
            if s > 0:
                source = np.asarray(tokens[s - 1 : e - 1], dtype=np.int64)
            else:  # like TokenBlockDataset: the stream starts after an eos
                source = np.concatenate([[self.eos], np.asarray(tokens[0 : e - 1], dtype=np.int64)])
        return {
            "id": index,
            "source": torch.from_numpy(np.asarray(source, dtype=np.int64)),
            "target": torch.from_numpy(np.asarray(target, dtype=np.int64)),
        }

    def collater(self, samples, whole_runs: bool = True):
        """Rows in the given order (runs stay adjacent and in order); padding on the right.
        ``whole_runs=False``: a piece of a step whose runs span workers (any number of rows)."""
        if len(samples) == 0:
            return {}
        if whole_runs and len(samples) % self.m != 0:
            raise ValueError(f"a batch of {len(samples)} segments does not hold whole runs of {self.m}")
        src = data_utils.collate_tokens([s["source"] for s in samples], self.pad, self.eos, left_pad=False)
        tgt = data_utils.collate_tokens([s["target"] for s in samples], self.pad, self.eos, left_pad=False)
        return {
            "id": torch.LongTensor([s["id"] for s in samples]),
            "nsentences": len(samples),
            "ntokens": int(tgt.ne(self.pad).sum()),
            "net_input": {"src_tokens": src, "src_lengths": torch.LongTensor([len(s["source"]) for s in samples])},
            "target": tgt,
            "segments_per_run": self.m,
        }

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        return np.arange(len(self))

    @property
    def supports_prefetch(self):
        return False
