"""LongMem: the chunked memory bank (memory/bank.py), the ALiBi backbone (models/alibi_lm.py) and the
SideNet model (models/longmem.py) against naive references, causality and reset checks, and the CLI path."""

import math
import re

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


def naive_local_attention(layer, q, k, v, b, h, t, valid=None):
    """Context of query t, head h: softmax over keys j <= t (non-padding) of q·k_j/√D − m_h (t − j), times v."""
    keys = [j for j in range(t + 1) if valid is None or valid[b, j]]
    if not keys:
        return torch.zeros_like(q[b, t, h])
    dim = q.size(-1)
    scores = torch.stack([q[b, t, h] @ k[b, j, h] / math.sqrt(dim) - layer.slopes[h] * (t - j) for j in keys])
    return sum(p * v[b, j, h] for p, j in zip(torch.softmax(scores, 0), keys))


def naive_block(layer, x, context_of):
    """A pre-norm block whose attention context of (q, k, v, b, h, t) is ``context_of``, with explicit loops."""
    q, k, v = layer.self_attn.project(layer.attn_norm(x))
    bsz, tlen, heads, _ = q.shape
    context = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            for t in range(tlen):
                context[b, t, h] = context_of(q, k, v, b, h, t)
    x = x + layer.self_attn.out(context)
    key = layer.ffn.ffn_norm(x)
    return x + layer.ffn.fc2(layer.ffn.activation(layer.ffn.fc1(key))), key


def naive_alibi_layer(layer, x, valid):
    """One pre-norm ALiBi block with explicit loops over batch, head, query and key."""
    return naive_block(layer, x, lambda q, k, v, b, h, t: naive_local_attention(layer, q, k, v, b, h, t, valid))


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



@pytest.mark.parametrize("adaptive", [False, True])
def test_backbone_trains_with_trime_loss_and_adaptive_softmax(adaptive):
    """The ALiBi LM is a model of this project: TRIME keys for trime_loss, full or adaptive softmax."""
    from tiny_models import lm_sample, tiny_task, trime_criterion

    from trime_fairseq.models.alibi_lm import AlibiLanguageModel

    task = tiny_task()
    torch.manual_seed(0)
    model = AlibiLanguageModel(AlibiLMDecoder(alibi_config(adaptive_softmax_cutoff="10,16" if adaptive else None),
                                              task.dictionary)).double()
    sample = lm_sample(task, bsz=2, tsz=7, pad_last=2)
    loss, size, log = trime_criterion(task)(model, sample)
    loss.backward()
    assert torch.isfinite(loss) and size == sample["ntokens"] and 0 < log["in_memory"] <= size
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    torch.testing.assert_close(lprobs.double().exp().sum(-1), torch.ones(2, 7, dtype=torch.float64))

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

    def joint(q, k, v, b, h, t):
        local = naive_local_attention(layer, q, k, v, b, h, t)
        scores, values = naive_bank.retrieve(b, h, q[b, t, h], 1 / math.sqrt(q.size(-1)))
        if not bank_visible[b, t] or scores.numel() == 0:
            return local
        gate = torch.sigmoid(layer.gate[h])
        return gate * local + (1 - gate) * (torch.softmax(scores, 0) @ values)

    return naive_block(layer, x, joint)[0]


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


# -- training: only the SideNet learns ---------------------------------------------------------------


def test_backbone_gets_no_gradient_and_stays_bit_identical_after_updates():
    decoder = tiny_longmem()
    model = LongMemModel(decoder).train()
    assert not model.decoder.backbone.training
    before = {k: v.clone() for k, v in model.decoder.backbone.state_dict().items()}
    side_before = [p.detach().clone() for p in model.decoder.layers.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = words(2, 15)
    model.decoder.recurrent_memory.reset()
    for s in range(0, 15, 5):
        logits = model(tokens[:, s : s + 5])[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, s + 1 : s + 5].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.decoder.backbone.parameters())
        gate_moves = decoder.layers[1].gate.grad.abs().sum() > 0
        assert gate_moves == (s > 0)  # the first segment of a stream has an empty bank: output = A
        optimizer.step()
    for name, value in model.decoder.backbone.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(model.decoder.layers.parameters(), side_before))
    assert model.decoder.backbone.dictionary_checksum.dtype == torch.uint8



def test_half_precision_with_large_activations_stays_finite():
    """fp16 model and bank: scores, softmax statistics and the gated mix run in float32."""
    decoder = tiny_longmem()
    with torch.no_grad():
        for layer in list(decoder.layers) + list(decoder.backbone.layers):
            layer.self_attn.q_proj.weight.mul_(100.0)
            layer.self_attn.k_proj.weight.mul_(100.0)
    decoder = decoder.half()
    out = stream_features(decoder, words(2, 15))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert decoder.recurrent_memory.state["bank.keys"].dtype == torch.float16

