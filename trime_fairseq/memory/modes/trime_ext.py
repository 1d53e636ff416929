"""``--eval-memory trime_ext``: TRIMELM_ext (Appendix F) and TRIME-MT.

The K datastore hits join the local memory in Eq. 6 (sim = g·g_j / (√d·τ), so the datastore must
hold g keys with metric ip), then Eq. 7-8 interpolate with P' ∝ Σ exp(g·g_j / (√d·τ′)) over the
same entries. Without a local memory (translation) the datastore hits alone.
"""

from trime_fairseq.memory.composition import DATASTORE, LOCAL_G
from trime_fairseq.memory.keys import TRIME_KEY
from trime_fairseq.memory.modes.registry import Mode, Step, TermOf, dot, register_mode


@register_mode
class TrimeExt(Mode):
    name = "trime_ext"
    help = "TRIMELM_ext: datastore entries join Eq. 6, then Eq. 7-8 interpolation"
    joint = (TermOf(LOCAL_G, dot("memory_temperature")), TermOf(DATASTORE, dot("memory_temperature")))
    steps = (Step((TermOf(LOCAL_G, dot("interpolation_temperature")),
                   TermOf(DATASTORE, dot("interpolation_temperature"))), "interpolation_lambda"),)
    axes = ("memory_temperature", "interpolation_temperature", "interpolation_lambda")
    decoding_axes = ("knn_k",) + axes
    without_local = True
    datastore_keys = (TRIME_KEY, "ip")
