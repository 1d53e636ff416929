"""``--eval-memory trime``: TRIME's joint softmax over the vocabulary and the local memory (Eq. 6).

sim(c, c_j) = g(c)·g(c_j) / (√d·τ) over the scored row's earlier positions (+ the stream's
long-term memory with ``--long-memory-size``: TRIMELM_long).
"""

from trime_fairseq.memory.composition import LOCAL_G
from trime_fairseq.memory.modes.registry import Mode, TermOf, dot, register_mode


@register_mode
class Trime(Mode):
    name = "trime"
    help = "Eq. 6 joint softmax over vocabulary and memory"
    joint = (TermOf(LOCAL_G, dot("memory_temperature")),)
    axes = ("memory_temperature",)
