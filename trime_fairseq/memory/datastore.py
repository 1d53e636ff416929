"""External memory: a FAISS datastore of (key, next token) pairs (kNN-LM, TRIMELM_ext).

A datastore folder holds::

    keys.f16        (N, d) float16 raw memmap -- g (``trime_key``) or f (``trime_feature``);
                    keys.f32 (float32) with ``key_dtype="float32"``
    values.i32      (N,)   int32 next-token ids (int16 would overflow a 267k vocabulary)
    index.faiss     FAISS index over the keys (ids 0..N-1 = rows of the memmaps)
    datastore.json  metadata, written last: its presence marks a complete datastore

Building (:class:`DatastoreWriter`) runs in stages that survive interruption:
keys are written in chunks with a progress marker (``progress.json``, replaced
atomically after the data it counts is flushed), the trained index and the
partly filled index are saved atomically, and a rerun with the same settings
resumes from the last marker. Until ``datastore.json`` exists the folder never
loads as a datastore.

Sharded builds (N machines / GPUs extract keys in parallel): part i of N is a
folder of keys and values only (stage 1) for a contiguous range of the single
build's batches (``source["batches"]``), ending with ``part.json``.
:func:`merge_parts` checks that all N parts are complete, agree and tile the
batches, then copies them in order into one datastore -- row for row the single
build (resumable like stage 1) -- whose index is then built as usual.

Search (:meth:`Datastore.search`) answers with the project's
:class:`~trime_fairseq.memory.sources.MemoryBatch`: scores are the inner product
(``metric=ip``) or the negative squared L2 distance (``metric=l2``), not yet
scaled, so callers apply temperatures and interpolation with
:mod:`trime_fairseq.memory.mixing` (``memory_log_probs``, ``interpolate_memory``,
``joint_log_probs``).
"""

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import faiss
import numpy as np
import torch
from tqdm import tqdm

from trime_fairseq.atomic import atomic_path, atomic_write_json
from trime_fairseq.checksums import checkpoint_model_checksum, dictionary_checksum, is_checksum, model_checksum
from trime_fairseq.memory import faiss_index as fi
from trime_fairseq.memory.sources import MemoryBatch

FORMAT, VERSION = "trime-datastore", 1
VALUES, INDEX, META, PROGRESS = "values.i32", "index.faiss", "datastore.json", "progress.json"
PART = "part.json"  # written last in the folder of one part of a sharded build
TRAINED, PARTIAL = "index.trained.faiss", "index.partial.faiss"
VALUE_DTYPE = np.int32
#: key storage: dtype name -> (file name, numpy dtype)
KEY_DTYPES = {"float16": ("keys.f16", np.float16), "float32": ("keys.f32", np.float32)}
KEY_FILES = tuple(name for name, _ in KEY_DTYPES.values())
KEY_TYPES = ("trime_key", "trime_feature")


class DatastoreError(ValueError):
    pass


@dataclass(frozen=True)
class DatastoreSpec:
    """What a datastore holds and where its keys come from (part of its metadata)."""

    dim: int
    key_type: str  # trime_key (g) | trime_feature (f)
    metric: str  # ip | l2
    dictionary_size: int
    dictionary_sha256: str
    model_path: str
    model_sha256: str
    source: dict = field(default_factory=dict)  # split, context window, tokens per sample, ...
    key_dtype: str = "float16"  # storage of the keys (KEY_DTYPES)

    def __post_init__(self):
        if self.dim < 1:
            raise DatastoreError(f"key dimension must be >= 1, got {self.dim}")
        if self.key_dtype not in KEY_DTYPES:
            raise DatastoreError(f"unknown key dtype '{self.key_dtype}', choose one of {sorted(KEY_DTYPES)}")
        if self.key_type not in KEY_TYPES:
            raise DatastoreError(f"unknown key type '{self.key_type}', choose one of {KEY_TYPES}")
        fi.metric_of(self.metric)


# -- writing -------------------------------------------------------------------------------------

