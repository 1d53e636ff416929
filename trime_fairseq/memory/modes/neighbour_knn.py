"""``--eval-memory neighbour_knn``: kNN-LM over SPALM's precomputed neighbours (``--neighbours``).

(1 − λ)·p + λ·p_kNN over the neighbours the batch carries: with a SPALM model the k it used
(SPALM + kNN), with another model (e.g. Transformer-XL) all of them (kNN-LM over the same
neighbours). Generation has no precomputed neighbours.
"""

from trime_fairseq.memory.composition import NEIGHBOURS
from trime_fairseq.memory.modes.registry import Mode, Step, TermOf, inverse, register_mode


@register_mode
class NeighbourKnn(Mode):
    name = "neighbour_knn"
    help = ("kNN-LM over the precomputed --neighbours of each position: SPALM + kNN, or kNN-LM over SPALM's "
            "neighbours with another model")
    steps = (Step((TermOf(NEIGHBOURS, inverse("knn_temperature")),), "knn_lambda"),)
    axes = ("knn_temperature", "knn_lambda")
