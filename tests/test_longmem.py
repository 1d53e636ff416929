"""LongMem: the chunked memory bank (memory/bank.py), the ALiBi backbone (models/alibi_lm.py) and the
SideNet model (models/longmem.py) against naive references, causality and reset checks, and the CLI path."""

import math

import pytest
import torch

import trime_fairseq  # noqa: F401  (registers models, task, criteria)
from trime_fairseq.memory.bank import BankConfig, ChunkMemoryBank

# -- the memory bank ---------------------------------------------------------------------------------


class NaiveBank:
    """Per row: the list of valid tokens since the last reset, chunked from its start; the last N chunks."""

    def __init__(self, config: BankConfig, rows: int):
        self.config = config
        self.tokens = [[] for _ in range(rows)]  # (key (H, D), value (H, D)) per token

    def append(self, keys, values, valid):
        for b in range(keys.size(0)):
            for t in range(keys.size(1)):
                if valid[b, t]:
                    self.tokens[b].append((keys[b, t], values[b, t]))

    def reset(self, rows):
        for b, r in enumerate(rows.tolist()):
            if r:
                self.tokens[b] = []

    def chunks(self, b):
        """[(keys (csz, H, D), values (csz, H, D))] oldest first: the last N complete chunks."""
        c = self.config.chunk_size
        full = len(self.tokens[b]) // c
        out = []
        for i in range(full):
            piece = self.tokens[b][i * c : (i + 1) * c]
            out.append((torch.stack([k for k, _ in piece]), torch.stack([v for _, v in piece])))
        return out[-self.config.slots :]

    def retrieve(self, b, h, query, scale):
        """Brute force: mean-pooled chunk keys, top K/csz chunks by q·mean, flattened. Returns
        (scores (k·csz,), values (k·csz, D)) with chunks in descending score order."""
        chunks = self.chunks(b)
        if not chunks:
            return query.new_zeros(0), query.new_zeros(0, query.size(-1))
        means = torch.stack([k[:, h].mean(0) for k, _ in chunks])
        order = sorted(range(len(chunks)), key=lambda i: -float(query @ means[i]))[: self.config.top_chunks]
        keys = torch.cat([chunks[i][0][:, h] for i in order])
        values = torch.cat([chunks[i][1][:, h] for i in order])
        return (keys @ query) * scale, values


