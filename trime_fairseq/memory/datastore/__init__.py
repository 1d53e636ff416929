"""External memory: a FAISS datastore of (key, next token) pairs (kNN-LM, TRIMELM_ext, kNN-MT, SPALM).

One module per job:

| module | what it holds |
|---|---|
| :mod:`.format` | the folder's files, :class:`DatastoreSpec` (what a datastore holds), :class:`DatastoreError` |
| :mod:`.writer` | :class:`DatastoreWriter`: the resumable build (keys -> trained index -> filled index -> metadata) |
| :mod:`.shards` | sharded builds: :func:`part_folder`, :func:`read_part`, :func:`merge_parts` |
| :mod:`.reading` | reading and verifying a folder: :func:`read_metadata`, :func:`open_entries`, the model / dictionary checks |
| :mod:`.search` | :class:`Datastore` (load, search, search with :class:`Exclusion`), :func:`target_ranks` |

The names below are the package's API.
"""

from trime_fairseq.memory.datastore.format import (  # noqa: F401
    KEY_DTYPES, KEY_TYPES, PART, DatastoreError, DatastoreSpec, settings_differences,
)
from trime_fairseq.memory.datastore.reading import ModelRef, open_entries, read_metadata  # noqa: F401
from trime_fairseq.memory.datastore.search import Datastore, Exclusion, target_ranks  # noqa: F401
from trime_fairseq.memory.datastore.shards import merge_parts, part_folder, read_part  # noqa: F401
from trime_fairseq.memory.datastore.writer import DatastoreWriter  # noqa: F401
