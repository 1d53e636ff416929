"""Sharded builds: N machines / GPUs extract keys in parallel, one part each, merged into one datastore.

Part i of N is a folder of keys and values only (stage 1) for a contiguous range of the single
build's batches (``source["batches"]``), ending with ``part.json``. :func:`merge_parts` checks
that all N parts are complete, agree and tile the batches, then copies them in order into one
datastore -- row for row the single build (resumable like stage 1) -- whose index is then
built as usual.
"""

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trime_fairseq.memory.datastore.format import (
    KEY_DTYPES,
    PART,
    PROGRESS,
    VALUE_DTYPE,
    VALUES,
    DatastoreError,
    DatastoreSpec,
    settings_differences,
)
from trime_fairseq.memory.datastore.writer import DatastoreWriter


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
