"""SPALM (``spalm``): the gated fusion against a naive loop, equivalence with Transformer-XL, gradients,
causality, and the neighbours' way through fairseq's data (stream batches, context windows, checks)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import trime_fairseq  # noqa: F401  (registers models, task, criteria)
from recurrent_helpers import VOCAB, dictionary, tiny, tokens
from trime_fairseq.data.neighbours import NeighbourError, NeighbourFile, NeighbourWriter
from trime_fairseq.memory.keys import NEIGHBOUR_SCORES, NEIGHBOUR_TOKENS, TRIME_FEATURE
from trime_fairseq.models.spalm import SPALM_GATE, SPALM_HIDDEN, SPALM_MEMORY, SpalmConfig, SpalmDecoder, SpalmModel
from trime_fairseq.models.transformer_xl import TransformerXLDecoder

PAD = dictionary().pad()


def spalm(seed=0, **overrides):
    """A float64 eval-mode SPALM decoder (tiny Transformer-XL, tied embeddings) with a random gate vector."""
    decoder = tiny(SpalmDecoder, SpalmConfig, seed=seed, share_decoder_input_output_embed=True, **overrides)
    with torch.no_grad():
        decoder.gate_weight.normal_(0.0, 0.5)
    return decoder


def neighbours_for(toks, k=4, seed=2, empty_rows=()):
    """Random neighbour tokens (B, T, k) with some padding (missing neighbours) and positions with none."""
    g = torch.Generator().manual_seed(seed)
    nb = torch.randint(4, VOCAB, toks.shape + (k,), generator=g)
    nb[torch.rand(nb.shape, generator=g) < 0.2] = PAD
    nb[:, 1] = PAD  # position 1 of every row: no neighbour at all
    for b, t in empty_rows:
        nb[b, t] = PAD
    return nb


def naive_fusion(decoder, h, nb):
    """m_t = Σ_k softmax_k(y_k·h_t) y_k over the visible neighbours, g_t = σ(w_g·h_t),
    z_t = (1 − g_t) m_t + g_t h_t (z_t = h_t without neighbours): explicit loops."""
    bsz, tsz, _ = h.shape
    z = torch.empty_like(h)
    memory = torch.zeros_like(h)
    gates = torch.empty(bsz, tsz, dtype=h.dtype)
    for b in range(bsz):
        for t in range(tsz):
            g = torch.sigmoid(torch.dot(decoder.gate_weight, h[b, t]))
            gates[b, t] = g
            visible = [int(w) for w in nb[b, t] if int(w) != PAD]
            if not visible:
                z[b, t] = h[b, t]
                continue
            ys = [decoder.embed_tokens.weight[w] for w in visible]
            scores = torch.stack([torch.dot(y, h[b, t]) for y in ys])
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            m = sum(w * y for w, y in zip(weights, ys))
            memory[b, t] = m
            z[b, t] = (1 - g) * m + g * h[b, t]
    return z, gates, memory


def test_fusion_equals_naive_loop():
    decoder = spalm()
    toks = tokens(2, 6)
    nb = neighbours_for(toks, empty_rows=[(1, 4)])
    out, extra = decoder(toks, features_only=True, neighbour_tokens=nb)
    h, _ = TransformerXLDecoder.extract_features(decoder, toks)  # the Transformer-XL part alone
    z, gates, m = naive_fusion(decoder, h, nb)
    torch.testing.assert_close(out, z)
    torch.testing.assert_close(extra[SPALM_GATE], gates)
    torch.testing.assert_close(extra[SPALM_MEMORY], m)
    torch.testing.assert_close(extra[SPALM_HIDDEN], h)
    torch.testing.assert_close(extra[TRIME_FEATURE], z)
    torch.testing.assert_close(out[:, 1], h[:, 1])  # no neighbours: z = h
    assert not torch.allclose(out[:, 0], h[:, 0])


def test_adaptive_input_embeddings_are_the_value_embeddings():
    decoder = tiny(SpalmDecoder, SpalmConfig, decoder_embed_dim=16, adaptive_input=True,
                   adaptive_input_cutoff="10,20", adaptive_softmax_cutoff="10,20", tie_adaptive_weights=True,
                   tie_adaptive_proj=True)
    with torch.no_grad():
        decoder.gate_weight.normal_(0.0, 0.5)
    toks = tokens(2, 5)
    nb = neighbours_for(toks)  # tokens in the head and in both tail clusters
    h, _ = TransformerXLDecoder.extract_features(decoder, toks)
    z, _, _ = decoder.fuse(h, nb)
    y = decoder.embed_tokens(nb)  # what the tied adaptive softmax scores z against
    visible = nb.ne(PAD)
    a = torch.einsum("btkd,btd->btk", y, h).masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    m = torch.einsum("btk,btkd->btd", a, y)
    g = torch.sigmoid(h @ decoder.gate_weight).unsqueeze(-1)
    expected = torch.where(visible.any(-1, keepdim=True), (1 - g) * m + g * h, h)
    torch.testing.assert_close(z, expected)


@pytest.mark.parametrize("memory", [False, True])
def test_gate_one_or_no_neighbours_is_transformer_xl_exactly(memory):
    txl = tiny(TransformerXLDecoder, share_decoder_input_output_embed=True, mem_len=8 if memory else 0)
    model = spalm(mem_len=8 if memory else 0)
    missing = model.load_state_dict(txl.state_dict(), strict=False).missing_keys
    assert missing == ["gate_weight"]  # w_g is the only new parameter
    toks = tokens(2, 12)
    nb = neighbours_for(toks)
    model.gate = lambda h: torch.ones(h.shape[:-1], dtype=h.dtype)  # g forced to 1

    def run(decoder, **kw):
        decoder.recurrent_memory.enable(memory)
        return torch.cat([decoder(toks[:, s:s + 4], **{k: v[:, s:s + 4] for k, v in kw.items()})[0]
                          for s in range(0, 12, 4)], 1)

    expected = run(txl)
    assert torch.equal(run(model, neighbour_tokens=nb), expected)
    model = spalm(mem_len=8 if memory else 0)
    model.load_state_dict(txl.state_dict(), strict=False)
    assert torch.equal(run(model, neighbour_tokens=torch.full_like(nb, PAD)), expected)  # nothing retrieved
    assert not torch.allclose(run(model, neighbour_tokens=nb), expected)  # the real gate does change things


def test_gradients_reach_the_gate_and_the_value_embeddings_not_the_neighbour_scores():
    decoder = spalm().train()
    toks = torch.tensor([[4, 5, 6, 7, 4, 5], [6, 7, 4, 5, 6, 7]])
    targets = torch.tensor([[5, 6, 7, 4, 5, 6], [7, 4, 5, 6, 7, 4]])
    nb = torch.tensor([30, 31, 32, 33]).expand(2, 6, 4).clone()  # tokens seen nowhere else
    nb[0, 2, 3] = PAD
    scores = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    logits, _ = decoder(toks, neighbour_tokens=nb, neighbour_scores=scores)
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
    assert decoder.gate_weight.grad is not None and decoder.gate_weight.grad.abs().sum() > 0
    emb = decoder.embed_tokens.weight.grad
    # rows 30..33 get gradient from the softmax output (tied) and, here, from the fusion
    without = spalm().train()
    logits, _ = without(toks, neighbour_tokens=torch.full_like(nb, PAD))
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
    assert not torch.allclose(emb[30:34], without.embed_tokens.weight.grad[30:34])
    assert scores.grad is None  # the stored scores (of the frozen keys) are no input of the model
    params = dict(decoder.named_parameters())
    assert set(params) == set(dict(tiny(TransformerXLDecoder, share_decoder_input_output_embed=True)
                                   .named_parameters())) | {"gate_weight"}


def test_no_position_depends_on_later_tokens_or_neighbours():
    decoder = spalm(mem_len=6)
    toks = tokens(2, 10)
    nb = neighbours_for(toks)

    def run(t_toks, t_nb):
        decoder.recurrent_memory.enable(True)
        decoder.recurrent_memory.reset()
        return torch.cat([decoder(t_toks[:, s:s + 5], neighbour_tokens=t_nb[:, s:s + 5])[0] for s in (0, 5)], 1)

    base = run(toks, nb)
    for t in [0, 3, 4, 7]:
        changed = toks.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 5 - 4) % (VOCAB - 4) + 4
        later = nb.clone()
        later[:, t + 1:] = (later[:, t + 1:] + 3 - 4) % (VOCAB - 4) + 4
        out = run(changed, later)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_first_k_neighbours_are_used_and_wrong_batches_are_errors():
    decoder = spalm(spalm_k=2)
    toks = tokens(2, 5)
    nb = neighbours_for(toks, k=4)
    out, extra = decoder(toks, neighbour_tokens=nb, neighbour_scores=nb.double())
    assert extra[NEIGHBOUR_TOKENS].shape == (2, 5, 2) and torch.equal(extra[NEIGHBOUR_SCORES], nb[..., :2].double())
    other = nb.clone()
    other[..., 2:] = 33  # neighbours beyond k do not matter
    torch.testing.assert_close(decoder(toks, neighbour_tokens=other)[0], out)
    with pytest.raises(ValueError, match="--neighbours"):
        decoder(toks)
    with pytest.raises(ValueError, match="spalm_k = 2"):
        decoder(toks, neighbour_tokens=nb[..., :1])
    with pytest.raises(ValueError, match="do not match the batch"):
        decoder(toks, neighbour_tokens=nb[:, :4])
    with pytest.raises(ValueError, match="incremental"):
        decoder(toks, neighbour_tokens=nb, incremental_state={})
    with pytest.raises(ValueError, match="tie"):
        tiny(SpalmDecoder, SpalmConfig)  # untied embeddings


def test_positions_without_neighbours_have_finite_gradients_in_half_precision():
    decoder = spalm().train()
    toks = tokens(2, 4)
    nb = torch.full(toks.shape + (4,), PAD)
    nb[0, 0] = torch.tensor([5, 6, PAD, PAD])
    logits, _ = decoder(toks, neighbour_tokens=nb)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)
    half = spalm().half()
    out = half(toks, features_only=True, neighbour_tokens=nb)[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# -- the neighbours through fairseq's data --------------------------------------------------------


def write_neighbours(root, split, stream_targets, dictionary, k=3, fingerprint="f" * 64):
    """A neighbour file whose entries encode their position: value j of position t is the target
    of position t (j = 0) or t + j, score = t + j / 10; ids t (what trime-neighbours would never write)."""
    n = len(stream_targets)
    from trime_fairseq.checksums import dictionary_checksum

    meta = dict(split=split, data="test", dictionary_size=len(dictionary),
                dictionary_sha256=dictionary_checksum(dictionary),
                datastore=dict(fingerprint=fingerprint, path="none"))
    writer = NeighbourWriter(root / split, meta, n, k)
    positions = np.arange(n)
    values = np.stack([stream_targets[np.minimum(positions + j, n - 1)] for j in range(k)], 1)
    scores = positions[:, None] + np.arange(k)[None] / 10
    writer.add(values, scores.astype(np.float32), np.repeat(positions[:, None], k, 1), stream_targets)
    return writer.finalize(meta)


def split_stream(task, split):
    """The targets of a split's token stream (TokenBlockDataset order)."""
    from trime_fairseq.data.neighbours import token_blocks

    blocks = token_blocks(task.dataset(split))
    return np.concatenate([blocks[i][1].numpy() for i in range(len(blocks))])


