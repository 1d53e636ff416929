"""``--eval-memory adaptive_knn``: adaptive kNN-MT (Zheng et al. 2021), one adaptive step over the datastore.

A Meta-k network (:mod:`trime_fairseq.memory.adaptive_knn`, the file of ``--knn-adaptive-network``) reads each
position's K hits (distances, distinct-value counts; never the target) and weighs the choices
k ∈ {0, 1, 2, 4, …, K}: p = w_0·p_model + Σ_{r≥1} w_r·p_kNN^{k_r}, p_kNN^{k} ∝ Σ_{i≤k} exp(score_i / T). As a step
of the composition: λ(x) = 1 − w_0, q over the hits re-weighted (the module's c_i).

The file fixes K, T and the weights: ``--knn-k`` and ``--knn-temperature`` must be the file's (another value
is an error naming them), so the mode has no tuning axes (``trime-tune-mt`` tunes vanilla ``knn``, whose K
and T a network is then trained for). No λ: the network gives it per position. Translation is the target
(``fairseq-generate`` applies it step by step); with a language model's datastore it also runs under
``fairseq-eval-lm``.

Commands (Multi30k; K 16, T 10: vanilla kNN-MT's tuned values, docs/results_mt.md)::

    trime-train-adaptive-knn data-bin/multi30k --user-dir trime_fairseq --task trime_translation \\
        --path runs/multi30k-mt-1000/transformer/checkpoint_last.pt --gen-subset valid --cpu --max-tokens 8000 \\
        --eval-memory knn --datastore runs/multi30k-mt-1000/dstore_transformer --knn-k 16 --knn-temperature 10 \\
        --output runs/multi30k-mt-1000/adaptive_knn_k16.json
    fairseq-generate data-bin/multi30k --user-dir trime_fairseq --task trime_translation \\
        --path runs/multi30k-mt-1000/transformer/checkpoint_last.pt --gen-subset test --cpu --beam 5 \\
        --max-tokens 8000 --remove-bpe --eval-memory adaptive_knn --datastore runs/multi30k-mt-1000/dstore_transformer \\
        --knn-k 16 --knn-temperature 10 --knn-adaptive-network runs/multi30k-mt-1000/adaptive_knn_k16.json
"""

from functools import lru_cache

from trime_fairseq.memory.composition import DATASTORE, Composition, Interpolation, Term
from trime_fairseq.memory.modes.registry import Mode, Step, TermOf, inverse, register_mode


@lru_cache(maxsize=16)
def _load(path: str, stamp):
    from trime_fairseq.memory.adaptive_knn import AdaptiveKnnNetwork

    return AdaptiveKnnNetwork.load(path)


def load_network(path: str):
    """The :class:`~trime_fairseq.memory.adaptive_knn.AdaptiveKnnNetwork` of ``path`` (read once per version
    of the file)."""
    import os

    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None  # load() says the file is missing
    return _load(str(path), stamp)


@register_mode
class AdaptiveKnn(Mode):
    name = "adaptive_knn"
    help = ("adaptive kNN-MT (Zheng et al. 2021) over --datastore: a Meta-k network (--knn-adaptive-network, "
            "from trime-train-adaptive-knn) weighs k ∈ {0, 1, 2, 4, …, K} per position")
    steps = (Step((TermOf(DATASTORE, inverse("knn_temperature")),), adaptive=True),)
    without_local = True
    own_options = ("knn_adaptive_network",)
    rule_text = ("λ(x) = 1 − w_0(x) and the hits weighted by the Meta-k network's mixture of "
                 "k ∈ {1, 2, 4, …, K} (--knn-adaptive-network)")

    def check_flags(self, given) -> None:
        if not given.get("knn_adaptive_network"):
            raise ValueError("--eval-memory adaptive_knn needs --knn-adaptive-network FILE (write one with "
                             "trime-train-adaptive-knn)")

    def step_rule(self, options, dim):
        if options.knn_adaptive_network is None:
            raise ValueError("--eval-memory adaptive_knn needs --knn-adaptive-network FILE")
        network = load_network(options.knn_adaptive_network)
        network.check_options(options.knn_k, options.knn_temperature, f"{options.knn_adaptive_network} ")
        return network.rule()

    def composition_of(self, rule, temperature: float) -> Composition:
        """This mode's composition with another rule (a network in training) at temperature T: what
        :meth:`compose` gives with the file's rule."""
        (step,) = self.steps
        terms = tuple(Term(t.part, t.scale.value(temperature, None)) for t in step.terms)
        return Composition(interpolations=(Interpolation(terms, None, rule),))