# -- causality, rows, resets -------------------------------------------------------------------------------


def heading_stream(bsz=2, length=20, seed=1):
    """Random words with a WikiText article start: eos, '=', title word at positions 6, 7, 8."""
    tokens = words(bsz, length, seed)
    tokens[:, 6], tokens[:, 7] = EOS, HEAD
    return tokens


@pytest.mark.parametrize("reset", ["never", "document"])
def test_no_leakage_from_later_tokens(reset):
    """Perturbing every token after t leaves the outputs at positions <= t unchanged (local attention,
    retrieval, the bank's insertion after scoring, article starts from inputs only)."""
    decoder = tiny_longmem(bank_reset=reset)
    tokens = heading_stream()
    base = stream_features(decoder, tokens)
    for t in [0, 3, 4, 7, 8, 12]:  # in the first segment, at its end, the heading's '=' (its target decides the start)
        changed = tokens.clone()
        changed[:, t + 1 :] = words(2, 20 - t - 1, seed=t + 10)
        if t == 7:
            changed[:, 8] = HEAD  # '= =': a section heading, not an article start
        out = stream_features(decoder, changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_memory_carries_earlier_segments_and_the_current_segment_is_not_in_the_bank(monkeypatch):
    decoder = tiny_longmem(memory_size=8)
    tokens = words(2, 15)
    base = stream_features(decoder, tokens)
    changed = tokens.clone()
    changed[:, :5] = words(2, 5, seed=9)  # only the first segment: later segments differ through the bank alone
    assert not torch.allclose(stream_features(decoder, changed)[:, 10:], base[:, 10:])

    held = []
    retrieve = ChunkMemoryBank.retrieve

    def spy(bank, queries, scale, visible=None):
        held.append(bank.tokens().tolist())
        return retrieve(bank, queries, scale, visible)

    monkeypatch.setattr(ChunkMemoryBank, "retrieve", spy)
    stream_features(decoder, tokens)
    # while segment s is scored the bank holds segments < s: 0, 5, then 10 tokens = 5 chunks of which M/csz = 4 kept
    assert held == [[0, 0], [5, 5], [8, 8]]


def test_rows_never_retrieve_another_rows_memory():
    decoder = tiny_longmem()
    tokens = words(3, 15)
    base = stream_features(decoder, tokens)
    changed = tokens.clone()
    changed[1] = words(1, 15, seed=7)[0]
    out = stream_features(decoder, changed)
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]])
    assert not torch.allclose(out[1, 5:], base[1, 5:])
    alone = stream_features(decoder, tokens[2:3])  # a batch of one row: its own stream, same result
    torch.testing.assert_close(alone[0], base[2])


def test_stream_resets_and_article_starts_empty_the_bank():
    decoder = tiny_longmem()
    tokens = words(2, 10)
    fresh = decoder(tokens[:, 5:], features_only=True)[0]
    decoder.recurrent_memory.reset()
    decoder(tokens[:, :5])
    assert not torch.allclose(decoder(tokens[:, 5:], features_only=True)[0], fresh)  # the bank is read
    decoder(tokens[:1, :5])  # another batch size: a new stream, the bank starts empty
    decoder.recurrent_memory.reset()
    torch.testing.assert_close(decoder(tokens[:, 5:], features_only=True)[0], fresh)  # explicit reset

    # --bank-reset document: the segments after an article start see nothing before it
    stream = heading_stream(length=25)
    other = stream.clone()
    other[:, :5] = words(2, 5, seed=5)  # another previous article, in the segment before the start's
    for reset, same in [("document", True), ("never", False)]:
        decoder = tiny_longmem(bank_reset=reset, memory_size=16)
        a, b = stream_features(decoder, stream), stream_features(decoder, other)
        assert torch.allclose(a[:, 10:], b[:, 10:]) == same, reset
    # inside the segment of the start, positions from the start on read no bank entry either
    decoder = tiny_longmem(bank_reset="document", memory_size=16)
    long_stream = torch.cat([words(2, 5, seed=3), heading_stream(length=20)], dim=1)  # start at 13 in segment 2
    other = long_stream.clone()
    other[:, :5] = words(2, 5, seed=4)
    a, b = stream_features(decoder, long_stream), stream_features(decoder, other)
    torch.testing.assert_close(a[:, 13:15], b[:, 13:15])
    assert not torch.allclose(a[:, 10:13], b[:, 10:13])


