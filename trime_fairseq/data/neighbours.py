"""SPALM's precomputed neighbours: files aligned to a split's token stream, and the datasets that carry them.

For every token position t of a split (the t-th target of the stream fairseq's
language-modeling data makes of the split: ``TokenBlockDataset`` order, each line
ending with ``eos``), ``trime-neighbours`` stores the K entries of a datastore
nearest to the query of t -- the separate vanilla LM's key of the context before
t -- best first. A neighbour folder holds one sub-folder per split::

    <root>/<split>/values.i32      (N, K) int32  next token stored with each neighbour (-1: none)
    <root>/<split>/scores.f32      (N, K) float32 the datastore's raw score (q·k or −|q−k|²; −inf: none)
    <root>/<split>/ids.i64         (N, K) int64  datastore entry id (-1: none)
    <root>/<split>/targets.i32     (N,)   int32  the split's token at t (checked against every item read)
    <root>/<split>/neighbours.json metadata, written last: its presence marks a complete file

The files are written in committed chunks with a progress marker (``progress.json``,
replaced atomically after the data it counts is flushed); a rerun with the same
settings resumes, and until ``neighbours.json`` exists the folder never loads.

Loading (:class:`NeighbourFolder`) checks the split, the token count, the
dictionary and K, and that every split of one folder comes from the same
datastore (its fingerprint). :class:`NeighbourDataset` adds the neighbours of
each block's targets to fairseq's language-modeling items and batches --
``net_input["neighbour_tokens"]`` (B, T, K) long (padding: no neighbour) and
``net_input["neighbour_scores"]`` (B, T, K) float32 -- so ``model(**net_input)``
receives them; :class:`NeighbourContextWindowDataset` keeps them aligned with the
targets under ``fairseq-eval-lm --context-window``.

Documents (own-document exclusion on the training split): :func:`document_labels`.
"""

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset, TokenBlockDataset
from fairseq.data.lm_context_window_dataset import LMContextWindowDataset

from trime_fairseq.atomic import atomic_write_json
from trime_fairseq.checksums import dictionary_checksum
from trime_fairseq.memory.datastore import settings_differences
from trime_fairseq.memory.keys import NEIGHBOUR_SCORES, NEIGHBOUR_TOKENS

FORMAT, VERSION = "trime-neighbours", 1
VALUES, SCORES, IDS, TARGETS = "values.i32", "scores.f32", "ids.i64", "targets.i32"
META, PROGRESS = "neighbours.json", "progress.json"
EXCLUSIONS = ("self", "document")
_ARRAYS = (  # file, dtype, columns (None: one per position)
    (VALUES, np.int32, "k"),
    (SCORES, np.float32, "k"),
    (IDS, np.int64, "k"),
    (TARGETS, np.int32, None),
)


class NeighbourError(ValueError):
    pass


# -- documents ----------------------------------------------------------------------------------

def document_labels(tokens: np.ndarray, boundaries) -> Tuple[np.ndarray, np.ndarray]:
    """(query documents (N,), entry documents (N,)) int64 of the positions of a token stream.

    The document rule is :class:`~trime_fairseq.memory.documents.DocumentBoundaries`': entry b
    (input x_b, target x_{b+1}) starts a document iff x_{b-1} = eos, x_b = "=", x_{b+1} != "="
    -- entry b, which reads the heading's opening "=", is the new document's first *entry*.
    Whether b starts a document depends on its target, so as a *query* a position only uses
    the starts strictly before it: position b still queries as the previous document, b + 1
    on as the new one. A query's document therefore never depends on its own target or
    later tokens; the own-document exclusion also hides the query's own entry separately.
    """
    starts = boundaries.starts_in_tokens(np.asarray(tokens))
    positions = np.arange(len(tokens))
    entry = np.searchsorted(starts, positions, side="right") - 1
    query = np.maximum(np.searchsorted(starts, positions, side="left") - 1, 0)
    return query.astype(np.int64), entry.astype(np.int64)


