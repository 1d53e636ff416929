"""Adaptive retrieval (He et al. 2021, "Efficient Nearest Neighbor Language Models", §4.1): skip the
datastore search at positions where a cheap predictor says that retrieval will not help.

The predictor reads only what a position has before its search -- never its target:

| feature | what |
|---|---|
| ``entropy`` | entropy of the model's own token distribution, −Σ p·log p |
| ``max_log_prob`` | its largest log-probability |
| ``query_norm`` | ‖q‖ of the position's query (the context vector the datastore is searched with) |

(:func:`skip_features`, (Q, V) log-probabilities and (Q, d) queries -> (Q, 3) float32). A small MLP
(ReLU hidden layer; ``hidden=0``: logistic regression) on standardised features gives
P(retrieval helps) (:meth:`SkipPredictor.benefit`); ``trime-train-skip-predictor`` fits it on a
validation split to the label "the kNN-interpolated log-probability of the target beats the
model's own" and picks the threshold there. At evaluation a position searches iff
P >= threshold (:meth:`SkipPredictor.retrieve`); a skipped position's datastore part is
empty, so the interpolation leaves the model's own distribution unchanged
(:func:`~trime_fairseq.memory.mixing.interpolate_memory_`: rows without memory keep p) -- a
choice of the options (``--knn-skip-predictor``, ``--knn-skip-threshold``), not a fallback.

The predictor file (JSON, written atomically) records the dictionary and the model whose
distributions it was trained on; :meth:`SkipPredictor.check` refuses any other.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from trime_fairseq.atomic import atomic_write_json
from trime_fairseq.memory.mixing import fp32

FORMAT, VERSION = "trime-skip-predictor", 1
SKIP_FEATURES = ("entropy", "max_log_prob", "query_norm")


class SkipPredictorError(ValueError):
    pass


def skip_features(token_log_probs: Tensor, queries: Tensor) -> Tensor:
    """(Q, 3) float32 features (:data:`SKIP_FEATURES`) from the model's token log-probabilities (Q, V)
    -- computed without the target -- and the positions' queries (Q, d)."""
    lp = fp32(token_log_probs)
    p_log_p = (lp.exp() * lp).nan_to_num_(nan=0.0)  # (Q, V), 0·log 0 = 0 (exp(-inf)·-inf is NaN; p > 0 is finite)
    entropy = -p_log_p.sum(-1)  # (Q,)
    return torch.stack([entropy, lp.max(-1).values, fp32(queries).norm(dim=-1)], -1).float()  # (Q, 3)