def test_longmem_refuses_to_run_outside_stream_order():
    decoder = tiny_longmem(stream=False)
    with pytest.raises(ValueError, match="--batching stream"):
        decoder(words(2, 5))
    assert torch.isfinite(tiny_longmem(stream=False, memory_size=0)(words(2, 5))[0]).all()


# -- generation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", ["never", "document"])
def test_incremental_generation_equals_the_segmented_stream(reset):
    decoder = tiny_longmem(bank_reset=reset)
    tokens = heading_stream(length=17)
    expected = stream_features(decoder, tokens)
    state = {}
    steps = [decoder(tokens[:, : t + 1], incremental_state=state, features_only=True)[0] for t in range(17)]
    torch.testing.assert_close(torch.cat(steps, 1), expected)
    state = {}
    chunks = [decoder(tokens[:, :end], incremental_state=state, features_only=True)[0] for end in (3, 12, 17)]
    torch.testing.assert_close(torch.cat(chunks, 1), expected)  # several segments in one call

    order = torch.tensor([1, 0])
    state = {}
    decoder(tokens[:, :13], incremental_state=state)
    decoder.reorder_incremental_state(state, order)
    reordered = decoder(tokens[order, :14], incremental_state=state, features_only=True)[0]
    torch.testing.assert_close(reordered, expected[order, 13:14])


def test_sequence_generator_beams_and_samples_with_the_bank():
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    model = LongMemModel(tiny_longmem()).eval()
    prompt = words(2, 12)
    sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.tensor([12, 12])}}
    sampling = search.Sampling(DICT, sampling_topk=5)
    for kwargs in [dict(beam_size=3), dict(beam_size=1, search_strategy=sampling)]:
        generator = SequenceGenerator([model], DICT, max_len_b=20, **kwargs)
        hypos = generator.generate([model], sample, prefix_tokens=prompt)
        assert len(hypos) == 2 and all(len(h[0]["tokens"]) > 12 for h in hypos)


# -- configuration and checkpoints ---------------------------------------------------------------------------


def test_impossible_sizes_are_clear_errors():
    backbone = tiny_backbone()
    for overrides, message in [
        (dict(memory_k=5), "multiple of the chunk size"),
        (dict(memory_size=1, chunk_size=2), "memory size"),
        (dict(memory_layer=3), "--memory-layer 3 is out of range"),
        (dict(memory_layer=0), "out of range"),
        (dict(backbone_memory_layer=5), "--backbone-memory-layer 5 is out of range"),
        (dict(memory_size=-1), "memory-size"),
    ]:
        with pytest.raises(ValueError, match=message):
            LongMemDecoder(longmem_config(**overrides), DICT, backbone)
    with pytest.raises(ValueError, match="even number of layers"):
        LongMemDecoder(longmem_config(memory_layer=1), DICT, tiny_backbone(decoder_layers=3))
    no_heading = Dictionary()
    with pytest.raises(ValueError, match="no such symbol"):
        LongMemDecoder(longmem_config(bank_reset="document"), no_heading, tiny_backbone(dictionary=no_heading))


def save_checkpoint(path, model_cfg, model):
    from omegaconf import OmegaConf

    torch.save({
        "cfg": {"model": OmegaConf.to_container(OmegaConf.structured(model_cfg), enum_to_str=True), "task": {"_name": "trime_lm"}},
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {"train_iterator": {}},
    }, path)


class TaskStub:
    def __init__(self, dictionary):
        self.source_dictionary = self.target_dictionary = self.dictionary = dictionary


def test_backbone_checkpoint_is_loaded_and_checked(tmp_path):
    from trime_fairseq.models.alibi_lm import AlibiLanguageModel

    cfg = alibi_config()
    cfg._name = "alibi_lm"
    backbone = AlibiLanguageModel(tiny_backbone().float())
    save_checkpoint(tmp_path / "backbone.pt", cfg, backbone)
    config = longmem_config(backbone_path=str(tmp_path / "backbone.pt"))
    model = LongMemModel.build_model(config, TaskStub(DICT))
    for name, value in backbone.decoder.state_dict().items():
        assert torch.equal(model.decoder.backbone.state_dict()[name], value), name

    with pytest.raises(ValueError, match="needs --backbone-path"):
        LongMemModel.build_model(longmem_config(), TaskStub(DICT))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        LongMemModel.build_model(longmem_config(backbone_path=str(tmp_path / "missing.pt")), TaskStub(DICT))
    other = tiny_dictionary()
    other.symbols[5], other.symbols[6] = other.symbols[6], other.symbols[5]  # same size, other ids
    with pytest.raises(ValueError, match="another dictionary"):
        LongMemModel.build_model(config, TaskStub(other))
    from trime_fairseq.models.transformer_xl import TransformerXLConfig, TrimeTransformerXLModel
    from recurrent_helpers import tiny as tiny_xl

    xl_cfg = TransformerXLConfig(decoder_layers=1, decoder_embed_dim=12, decoder_attention_heads=2, decoder_ffn_embed_dim=20)
    xl_cfg._name = "trime_transformer_xl"
    save_checkpoint(tmp_path / "xl.pt", xl_cfg, TrimeTransformerXLModel(tiny_xl(decoder_layers=1)))
    with pytest.raises(ValueError, match="needs an alibi_lm backbone"):
        LongMemModel.build_model(longmem_config(backbone_path=str(tmp_path / "xl.pt")), TaskStub(DICT))

    # a longmem checkpoint adapted on a backbone of other sizes cannot be loaded over this one
    wide = LongMemModel(LongMemDecoder(longmem_config(), DICT, tiny_backbone(decoder_embed_dim=18).float()))
    with pytest.raises(ValueError, match="adapted on another backbone"):
        model.load_state_dict(wide.state_dict())
    model.load_state_dict(LongMemModel(LongMemDecoder(config, DICT, backbone.decoder)).state_dict())


