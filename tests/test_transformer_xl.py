"""Transformer-XL (trime_transformer_xl), the shared relative attention, stream batching and the CLI path."""

import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import trime_fairseq  # noqa: F401  (registers models, task, criteria)
from naive_relative import naive_causal_transformer, sinusoid
from recurrent_helpers import VOCAB, features, tiny, tokens
from trime_fairseq.data.stream import stream_batch_indices, stream_layout, StreamRowsDataset
from trime_fairseq.models.recurrent_decoder import check_config
from trime_fairseq.models.relative_attention import masked_softmax, rel_shift, relative_attention, sinusoid_embedding
from trime_fairseq.models.transformer_xl import TransformerXLConfig, TrimeTransformerXLModel

from conftest import PYTHON, ROOT, run_cli

# -- relative attention primitives -----------------------------------------------------------


@pytest.mark.parametrize("qlen,klen", [(1, 1), (1, 5), (4, 4), (3, 7), (5, 9)])
def test_rel_shift_equals_explicit_gather(qlen, klen):
    torch.manual_seed(0)
    dim = 8
    q = torch.randn(2, 3, qlen, dim, dtype=torch.float64)
    distances = torch.arange(klen - 1, -1, -1)
    R = sinusoid_embedding(distances, dim).double()  # column c <-> distance klen-1-c
    shifted = rel_shift(torch.einsum("bhqd,ld->bhql", q, R), klen)
    for i in range(qlen):
        for j in range(klen):
            dist = klen - qlen + i - j  # absolute query position minus key position
            if dist >= 0:
                expected = q[:, :, i] @ sinusoid(dist, dim)
                torch.testing.assert_close(shifted[:, :, i, j], expected)
            else:  # future keys read zeros
                assert torch.all(shifted[:, :, i, j] == 0)


def test_rel_shift_with_leading_zero_columns_matches_index_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64)  # (…, Q=5, L=7)
    for klen, offset in [(3, 2), (5, 0), (4, 4), (9, 1)]:
        out = rel_shift(x, klen, offset)
        for i in range(5):
            for j in range(klen):
                c = j + 5 - 1 - i - offset
                expected = x[:, i, c] if 0 <= c < 7 else torch.zeros(2, dtype=torch.float64)
                torch.testing.assert_close(out[:, i, j], expected)


def test_sinusoid_matches_formula():
    dist = torch.tensor([0, 1, 7, 100])
    torch.testing.assert_close(sinusoid_embedding(dist, 10).double(), torch.stack([sinusoid(d, 10) for d in [0, 1, 7, 100]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="even"):
        sinusoid_embedding(dist, 7)


def test_masked_softmax_all_masked_rows_are_zero_not_nan():
    scores = torch.randn(2, 3, 4, requires_grad=True)
    visible = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4]).expand(2, 3, 4)
    probs, lse = masked_softmax(scores * 1e4, visible)
    assert torch.all(probs[:, 1] == 0) and torch.all(torch.isneginf(lse[:, 1]))
    torch.testing.assert_close(probs[:, [0, 2]].sum(-1), torch.ones(2, 2))
    (probs.sum() + lse[:, [0, 2]].sum()).backward()
    assert torch.isfinite(scores.grad).all()


def test_relative_attention_handles_huge_scores_in_half_precision():
    torch.manual_seed(0)
    q = (torch.randn(1, 3, 2, 4) * 300).half()
    k = (torch.randn(1, 3, 2, 4) * 300).half()
    v = torch.randn(1, 3, 2, 4).half()
    r = torch.randn(3, 2, 4).half()
    bias = torch.zeros(2, 4).half()
    visible = torch.ones(3, 3, dtype=torch.bool).tril().view(1, 1, 3, 3)
    ctx, lse = relative_attention(q, k, v, r, bias, bias, visible)
    assert ctx.dtype == torch.float16 and lse.dtype == torch.float32
    assert torch.isfinite(ctx).all() and torch.isfinite(lse).all() and lse.abs().max() > 1e3


# -- the model against naive references ------------------------------------------------------


@pytest.mark.parametrize("pre_norm", [False, True])
def test_empty_memory_equals_naive_causal_relative_transformer(pre_norm):
    decoder = tiny(decoder_normalize_before=pre_norm)
    toks = tokens(2, 7)
    out, extra = decoder(toks, features_only=True)
    expected, key = naive_causal_transformer(decoder, toks)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(extra["trime_key"], key)
    torch.testing.assert_close(extra["trime_feature"], out)


