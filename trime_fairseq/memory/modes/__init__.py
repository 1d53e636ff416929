"""The evaluation modes (``--eval-memory NAME``), one record each (:mod:`.registry` says what a record holds).

| module | mode |
|---|---|
| :mod:`.none` | ``none``: the model's own distribution |
| :mod:`.trime` | ``trime``: Eq. 6 over the local memory |
| :mod:`.cache` | ``cache``: the continuous cache |
| :mod:`.knn` | ``knn``: kNN-LM / kNN-MT (+ cache) |
| :mod:`.trime_ext` | ``trime_ext``: TRIMELM_ext / TRIME-MT |
| :mod:`.neighbour_knn` | ``neighbour_knn``: kNN-LM over SPALM's neighbours |
| :mod:`.adaptive_knn` | ``adaptive_knn``: adaptive kNN-MT (a Meta-k network weighs K and λ per position) |
| :mod:`.sk_mt` | ``sk_mt``: SK-MT, kNN-MT over each sentence's retrieved training pairs |

Importing this package registers them, in this order.
"""

from trime_fairseq.memory.modes import none, trime, cache, knn, trime_ext, neighbour_knn  # noqa: F401
from trime_fairseq.memory.modes import adaptive_knn  # noqa: F401
from trime_fairseq.memory.modes import sk_mt  # noqa: F401
from trime_fairseq.memory.modes.registry import (  # noqa: F401  (the registry's API)
    REGISTRY,
    Mode,
    flag,
    mode_help,
    mode_names,
    mode_of,
    modes_where,
    register_mode,
)
