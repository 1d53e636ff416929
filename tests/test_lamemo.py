"""LaMemo: look-ahead memory, memory interpolation (Appendix A), disentangled positions, no leakage."""

import math

import pytest
import torch

from naive_relative import attend, naive_causal_transformer
from recurrent_helpers import VOCAB, features, tiny, tokens
from trime_fairseq.models.lamemo import LaMemoConfig, LaMemoDecoder, LaMemoModel, interpolate_contexts, interpolation_weight


def lamemo(**overrides):
    return tiny(LaMemoDecoder, LaMemoConfig, **overrides)


def stream(decoder, toks, seg):
    decoder.recurrent_memory.enable(True)
    decoder.recurrent_memory.reset()
    return torch.cat([features(decoder, toks[:, s : s + seg]) for s in range(0, toks.size(1), seg)], dim=1)


def test_empty_memory_equals_naive_causal_relative_transformer():
    decoder = lamemo(mem_len=4)
    toks = tokens(2, 6)
    out, extra = decoder(toks, features_only=True)
    expected, key = naive_causal_transformer(decoder, toks)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(extra["trime_key"], key)


def test_one_layer_equals_transformer_xl_and_deeper_models_refresh_the_memory():
    toks = tokens(2, 12)
    for layers, same in [(1, True), (2, False)]:
        la = lamemo(decoder_layers=layers, mem_len=8)
        xl = tiny(decoder_layers=layers, mem_len=8)
        state = {k: v for k, v in la.state_dict().items() if k != "future_position_bias"}
        xl.load_state_dict(state)
        a, b = stream(la, toks, 4), stream(xl, toks, 4)
        torch.testing.assert_close(a[:, :4], b[:, :4])  # first segment: no memory
        assert torch.allclose(a, b) == same


def _bidirectional_reference(decoder, toks, query, last_key):
    """Layer-0 attention of ``query`` over keys 0 … last_key, past with v₊, future with v₋ (Eq. 12, Appendix A)."""
    layer = decoder.layers[0]
    x = decoder.embed_scale * decoder.embed_tokens(toks)  # layer-0 inputs (post-norm: no input norm)
    v_plus, v_minus = decoder.position_bias, decoder.future_position_bias
    return attend(
        layer,
        x,
        query,
        range(0, last_key + 1),
        lambda i, j: abs(i - j),
        lambda i, j: v_plus if j <= i else v_minus,
        decoder.content_bias,
        decoder.num_heads,
    )


def test_memory_interpolation_equals_bidirectional_attention():
    """After segments of T tokens, each memory position's layer-0 context equals one softmax over
    every position up to the first token of the current segment, both directions (Appendix A):
    layer-0 queries and keys are the embeddings, so q' = q, k' = k."""
    seg = 4
    decoder = lamemo(mem_len=12, decoder_layers=2, decoder_attention_heads=3)
    toks = tokens(2, 3 * seg)
    stream(decoder, toks, seg)
    state = decoder.recurrent_memory.state
    context, lse = state["context.0"], state["lse.0"]  # (B, 12, H, D), (B, 12, H)
    for i in range(3 * seg):
        last = 2 * seg if i < 2 * seg else i  # refreshed up to the first token of segment 3; causal after
        expected_ctx, expected_lse = _bidirectional_reference(decoder, toks, i, last)
        torch.testing.assert_close(context[:, i], expected_ctx)
        torch.testing.assert_close(lse[:, i], expected_lse)


def test_without_interpolation_the_memory_keeps_only_the_look_ahead_context():
    seg = 4
    decoder = lamemo(mem_len=8, decoder_layers=2, memory_interpolation=False)
    toks = tokens(2, 2 * seg)
    stream(decoder, toks, seg)
    context = decoder.recurrent_memory.state["context.0"]
    layer = decoder.layers[0]
    x = decoder.embed_scale * decoder.embed_tokens(toks)
    for i in range(seg):  # refreshed once: only keys i+1 … seg (the first token of segment 2)
        expected, _ = attend(
            layer, x, i, range(i + 1, seg + 1), lambda i, j: j - i, lambda i, j: decoder.future_position_bias,
            decoder.content_bias, decoder.num_heads,
        )
        torch.testing.assert_close(context[:, i], expected)


def test_no_leak_through_look_ahead_memory():
    decoder = lamemo(mem_len=8, decoder_layers=3)
    toks = tokens(2, 12)
    for t in [0, 2, 3, 4, 5, 7, 8, 10]:
        changed = toks.clone()
        changed[:, t + 1] = (changed[:, t + 1] - 4 + 5) % (VOCAB - 4) + 4
        a, b = stream(decoder, toks, 4), stream(decoder, changed, 4)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])
    # the same with gradients: nothing at positions <= t depends on the embedding of t + 1
    decoder.train()  # dropout is 0: only enables autograd paths through the memory
    embed = decoder.embed_tokens.weight
    for t in [4, 5]:
        decoder.recurrent_memory.reset()
        features(decoder, toks[:, :4])
        out = features(decoder, toks[:, 4:])
        grad = torch.autograd.grad(out[:, : t - 4 + 1].sum(), embed)[0]
        later = toks[:, t + 1 :].flatten().unique()
        earlier = toks[:, 4 : t + 1].flatten().unique()
        only_later = [w for w in later.tolist() if w not in earlier.tolist()]
        assert torch.all(grad[only_later] == 0)