@pytest.mark.parametrize("layers", [1, 2])
def test_segments_with_full_memory_equal_one_pass(layers):
    decoder = tiny(decoder_layers=layers, mem_len=100)
    decoder.recurrent_memory.enable(True)
    toks = tokens(3, 15)
    segmented = torch.cat([features(decoder, toks[:, s : s + 5]) for s in range(0, 15, 5)], dim=1)
    decoder.recurrent_memory.enable(False)
    torch.testing.assert_close(segmented, features(decoder, toks))
    torch.testing.assert_close(segmented, naive_causal_transformer(decoder, toks)[0])


def test_same_length_and_clamp_len_equal_sliding_window_attention():
    # every query sees exactly the last mem_len keys: segments of XL = one pass with a sliding window
    decoder = tiny(mem_len=4, same_length=True, clamp_len=3)
    decoder.recurrent_memory.enable(True)
    toks = tokens(2, 12)
    segmented = torch.cat([features(decoder, toks[:, s : s + 3]) for s in range(0, 12, 3)], dim=1)
    expected, _ = naive_causal_transformer(decoder, toks, window=4, clamp_len=3)
    torch.testing.assert_close(segmented, expected)


def test_truncated_memory_is_used_and_detached():
    decoder = tiny(mem_len=3).train()
    decoder.recurrent_memory.enable(True)
    toks = tokens(2, 8)
    features(decoder, toks[:, :4])
    state = decoder.recurrent_memory.state
    assert state["hidden.0"].shape[:2] == (2, 3) and not state["hidden.1"].requires_grad
    with_memory = features(decoder, toks[:, 4:])
    decoder.recurrent_memory.reset()
    without = features(decoder, toks[:, 4:])
    assert not torch.allclose(with_memory, without)


def test_no_leak_from_future_tokens():
    decoder = tiny(mem_len=6)
    decoder.recurrent_memory.enable(True)
    toks = tokens(2, 10)
    for t in [0, 3, 4, 8]:  # t + 1 in the first segment, at its end, in the second
        decoder.recurrent_memory.reset()
        a = torch.cat([features(decoder, toks[:, :5]), features(decoder, toks[:, 5:])], 1)
        changed = toks.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7 - 4) % (VOCAB - 4) + 4
        decoder.recurrent_memory.reset()
        b = torch.cat([features(decoder, changed[:, :5]), features(decoder, changed[:, 5:])], 1)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_document_separator_isolates_documents():
    decoder = tiny(mem_len=20, doc_separator="</s>")
    decoder.recurrent_memory.enable(True)
    eos = decoder.dictionary.eos()
    doc1, doc2 = tokens(2, 5, seed=3), tokens(2, 6, seed=4)
    doc2[:, 0] = eos  # the separator input starts document 2
    stream = torch.cat([doc1, doc2], dim=1)
    out = torch.cat([features(decoder, stream[:, :4]), features(decoder, stream[:, 4:])], dim=1)
    decoder.recurrent_memory.reset()
    alone = features(decoder, doc2)
    torch.testing.assert_close(out[:, 5:], alone)


def test_padding_rows_and_padded_memory_stay_finite():
    decoder = tiny(mem_len=4).train()
    decoder.recurrent_memory.enable(True)
    toks = tokens(3, 6)
    toks[2] = decoder.padding_idx  # an ended stream
    toks[1, 3:] = decoder.padding_idx  # a short last block
    out = features(decoder, toks)
    assert torch.isfinite(out).all()
    assert decoder.recurrent_memory.state["valid"][2].sum() == 0
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)
    assert torch.isfinite(features(decoder, tokens(3, 6))).all()


def test_large_activations_stay_finite_in_half_precision():
    decoder = tiny(mem_len=4)
    with torch.no_grad():
        for layer in decoder.layers:
            layer.self_attn.q_proj.weight.mul_(200.0)
            layer.self_attn.kv_proj.weight.mul_(200.0)
    decoder = decoder.half()
    decoder.recurrent_memory.enable(True)
    for _ in range(2):
        out = features(decoder, tokens(2, 5))
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


