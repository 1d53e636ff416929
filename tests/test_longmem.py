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
        order = sorted(range(len(chunks)), key=lambda i: -float((query @ means[i]).detach()))[: self.config.top_chunks]
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


# -- tiny models ---------------------------------------------------------------------------------------

from fairseq.data import Dictionary  # noqa: E402

from trime_fairseq.models.alibi_lm import AlibiLMConfig, AlibiLMDecoder, alibi_slopes  # noqa: E402
from trime_fairseq.models.longmem import (  # noqa: E402
    LongMemConfig,
    LongMemDecoder,
    LongMemModel,
    MemoryAugmentedLayer,
)

WORDS = 36  # ids 4 .. 39 are words, 40 is "="


def tiny_dictionary(words: int = WORDS) -> Dictionary:
    d = Dictionary()
    for i in range(words):
        d.add_symbol(f"w{i}")
    d.add_symbol("=")
    return d


DICT = tiny_dictionary()
EOS, HEAD, PAD = DICT.eos(), DICT.index("="), DICT.pad()


def alibi_config(**overrides) -> AlibiLMConfig:
    options = dict(decoder_layers=4, decoder_embed_dim=12, decoder_attention_heads=3, decoder_ffn_embed_dim=20,
                   dropout=0.0, attention_dropout=0.0)
    options.update(overrides)
    cfg = AlibiLMConfig(**options)
    cfg.max_target_positions = None
    return cfg


def tiny_backbone(seed=0, dictionary=DICT, **overrides) -> AlibiLMDecoder:
    """A float64 eval-mode ALiBi LM with randomised biases and norms (so every parameter matters)."""
    torch.manual_seed(seed)
    backbone = AlibiLMDecoder(alibi_config(**overrides), dictionary).double().eval()
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "bias" in name or "norm" in name:
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    return backbone


def longmem_config(**overrides) -> LongMemConfig:
    options = dict(memory_size=8, chunk_size=2, memory_k=4, memory_layer=2, tokens_per_sample=5, dropout=0.0)
    options.update(overrides)
    return LongMemConfig(**options)


def tiny_longmem(backbone=None, seed=1, stream=True, **overrides) -> LongMemDecoder:
    """LongMem on ``tiny_backbone``: SideNet 2 layers, memory layer 2 reading backbone layer 4, M 8, csz 2,
    K 4, segments of 5 tokens; the SideNet is perturbed away from the backbone copy and the gate randomised."""
    decoder = LongMemDecoder(longmem_config(**overrides), DICT, backbone or tiny_backbone()).double().eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in decoder.layers.parameters():
            p.add_(0.1 * torch.randn_like(p))
    decoder.recurrent_memory.enable(stream)
    return decoder


def words(bsz, length, seed=1):
    return torch.randint(4, 4 + WORDS, (bsz, length), generator=torch.Generator().manual_seed(seed))


def stream_features(decoder, tokens, segment=5):
    """Features of a whole stream fed segment by segment (the bank carries across calls)."""
    decoder.recurrent_memory.reset()
    return torch.cat([decoder(tokens[:, s : s + segment], features_only=True)[0]
                      for s in range(0, tokens.size(1), segment)], dim=1)


# -- the ALiBi backbone ---------------------------------------------------------------------------------


def test_alibi_slopes_are_press_et_al():
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads (2^-1, 2^-3)
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]))


def naive_alibi_layer(layer, x, valid):
    """One pre-norm ALiBi block with explicit loops over batch, head, query and key."""
    attn = layer.self_attn
    q, k, v = attn.project(layer.attn_norm(x))
    bsz, tlen, heads, dim = q.shape
    context = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            for t in range(tlen):
                keys = [j for j in range(t + 1) if valid[b, j]]
                if not keys:
                    continue
                scores = torch.stack([q[b, t, h] @ k[b, j, h] / math.sqrt(dim) - layer.slopes[h] * (t - j) for j in keys])
                probs = torch.softmax(scores, 0)
                context[b, t, h] = sum(p * v[b, j, h] for p, j in zip(probs, keys))
    x = x + attn.out(context)
    key = layer.ffn.ffn_norm(x)
    return x + layer.ffn.fc2(layer.ffn.activation(layer.ffn.fc1(key))), key


def test_backbone_equals_naive_alibi_transformer_and_exposes_states():
    backbone = tiny_backbone()
    tokens = words(2, 6)
    tokens[1, 4:] = PAD
    states = backbone.encode(tokens)
    x = backbone.embed_scale * backbone.embed_tokens(tokens)
    valid = tokens.ne(PAD)
    assert len(states.hidden) == 5 and len(states.key_values) == 4
    torch.testing.assert_close(states.hidden[0], x)
    for i, layer in enumerate(backbone.layers):
        expected_k = layer.self_attn.project(layer.attn_norm(x))[1]
        torch.testing.assert_close(states.key_values[i][0], expected_k)
        x, key = naive_alibi_layer(layer, x, valid)
        torch.testing.assert_close(states.hidden[i + 1], x)
    torch.testing.assert_close(states.key, key)
    torch.testing.assert_close(states.features, backbone.final_norm(x))
    logits, extra = backbone(tokens)
    torch.testing.assert_close(logits, backbone.output_projection(backbone.final_norm(x)))
    torch.testing.assert_close(extra["trime_key"], key)


