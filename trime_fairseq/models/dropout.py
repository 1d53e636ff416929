"""Dropout for our models: ``nn.Dropout``'s distribution, a cheaper mask on the CPU.

On the CPU ``F.dropout`` draws its mask with ``bernoulli_``, which costs about as
much as a (B·T, d) x (d, d) matmul; a uniform draw compared with p gives the
same mask distribution (keep with probability 1 − p, survivors scaled by
1 / (1 − p)) in about half the time, which matters for the recurrence models:
LaMemo's refreshed memory doubles the dropout work of its feed-forward blocks.
On the GPU ``F.dropout`` (fused) is used. Parameter-free, so checkpoints are
unchanged.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Dropout(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.is_cuda or self.p == 1.0:
            return F.dropout(x, self.p, training=True)
        keep = torch.empty_like(x).uniform_() >= self.p  # P(keep) = 1 - p
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"