# -- memory ownership and incremental state ------------------------------------------------------


def test_memory_owner_resets_on_mode_batch_size_and_explicit_reset():
    decoder = tiny(mem_len=4)
    memory = decoder.recurrent_memory
    features(decoder, tokens(2, 3))
    assert memory.state is None  # disabled by default: every batch starts empty
    memory.enable(True)
    features(decoder, tokens(2, 3))
    assert memory.state is not None
    assert memory.read(2, training=False) is not None
    assert memory.read(3, training=False) is None  # batch size changed
    features(decoder, tokens(2, 3))
    assert memory.read(2, training=True) is None  # train/eval switch
    features(decoder, tokens(2, 3))
    memory.reset()
    assert memory.state is None
    # one memory per stream row: a fresh memory gives the same result as a reset one
    first = features(decoder, tokens(2, 3, seed=5))
    memory.reset()
    torch.testing.assert_close(features(decoder, tokens(2, 3, seed=5)), first)


def test_incremental_decoding_equals_full_forward_and_reorders():
    decoder = tiny(mem_len=50)
    toks = tokens(3, 6)
    full = decoder(toks)[0]
    state = {}
    steps = [decoder(toks[:, : t + 1], incremental_state=state)[0] for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full)

    order = torch.tensor([2, 0, 0])
    state = {}
    for t in range(3):
        decoder(toks[:, : t + 1], incremental_state=state)
    decoder.reorder_incremental_state(state, order)
    reordered = decoder(toks[order, :4], incremental_state=state)[0]
    torch.testing.assert_close(reordered, full[order, 3:4])


def test_sequence_generator_samples_and_beams():
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    decoder = tiny(mem_len=8)
    model = TrimeTransformerXLModel(decoder).eval()
    sample = {"net_input": {"src_tokens": tokens(2, 3), "src_lengths": torch.tensor([3, 3])}}
    sampling = search.Sampling(decoder.dictionary, sampling_topp=0.9)
    for kwargs in [dict(beam_size=3), dict(beam_size=1, search_strategy=sampling)]:
        generator = SequenceGenerator([model], decoder.dictionary, max_len_b=6, **kwargs)
        hypos = generator.generate([model], sample, prefix_tokens=sample["net_input"]["src_tokens"])
        assert len(hypos) == 2 and all(len(h[0]["tokens"]) >= 3 for h in hypos)


