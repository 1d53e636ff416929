"""``--eval-memory knn``: kNN-LM / kNN-MT over the datastore, then a continuous cache on top.

(1 − λ)·p + λ·p_kNN, p_kNN ∝ Σ exp(score/T) over the K hits; with ``--cache-lambda λ_c > 0``
the cache is mixed on top (Table 2's "kNN-LM + cache"), without one the mode has no local
memory, so translation uses it (kNN-MT) and ``fairseq-generate`` applies it step by step.

Adaptive retrieval (He et al. 2021): with ``--knn-skip-predictor FILE`` a position searches the
datastore only when the predictor's P(retrieval helps) >= ``--knn-skip-threshold`` (default: the
file's, chosen on valid); a skipped position has no datastore hits, so its kNN step keeps the
model's own distribution (:mod:`trime_fairseq.memory.skip`).
"""

from trime_fairseq.memory.composition import DATASTORE
from trime_fairseq.memory.modes.cache import CACHE_STEP
from trime_fairseq.memory.modes.registry import Mode, Step, TermOf, inverse, register_mode


@register_mode
class Knn(Mode):
    name = "knn"
    help = "kNN-LM over --datastore, plus a cache with --cache-lambda"
    steps = (Step((TermOf(DATASTORE, inverse("knn_temperature")),), "knn_lambda"), CACHE_STEP)
    defaults = {"cache_lambda": 0.0}
    axes = ("knn_temperature", "knn_lambda")  # a cache given on the command line is kept
    decoding_axes = ("knn_k", "knn_temperature", "knn_lambda")
    without_local = True
    own_options = ("knn_skip_predictor", "knn_skip_threshold")

    def check_flags(self, given) -> None:
        if not given.get("cache_lambda") and given.keys() & {"cache_theta", "cache_size"}:
            raise ValueError("--cache-theta / --cache-size need --cache-lambda > 0 with --eval-memory knn "
                             "(kNN-LM + cache); without it there is no cache")