# -- writing -------------------------------------------------------------------------------------

class NeighbourWriter:
    """Writes one split's neighbour file in committed chunks; resumes an interrupted run with the same settings."""

    def __init__(self, folder, identity: dict, size: int, k: int, overwrite: bool = False):
        self.folder, self.size, self.k = Path(folder), int(size), int(k)
        if self.size < 1 or self.k < 1:
            raise NeighbourError(f"a neighbour file needs positions and k >= 1 (got {self.size} positions, k {k})")
        if (self.folder / META).exists() and not overwrite:
            raise NeighbourError(f"{self.folder} already holds complete neighbours; pass --overwrite to recompute them")
        identity = json.loads(json.dumps(dict(identity, size=self.size, k=self.k)))
        if overwrite or not (self.folder / PROGRESS).exists():
            for name in (META, PROGRESS) + tuple(name for name, _, _ in _ARRAYS):
                if (self.folder / name).exists():
                    (self.folder / name).unlink()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.progress = dict(identity=identity, rows=0, batches=0)
            self._open("w+")
            self._save_progress()
        else:
            self.progress = json.loads((self.folder / PROGRESS).read_text())
            if self.progress.get("identity") != identity:
                diff = settings_differences(self.progress.get("identity"), identity)
                raise NeighbourError(
                    f"{self.folder} holds an interrupted run with other settings ({diff}); delete it or rerun "
                    "with the same datastore, data and options to resume"
                )
            self._open("r+")
        self.rows = int(self.progress["rows"])  # positions committed
        self.batches_done = int(self.progress["batches"])  # input batches they came from
        self.next_position = self.rows  # where the next add() starts (committed or not)

    def add(self, values, scores, ids, targets) -> None:
        """Append the neighbours of the next n positions: values / scores / ids (n, K), targets (n,)."""
        n = len(targets)
        start = self.next_position
        if start + n > self.size:
            raise NeighbourError(f"more positions than the split's {self.size}")
        for name, array in (("values", values), ("scores", scores), ("ids", ids)):
            if np.shape(array) != (n, self.k):
                raise NeighbourError(f"{name} must be ({n}, {self.k}), got {np.shape(array)}")
        self.arrays[VALUES][start:start + n] = values
        self.arrays[SCORES][start:start + n] = scores
        self.arrays[IDS][start:start + n] = ids
        self.arrays[TARGETS][start:start + n] = targets
        self.next_position = start + n

    def commit(self, batches_done: int) -> None:
        for array in self.arrays.values():
            array.flush()
        self.rows, self.batches_done = self.next_position, int(batches_done)
        self.progress.update(rows=self.rows, batches=self.batches_done)
        self._save_progress()

    def finalize(self, meta: dict) -> dict:
        """Write the metadata (the completion marker) once every position has its neighbours."""
        self.commit(self.batches_done)
        if self.rows != self.size:
            raise NeighbourError(f"{self.rows} of {self.size} positions written: the split was not fully covered")
        meta = dict(format=FORMAT, version=VERSION, size=self.size, k=self.k, **meta,
                    created=time.strftime("%Y-%m-%d %H:%M:%S"))
        atomic_write_json(self.folder / META, meta)
        (self.folder / PROGRESS).unlink()
        return meta

    def _open(self, mode: str) -> None:
        self.arrays = {
            name: np.memmap(self.folder / name, dtype=dtype, mode=mode,
                            shape=(self.size, self.k) if cols else (self.size,))
            for name, dtype, cols in _ARRAYS
        }

    def _save_progress(self) -> None:
        atomic_write_json(self.folder / PROGRESS, self.progress)


# -- reading -------------------------------------------------------------------------------------