def random_segment(bsz, tlen, heads, dim, seed, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(bsz, tlen, heads, dim, generator=g, dtype=torch.float64)
    values = torch.randn(bsz, tlen, heads, dim, generator=g, dtype=torch.float64)
    valid = torch.rand(bsz, tlen, generator=g) > 0.2  # padding anywhere: it must never enter
    return keys, values, valid


def assert_matches_naive(bank, naive, queries, scale=0.5):
    result = bank.retrieve(queries, scale)
    bsz, tlen, heads, dim = queries.shape
    for b in range(bsz):
        for h in range(heads):
            for t in range(tlen):
                scores, values = naive.retrieve(b, h, queries[b, t, h], scale)
                mask = result.mask[b, h, t]
                assert int(mask.sum()) == scores.numel(), (b, h, t)
                # chunks come out in descending chunk-score order (torch.topk), masked ones last
                torch.testing.assert_close(result.scores[b, h, t][mask], scores)
                torch.testing.assert_close(result.values[b, h, t][mask], values)


@pytest.mark.parametrize("chunk_size,capacity,retrieved", [(4, 24, 8), (1, 5, 3), (3, 9, 12), (2, 40, 4)])
def test_bank_retrieval_equals_brute_force_reference(chunk_size, capacity, retrieved):
    """Ring-buffer writes, partial chunks carried across segments, padding skipped, the last M tokens kept,
    mean-pooled chunk keys, top K/csz chunks per query and head, flattened pairs -- vs explicit lists."""
    config = BankConfig(capacity=capacity, chunk_size=chunk_size, retrieved=retrieved)
    bank = ChunkMemoryBank.empty(config, rows=3, heads=2, head_dim=5, dtype=torch.float64, device="cpu")
    naive = NaiveBank(config, rows=3)
    for step, tlen in enumerate([3, 7, 1, 11, 6, 2]):
        keys, values, valid = random_segment(3, tlen, 2, 5, seed=step)
        if step == 2:
            valid[1] = False  # an ended stream: nothing enters
        bank.append(keys, values, valid)
        naive.append(keys, values, valid)
        held = [len(t) for t in naive.tokens]
        expected = [min(n // chunk_size, config.slots) * chunk_size + n % chunk_size for n in held]
        assert bank.tokens().tolist() == expected
        queries = torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64)
        assert_matches_naive(bank, naive, queries)
    rows = torch.tensor([False, True, False])
    bank.reset(rows)
    naive.reset(rows)
    keys, values, valid = random_segment(3, 9, 2, 5, seed=50)
    bank.append(keys, values, valid)
    naive.append(keys, values, valid)
    assert_matches_naive(bank, naive, torch.randn(3, 2, 2, 5, dtype=torch.float64))


def test_bank_with_fewer_chunks_than_retrieved_masks_the_rest():
    config = BankConfig(capacity=64, chunk_size=4, retrieved=16)  # 4 chunks wanted
    bank = ChunkMemoryBank.empty(config, rows=2, heads=1, head_dim=3, dtype=torch.float32, device="cpu")
    empty = bank.retrieve(torch.randn(2, 5, 1, 3), 1.0)
    assert empty.mask.shape == (2, 1, 5, 16) and not empty.mask.any()
    keys, values = torch.randn(2, 6, 1, 3), torch.randn(2, 6, 1, 3)
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    bank.append(keys, values, valid)  # row 0: one chunk + 2 pending; row 1: 3 pending tokens only
    got = bank.retrieve(torch.randn(2, 5, 1, 3), 1.0)
    assert got.mask[0].sum(-1).eq(4).all() and not got.mask[1].any()
    torch.testing.assert_close(got.values[0, 0, 0, :4], values[0, :4, 0])
    assert torch.isfinite(got.scores).all()
    # a bank smaller than K/csz chunks: all of it, every query
    small = ChunkMemoryBank.empty(BankConfig(capacity=8, chunk_size=4, retrieved=16), 1, 1, 3, torch.float32, "cpu")
    small.append(torch.randn(1, 12, 1, 3), torch.randn(1, 12, 1, 3), torch.ones(1, 12, dtype=torch.bool))
    got = small.retrieve(torch.randn(1, 2, 1, 3), 1.0)
    assert got.mask.shape == (1, 1, 2, 8) and got.mask.all()


def test_bank_visibility_and_gradients():
    config = BankConfig(capacity=16, chunk_size=2, retrieved=4)
    bank = ChunkMemoryBank.empty(config, rows=1, heads=2, head_dim=3, dtype=torch.float32, device="cpu")
    bank.append(torch.randn(1, 8, 2, 3), torch.randn(1, 8, 2, 3), torch.ones(1, 8, dtype=torch.bool))
    queries = torch.randn(1, 3, 2, 3, requires_grad=True)
    got = bank.retrieve(queries, 0.5, visible=torch.tensor([[True, False, True]]))
    assert got.mask[0, :, 1].sum() == 0 and got.mask[0, :, 0].all()
    got.scores.sum().backward()
    assert queries.grad.abs().sum() > 0 and not bank.keys.requires_grad


def test_faiss_search_finds_the_same_chunks():
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    config = BankConfig(capacity=40, chunk_size=4, retrieved=12)
    banks = {s: ChunkMemoryBank.empty(BankConfig(40, 4, 12, s), 2, 3, 4, torch.float32, "cpu") for s in ("torch", "faiss")}
    for tlen in (9, 17, 30):
        keys, values, valid = random_segment(2, tlen, 3, 4, seed=tlen)
        for bank in banks.values():
            bank.append(keys.float(), values.float(), valid)
        queries = torch.randn(2, 5, 3, 4)
        ref, got = (banks[s].retrieve(queries, 1.0) for s in ("torch", "faiss"))
        assert torch.equal(ref.mask, got.mask)
        torch.testing.assert_close(got.scores.masked_fill(~got.mask, 0), ref.scores.masked_fill(~ref.mask, 0))
    assert config.top_chunks == 3


def test_bank_sizes_are_checked():
    for kwargs, message in [
        (dict(capacity=16, chunk_size=4, retrieved=6), "multiple of the chunk size"),
        (dict(capacity=2, chunk_size=4, retrieved=4), "memory size"),
        (dict(capacity=10, chunk_size=4, retrieved=4), "memory size"),
        (dict(capacity=16, chunk_size=0, retrieved=4), "chunk size"),
        (dict(capacity=16, chunk_size=4, retrieved=4, search="annoy"), "unknown memory search"),
    ]:
        with pytest.raises(ValueError, match=message):
            BankConfig(**kwargs)
