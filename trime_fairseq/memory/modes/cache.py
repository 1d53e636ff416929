"""``--eval-memory cache``: the continuous cache (Grave et al. 2017).

(1 − λ_c)·p + λ_c·p_cache, p_cache ∝ Σ exp(θ·f·f_j) over the scored row's earlier positions
(the last ``--cache-size`` of them, or + the stream's long-term memory); λ_c is 0.1 unless given.
"""

from trime_fairseq.memory.composition import LOCAL_F
from trime_fairseq.memory.modes.registry import Mode, Step, TermOf, register_mode, times

CACHE_STEP = Step((TermOf(LOCAL_F, times("cache_theta")),), "cache_lambda", optional=True)


@register_mode
class Cache(Mode):
    name = "cache"
    help = "continuous cache interpolation"
    steps = (CACHE_STEP,)
    defaults = {"cache_lambda": 0.1}
    axes = ("cache_lambda", "cache_theta")