def test_backbone_incremental_decoding_equals_full_forward():
    backbone = tiny_backbone()
    tokens = words(2, 7)
    full = backbone(tokens)[0]
    state = {}
    steps = [backbone(tokens[:, : t + 1], incremental_state=state)[0] for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    order = torch.tensor([1, 1])
    state = {}
    backbone(tokens[:, :3], incremental_state=state)
    backbone.reorder_incremental_state(state, order)
    torch.testing.assert_close(backbone(tokens[order, :4], incremental_state=state)[0], full[order, 3:4])


# -- the SideNet ------------------------------------------------------------------------------------------


def test_sidenet_is_initialised_from_backbone_layers_2l_and_the_gate_at_one_half():
    backbone = tiny_backbone()
    decoder = LongMemDecoder(longmem_config(), DICT, backbone)
    assert len(decoder.layers) == 2 and isinstance(decoder.layers[1], MemoryAugmentedLayer)
    for layer, side in enumerate(decoder.layers, start=1):
        source = backbone.layers[2 * layer - 1].state_dict()  # backbone layer 2l, 1-based
        for name, value in side.state_dict().items():
            if name != "gate":
                assert torch.equal(value, source[name]), (layer, name)
    torch.testing.assert_close(torch.sigmoid(decoder.layers[1].gate), torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.equal(decoder.final_norm.weight, backbone.final_norm.weight)
    assert all(not p.requires_grad for p in decoder.backbone.parameters())
    assert decoder.backbone_memory_layer == 4  # default: 2 x memory layer


def test_cross_network_residuals_add_backbone_2l_minus_2l_minus_2():
    """Layer l+1 of the SideNet reads f_l(H_side^{l-1}) + (H^{2l} - H^{2l-2}): with identity layers it reads H^{2l}."""
    decoder = tiny_longmem(memory_size=0, backbone=tiny_backbone(decoder_layers=6), memory_layer=1)
    seen = []

    def identity(layer):
        def forward(x, visible, past=None, memory=None):
            seen.append(x)
            return x + 0.0, x, (x, x)
        return forward

    for layer in decoder.layers:
        layer.forward = identity(layer)
    tokens = words(2, 5)
    features = decoder(tokens, features_only=True)[0]
    hidden = decoder.backbone.encode(tokens).hidden
    for layer in range(1, 4):  # input of layer l = H^{2(l-1)}
        torch.testing.assert_close(seen[layer - 1], hidden[2 * (layer - 1)])
    torch.testing.assert_close(features, decoder.final_norm(hidden[6]))


def naive_joint_attention_layer(layer, x, naive_bank, bank_visible):
    """Eq. 2-3 with loops: local ALiBi attention A, attention M over the brute-force retrieved pairs,
    σ(g_h)·A + (1 − σ(g_h))·M (A alone where nothing is retrieved), then the rest of the block."""
    attn = layer.self_attn
    q, k, v = attn.project(layer.attn_norm(x))
    bsz, tlen, heads, dim = q.shape
    context = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            gate = torch.sigmoid(layer.gate[h])
            for t in range(tlen):
                scores = torch.stack([q[b, t, h] @ k[b, j, h] / math.sqrt(dim) - layer.slopes[h] * (t - j) for j in range(t + 1)])
                local = torch.softmax(scores, 0) @ v[b, : t + 1, h]
                mem_scores, mem_values = naive_bank.retrieve(b, h, q[b, t, h], 1 / math.sqrt(dim))
                if bank_visible[b, t] and mem_scores.numel():
                    context[b, t, h] = gate * local + (1 - gate) * (torch.softmax(mem_scores, 0) @ mem_values)
                else:
                    context[b, t, h] = local
    x = x + attn.out(context)
    return layer.ffn(x)[0]


def test_memory_layer_equals_explicit_joint_attention():
    decoder = tiny_longmem()
    layer = decoder.layers[1]
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([-1.0, 0.3, 2.0]))
    config = decoder.bank_config
    bank = ChunkMemoryBank.empty(config, rows=2, heads=3, head_dim=4, dtype=torch.float64, device="cpu")
    naive = NaiveBank(config, rows=2)
    keys, values, valid = random_segment(2, 7, 3, 4, seed=3)
    valid[1, 2:] = False  # row 1: one chunk only (fewer than K/csz = 2)
    bank.append(keys, values, valid)
    naive.append(keys, values, valid)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    bank_visible = torch.tensor([[True] * 5, [True, True, False, False, False]])
    visible = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    out, _, _ = layer(x, visible, memory=lambda q, scale: bank.retrieve(q, scale, bank_visible))
    torch.testing.assert_close(out, naive_joint_attention_layer(layer, x, naive, bank_visible))