class NeighbourFile:
    """One split's complete neighbour file (memmaps) and its metadata."""

    def __init__(self, folder: Path, meta: dict, arrays: Dict[str, np.ndarray]):
        self.folder, self.meta = folder, meta
        self.values, self.scores = arrays[VALUES], arrays[SCORES]
        self.ids, self.targets = arrays[IDS], arrays[TARGETS]
        self.size, self.k = int(meta["size"]), int(meta["k"])

    @property
    def split(self) -> str:
        return self.meta["split"]

    @property
    def datastore_fingerprint(self) -> str:
        return self.meta["datastore"]["fingerprint"]

    @classmethod
    def load(cls, folder, split: Optional[str] = None, expect_dictionary=None,
             expect_size: Optional[int] = None, expect_datastore: Optional[str] = None) -> "NeighbourFile":
        """Open ``folder``, refusing incomplete files and files of another split / size / dictionary / datastore."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"neighbour folder not found: {folder} (write it with trime-neighbours)")
        if not (folder / META).exists():
            if (folder / PROGRESS).exists():
                rows = json.loads((folder / PROGRESS).read_text()).get("rows")
                raise NeighbourError(f"{folder} holds incomplete neighbours ({rows} positions written); rerun "
                                     "trime-neighbours with the same arguments to finish them")
            raise NeighbourError(f"{folder} holds no neighbours (no {META})")
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise NeighbourError(f"{folder}: unsupported format {meta.get('format')} v{meta.get('version')}")
        n, k = int(meta["size"]), int(meta["k"])
        if split is not None and meta["split"] != split:
            raise NeighbourError(f"{folder} holds the neighbours of split '{meta['split']}', not of '{split}'")
        if expect_size is not None and int(expect_size) != n:
            raise NeighbourError(f"{folder} holds neighbours of {n} positions but split '{meta['split']}' has "
                                 f"{expect_size} tokens: another version of the data, or another --data")
        if expect_dictionary is not None:
            sha = dictionary_checksum(expect_dictionary)
            if sha != meta["dictionary_sha256"]:
                raise NeighbourError(f"{folder} was written with another dictionary (sha256 "
                                     f"{meta['dictionary_sha256'][:12]}…, not {sha[:12]}…): its token ids would be wrong")
        if expect_datastore is not None and meta["datastore"]["fingerprint"] != expect_datastore:
            raise NeighbourError(
                f"{folder} comes from another datastore ({meta['datastore']['path']}, fingerprint "
                f"{meta['datastore']['fingerprint'][:12]}…) than the other splits' ({expect_datastore[:12]}…)"
            )
        arrays = {}
        for name, dtype, cols in _ARRAYS:
            shape = (n, k) if cols else (n,)
            path = folder / name
            expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not path.exists() or os.path.getsize(path) != expected:
                actual = os.path.getsize(path) if path.exists() else "no"
                raise NeighbourError(f"{path} has {actual} bytes, expected {expected} for {shape} (truncated?)")
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=shape)
        return cls(folder, meta, arrays)


class NeighbourFolder:
    """The neighbour files of one ``--neighbours`` folder: every split opened from it must come from one datastore."""

    def __init__(self, root, dictionary):
        self.root, self.dictionary = Path(root), dictionary
        self.datastore: Optional[str] = None  # fingerprint of the first split opened
        self.k: Optional[int] = None

    def open(self, split: str, size: int) -> NeighbourFile:
        found = NeighbourFile.load(self.root / split, split, self.dictionary, size, self.datastore)
        if self.k is not None and found.k != self.k:
            raise NeighbourError(f"{found.folder} holds {found.k} neighbours per position, the other splits {self.k}")
        self.datastore, self.k = found.datastore_fingerprint, found.k
        return found


# -- datasets ------------------------------------------------------------------------------------

def token_blocks(dataset) -> TokenBlockDataset:
    """The TokenBlockDataset under a language-modeling dataset (its blocks' stream offsets)."""
    inner = dataset
    while inner is not None and not isinstance(inner, TokenBlockDataset):
        inner = getattr(inner, "dataset", None)
    if inner is None:
        raise NeighbourError(f"neighbours follow fairseq's TokenBlockDataset blocks; {type(dataset).__name__} has none")
    return inner


class NeighbourDataset(BaseWrapperDataset):
    """A language-modeling dataset whose items and batches also carry each target's neighbours."""

    def __init__(self, dataset, neighbours: NeighbourFile, pad: int):
        super().__init__(dataset)
        if getattr(dataset, "add_bos_token", False):
            raise NeighbourError("neighbours are aligned with the token stream; --add-bos-token shifts the targets")
        self.blocks = token_blocks(dataset)
        self.neighbours, self.pad = neighbours, pad
        tokens = int(np.sum(self.blocks.sizes))
        if tokens != neighbours.size:
            raise NeighbourError(f"{neighbours.folder} holds neighbours of {neighbours.size} positions but split "
                                 f"'{neighbours.split}' has {tokens} tokens")
        # fill values of the batch fields for rows without data (ended streams, see data/stream.py)
        self.net_input_padding = {NEIGHBOUR_TOKENS: pad, NEIGHBOUR_SCORES: float("-inf")}

    def __getitem__(self, index):
        item = self.dataset[index]
        start, end = (int(x) for x in self.blocks.slice_indices[index])
        target = item["target"]
        stored = self.neighbours.targets[start:end]
        if target is None or len(target) != end - start or not np.array_equal(target.numpy(), stored):
            raise NeighbourError(
                f"the targets of block {index} (stream positions {start}..{end}) differ from those stored in "
                f"{self.neighbours.folder}: the neighbour file was written for other data"
            )
        values = torch.from_numpy(self.neighbours.values[start:end].astype(np.int64))
        item[NEIGHBOUR_TOKENS] = values.masked_fill(values < 0, self.pad)  # (T, K)
        item[NEIGHBOUR_SCORES] = torch.from_numpy(np.array(self.neighbours.scores[start:end]))  # (T, K)
        return item

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch:
            return batch
        bsz, tsz = batch["net_input"]["src_tokens"].shape
        k = self.neighbours.k
        tokens = torch.full((bsz, tsz, k), self.pad, dtype=torch.long)
        scores = torch.full((bsz, tsz, k), float("-inf"), dtype=torch.float32)
        for row, sample in enumerate(samples):  # targets are right-padded: neighbours too
            length = sample[NEIGHBOUR_TOKENS].size(0)
            tokens[row, :length] = sample[NEIGHBOUR_TOKENS]
            scores[row, :length] = sample[NEIGHBOUR_SCORES]
        batch["net_input"][NEIGHBOUR_TOKENS] = tokens
        batch["net_input"][NEIGHBOUR_SCORES] = scores
        return batch


class NeighbourContextWindowDataset(LMContextWindowDataset):
    """fairseq's ``--context-window`` rows (context tokens + the block) with the block's neighbours
    moved to the block's target columns; context columns have none (they are not scored)."""

    def collater(self, samples):
        sample = super().collater(samples)
        net_input = sample["net_input"]
        bsz, tsz = net_input["src_tokens"].shape
        old_tokens, old_scores = net_input[NEIGHBOUR_TOKENS], net_input[NEIGHBOUR_SCORES]
        length, k = old_tokens.shape[1:]
        tokens = old_tokens.new_full((bsz, tsz, k), self.pad_idx)
        scores = old_scores.new_full((bsz, tsz, k), float("-inf"))
        for row, start in enumerate(sample["start_indices"]):  # where the row's targets went
            tokens[row, start:start + length] = old_tokens[row]
            scores[row, start:start + length] = old_scores[row]
        net_input[NEIGHBOUR_TOKENS], net_input[NEIGHBOUR_SCORES] = tokens, scores
        return sample


def carries_neighbours(dataset) -> bool:
    """Whether ``dataset`` (or a dataset it wraps) is a :class:`NeighbourDataset`."""
    while dataset is not None:
        if isinstance(dataset, NeighbourDataset):
            return True
        dataset = getattr(dataset, "dataset", None)
    return False