@pytest.fixture(scope="module")
def slice_task(wikitext2_bin, tmp_path_factory):
    """trime_lm on the WikiText-2 slice with neighbour files for valid and test."""
    from fairseq.data import Dictionary

    from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask

    root = tmp_path_factory.mktemp("neighbours")
    d = Dictionary.load(str(wikitext2_bin / "dict.txt"))
    # the values fairseq's CLIs interpolate from the other config groups
    common = dict(data=str(wikitext2_bin), tokens_per_sample=16, sample_break_mode="none", seed=1,
                  batch_size=None, batch_size_valid=None, dataset_impl=None, data_buffer_size=0, tpu=False,
                  use_plasma_view=False, plasma_path="/tmp/plasma", update_freq=[1])

    def make(neighbours=str(root), **options):
        return TrimeLMTask(TrimeLMConfig(**common, neighbours=neighbours, **options), d)

    plain = make(neighbours=None)
    for split in ("valid", "test"):
        plain.load_dataset(split)
        write_neighbours(root, split, split_stream(plain, split), d)

    return make, root, d


def check_alignment(batch, pad):
    """Neighbour 0 of every scored position is its target, and scores name its stream position."""
    target = batch["target"]
    nb, scores = batch["net_input"][NEIGHBOUR_TOKENS], batch["net_input"][NEIGHBOUR_SCORES]
    assert nb.shape[:2] == target.shape == batch["net_input"]["src_tokens"].shape
    scored = target.ne(pad)
    assert torch.equal(nb[..., 0][scored], target[scored])
    assert torch.all(nb[~scored] == pad) and torch.all(torch.isneginf(scores[~scored]))
    return scores[..., 0][scored].long()  # stream positions of the scored targets