@dataclass
class SkipPredictor:
    """P(retrieval helps) = σ(MLP((x − mean) / std)); ``layers``: [(W (out, in), b (out,)) as lists], ReLU
    between them; one layer: logistic regression."""

    mean: List[float]
    std: List[float]
    layers: List[Tuple[list, list]]
    threshold: float  # chosen on the validation split by trime-train-skip-predictor
    dictionary_sha256: str
    model_sha256: str
    features: Tuple[str, ...] = SKIP_FEATURES
    report: dict = field(default_factory=dict)  # how it was trained and what the threshold costs on valid

    def __post_init__(self):
        if tuple(self.features) != SKIP_FEATURES:
            raise SkipPredictorError(f"skip predictor reads features {tuple(self.features)}; this version computes "
                                     f"{SKIP_FEATURES}")
        check_threshold(self.threshold)
        self._device_layers = {}  # device -> [(W, b)] tensors

    # -- prediction ---------------------------------------------------------------------------------
    def _tensors(self, device):
        if device not in self._device_layers:
            self._device_layers[device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=device),
                torch.tensor(self.std, dtype=torch.float32, device=device),
                [(torch.tensor(w, dtype=torch.float32, device=device), torch.tensor(b, dtype=torch.float32,
                                                                                     device=device))
                 for w, b in self.layers])
        return self._device_layers[device]

    def benefit(self, features: Tensor) -> Tensor:
        """(Q,) float32 P(retrieval helps) of features (Q, 3)."""
        mean, std, layers = self._tensors(features.device)
        x = (fp32(features) - mean) / std
        for i, (w, b) in enumerate(layers):
            x = torch.addmm(b, x, w.T)
            if i < len(layers) - 1:
                x = x.relu()
        return torch.sigmoid(x.squeeze(-1))

    def retrieve(self, features: Tensor, threshold: Optional[float] = None) -> Tensor:
        """(Q,) bool: the positions that search (P >= threshold; default: the file's)."""
        return self.benefit(features) >= (self.threshold if threshold is None else threshold)

    # -- files --------------------------------------------------------------------------------------
    def save(self, path) -> None:
        data = dict(format=FORMAT, version=VERSION, **{k: v for k, v in asdict(self).items()})
        atomic_write_json(path, data)

    @classmethod
    def load(cls, path) -> "SkipPredictor":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"skip predictor not found: {path} (write one with trime-train-skip-predictor)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SkipPredictorError(f"{path} is unreadable: {e}") from None
        if data.pop("format", None) != FORMAT or data.pop("version", None) != VERSION:
            raise SkipPredictorError(f"{path} is not a {FORMAT} v{VERSION} file")
        data["features"] = tuple(data["features"])
        data["layers"] = [tuple(layer) for layer in data["layers"]]
        return cls(**data)

    def check(self, dictionary=None, model=None, where: str = "") -> None:
        """Refuse another dictionary or model than the predictor's (same references as the datastore's checks:
        a Dictionary / dict.txt / sha256, a model / state dict / checkpoint / sha256)."""
        from trime_fairseq.memory.datastore.reading import dictionary_fingerprint, model_fingerprint

        if dictionary is not None and dictionary_fingerprint(dictionary)[1] != self.dictionary_sha256:
            raise SkipPredictorError(f"skip predictor {where}was trained with another dictionary (sha256 "
                                     f"{self.dictionary_sha256[:12]}…): retrain it for this one")
        if model is not None and model_fingerprint(model) != self.model_sha256:
            raise SkipPredictorError(f"skip predictor {where}was trained on another model's distributions (sha256 "
                                     f"{self.model_sha256[:12]}…): retrain it with trime-train-skip-predictor")


def check_threshold(threshold: Optional[float]) -> None:
    if threshold is not None and not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise SkipPredictorError(f"--knn-skip-threshold is a probability in [0, 1], got {threshold}")


def fit(features: Tensor, helps: Tensor, hidden: int = 16, epochs: int = 300, lr: float = 0.01,
        seed: int = 1) -> Tuple[List[float], List[float], List[Tuple[list, list]]]:
    """(mean, std, layers) of a predictor fitted by full-batch Adam on the logistic loss: features (N, 3),
    ``helps`` (N,) bool."""
    x = fp32(features).detach().cpu()
    y = helps.detach().cpu().float()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    sizes = [x.size(1)] + ([hidden] if hidden > 0 else []) + [1]
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        w = (torch.randn(b, a, generator=gen) / math.sqrt(a)).requires_grad_()
        params.append((w, torch.zeros(b, requires_grad=True)))
    opt = torch.optim.Adam([t for layer in params for t in layer], lr=lr)
    for _ in range(epochs):
        h = x
        for i, (w, b) in enumerate(params):
            h = torch.addmm(b, h, w.T)
            if i < len(params) - 1:
                h = h.relu()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(h.squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layers = [(w.detach().tolist(), b.detach().tolist()) for w, b in params]
    return mean.tolist(), std.tolist(), layers


def threshold_table(benefit: Tensor, knn: Tensor, plain: Tensor, thresholds: Sequence[float]) -> List[dict]:
    """For each threshold: the fraction of positions skipped and the perplexity when skipped positions take
    the model's own log-probability of the target (``plain``) and the others the kNN one (``knn``), all (N,)."""
    rows = []
    for t in thresholds:
        search = benefit >= t
        nll = -torch.where(search, fp32(knn), fp32(plain)).mean()
        rows.append(dict(threshold=float(t), skipped=float((~search).float().mean()), ppl=float(nll.exp())))
    return rows


def choose_threshold(table: List[dict], knn_ppl: float, max_increase: float) -> dict:
    """The row of ``table`` that skips most with a perplexity within (1 + max_increase) of exact kNN's."""
    ok = [row for row in table if row["ppl"] <= knn_ppl * (1 + max_increase)]
    return max(ok, key=lambda row: (row["skipped"], -row["ppl"]))  # threshold 0 (never skip) is always ok