def test_document_separator_isolates_documents_aligned_with_segments():
    decoder = lamemo(mem_len=16, decoder_layers=2, doc_separator="</s>")
    eos = decoder.dictionary.eos()
    doc1, doc2 = tokens(2, 4, seed=3), tokens(2, 8, seed=4)
    doc2[:, 0] = eos
    out = stream(decoder, torch.cat([doc1, doc2], dim=1), 4)
    alone = stream(decoder, doc2, 4)
    torch.testing.assert_close(out[:, 4:], alone)
    assert torch.isfinite(out).all()


def test_interpolation_weight_is_stable_and_exact():
    lse_old = torch.tensor([5000.0, 0.0, float("-inf"), float("-inf"), 12.0])
    lse_new = torch.tensor([5001.0, float("-inf"), 3.0, float("-inf"), 12.0], requires_grad=True)
    alpha = interpolation_weight(lse_old, lse_new)
    expected = torch.tensor([1 / (1 + math.e), 1.0, 0.0, 1.0, 0.5])
    torch.testing.assert_close(alpha, expected)
    alpha.sum().backward()
    assert torch.isfinite(lse_new.grad).all()
    # half-precision inputs: α is float32 and exact even where exp() overflows float16
    alpha16 = interpolation_weight(lse_old.half(), lse_new.detach().half())
    assert alpha16.dtype == torch.float32 and torch.isfinite(alpha16).all()
    ctx, lse = interpolate_contexts(
        torch.ones(1, 5, 1, 2).half(), lse_old.view(1, 5, 1), torch.zeros(1, 5, 1, 2).half(), lse_new.detach().view(1, 5, 1)
    )  # half contexts, float32 statistics (as relative_attention returns them)
    torch.testing.assert_close(ctx[0, :, 0, 0].float(), expected, atol=1e-3, rtol=0)
    assert lse.dtype == torch.float32 and not torch.isnan(lse).any()


def test_large_activations_stay_finite_in_half_precision():
    decoder = lamemo(mem_len=4, decoder_layers=3)
    with torch.no_grad():
        for layer in decoder.layers:
            layer.self_attn.q_proj.weight.mul_(200.0)
            layer.self_attn.kv_proj.weight.mul_(200.0)
    decoder = decoder.half()
    decoder.recurrent_memory.enable(True)
    for _ in range(3):
        out = features(decoder, tokens(2, 4))
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
    state = decoder.recurrent_memory.state
    assert state["lse.0"].dtype == torch.float32 and torch.isfinite(state["lse.0"]).all()
    assert torch.isfinite(state["context.1"]).all()


def test_incremental_state_matches_single_token_stream_and_reorders():
    decoder = lamemo(mem_len=5, decoder_layers=3)
    toks = tokens(3, 7)
    streamed = stream(decoder, toks, 1)
    state = {}
    steps = [decoder(toks[:, : t + 1], incremental_state=state, features_only=True)[0] for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), streamed)

    order = torch.tensor([1, 2, 1])
    state = {}
    for t in range(4):
        decoder(toks[:, : t + 1], incremental_state=state)
    decoder.reorder_incremental_state(state, order)
    reordered = [decoder(toks[order, : t + 1], incremental_state=state, features_only=True)[0] for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(reordered, 1), streamed[order, 4:])


def test_state_reset_on_train_eval_switch_and_batch_size():
    decoder = lamemo(mem_len=4)
    memory = decoder.recurrent_memory
    memory.enable(True)
    first = features(decoder, tokens(2, 4))
    features(decoder, tokens(2, 4))
    decoder.train()
    features(decoder, tokens(2, 4, seed=9))  # train mode: the eval memory is dropped first
    decoder.eval()
    torch.testing.assert_close(features(decoder, tokens(2, 4)), first)  # and the train memory too
    features(decoder, tokens(3, 4))
    assert memory.state["valid"].size(0) == 3


def test_model_builds_with_trime_keys():
    decoder = lamemo(mem_len=4)
    model = LaMemoModel(decoder)
    net_output = model(tokens(2, 5))
    assert net_output[0].shape == (2, 5, VOCAB)
    assert net_output[1]["trime_key"].shape == net_output[1]["trime_feature"].shape == (2, 5, 12)
    assert decoder.provides_trime_keys


def test_cpu_dropout_has_nn_dropouts_distribution():
    """models/dropout.py draws a cheaper mask on the CPU: keep with probability 1 - p, scale 1 / (1 - p),
    identity in eval mode, gradients through the kept entries only."""
    from trime_fairseq.models.dropout import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert drop.eval()(x) is x and Dropout(1.0).train()(x).abs().sum() == 0
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)