class DatastoreWriter:
    """Builds a datastore folder stage by stage: keys -> trained index -> filled index -> metadata."""

    def __init__(self, path, spec: DatastoreSpec, capacity: int, overwrite: bool = False):
        self.path, self.spec, self.capacity = Path(path), spec, int(capacity)
        if self.capacity < 1:
            raise DatastoreError("a datastore needs at least one key (the split has no scored positions)")
        if (self.path / META).exists() and not overwrite:
            raise DatastoreError(f"{self.path} already holds a complete datastore; pass --overwrite to rebuild it")
        if overwrite:  # a complete datastore or an interrupted build: start again
            for name in (META, PROGRESS, *KEY_FILES, VALUES, INDEX, TRAINED, PARTIAL):
                if (self.path / name).exists():
                    (self.path / name).unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        identity = {"spec": asdict(spec), "capacity": self.capacity}
        if (self.path / PROGRESS).exists():
            self.progress = json.loads((self.path / PROGRESS).read_text())
            theirs = {"spec": self.progress.get("spec"), "capacity": self.progress.get("capacity")}
            if theirs != json.loads(json.dumps(identity)):
                diff = settings_differences(theirs, identity)
                raise DatastoreError(
                    f"{self.path} holds an interrupted build with other settings ({diff}); delete the folder or "
                    "rerun with the same checkpoint, data and options to resume it"
                )
            if self.progress["stage"] == "keys":
                self._open_memmaps("r+", self.capacity)
            else:
                self._truncate(self.progress["rows"])
                self._open_memmaps("r", self.progress["rows"])
        else:
            for name in (*KEY_FILES, VALUES, INDEX, TRAINED, PARTIAL):
                if (self.path / name).exists():
                    (self.path / name).unlink()
            self._open_memmaps("w+", self.capacity)
            self.progress = dict(identity, stage="keys", rows=0, batches=0)
            self._save_progress()

    # -- stage 1: keys and values -------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self.progress["stage"]

    @property
    def rows(self) -> int:
        return int(self.progress["rows"])

    @property
    def batches_done(self) -> int:
        return int(self.progress["batches"])

    def add(self, keys, values) -> None:
        """Append keys (n, d) and values (n,) after the rows written so far (uncommitted)."""
        if self.stage != "keys":
            raise DatastoreError(f"keys are complete (stage {self.stage}); cannot add more")
        keys = _numpy(keys)
        values = _numpy(values)
        n = keys.shape[0]
        if keys.ndim != 2 or keys.shape[1] != self.spec.dim:
            raise DatastoreError(f"keys must be (n, {self.spec.dim}), got {keys.shape}")
        if values.shape != (n,):
            raise DatastoreError(f"values must be ({n},), got {values.shape}")
        if n and (values.min() < 0 or values.max() >= self.spec.dictionary_size):
            raise DatastoreError(f"values must be token ids in [0, {self.spec.dictionary_size})")
        start = self._pending
        if start + n > self.capacity:
            raise DatastoreError(f"more keys than the datastore's capacity {self.capacity}")
        stored = keys.astype(self._key_dtype)
        finite = np.isfinite(stored).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            was = "finite before conversion" if np.isfinite(keys[row]).all() else "not finite in the model"
            raise DatastoreError(
                f"the key of entry {start + row} (the {start + row}-th scored token of the split) is not finite in "
                f"{self.spec.key_dtype} ({was}; max |value| {float(np.nanmax(np.abs(keys[row].astype(np.float64)))):g}); "
                + ("rebuild with --key-dtype float32" if was.startswith("finite") else
                   "the model produced inf/NaN features (run it without --fp16)")
            )
        self.keys[start:start + n] = stored
        self.values[start:start + n] = values.astype(VALUE_DTYPE)
        self._pending = start + n

    def commit(self, batches_done: int) -> None:
        """Flush the rows added so far, then record them (and the batches they came from)."""
        self.keys.flush()
        self.values.flush()
        self.progress.update(rows=self._pending, batches=int(batches_done))
        self._save_progress()

    def finish_part(self, shard_id: int, num_shards: int) -> dict:
        """End a part of a sharded build: keys complete, ``part.json`` written last. Returns it."""
        n = self.finish_keys()
        part = dict(format=FORMAT, version=VERSION, part=True, shard_id=int(shard_id), num_shards=int(num_shards),
                    rows=n, spec=asdict(self.spec), capacity=self.capacity, created=time.strftime("%Y-%m-%d %H:%M:%S"))
        atomic_write_json(self.path / PART, part)
        return part

    def finish_keys(self) -> int:
        """End stage 1: the datastore holds exactly the committed rows. Returns N."""
        if self.stage == "keys":
            self.commit(self.batches_done)
            if self.rows == 0:
                raise DatastoreError("no keys were written")
            self.progress["stage"] = "keys_done"
            self._save_progress()
            del self.keys, self.values
            self._truncate(self.rows)
            self._open_memmaps("r", self.rows)
        return self.rows

    # -- stage 2-3: index ---------------------------------------------------------------------------
    def build_index(self, factory: str = "IVF4096,PQ64", ntrain: int = 1_000_000, seed: int = 1,
                    add_chunk: int = 1_000_000, save_every: int = 10, use_gpu: bool = False,
                    gpu_device: int = 0, progress_bar: bool = True) -> None:
        """Train (on up to ``ntrain`` random keys) and fill the index, resumably."""
        if self.stage == "keys":
            raise DatastoreError("call finish_keys() before build_index()")
        if self.stage == "indexed":
            return
        n, dim = self.rows, self.spec.dim
        settings = dict(factory=factory, ntrain=int(ntrain), seed=int(seed))
        if "index" in self.progress and self.progress["index"] != settings:
            raise DatastoreError(
                f"the interrupted build used index settings {self.progress['index']}, not {settings}; "
                "rerun with the same --index-factory / --ntrain / --seed, or delete the folder"
            )
        fi.check_factory(factory, dim, n, ntrain)
        placement = fi.GpuPlacement(gpu_device) if use_gpu else None
        if self.stage == "keys_done":
            self.progress["index"] = settings
            index = fi.new_index(factory, dim, self.spec.metric)
            if placement is not None:
                index = placement.to_gpu(index)
            if not index.is_trained:
                sample = self._training_sample(ntrain, seed, progress_bar)
                with tqdm(total=1, desc=f"train {factory} on {len(sample)} keys", disable=not progress_bar) as bar:
                    t, cpu = time.time(), time.process_time()
                    index.train(sample)
                    bar.update(1)
                self.progress.update(train_seconds=round(time.time() - t, 2),
                                     train_cpu_seconds=round(time.process_time() - cpu, 2))
                del sample
            self._write_index(fi.to_cpu(index), TRAINED)
            self.progress.update(stage="adding", added=0)
            self._save_progress()
        # stage "adding": continue from the last saved partial index
        source = PARTIAL if self.progress["added"] > 0 else TRAINED
        index = self._read_index(source)
        if index.ntotal != self.progress["added"]:
            raise DatastoreError(f"{source} holds {index.ntotal} keys but progress says {self.progress['added']}")
        if placement is not None:
            index = placement.to_gpu(index)
        start = int(self.progress["added"])
        chunks_since_save = 0
        with tqdm(total=n, initial=start, desc="add keys", unit="key", disable=not progress_bar,
                  mininterval=2.0) as bar:
            while start < n:
                stop = min(start + add_chunk, n)
                index.add(fi.as_float32(self.keys[start:stop]))
                bar.update(stop - start)
                start = stop
                chunks_since_save += 1
                if start < n and chunks_since_save >= save_every:
                    self._write_index(fi.to_cpu(index), PARTIAL)
                    self.progress["added"] = start
                    self._save_progress()
                    chunks_since_save = 0
        if index.ntotal != n:
            raise DatastoreError(f"index holds {index.ntotal} keys after adding, expected {n}")
        self._write_index(fi.to_cpu(index), INDEX)
        self.progress.update(stage="indexed", added=n)
        self._save_progress()

    # -- stage 4: metadata -------------------------------------------------------------------------
    def finalize(self, nprobe: Optional[int] = 32, extra: Optional[dict] = None) -> dict:
        """Write datastore.json (the completion marker) and remove the build's leftovers."""
        if self.stage != "indexed":
            raise DatastoreError(f"cannot finalize at stage {self.stage}: build the index first")
        index = self._read_index(INDEX)
        if faiss.try_extract_index_ivf(index) is None:
            nprobe = None
        meta = dict(
            format=FORMAT,
            version=VERSION,
            size=self.rows,
            value_dtype="int32",
            **asdict(self.spec),
            index=dict(self.progress["index"], nprobe=nprobe, type=type(index).__name__),
            created=time.strftime("%Y-%m-%d %H:%M:%S"),
            **(extra or {}),
        )
        atomic_write_json(self.path / META, meta)
        for name in (PROGRESS, TRAINED, PARTIAL):
            if (self.path / name).exists():
                (self.path / name).unlink()
        return meta

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def _key_file(self) -> str:
        return KEY_DTYPES[self.spec.key_dtype][0]

    @property
    def _key_dtype(self):
        return KEY_DTYPES[self.spec.key_dtype][1]

    def _open_memmaps(self, mode: str, rows: int) -> None:
        self.keys = np.memmap(self.path / self._key_file, dtype=self._key_dtype, mode=mode,
                              shape=(rows, self.spec.dim))
        self.values = np.memmap(self.path / VALUES, dtype=VALUE_DTYPE, mode=mode, shape=(rows,))
        self._pending = int(self.progress["rows"]) if hasattr(self, "progress") else 0

    def _truncate(self, rows: int) -> None:
        key_bytes = np.dtype(self._key_dtype).itemsize
        for name, size in ((self._key_file, rows * self.spec.dim * key_bytes), (VALUES, rows * 4)):
            if os.path.getsize(self.path / name) != size:
                os.truncate(self.path / name, size)

    def _save_progress(self) -> None:
        atomic_write_json(self.path / PROGRESS, self.progress)

    def _training_sample(self, ntrain: int, seed: int, progress_bar: bool) -> np.ndarray:
        n = self.rows
        if ntrain >= n:
            rows = np.arange(n)
        else:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=ntrain, replace=False))
        sample = np.empty((len(rows), self.spec.dim), dtype=np.float32)
        step = 65536
        for i in tqdm(range(0, len(rows), step), desc="read training sample", disable=not progress_bar):
            sample[i:i + step] = self.keys[rows[i:i + step]]
        return sample

    def _write_index(self, index, name: str) -> None:
        with atomic_path(self.path / name) as tmp:
            faiss.write_index(index, str(tmp))

    def _read_index(self, name: str):
        return _read_index(self.path / name)