def test_config_errors_are_clear():
    base = dict(decoder_layers=1, decoder_embed_dim=12, decoder_attention_heads=2, decoder_ffn_embed_dim=8)
    for bad, message in [
        (dict(mem_len=-1), "mem_len"),
        (dict(clamp_len=0), "clamp_len"),
        (dict(decoder_attention_heads=5), "not divisible"),
        (dict(same_length=True, mem_len=0), "same_length"),
        (dict(decoder_embed_dim=13, decoder_head_dim=13, decoder_attention_heads=1), "even"),
        (dict(tie_adaptive_weights=True), "tie_adaptive_weights"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_config(TransformerXLConfig(**{**base, **bad}))


def test_architectures_set_paper_sizes():
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY

    for arch, expected in [
        ("trime_transformer_xl_wt103_base", (16, 410, 10, 41, 2100, 150, "20000,40000,200000")),
        ("trime_transformer_xl_enwik8", (12, 512, 8, 64, 2048, 512, None)),
        ("lamemo_wt103_base", (16, 410, 10, 41, 2100, 150, "20000,40000,200000")),
        ("lamemo_enwik8", (12, 512, 8, 64, 2048, 512, None)),
        ("trime_transformer_xl_wikitext2_small", (4, 128, 4, None, 512, 64, "2000,10000")),
        ("lamemo_wikitext2_small", (4, 128, 4, None, 512, 64, "2000,10000")),
    ]:
        args = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](args)
        got = (
            args.decoder_layers,
            args.decoder_embed_dim,
            args.decoder_attention_heads,
            args.decoder_head_dim,
            args.decoder_ffn_embed_dim,
            args.mem_len,
            args.adaptive_softmax_cutoff,
        )
        assert got == expected, arch


# -- stream batching ------------------------------------------------------------------------


def test_stream_layout_covers_every_block_once_in_order():
    for n, b, shards in [(10, 3, 1), (11, 2, 2), (4, 4, 1), (3, 2, 2)]:
        seen = []
        for shard in range(shards):
            batches = stream_batch_indices(n, b, shards, shard)
            assert all(len(batch) == b for batch in batches)
            for row in range(b):
                column = [batch[row] for batch in batches if batch[row] >= 0]
                assert column == list(range(column[0], column[0] + len(column))) if column else True
                # ended streams only at the end of a column and only in the last rows of a batch
                ended = [batch[row] < 0 for batch in batches]
                assert ended == sorted(ended)
            for batch in batches:
                flags = [i < 0 for i in batch]
                assert flags == sorted(flags)
                seen += [i for i in batch if i >= 0]
        assert sorted(seen) == list(range(n))
    assert [len(r) for r in stream_layout(10, 3)] == [4, 3, 3]


def test_stream_rows_collate_to_padding_rows():
    class Items:
        def __getitem__(self, i):
            return {"id": i, "source": torch.tensor([5 + i, 6]), "target": torch.tensor([6, 7])}

        def __len__(self):
            return 3

        def collater(self, samples):
            from fairseq.data.monolingual_dataset import collate

            return collate(samples, 1, 2)

    rows = StreamRowsDataset(Items(), pad=1)
    batch = rows.collater([rows[0], rows[1], rows[-1]])
    assert batch["net_input"]["src_tokens"].tolist() == [[5, 6], [6, 6], [1, 1]]
    assert batch["target"][2].tolist() == [1, 1] and batch["id"].tolist() == [0, 1, -1]


# -- end to end: fairseq-train -> fairseq-eval-lm, both models, cross-entropy and trime_loss -----------


def _ppl(output: str) -> float:
    match = re.search(r"Perplexity: ([0-9.]+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


def run_cli_parallel(commands):
    """conftest.run_cli on several commands at once (process startup dominates these tiny runs)."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(run_cli, commands))


def test_cli_train_and_eval_lm_stream(wikitext2_bin, tmp_path):
    """Transformer-XL and LaMemo with adaptive cross-entropy, Transformer-XL with trime_loss:
    train 20 updates in stream order, then fairseq-eval-lm in stream order with a longer memory."""
    small = ["--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128"]
    runs = [
        ("xl_ce", "trime_transformer_xl_wikitext2_small", "adaptive_loss", [], []),
        ("lamemo_ce", "lamemo_wikitext2_small", "adaptive_loss", [], []),
        ("xl_trime", "trime_transformer_xl_wikitext2_small", "trime_loss", ["--ce-warmup-updates", "5"],
         ["--eval-memory", "trime"]),
    ]
    train = [
        [PYTHON, "-m", "fairseq_cli.train", wikitext2_bin, "--user-dir", ROOT / "trime_fairseq",
         "--task", "trime_lm", "--batching", "stream", "--tokens-per-sample", "32", "--sample-break-mode", "none",
         "--arch", arch, *small, "--mem-len", "32", "--criterion", criterion, *extra,
         "--optimizer", "adam", "--lr", "0.002", "--batch-size", "8", "--max-update", "20",
         "--disable-validation", "--no-epoch-checkpoints", "--save-dir", tmp_path / name, "--cpu", "--seed", "1",
         "--ddp-backend", "legacy_ddp", "--log-format", "simple", "--log-interval", "10"]
        for name, arch, criterion, extra, _ in runs
    ]
    for out in run_cli_parallel(train):
        assert "num_updates 20" in out and "recurrence memory across batches: on (stream)" in out
    evaluate = [
        [PYTHON, "-m", "fairseq_cli.eval_lm", wikitext2_bin, "--user-dir", ROOT / "trime_fairseq",
         "--task", "trime_lm", "--batching", "stream", "--path", tmp_path / name / "checkpoint_last.pt",
         "--gen-subset", "valid", "--tokens-per-sample", "32", "--batch-size", "16", "--cpu",
         "--model-overrides", "{'mem_len': 64, 'clamp_len': 48}", *eval_extra]
        for name, _, _, _, eval_extra in runs
    ]
    for (name, *_), out in zip(runs, run_cli_parallel(evaluate)):
        assert "recurrence memory across batches: on (stream)" in out
        ppl = _ppl(out)
        assert math.isfinite(ppl) and 1 < ppl < 5000, (name, ppl)
