"""Adaptive kNN-MT (Zheng et al. 2021, "Adaptive Nearest Neighbor Machine Translation"): a Meta-k network
weighs, per decoding position, how many of the K retrieved neighbours to use -- or none.

For a position with K datastore hits (best first; raw scores −d_i, d_i the L2 distance, or q·k for an ip
datastore), the network f reads only what the position retrieved (never its target):

| feature | what |
|---|---|
| d_1 … d_K | the hits' distances, −(raw score) (0 for a hidden hit) |
| c_1 … c_K | the number of distinct values among the visible hits 1 … i |

(:func:`adaptive_features`, (Q, K) -> (Q, 2K) float32) and gives, through Linear(2K, hidden) → tanh → dropout →
Linear(hidden, R) and a softmax, weights w_r over the choices k_r ∈ (0, 1, 2, 4, …, K) (:func:`choices_for`;
k = 0: no retrieval)::

    p(y) = w_0·p_model(y) + Σ_{r ≥ 1} w_r·p_kNN^{k_r}(y),   p_kNN^{k}(y) ∝ Σ_{i ≤ k} exp(−d_i / T)·[v_i = y]

As one adaptive interpolation step of the composition (:mod:`trime_fairseq.memory.composition`) this is
log((1 − λ)·p + λ·q) with λ = 1 − w_0 and q the distribution of the hits re-weighted: hit i gets weight

    c_i = Σ_{r ≥ 1, k_r ≥ i} (w_r / λ) · exp(s_i) / Σ_{j ≤ k_r} exp(s_j),   s_i = −d_i / T (the step's scaled score)

(Σ_i c_i = 1, so q(y) = Σ_i c_i·[v_i = y] = Σ_{r≥1} (w_r/λ)·p_kNN^{k_r}(y): the mixture exactly).
:func:`mixture_entries` returns the entries (log c_i, v_i, visible) and λ as logs
(:class:`~trime_fairseq.memory.mixing.LogWeight`: 1 − λ = w_0 exactly), fp32 log space throughout, gradients
flowing to the network. Hidden hits (a search that found fewer than K): a choice k_r none of whose first
k_r hits is visible does not exist for that row and its weight is given to the others (the softmax is taken
over the existing choices); a row with no visible hit has only k = 0: λ = 0, the model's own distribution.

The network file (JSON, written atomically, :class:`AdaptiveKnnNetwork`) records K, the choices, T, the
hidden size, the weights, and the checksums of the dictionary and of the model whose datastore and
distributions it was trained on; ``--eval-memory adaptive_knn --knn-adaptive-network FILE`` refuses it with
another K or T than ``--knn-k`` / ``--knn-temperature``, another dictionary or another model's datastore.
``trime-train-adaptive-knn`` (:mod:`trime_fairseq.cli.train_adaptive_knn`) trains it on a validation split.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from trime_fairseq.atomic import atomic_write_json
from trime_fairseq.memory.mixing import LogWeight, fp32
from trime_fairseq.memory.sources import MemoryBatch

FORMAT, VERSION = "trime-adaptive-knn", 1
#: a finite stand-in for log 0 inside differentiable reductions (an all −inf logsumexp has NaN gradients)
_LOG_ZERO = -1e30


class AdaptiveKnnError(ValueError):
    pass


def choices_for(k: int) -> Tuple[int, ...]:
    """The Meta-k network's choices for K hits: 0 (no retrieval), then 1, 2, 4, … below K, then K."""
    if k < 1:
        raise AdaptiveKnnError(f"adaptive kNN needs K >= 1 hits, got {k}")
    out, r = [0], 1
    while r < k:
        out.append(r)
        r *= 2
    return tuple(out + [k])