def settings_differences(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(a or {}) | set(b or {})):
        x, y = (a or {}).get(key), (b or {}).get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            inner = settings_differences(x, y, f"{prefix}{key}.")
            if inner:
                out.append(inner)
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} vs {y!r}")
    return "; ".join(out)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _read_index(path: Path):
    if not path.exists():
        raise DatastoreError(f"missing FAISS index {path}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        detail = str(e).strip()[:200]
        raise DatastoreError(f"cannot read FAISS index {path} (truncated or corrupt?): {detail}") from None


# -- sharded builds ---------------------------------------------------------------------------

def part_folder(output, shard_id: int, num_shards: int) -> Path:
    return Path(output) / f"part-{shard_id}-of-{num_shards}"


def read_part(path) -> dict:
    """``part.json`` of a complete part; a clear error for a missing or unfinished part."""
    path = Path(path)
    if not path.is_dir():
        raise DatastoreError(f"missing part {path}: run trime-build-datastore with its --shard-id first")
    if not (path / PART).exists():
        state = json.loads((path / PROGRESS).read_text()) if (path / PROGRESS).exists() else {}
        raise DatastoreError(f"part {path} is incomplete (stage '{state.get('stage', 'none')}', {state.get('rows', 0)} "
                             "keys written); rerun its trime-build-datastore command to finish it")
    part = json.loads((path / PART).read_text())
    key_file, key_np = KEY_DTYPES[part["spec"]["key_dtype"]]
    n, d = int(part["rows"]), int(part["spec"]["dim"])
    for name, size in ((key_file, n * d * np.dtype(key_np).itemsize), (VALUES, n * 4)):
        if not (path / name).exists() or os.path.getsize(path / name) != size:
            raise DatastoreError(f"part {path}: {name} does not hold its {n} entries (truncated or replaced)")
    return part


def merge_parts(output, num_shards: int, overwrite: bool = False, progress_bar: bool = True) -> "DatastoreWriter":
    """Stage 1 of the datastore at ``output`` from its N complete parts (``output/part-i-of-N``), copied in
    order (their batch ranges tile the single build's). Returns the writer at stage ``keys_done`` (then
    :meth:`DatastoreWriter.build_index` and :meth:`DatastoreWriter.finalize`)."""
    if num_shards < 2:
        raise DatastoreError(f"a sharded build has >= 2 parts, got {num_shards}")
    parts = [read_part(part_folder(output, i, num_shards)) for i in range(num_shards)]
    first = dict(parts[0]["spec"], source=_unsharded(parts[0]["spec"]["source"]))
    covered = 0
    for i, part in enumerate(parts):
        problems = []
        if (part["shard_id"], part["num_shards"]) != (i, num_shards):
            problems.append(f"it is part {part['shard_id']} of {part['num_shards']}")
        spec = dict(part["spec"], source=_unsharded(part["spec"]["source"]))
        if spec != first:
            problems.append(settings_differences(first, spec))
        lo, hi = part["spec"]["source"]["batches"]
        if lo != covered:
            problems.append(f"its batches start at {lo}, not {covered}")
        covered = hi
        if problems:
            raise DatastoreError(f"part {i} of {output} does not match part 0: " + "; ".join(problems)
                                 + " (every part must come from the same checkpoint, data and options)")
    if covered != first["source"]["num_batches"]:
        raise DatastoreError(f"the parts of {output} cover batches [0, {covered}) of {first['source']['num_batches']}")
    spec = DatastoreSpec(**dict(first, source=dict(first["source"], num_shards=num_shards)))
    writer = DatastoreWriter(output, spec, sum(p["rows"] for p in parts), overwrite=overwrite)
    if writer.stage != "keys":
        return writer
    chunk = max(1, (64 << 20) // (spec.dim * 4))  # rows copied at a time: bounded memory
    start, offset = writer.rows, 0  # rows copied before an interruption are kept
    with tqdm(total=writer.capacity, initial=start, desc=f"merge {num_shards} parts", unit="key",
              disable=not progress_bar, mininterval=2.0) as bar:
        for i, part in enumerate(parts):
            keys, values = _part_arrays(part_folder(output, i, num_shards), part)
            for a in range(max(start - offset, 0), part["rows"], chunk):
                b = min(a + chunk, part["rows"])
                writer.add(keys[a:b], values[a:b])
                writer.commit(i)
                bar.update(b - a)
            offset += part["rows"]
    writer.commit(num_shards)
    writer.finish_keys()
    return writer


def _unsharded(source: dict) -> dict:
    return {k: v for k, v in source.items() if k not in ("shard_id", "num_shards", "batches")}


def _part_arrays(path: Path, part: dict):
    key_file, key_np = KEY_DTYPES[part["spec"]["key_dtype"]]
    n, d = int(part["rows"]), int(part["spec"]["dim"])
    return (np.memmap(path / key_file, dtype=key_np, mode="r", shape=(n, d)),
            np.memmap(path / VALUES, dtype=VALUE_DTYPE, mode="r", shape=(n,)))


# -- exclusion ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Exclusion:
    """Entries a search must not return, per query: its own entry and / or every entry with its label.

    * ``own_ids`` (Q,): entry q of the datastore is query q's own (SPALM's training
      split: entry ids are stream positions); -1: none;
    * ``query_labels`` (Q,) and ``entry_labels`` (N,): entry i is hidden from query q
      iff ``entry_labels[i] == query_labels[q]`` (the query's document); a query
      label of -1 hides nothing.

    ``max_hidden`` (at most this many entries are hidden per query: 1 for own-entry
    exclusion alone) sizes the first over-fetch; None: unknown.
    """

    own_ids: Optional[np.ndarray] = None  # (Q,) int64
    query_labels: Optional[np.ndarray] = None  # (Q,) int64
    entry_labels: Optional[np.ndarray] = None  # (N,)

    def __post_init__(self):
        if (self.query_labels is None) != (self.entry_labels is None):
            raise ValueError("label exclusion needs both the queries' and the entries' labels")
        if self.own_ids is None and self.query_labels is None:
            raise ValueError("an exclusion needs own entry ids or labels")

    @classmethod
    def own_entry(cls, entry_ids, query_labels=None, entry_labels=None) -> "Exclusion":
        """Each query's own entry (``entry_ids``), and with labels every entry sharing its label."""
        return cls(np.asarray(entry_ids, dtype=np.int64),
                   None if query_labels is None else np.asarray(query_labels, dtype=np.int64),
                   None if entry_labels is None else np.asarray(entry_labels))

    @classmethod
    def same_label(cls, query_labels, entry_labels) -> "Exclusion":
        return cls(None, np.asarray(query_labels, dtype=np.int64), np.asarray(entry_labels))

    @property
    def max_hidden(self) -> Optional[int]:
        return 1 if self.query_labels is None else None

    def check(self, num_queries: int, num_entries: int) -> None:
        for name in ("own_ids", "query_labels"):
            value = getattr(self, name)
            if value is not None and value.shape != (num_queries,):
                raise ValueError(f"exclusion {name} {value.shape} do not match {num_queries} queries")
        if self.entry_labels is not None and self.entry_labels.shape != (num_entries,):
            raise ValueError(f"exclusion has {self.entry_labels.shape} entry labels for a datastore of {num_entries}")

    def hidden(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(R, F) bool: hit ``ids[r, f]`` of query ``rows[r]`` is excluded (ids -1 never are)."""
        found = ids >= 0
        out = np.zeros(ids.shape, dtype=bool)
        if self.own_ids is not None:
            out |= ids == self.own_ids[rows][:, None]
        if self.query_labels is not None:
            mine = self.query_labels[rows][:, None]  # (R, 1)
            out |= (mine >= 0) & (self.entry_labels[np.where(found, ids, 0)] == mine)
        return found & out


# -- reading --------------------------------------------------------------------------------------

ModelRef = Union[str, dict, torch.nn.Module]


class Datastore:
    """A complete datastore: memmapped keys/values, FAISS index, metadata."""

    def __init__(self, path: Path, meta: dict, keys: np.ndarray, values: np.ndarray, index, rescore: bool):
        self.path, self.meta, self.keys, self.values, self.index = path, meta, keys, values, index
        self.rescore = rescore
        self.size, self.dim, self.metric = int(meta["size"]), int(meta["dim"]), meta["metric"]
        # sha256 of this build's datastore.json (size, model, dictionary, index, build time):
        # what artefacts derived from the datastore (SPALM's neighbour files) record
        self.fingerprint = hashlib.sha256((path / META).read_bytes()).hexdigest()
        self.on_gpu = False  # the index lives on a GPU (faiss-gpu): torch queries stay there
        self._device_values = {}  # device -> (N,) int32 copy of the values, for torch searches

    @classmethod
    def load(cls, path, expect_dim: Optional[int] = None, expect_dictionary=None,
             expect_model: Optional[ModelRef] = None, expect_key_type: Optional[str] = None,
             expect_metric: Optional[str] = None, nprobe: Optional[int] = None, rescore: bool = False,
             use_gpu: bool = False, gpu_device: int = 0, check_values: bool = True) -> "Datastore":
        """Open ``path``, refusing incomplete, truncated or mismatched datastores.

        expect_dictionary: a fairseq Dictionary, a dict.txt path or a sha256.
        expect_model: a checkpoint path, a sha256, a state dict or a model (same dtype as saved).
        nprobe: lists probed per query (default: the value stored at build time).
        rescore: re-rank the index's (PQ-approximate) hits with the stored keys.
        """
        path = Path(path)
        meta = read_metadata(path)
        n, d = int(meta["size"]), int(meta["dim"])
        _check_expectations(meta, path, expect_dim, expect_dictionary, expect_model, expect_key_type, expect_metric)
        key_dtype = meta.get("key_dtype", "float16")
        if key_dtype not in KEY_DTYPES:
            raise DatastoreError(f"{path}: unknown key dtype '{key_dtype}'")
        key_file, key_np = KEY_DTYPES[key_dtype]
        for name, size in ((key_file, n * d * np.dtype(key_np).itemsize), (VALUES, n * 4)):
            if not (path / name).exists():
                raise DatastoreError(f"{path}: missing {name}")
            actual = os.path.getsize(path / name)
            if actual != size:
                raise DatastoreError(f"{path / name} has {actual} bytes, expected {size} for {n} entries "
                                     f"(truncated or from another build)")
        keys = np.memmap(path / key_file, dtype=key_np, mode="r", shape=(n, d))
        values = np.memmap(path / VALUES, dtype=VALUE_DTYPE, mode="r", shape=(n,))
        if check_values and n and (values.min() < 0 or values.max() >= meta["dictionary_size"]):
            raise DatastoreError(f"{path / VALUES} holds ids outside [0, {meta['dictionary_size']}) (corrupt)")
        index = _read_index(path / INDEX)
        if index.ntotal != n or index.d != d:
            raise DatastoreError(f"{path / INDEX} holds {index.ntotal} keys of dimension {index.d}, "
                                 f"expected {n} of dimension {d}")
        if index.metric_type != fi.metric_of(meta["metric"]):
            raise DatastoreError(f"{path / INDEX} uses another metric than the metadata's '{meta['metric']}'")
        if use_gpu:
            index = fi.GpuPlacement(gpu_device).to_gpu(index)
        store = cls(path, meta, keys, values, index, rescore)
        store.on_gpu = bool(use_gpu)
        store.set_nprobe(nprobe if nprobe is not None else meta["index"].get("nprobe"))
        return store

    def set_nprobe(self, nprobe: Optional[int]) -> None:
        fi.set_nprobe(self.index, nprobe)

    def check(self, dim: Optional[int] = None, dictionary=None, model: Optional[ModelRef] = None,
              key_type: Optional[str] = None, metric: Optional[str] = None) -> None:
        """Refuse (DatastoreError) queries that do not fit this datastore; same checks as :meth:`load`."""
        _check_expectations(self.meta, self.path, dim, dictionary, model, key_type, metric)

    def search(self, queries, k: int, rescore: Optional[bool] = None,
               exclude: Optional[Exclusion] = None) -> MemoryBatch:
        """Top-k entries of each query: MemoryBatch(scores (Q, k) float32, values (Q, k) long, mask (Q, k) bool).

        ``queries`` (Q, d), numpy or torch (results follow a tensor's device). Scores
        are ``q·k`` (ip) or ``-|q - k|^2`` (l2), best first; missing hits (fewer than k
        found) have mask False, score -inf and value 0. ``exclude``: entries each query
        must not retrieve (see :class:`Exclusion`).
        """
        device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
        if self.on_gpu and isinstance(queries, torch.Tensor) and queries.is_cuda and exclude is None and not (
                self.rescore if rescore is None else rescore):
            return self.search_torch(queries, k)
        scores, ids = self.search_ids(queries, k, rescore, exclude)
        valid = ids >= 0
        values = np.where(valid, self.values[np.where(valid, ids, 0)], 0)
        return MemoryBatch(
            torch.from_numpy(scores).to(device),
            torch.from_numpy(values.astype(np.int64)).to(device),
            torch.from_numpy(valid).to(device),
        )

    def search_torch(self, queries: torch.Tensor, k: int) -> MemoryBatch:
        """:meth:`search` without leaving torch (``faiss.contrib.torch_utils``): a GPU index answers
        CUDA queries on the GPU, values are gathered from a copy on the queries' device -- no numpy
        round trip per decoding step. (Re-scoring reads the key memmap, so it takes :meth:`search`.)"""
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors)

        if queries.dim() != 2 or queries.size(1) != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        distances, ids = self.index.search(queries.detach().float().contiguous(), k)  # (Q, k) on queries' device
        valid = ids >= 0
        scores = -distances if self.metric == "l2" else distances
        values = self._device_values.get(queries.device)
        if values is None:
            values = self._device_values[queries.device] = torch.from_numpy(np.asarray(self.values)).to(queries.device)
        hit_values = values[ids.clamp(min=0)].long().masked_fill(~valid, 0)
        return MemoryBatch(scores.float().masked_fill(~valid, float("-inf")), hit_values, valid)

    def search_ids(self, queries, k: int, rescore: Optional[bool] = None, exclude: Optional[Exclusion] = None):
        """Like :meth:`search`, with entry ids: scores (Q, k) float32 (-inf: none), ids (Q, k) int64 (-1: none).

        With ``exclude`` the index is asked for more than k entries (over-fetch), the
        excluded ones are dropped and the best k kept; a query left with fewer than k
        asks again for twice as many, until it has k or the index has no further
        candidates for it (all N entries, or every probed inverted list, returned):
        only then does it keep fewer than k (missing ones: id -1).
        """
        q = fi.as_float32(_numpy(queries))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(q.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is None:
            return self._search(q, k, rescore)
        exclude.check(len(q), self.size)
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(q), k), -1, dtype=np.int64)
        rows = np.arange(len(q))
        fetch = min(self.size, k + exclude.max_hidden if exclude.max_hidden is not None else 4 * k)
        while rows.size:
            scores, ids = self._search(q[rows], fetch, rescore)  # (R, fetch) best first
            keep = (ids >= 0) & ~exclude.hidden(rows, ids)
            exhausted = (ids < 0).any(axis=1) | (fetch >= self.size)  # the index has nothing more to give
            done = (keep.sum(axis=1) >= k) | exhausted
            take = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in rank order
            kept = np.take_along_axis(keep, take, 1)[done]
            cols = take.shape[1]
            out_scores[rows[done], :cols] = np.where(kept, np.take_along_axis(scores, take, 1)[done], -np.inf)
            out_ids[rows[done], :cols] = np.where(kept, np.take_along_axis(ids, take, 1)[done], -1)
            rows = rows[~done]
            fetch = min(self.size, 2 * fetch)
        return out_scores, out_ids

    def _search(self, q: np.ndarray, k: int, rescore: Optional[bool]):
        distances, ids = self.index.search(q, k)  # (Q, k), (Q, k)
        if self.rescore if rescore is None else rescore:
            scores = self.exact_scores(q, ids)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        else:
            scores = -distances if self.metric == "l2" else distances
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)

    def exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Scores of (Q, d) queries against the stored keys ``ids`` (Q, k): (Q, k) float32, -inf for id -1."""
        q_count, k = ids.shape
        out = np.full((q_count, k), -np.inf, dtype=np.float32)
        rows = max(1, (1 << 24) // max(k * self.dim, 1))  # queries per chunk of gathered keys
        for s in range(0, q_count, rows):
            block = ids[s:s + rows]
            valid = block >= 0
            keys = self.keys[np.where(valid, block, 0)].astype(np.float32)  # (q, k, d)
            qb = queries[s:s + rows, None, :]  # (q, 1, d)
            if self.metric == "ip":
                sc = np.einsum("qkd,qkd->qk", keys, np.broadcast_to(qb, keys.shape))
            else:
                sc = -np.square(keys - qb).sum(-1)
            out[s:s + rows] = np.where(valid, sc, -np.inf)
        return out


def read_metadata(path) -> dict:
    """The ``datastore.json`` of a complete datastore (clear errors for missing folders and interrupted builds)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"datastore folder not found: {path}")
    meta_path = path / META
    if not meta_path.exists():
        if (path / PROGRESS).exists():
            state = json.loads((path / PROGRESS).read_text())
            raise DatastoreError(
                f"{path} is an incomplete datastore (build interrupted at stage '{state.get('stage')}', "
                f"{state.get('rows')} keys written); rerun trime-build-datastore with the same arguments to resume"
            )
        raise DatastoreError(f"{path} is not a datastore (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DatastoreError(f"{meta_path} is unreadable: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DatastoreError(f"{path}: unsupported datastore format {meta.get('format')} v{meta.get('version')}")
    return meta


def _check_expectations(meta, path, dim, dictionary, model, key_type, metric) -> None:
    if dim is not None and int(dim) != int(meta["dim"]):
        raise DatastoreError(f"{path}: keys have dimension {meta['dim']} but the model's queries have {dim}")
    if key_type is not None and key_type != meta["key_type"]:
        raise DatastoreError(f"{path}: keys are '{meta['key_type']}' but '{key_type}' queries were asked for")
    if metric is not None and metric != meta["metric"]:
        raise DatastoreError(f"{path}: index metric is '{meta['metric']}', not '{metric}'")
    if dictionary is not None:
        size, sha = _dictionary_fingerprint(dictionary)
        if sha != meta["dictionary_sha256"] or (size is not None and size != meta["dictionary_size"]):
            raise DatastoreError(
                f"{path}: built with another dictionary ({meta['dictionary_size']} symbols, sha256 "
                f"{meta['dictionary_sha256'][:12]}…) than the one given"
                + (f" ({size} symbols, sha256 {sha[:12]}…)" if size is not None else f" (sha256 {sha[:12]}…)")
                + ": its token ids would be wrong"
            )
    if model is not None:
        sha = _model_fingerprint(model)
        if sha != meta["model_sha256"]:
            raise DatastoreError(
                f"{path}: keys come from another model ({meta['model_path']}, state sha256 "
                f"{meta['model_sha256'][:12]}…) than the one given (sha256 {sha[:12]}…); rebuild the datastore "
                "with this checkpoint"
            )


def _dictionary_fingerprint(dictionary):
    if isinstance(dictionary, (str, os.PathLike)) and is_checksum(str(dictionary)):
        return None, str(dictionary)
    if isinstance(dictionary, (str, os.PathLike)):
        from fairseq.data import Dictionary

        dictionary = Dictionary.load(str(dictionary))
    return len(dictionary), dictionary_checksum(dictionary)


def _model_fingerprint(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model) if is_checksum(str(model)) else checkpoint_model_checksum(str(model))
    if isinstance(model, torch.nn.Module):
        return model_checksum(model.state_dict())
    if isinstance(model, dict):
        return model_checksum(model)
    raise TypeError(f"expect_model must be a checkpoint path, a sha256, a state dict or a model, got {type(model)}")