def test_neighbours_follow_their_targets_through_stream_batches(slice_task):
    make, _, d = slice_task
    task = make(batching="stream")
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    total = int(dataset.sizes.sum())
    for epoch in (1, 2):  # a second pass (the recurrence memory is reset, the data the same)
        itr = task.get_batch_iterator(dataset, max_sentences=5, epoch=epoch).next_epoch_itr(shuffle=False)
        positions = torch.cat([check_alignment(b, d.pad()) for b in itr])
        assert sorted(positions.tolist()) == list(range(total))  # every token once, with its own neighbours
    # rows continue their streams: in each row, positions follow one another across batches
    itr = task.get_batch_iterator(dataset, max_sentences=5).next_epoch_itr(shuffle=False)
    last = {}
    for batch in itr:
        for row in range(batch["target"].size(0)):
            scored = batch["target"][row].ne(d.pad())
            pos = batch["net_input"][NEIGHBOUR_SCORES][row, :, 0][scored].long()
            if pos.numel():
                assert row not in last or pos[0] == last[row] + 1
                assert torch.equal(pos, torch.arange(pos[0], pos[0] + pos.numel()))
                last[row] = int(pos[-1])


def test_neighbours_follow_their_targets_through_context_windows(slice_task):
    make, _, d = slice_task
    task = make()
    task.load_dataset("test")
    dataset = task.dataset("test")
    itr = task.eval_lm_dataloader(dataset, max_tokens=None, batch_size=4, context_window=8, num_workers=0,
                                  data_buffer_size=0)
    positions, context = [], 0
    for batch in itr:
        positions.append(check_alignment(batch, d.pad()))
        context += int(batch["net_input"]["src_tokens"].ne(d.pad()).sum() - batch["target"].ne(d.pad()).sum())
    assert context > 0  # rows did get context columns (whose neighbours are empty)
    assert torch.equal(torch.cat(positions), torch.arange(int(dataset.sizes.sum())))


