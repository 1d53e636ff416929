"""LongMem's cached memory bank: per stream, per head, token-to-chunk retrieval (Wang et al. 2023, §2.1, §2.3).

Entries are the attention (key, value) pairs of a frozen model's layer m at the latest M
tokens of each stream (batch row). The bank is cut into chunks of ``csz`` consecutive
tokens; a chunk is retrieved by the inner product of the query with its mean-pooled key,
the top K/csz chunks of each query and head are flattened into K (key, value) pairs, and
:meth:`ChunkMemoryBank.retrieve` answers with a :class:`~trime_fairseq.memory.sources.MemoryBatch`
whose values are vectors: scores (B, H, T, K) float32, values (B, H, T, K, D), mask (B, H, T, K).

Storage (preallocated on the device of the keys, written in place; no growth, no host round trip):

* ``keys``, ``values``  (B, H, N + 1, csz, D), N = M / csz chunk slots per row, slot N a scratch slot
  that absorbs the writes of padding and of chunks overwritten within the same append;
* ``chunk_keys``        (B, H, N + 1, D): the mean of each chunk's keys (its retrieval key);
* ``filled`` (B,), ``next`` (B,): a row's valid slots are [0, filled) (writes start at slot 0 after a
  reset and go round the ring), ``next`` is the slot written next (the oldest once the row is full);
* ``pending_keys``, ``pending_values`` (B, csz − 1, H, D), ``pending`` (B,): the last tokens of a row
  that do not fill a chunk yet, right-aligned; they join the next chunk of the row.

Only tokens marked valid enter (padding never does), in stream order; a row that has
fewer than K/csz chunks retrieves what it has and masks the rest; ``reset(rows)`` empties rows.
The state is a dict of tensors (:meth:`state` / :meth:`from_state`), so a model can keep it in
its recurrent memory or in fairseq's ``incremental_state`` and reorder it for beam search.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from trime_fairseq.memory.mixing import fp32
from trime_fairseq.memory.sources import MemoryBatch

SEARCHES = ("torch", "faiss")
_SCORE_BLOCK = 1 << 24  # chunk scores computed per block of queries: at most this many float32 at once


@dataclass(frozen=True)
class BankConfig:
    capacity: int  # M: tokens per row
    chunk_size: int = 4  # csz
    retrieved: int = 64  # K: (key, value) pairs per query and head
    search: str = "torch"  # exact inner-product search in torch, or faiss (IndexFlatIP, on the host)

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.retrieved < self.chunk_size or self.retrieved % self.chunk_size != 0:
            raise ValueError(
                f"the number of retrieved pairs K={self.retrieved} must be a positive multiple of the "
                f"chunk size {self.chunk_size} (K/csz whole chunks are retrieved)"
            )
        if self.capacity < self.chunk_size or self.capacity % self.chunk_size != 0:
            raise ValueError(
                f"memory size M={self.capacity} must be a positive multiple of the chunk size {self.chunk_size}"
            )
        if self.search not in SEARCHES:
            raise ValueError(f"unknown memory search '{self.search}', choose one of {SEARCHES}")

    @property
    def slots(self) -> int:
        """N = M / csz chunks per row."""
        return self.capacity // self.chunk_size

    @property
    def top_chunks(self) -> int:
        """Chunks retrieved per query and head: K / csz, or all N slots of a smaller bank."""
        return min(self.retrieved // self.chunk_size, self.slots)


_TENSORS = ("keys", "values", "chunk_keys", "filled", "next", "pending_keys", "pending_values", "pending")


class ChunkMemoryBank:
    """One bank per stream (batch row); see the module docstring for the layout."""

    def __init__(self, config: BankConfig, state: Dict[str, Tensor]):
        self.config = config
        missing = [name for name in _TENSORS if name not in state]
        if missing:
            raise ValueError(f"memory bank state lacks {missing}")
        for name in _TENSORS:
            setattr(self, name, state[name])

    @classmethod
    def empty(cls, config: BankConfig, rows: int, heads: int, head_dim: int, dtype, device) -> "ChunkMemoryBank":
        n, c = config.slots, config.chunk_size
        zeros = dict(dtype=dtype, device=device)
        count = dict(dtype=torch.long, device=device)
        return cls(config, {
            "keys": torch.zeros(rows, heads, n + 1, c, head_dim, **zeros),
            "values": torch.zeros(rows, heads, n + 1, c, head_dim, **zeros),
            "chunk_keys": torch.zeros(rows, heads, n + 1, head_dim, **zeros),
            "filled": torch.zeros(rows, **count),
            "next": torch.zeros(rows, **count),
            "pending_keys": torch.zeros(rows, c - 1, heads, head_dim, **zeros),
            "pending_values": torch.zeros(rows, c - 1, heads, head_dim, **zeros),
            "pending": torch.zeros(rows, **count),
        })

    @classmethod
    def from_state(cls, config: BankConfig, state: Dict[str, Tensor], prefix: str = "") -> "ChunkMemoryBank":
        bank = cls(config, {name: state[prefix + name] for name in _TENSORS if prefix + name in state})
        if bank.keys.size(2) != config.slots + 1 or bank.keys.size(3) != config.chunk_size:
            raise ValueError(
                f"memory bank state has {bank.keys.size(2) - 1} slots of {bank.keys.size(3)} tokens, "
                f"the configuration {config.slots} of {config.chunk_size}"
            )
        return bank

    def state(self, prefix: str = "") -> Dict[str, Tensor]:
        return {prefix + name: getattr(self, name) for name in _TENSORS}

    @property
    def rows(self) -> int:
        return self.keys.size(0)

    def tokens(self) -> Tensor:
        """(B,) tokens held per row: full chunks plus pending tokens."""
        return self.filled * self.config.chunk_size + self.pending

    # -- writing ------------------------------------------------------------------------------
    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Empty the rows where ``rows`` (B,) bool is True (all rows when None)."""
        if rows is None:
            rows = torch.ones(self.rows, dtype=torch.bool, device=self.filled.device)
        for name in ("filled", "next", "pending"):
            setattr(self, name, getattr(self, name).masked_fill(rows, 0))

    def append(self, keys: Tensor, values: Tensor, valid: Tensor) -> None:
        """Add one segment: keys, values (B, T, H, D), ``valid`` (B, T) bool (the tokens that enter, in order)."""
        bsz, tlen, heads, dim = keys.shape
        if values.shape != keys.shape or valid.shape != (bsz, tlen):
            raise ValueError(f"append expects keys, values (B, T, H, D) and valid (B, T); got "
                             f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(valid.shape)}")
        if bsz != self.rows or (heads, dim) != (self.keys.size(1), self.keys.size(-1)):
            raise ValueError(f"the bank holds {self.rows} rows x {self.keys.size(1)} heads x {self.keys.size(-1)}, "
                             f"got keys {tuple(keys.shape)}")
        c, n = self.config.chunk_size, self.config.slots
        p = c - 1
        device = keys.device
        rows = torch.arange(bsz, device=device)

        # staging (B, p + T + 1, H, D): pending tokens right-aligned in [0, p), then the valid tokens
        # of the segment compacted in order; column p + T absorbs the padding
        def stage(pending: Tensor, new: Tensor) -> Tensor:
            staged = new.new_zeros(bsz, p + tlen + 1, heads, dim)
            staged[:, :p] = pending
            dest = torch.where(valid, p + valid.long().cumsum(1) - 1, p + tlen)  # (B, T)
            return staged.scatter(1, dest.view(bsz, tlen, 1, 1).expand_as(new), new.to(staged.dtype))

        staged_k, staged_v = stage(self.pending_keys, keys.detach()), stage(self.pending_values, values.detach())
        count = valid.long().sum(1)  # (B,)
        total = self.pending + count
        complete = total // c  # (B,) chunks completed by this segment
        first = p - self.pending  # (B,) staged position of the row's first token

        j = torch.arange((p + tlen) // c, device=device)  # (C,) candidate chunks
        where = first.view(-1, 1, 1) + j.view(1, -1, 1) * c + torch.arange(c, device=device).view(1, 1, -1)
        where = where.clamp(max=p + tlen)  # (B, C, csz): incomplete chunks read the scratch column
        chunk_k, chunk_v = staged_k[rows.view(-1, 1, 1), where], staged_v[rows.view(-1, 1, 1), where]  # (B, C, csz, H, D)
        # chunk j goes to slot (next + j) mod N; chunks overwritten within this append and
        # incomplete ones go to the scratch slot N
        keep = (j.view(1, -1) < complete.view(-1, 1)) & (j.view(1, -1) >= complete.view(-1, 1) - n)
        slot = torch.where(keep, (self.next.view(-1, 1) + j.view(1, -1)) % n, n)  # (B, C)
        index = (rows.view(-1, 1), slice(None), slot)
        self.keys[index] = chunk_k.transpose(2, 3)  # keys[b, :, slot]: (B, C, H, csz, D)
        self.values[index] = chunk_v.transpose(2, 3)
        self.chunk_keys[index] = fp32(chunk_k).mean(dim=2).to(self.chunk_keys.dtype)  # (B, C, H, D)
        self.next = (self.next + complete) % n
        self.filled = torch.clamp(self.filled + complete, max=n)

        # the new pending tokens: the last (total mod csz) real tokens, right-aligned
        self.pending = total - complete * c
        if p > 0:
            # the real tokens end at staged position p + count: the pending window is [count, count + p)
            tail = count.view(-1, 1) + torch.arange(p, device=device).view(1, -1)  # (B, p)
            self.pending_keys = staged_k[rows.view(-1, 1), tail]
            self.pending_values = staged_v[rows.view(-1, 1), tail]

    # -- reading ------------------------------------------------------------------------------
    def search(self, queries: Tensor) -> Tuple[Tensor, Tensor]:
        """Top chunks of every query: queries (B, H, T, D) -> (slots (B, H, T, k) long, found (B, H, T, k) bool),
        k = :attr:`BankConfig.top_chunks`, by inner product with the mean-pooled chunk keys.
        ``found`` is False where the row holds fewer than k chunks."""
        with torch.no_grad():
            if self.config.search == "faiss":
                return self._search_faiss(queries)
            return self._search_torch(queries)

    def _search_torch(self, queries: Tensor) -> Tuple[Tensor, Tensor]:
        n, k = self.config.slots, self.config.top_chunks
        bsz, heads, tlen, _ = queries.shape
        empty = (torch.arange(n, device=queries.device).view(1, -1) >= self.filled.view(-1, 1)).view(bsz, 1, 1, n)
        chunk_keys = fp32(self.chunk_keys[:, :, :n])
        block = max(1, _SCORE_BLOCK // max(1, bsz * heads * n))
        slots, found = [], []
        for start in range(0, tlen, block):
            scores = torch.einsum("bhtd,bhnd->bhtn", fp32(queries[:, :, start : start + block]), chunk_keys)
            top, index = scores.masked_fill_(empty, float("-inf")).topk(k, dim=-1)
            slots.append(index)
            found.append(top > float("-inf"))
        return torch.cat(slots, dim=2), torch.cat(found, dim=2)

    def _search_faiss(self, queries: Tensor) -> Tuple[Tensor, Tensor]:
        import faiss

        k = self.config.top_chunks
        bsz, heads, tlen, dim = queries.shape
        slots = torch.zeros(bsz, heads, tlen, k, dtype=torch.long)
        found = torch.zeros(bsz, heads, tlen, k, dtype=torch.bool)
        q = queries.float().cpu().numpy()
        chunk_keys = self.chunk_keys.float().cpu().numpy()
        for b, filled in enumerate(self.filled.tolist()):
            hits = min(k, filled)
            for h in range(heads if hits > 0 else 0):
                index = faiss.IndexFlatIP(dim)
                index.add(chunk_keys[b, h, :filled])
                _, ids = index.search(q[b, h], hits)
                ids = torch.from_numpy(ids)
                slots[b, h, :, :hits] = ids.clamp(min=0)
                found[b, h, :, :hits] = ids >= 0
        return slots.to(queries.device), found.to(queries.device)

    def retrieve(self, queries: Tensor, scale: float, visible: Optional[Tensor] = None) -> MemoryBatch:
        """The K' = k·csz pairs of every query (k = :attr:`BankConfig.top_chunks`).

        queries (B, T, H, D); ``visible`` (B, T) bool: queries that may read the bank (default all).
        Returns a MemoryBatch with scores ``scale``·q·k̃ (B, H, T, K') float32 (differentiable in the
        queries), values ṽ (B, H, T, K', D) and mask (B, H, T, K') bool: found chunks of visible queries.
        """
        q = queries.transpose(1, 2)  # (B, H, T, D)
        slots, found = self.search(q)  # (B, H, T, k)
        bsz, heads = q.shape[:2]
        b = torch.arange(bsz, device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
        keys = self.keys[b, h, slots].flatten(3, 4)  # (B, H, T, k·csz, D)
        values = self.values[b, h, slots].flatten(3, 4)
        scores = torch.einsum("bhtd,bhtkd->bhtk", fp32(q), fp32(keys)) * scale
        mask = found.repeat_interleave(self.config.chunk_size, dim=-1)
        if visible is not None:
            mask = mask & visible.view(bsz, 1, -1, 1)
        return MemoryBatch(scores, values, mask)
