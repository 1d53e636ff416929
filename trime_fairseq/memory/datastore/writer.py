"""Building a datastore resumably: :class:`DatastoreWriter`, stage by stage.

keys and values (stage 1) -> trained index -> filled index -> metadata. Keys are written in
chunks with a progress marker (``progress.json``, replaced atomically after the data it counts
is flushed), the trained index and the partly filled index are saved atomically, and a rerun
with the same settings resumes from the last marker. Until ``datastore.json`` exists the
folder never loads as a datastore.
"""

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
from tqdm import tqdm

from trime_fairseq.atomic import atomic_path, atomic_write_json
from trime_fairseq.memory import faiss_index as fi
from trime_fairseq.memory.datastore.format import (
    FORMAT,
    INDEX,
    KEY_DTYPES,
    KEY_FILES,
    META,
    PART,
    PARTIAL,
    PROGRESS,
    TRAINED,
    VALUE_DTYPE,
    VALUES,
    VERSION,
    DatastoreError,
    DatastoreSpec,
    as_numpy,
    settings_differences,
)
from trime_fairseq.memory.datastore.reading import read_index


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
        keys = as_numpy(keys)
        values = as_numpy(values)
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
        fi.check_factory(factory, dim, n, ntrain, self.spec.metric)
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
        transforms, search_dim = fi.key_transforms(self.progress["index"]["factory"], self.spec.dim)
        meta = dict(
            format=FORMAT,
            version=VERSION,
            size=self.rows,
            value_dtype="int32",
            **asdict(self.spec),
            index=dict(self.progress["index"], nprobe=nprobe, type=type(index).__name__,
                       transforms=list(transforms), search_dim=search_dim),
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
        return read_index(self.path / name)