def test_neighbour_files_that_do_not_match_are_errors(slice_task, tmp_path):
    make, root, d = slice_task
    task = make()
    with pytest.raises(FileNotFoundError, match="neighbour folder not found"):
        task.load_dataset("train")  # no train/ in the folder
    import shutil

    shutil.copytree(root / "valid", tmp_path / "test")  # another split's file under test/
    shutil.copytree(root / "valid", tmp_path / "valid")
    other = make(neighbours=str(tmp_path))
    with pytest.raises(NeighbourError, match="split 'valid', not of 'test'"):
        other.load_dataset("test")
    # a file with the right name but other targets: refused when the item is read
    stored = NeighbourFile.load(root / "valid")
    targets = np.asarray(stored.targets).copy()
    targets[100] = (targets[100] + 1) % len(d)
    write_neighbours(tmp_path / "tampered", "valid", targets, d)
    tampered = make(neighbours=str(tmp_path / "tampered"))
    tampered.load_dataset("valid")
    with pytest.raises(NeighbourError, match="differ from those stored"):
        for i in range(len(tampered.dataset("valid"))):
            tampered.dataset("valid")[i]
    # wrong size, other dictionary, other datastore, incomplete file
    write_neighbours(tmp_path / "short", "valid", np.asarray(stored.targets)[:-1], d)
    with pytest.raises(NeighbourError, match="tokens"):
        NeighbourFile.load(tmp_path / "short" / "valid", "valid", expect_size=stored.size)
    with pytest.raises(NeighbourError, match="another dictionary"):
        NeighbourFile.load(root / "valid", expect_dictionary=dictionary())
    write_neighbours(tmp_path / "mixed", "valid", np.asarray(stored.targets), d, fingerprint="0" * 64)
    shutil.copytree(root / "test", tmp_path / "mixed" / "test")
    mixed = make(neighbours=str(tmp_path / "mixed"))
    mixed.load_dataset("valid")
    with pytest.raises(NeighbourError, match="another datastore"):
        mixed.load_dataset("test")
    (tmp_path / "mixed" / "valid" / "neighbours.json").unlink()
    with pytest.raises(NeighbourError, match="no neighbours"):
        NeighbourFile.load(tmp_path / "mixed" / "valid")