def adaptive_features(scores: Tensor, values: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """(Q, 2K) float32 (float64 for float64 scores) features [d_1 … d_K, c_1 … c_K] of the step's scaled hits: ``scores`` (Q, K) = raw / T
    (so d_i = −scores_i·T, 0 where hidden), ``values`` (Q or 1, K), ``mask`` (Q, K) bool; c_i counts the distinct
    values among the visible hits 1 … i."""
    s = fp32(scores)
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    k = s.size(-1)
    distance = torch.where(mask, -s * temperature, s.new_zeros(()))  # (Q, K)
    vals = values.expand_as(mask)
    same = (vals.unsqueeze(-1) == vals.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)  # (Q, K, K) [i, j]
    earlier = torch.ones(k, k, dtype=torch.bool, device=mask.device).tril(-1)  # j < i
    new = mask & ~(same & earlier).any(-1)  # (Q, K) hit i shows a value no earlier visible hit has
    return torch.cat([distance, new.cumsum(-1).to(s.dtype)], -1)


class MetaKNetwork(nn.Module):
    """f: features (Q, 2K) -> log-weights (Q, R) over :attr:`choices` (log-softmax of Linear-tanh-dropout-Linear)."""

    def __init__(self, k: int, hidden: int = 32, dropout: float = 0.0, seed: Optional[int] = None):
        super().__init__()
        if hidden < 1:
            raise AdaptiveKnnError(f"the Meta-k network needs >= 1 hidden units, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise AdaptiveKnnError(f"dropout must lie in [0, 1), got {dropout}")
        self.k = k
        self.choices = choices_for(k)
        self.hidden = nn.Linear(2 * k, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, len(self.choices))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():  # small first-layer weights: raw distances can be large, tanh should not saturate
            std = 1.0 / math.sqrt(2 * k)
            self.hidden.weight.copy_(torch.randn(self.hidden.weight.shape, generator=gen) * std * 0.01)
            self.hidden.weight[:, k:].mul_(10.0)  # the counts are small numbers
            self.hidden.bias.zero_()
            self.out.weight.copy_(torch.randn(self.out.weight.shape, generator=gen) / math.sqrt(hidden))
            self.out.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        dtype = self.hidden.weight.dtype
        h = self.dropout(torch.tanh(self.hidden(features.to(dtype))))  # (Q, hidden)
        return torch.log_softmax(self.out(h), -1)  # (Q, R)


def mixture_entries(log_w: Tensor, batch: MemoryBatch, choices: Tuple[int, ...]) -> Tuple[MemoryBatch, LogWeight]:
    """q's entries and λ of the mixture Σ_r w_r·p^{k_r} (module docstring) from log-weights ``log_w`` (Q, R) over
    ``choices`` (k_0 = 0 first, k_R = K) and the step's scaled hits ``batch`` (Q, K): entries (log c (Q, K),
    values, mask) and (log(1 − λ), log λ) (Q,) each."""
    s, mask = fp32(batch.scores), batch.mask
    dtype = torch.promote_types(s.dtype, torch.float32)
    s, log_w = s.to(dtype), fp32(log_w).to(dtype)
    k = s.size(-1)
    if choices[0] != 0 or choices[-1] != k or log_w.size(-1) != len(choices):
        raise AdaptiveKnnError(f"choices {choices} and {log_w.size(-1)} weights do not fit {k} hits per row")
    ks = torch.tensor(choices[1:], device=s.device)  # (R',)
    filled = s.masked_fill(~mask, _LOG_ZERO)  # (Q, K)
    prefix = torch.logcumsumexp(filled, -1)  # (Q, K) log Σ_{j ≤ i} exp(s_j) over visible j (≈ _LOG_ZERO: none)
    exists = (mask.cumsum(-1) > 0)[:, ks - 1]  # (Q, R') some hit among the first k_r is visible
    rest = log_w[:, 1:].masked_fill(~exists, _LOG_ZERO)
    log_w = torch.cat([log_w[:, :1], rest], -1)
    log_w = log_w - log_w.logsumexp(-1, keepdim=True)  # (Q, R) renormalised over the existing choices
    log_lam = log_w[:, 1:].logsumexp(-1)  # (Q,) log(1 − w_0), ≈ _LOG_ZERO where nothing is visible
    has = mask.any(-1)  # (Q,)
    within = torch.arange(k, device=s.device) < ks.unsqueeze(-1)  # (R', K) hit i among the first k_r
    log_norm = (log_w[:, 1:] - torch.where(has, log_lam, 0.0).unsqueeze(-1)
                - prefix[:, ks - 1])  # (Q, R') log(w_r / λ) − log Z_{k_r}
    terms = (log_norm.unsqueeze(-1) + filled.unsqueeze(1)).masked_fill(
        ~(within.unsqueeze(0) & exists.unsqueeze(-1)), _LOG_ZERO)  # (Q, R', K)
    log_c = terms.logsumexp(1).masked_fill(~mask, 0.0)  # (Q, K); hidden hits: 0, masked out
    log_keep = log_w[:, 0]
    log_lam = torch.where(has, log_lam, torch.full_like(log_lam, float("-inf")))
    return MemoryBatch(log_c, batch.values, mask), LogWeight(log_keep, log_lam)


class AdaptiveRule:
    """The StepRule (:data:`~trime_fairseq.memory.composition.StepRule`) of a Meta-k network: the step's hits
    (Q, K) scaled by 1/T -> (q's entries (Q, K), λ per row as :class:`~trime_fairseq.memory.mixing.LogWeight`)."""

    def __init__(self, network: MetaKNetwork, temperature: float):
        self.network = network
        self.temperature = temperature

    def log_weights(self, batch: MemoryBatch) -> Tensor:
        """(Q, R) the network's log-weights over its choices for the scaled hits (Q, K)."""
        if batch.mask.size(-1) != self.network.k:
            raise AdaptiveKnnError(f"the Meta-k network was trained on K = {self.network.k} hits per position, "
                                   f"the step has {batch.mask.size(-1)}: give --knn-k {self.network.k}")
        device = batch.scores.device
        if self.network.hidden.weight.device != device:  # a file's network is loaded on the CPU; hits may be on a GPU
            self.network.to(device)
        return self.network(adaptive_features(*batch, self.temperature))

    def __call__(self, batch: MemoryBatch) -> Tuple[MemoryBatch, LogWeight]:
        return mixture_entries(self.log_weights(batch), batch, self.network.choices)


@dataclass
class AdaptiveKnnNetwork:
    """The network file: K, T, the architecture, the weights (name -> nested lists) and the checksums."""

    k: int
    temperature: float
    hidden: int
    weights: Dict[str, list]
    dictionary_sha256: str
    model_sha256: str
    dropout: float = 0.0
    choices: List[int] = field(default_factory=list)  # choices_for(k); checked on load
    report: dict = field(default_factory=dict)  # how it was trained, held-out NLL of plain / kNN / adaptive

    def __post_init__(self):
        self.choices = list(self.choices or choices_for(self.k))
        if tuple(self.choices) != choices_for(self.k):
            raise AdaptiveKnnError(f"network choices {self.choices} are not this version's {choices_for(self.k)} "
                                   f"for K = {self.k}")
        if not self.temperature > 0:
            raise AdaptiveKnnError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def of(cls, network: MetaKNetwork, temperature: float, dictionary_sha256: str, model_sha256: str,
           report: Optional[dict] = None) -> "AdaptiveKnnNetwork":
        weights = {name: t.detach().cpu().float().tolist() for name, t in network.state_dict().items()}
        return cls(network.k, float(temperature), network.hidden.out_features, weights, dictionary_sha256,
                   model_sha256, network.dropout.p, list(network.choices), dict(report or {}))

    def network(self) -> MetaKNetwork:
        """The Meta-k network with the file's weights, in eval mode (no dropout), float32."""
        net = MetaKNetwork(self.k, self.hidden, self.dropout)
        net.load_state_dict({name: torch.tensor(w, dtype=torch.float32) for name, w in self.weights.items()})
        return net.eval()

    def rule(self) -> AdaptiveRule:
        """The StepRule of this file's network (one per loaded file: compositions of equal options compare equal)."""
        if getattr(self, "_rule", None) is None:
            self._rule = AdaptiveRule(self.network(), self.temperature)
        return self._rule

    # -- files --------------------------------------------------------------------------------------
    def save(self, path) -> None:
        atomic_write_json(path, dict(format=FORMAT, version=VERSION, **asdict(self)))

    @classmethod
    def load(cls, path) -> "AdaptiveKnnNetwork":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adaptive kNN network not found: {path} (write one with "
                                    "trime-train-adaptive-knn)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AdaptiveKnnError(f"{path} is unreadable: {e}") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT or data.pop("version", None) != VERSION:
            raise AdaptiveKnnError(f"{path} is not a {FORMAT} v{VERSION} file")
        try:
            return cls(**data)
        except TypeError as e:
            raise AdaptiveKnnError(f"{path}: {e}") from None

    def check_options(self, knn_k: int, knn_temperature: float, where: str = "") -> None:
        """Refuse another K or T than the network was trained with."""
        if knn_k != self.k or not math.isclose(knn_temperature, self.temperature, rel_tol=1e-9):
            raise AdaptiveKnnError(
                f"the adaptive kNN network {where}was trained with K = {self.k} hits and T = {self.temperature:g}: "
                f"give --knn-k {self.k} --knn-temperature {self.temperature:g} (got {knn_k}, {knn_temperature:g}), "
                "or train a network for those with trime-train-adaptive-knn")

    def check(self, dictionary=None, model=None, where: str = "") -> None:
        """Refuse another dictionary or model than the network's (a Dictionary / dict.txt / sha256, a model /
        state dict / checkpoint / sha256: the datastore checks' references)."""
        from trime_fairseq.memory.datastore.reading import dictionary_fingerprint, model_fingerprint

        if dictionary is not None and dictionary_fingerprint(dictionary)[1] != self.dictionary_sha256:
            raise AdaptiveKnnError(f"the adaptive kNN network {where}was trained with another dictionary (sha256 "
                                   f"{self.dictionary_sha256[:12]}…): retrain it for this one")
        if model is not None and model_fingerprint(model) != self.model_sha256:
            raise AdaptiveKnnError(f"the adaptive kNN network {where}was trained on another model's datastore and "
                                   f"distributions (sha256 {self.model_sha256[:12]}…): retrain it with "
                                   "trime-train-adaptive-knn")