# -- end to end through the CLIs -------------------------------------------------------------------------------


def test_cli_backbone_then_longmem_then_eval_lm(wikitext2_bin, tmp_path):
    """fairseq-train the ALiBi backbone -> fairseq-train longmem in stream order -> fairseq-eval-lm with the bank
    (and an eval-time memory size); the adapted checkpoint carries the backbone bit for bit."""
    from fairseq import checkpoint_utils

    import subprocess

    from conftest import PYTHON, ROOT, perplexity, run_cli

    common = [wikitext2_bin, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--tokens-per-sample", "32",
              "--sample-break-mode", "none", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
              "--optimizer", "adam", "--batch-size", "4", "--max-update", "12", "--disable-validation",
              "--no-epoch-checkpoints", "--cpu", "--seed", "1", "--log-format", "simple", "--log-interval", "6"]
    run_cli([PYTHON, "-m", "fairseq_cli.train", *common, "--arch", "alibi_lm_wikitext2_small", "--decoder-layers", "4",
             "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
             "--lr", "0.003", "--save-dir", tmp_path / "backbone"])
    backbone = tmp_path / "backbone" / "checkpoint_last.pt"
    out = run_cli([PYTHON, "-m", "fairseq_cli.train", *common, "--arch", "longmem_wikitext2_small",
                   "--backbone-path", backbone, "--batching", "stream", "--memory-size", "64", "--memory-k", "8",
                   "--memory-layer", "1", "--bank-reset", "document", "--lr", "0.001",
                   "--save-dir", tmp_path / "longmem"])
    assert "num_updates 12" in out and "recurrence memory across batches: on (stream)" in out, out[-3000:]
    counts = re.search(r"num\. shared model params: ([\d,]+) \(num\. trained: ([\d,]+)\)", out)
    total, trained = (int(c.replace(",", "")) for c in counts.groups())
    assert 0 < trained < total / 2  # only the SideNet (2 of the backbone's 4 layers, gate, final norm)
    adapted = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "longmem" / "checkpoint_last.pt"))["model"]
    original = checkpoint_utils.load_checkpoint_to_cpu(str(backbone))["model"]
    for name, value in original.items():
        assert torch.equal(adapted["decoder.backbone." + name[len("decoder."):]], value), name
    assert any(not torch.equal(adapted[f"decoder.layers.0.{n}"], original[f"decoder.layers.1.{n}"])
               for n in ("attn_norm.weight", "self_attn.q_proj.weight", "ffn.fc1.weight"))

    def eval_lm(*extra):
        return run_cli([PYTHON, "-m", "fairseq_cli.eval_lm", wikitext2_bin, "--user-dir", "trime_fairseq",
                        "--task", "trime_lm", "--path", tmp_path / "longmem" / "checkpoint_last.pt",
                        "--gen-subset", "valid", "--tokens-per-sample", "32", "--cpu", "--batching", "stream",
                        "--batch-size", "2", *extra])

    with_bank = perplexity(eval_lm())
    without = perplexity(eval_lm("--model-overrides", "{'memory_size': 0}"))
    assert math.isfinite(with_bank) and 1 < with_bank < 1e5 and with_bank != without
    proc = subprocess.run(
        [PYTHON, "-m", "fairseq_cli.eval_lm", str(wikitext2_bin), "--user-dir", "trime_fairseq", "--task", "trime_lm",
         "--path", str(tmp_path / "longmem" / "checkpoint_last.pt"), "--cpu", "--tokens-per-sample", "32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0 and "--batching stream" in proc.stdout + proc.stderr