def test_task_refuses_neighbours_without_spalm_and_spalm_without_neighbours(slice_task):
    import argparse

    make, _, d = slice_task
    with pytest.raises(ValueError, match="reads no neighbours"):
        make().build_model(argparse.Namespace(arch="trime_transformer_xl_wikitext2_small"))
    plain = make(neighbours=None)
    with pytest.raises(ValueError, match="pass --neighbours"):
        plain.build_model(argparse.Namespace(arch="spalm_wikitext2_small"))
    model = make().build_model(argparse.Namespace(arch="spalm_wikitext2_small"))
    assert isinstance(model, SpalmModel) and model.decoder.spalm_k == 4
    # neighbour_knn: a model that reads none gets them withheld from its forward, the memory reads the batch's
    txl = make(eval_memory="neighbour_knn").build_model(argparse.Namespace(arch="trime_transformer_xl_wikitext2_small"))
    assert txl.trime_eval_memory.options.uses_neighbours
    with pytest.raises(ValueError, match="pass --neighbours"):
        make(neighbours=None, eval_memory="neighbour_knn")


# -- SPALM + kNN: the neighbours as an evaluation memory part ---------------------------------------


@pytest.mark.parametrize("reads_neighbours", [True, False])
def test_neighbour_knn_interpolates_with_the_neighbours_the_model_used(reads_neighbours):
    """SPALM + kNN: (1 − λ)·p_SPALM + λ·p_kNN, p_kNN ∝ Σ_k exp(score_k / T) over the model's k neighbours;
    a model that reads none (Transformer-XL) interpolates with all the batch's neighbours (kNN-LM)."""
    from trime_fairseq.memory.eval_memory import EvalMemory, attach_eval_memory
    from trime_fairseq.memory.options import MemoryOptions
    from trime_fairseq.models.transformer_xl import TrimeTransformerXLModel

    decoder = spalm(spalm_k=3) if reads_neighbours else tiny(TransformerXLDecoder, share_decoder_input_output_embed=True)
    model = (SpalmModel if reads_neighbours else TrimeTransformerXLModel)(decoder).eval()
    toks = tokens(2, 6)
    target = tokens(2, 6, seed=9)
    target[1, 4:] = PAD
    nb = neighbours_for(toks, k=4)
    nb[0, 0, :2] = target[0, 0]  # the target among the neighbours
    scores = torch.randn(nb.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    sample = {"net_input": {"src_tokens": toks, NEIGHBOUR_TOKENS: nb, NEIGHBOUR_SCORES: scores}, "target": target}
    options = MemoryOptions("neighbour_knn", knn_temperature=2.0, knn_lambda=0.3)
    memory = EvalMemory(options, PAD)
    attach_eval_memory(model, memory)
    out = model(**sample["net_input"])
    log_probs = model.get_normalized_probs(out, log_probs=True, sample=sample)  # (B, T, V)
    plain = torch.log_softmax(out[0].double(), -1)
    used = 3 if reads_neighbours else 4
    for b in range(2):
        for t in range(6):
            if target[b, t] == PAD:
                torch.testing.assert_close(log_probs[b, t].double(), plain[b, t])  # not scored: no memory work
                continue
            visible = [(int(w), float(s)) for w, s in zip(nb[b, t, :used], scores[b, t, :used]) if int(w) != PAD]
            expected = plain[b, t].exp()
            if visible:
                total = sum(np.exp(s / 2.0) for _, s in visible)
                q = torch.zeros(VOCAB, dtype=torch.float64)
                for w, s in visible:
                    q[w] += np.exp(s / 2.0) / total
                expected = 0.7 * expected + 0.3 * q
            torch.testing.assert_close(log_probs[b, t].double().exp(), expected, atol=1e-6, rtol=1e-5)
    at_target = memory.target_log_probs(model.decoder, out, sample, options)
    scored = target.ne(PAD)
    torch.testing.assert_close(at_target[scored].double(),
                               log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[scored].double())
    with pytest.raises(ValueError, match="neighbours"):
        memory.log_probs(model.decoder, model(toks, neighbour_tokens=nb) if reads_neighbours else model(toks),
                         {"net_input": {"src_tokens": toks}, "target": target})


# -- configs against the paper -------------------------------------------------------------------------

SPALM_CONFIGS = {  # config -> (--arch, parameters (paper), vocabulary, k, tokens per update: 256 sequences)
    "wt103": ("spalm_wt103", 142e6, 267_744, 4, 256 * 512),
    "enwik8": ("spalm_enwik8", 104e6, 208, 2, 256 * 768),
    "wikitext2_small": ("spalm_wikitext2_small", None, 33_280, 4, 8 * 64),
}


@pytest.mark.parametrize("name", sorted(SPALM_CONFIGS))
def test_spalm_configs_build_their_architecture_with_the_papers_sizes(name):
    import argparse
    from pathlib import Path

    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from omegaconf import OmegaConf

    arch, params, vocab, k, tokens = SPALM_CONFIGS[name]
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "spalm" / f"{name}.yaml")
    expected = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](expected)
    for field_name, value in cfg.model.items():  # hydra takes every value from the file: it must be --arch's
        if field_name != "_name":
            assert getattr(expected, field_name) == value, (name, field_name)
    assert cfg.model.spalm_k == k and cfg.task.batching == "stream"
    assert cfg.dataset.batch_size * cfg.task.tokens_per_sample * cfg.optimization.get("update_freq", [1])[0] == tokens
    if params is not None:
        d = Dictionary()
        for i in range(vocab - d.nspecial):
            d.add_symbol(f"w{i}")
        expected.max_target_positions = None
        with torch.device("meta"):
            count = sum(p.numel() for p in SpalmDecoder(expected, d).parameters())
        assert abs(count - params) / params < 0.02, f"{arch}: {count / 1e6:.1f}M parameters, the paper {params / 1e6:g}M"


@pytest.mark.parametrize("name", sorted(SPALM_CONFIGS))
def test_spalm_configs_take_the_options_the_pipeline_overrides(name):
    """``fairseq-hydra-train`` refuses to override a model key its file lacks (the yaml's model section
    is a plain struct dict): scripts/wikitext2_spalm.sh sets ``model.spalm_scale_values=true`` and
    ``model.spalm_detach_values=true``."""
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    hydra_init(name)
    config_dir = Path(__file__).resolve().parents[1] / "configs" / "spalm"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.1"):
        cfg = compose(config_name=name, overrides=["task.data=/nonexistent", "task.neighbours=/nonexistent",
                                                   "model.spalm_scale_values=true", "model.spalm_detach_values=true",
                                                   "model.spalm_k=2"])
    GlobalHydra.instance().clear()
    assert cfg.model.spalm_scale_values is True and cfg.model.spalm_detach_values is True
    assert cfg.model.spalm_k == 2


def test_rows_without_scored_positions_with_a_tied_adaptive_softmax():
    """An ended stream's padding row (no scored position) under the evaluation memory: the model's
    own distribution, no error from the tied adaptive head on an empty selection."""
    from trime_fairseq.memory.eval_memory import EvalMemory, attach_eval_memory
    from trime_fairseq.memory.options import MemoryOptions

    decoder = tiny(SpalmDecoder, SpalmConfig, decoder_embed_dim=16, adaptive_input=True,
                   adaptive_input_cutoff="10,20", adaptive_softmax_cutoff="10,20", tie_adaptive_weights=True,
                   tie_adaptive_proj=True)
    model = SpalmModel(decoder).eval()
    attach_eval_memory(model, EvalMemory(MemoryOptions("neighbour_knn"), PAD))
    toks = tokens(1, 5)
    nb = neighbours_for(toks)
    sample = {"net_input": {"src_tokens": toks, NEIGHBOUR_TOKENS: nb, NEIGHBOUR_SCORES: nb.double()},
              "target": torch.full_like(toks, PAD)}
    out = model(**sample["net_input"])
    log_probs = model.get_normalized_probs(out, log_probs=True, sample=sample)
    assert log_probs.shape == (1, 5, VOCAB) and torch.isfinite(log_probs).all()


def test_detached_values_stop_only_the_memory_gradient_of_the_embeddings():
    """--spalm-detach-values: the same outputs; the value rows (30..33, seen nowhere else as input) get the
    gradient of the output layer alone, the gate still trains."""
    toks = torch.tensor([[4, 5, 6, 7, 4, 5], [6, 7, 4, 5, 6, 7]])
    targets = torch.tensor([[5, 6, 7, 4, 5, 6], [7, 4, 5, 6, 7, 4]])
    nb = torch.tensor([30, 31, 32, 33]).expand(2, 6, 4).clone()
    grads = {}
    for detach in (False, True):
        decoder = spalm(spalm_detach_values=detach).train()
        logits, _ = decoder(toks, neighbour_tokens=nb)
        torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
        grads[detach] = (logits.detach(), decoder.embed_tokens.weight.grad.clone(), decoder.gate_weight.grad.clone())
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert grads[True][2].abs().sum() > 0
    assert not torch.allclose(grads[True][1][30:34], grads[False][1][30:34])
    # detached: rows 30..33 get exactly the output layer's gradient, softmax(W z)·z summed over positions
    decoder = spalm(spalm_detach_values=True).train()
    logits, extra = decoder(toks, neighbour_tokens=nb)
    z = extra["trime_feature"].detach()  # (B, T, d) the fused features fed to the output layer
    probs = torch.softmax(logits.detach(), -1).reshape(-1, VOCAB) / targets.numel()
    onehot = torch.nn.functional.one_hot(targets.reshape(-1), VOCAB).to(probs.dtype) / targets.numel()
    output_grad = (probs - onehot).t() @ z.reshape(-1, z.size(-1))  # (V, d)
    torch.testing.assert_close(grads[True][1][30:34], output_grad[30:34])


@pytest.mark.parametrize("env,message", [({"VARIANTS": "spalm spalm_detachd"}, "unknown SPALM variant 'spalm_detachd'"),
                                         ({"VANILLA": "/nonexistent/checkpoint.pt"}, "no such checkpoint")])
def test_pipeline_script_refuses_bad_options_before_writing(tmp_path, env, message):
    """scripts/wikitext2_spalm.sh: a misspelt variant or a missing key encoder stops it before any step runs."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "wikitext2_spalm.sh"
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(script)], env={**os.environ, **env, "OUT": str(out)}, capture_output=True,
                          text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not out.exists()
