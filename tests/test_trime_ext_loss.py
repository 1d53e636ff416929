"""trime_ext_loss (TRIMELM_ext, §4.3): memory = other segments of the batch + (unless dropped) local memory.

Loss and gradients are checked against a naive reference (explicit loops, double
precision) that builds every token's memory entry by entry; the drop pattern is
injected for those tests and its statistics / determinism are tested separately.
"""

import math

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from test_trime_loss import full_token_scores
from tiny_models import lm_sample, row_gradient, tiny_lm, tiny_task, trime_criterion

from trime_fairseq.criterions.trime_ext_loss import MAX_DENSE_POSITIONS, TrimeExtLoss
from trime_fairseq.memory.keys import TRIME_KEY, ensure_key_capture
from trime_fairseq.memory.mixing import joint_target_log_prob


def ext_criterion(task, p=0.9, block=0, seed=1, **overrides) -> TrimeExtLoss:
    options = dict(ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False,
                   local_drop_prob=p, memory_block_size=block, seed=seed)
    options.update(overrides)
    return TrimeExtLoss(task, **options)


def with_pattern(crit: TrimeExtLoss, dropped) -> TrimeExtLoss:
    """Inject a fixed drop pattern (True: that segment's local memory is dropped)."""
    pattern = torch.tensor(dropped, dtype=torch.bool)

    def draw(bsz):
        assert bsz == len(pattern)
        return pattern.clone()

    crit.draw_local_drop = draw
    return crit


def naive_ext_losses(token_scores_full, keys, target, pad, dropped):
    """-log P(target) (B, T) with P(w) ∝ exp(s_w) + Σ_{memory entries with value w} exp(g_t·g_j/√d).

    The memory of (b, t) is built explicitly: every non-pad position of every other row,
    plus the non-pad positions j < t of row b unless ``dropped[b]``. Also returns whether
    the target occurs in the memory.
    """
    bsz, tsz, vocab = token_scores_full.shape
    d = keys.size(-1)
    out = torch.zeros(bsz, tsz, dtype=torch.float64)
    hit = torch.zeros(bsz, tsz, dtype=torch.bool)
    for b in range(bsz):
        for t in range(tsz):
            if target[b, t] == pad:
                continue
            memory = [(r, j) for r in range(bsz) if r != b for j in range(tsz)]
            if not dropped[b]:
                memory += [(b, j) for j in range(t)]
            p = [torch.exp(token_scores_full[b, t, w]) for w in range(vocab)]
            for r, j in memory:
                if target[r, j] == pad:
                    continue
                value = int(target[r, j])
                p[value] = p[value] + torch.exp(torch.dot(keys[b, t], keys[r, j]) / math.sqrt(d))
                hit[b, t] |= value == int(target[b, t])
            out[b, t] = -torch.log(p[int(target[b, t])] / sum(p))
    return out, hit


def ours_and_reference(model, task, crit, sample, dropped):
    """(our losses, in_memory, valid, grads) and (reference losses, hits, grads)."""
    model.zero_grad()
    trime, ce, in_memory, valid = crit.token_losses(model, sample)
    trime.masked_fill(~valid, 0).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ensure_key_capture(model)
    out = model(**sample["net_input"])
    ref, hit = naive_ext_losses(full_token_scores(model, out), out[1][TRIME_KEY], sample["target"],
                                task.dictionary.pad(), dropped)
    ref.sum().backward()
    theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return (trime, ce, in_memory, valid, ours), (ref, hit, theirs)


def assert_same(model, ours, reference):
    trime, _, in_memory, valid, grads = ours
    ref, hit, ref_grads = reference
    torch.testing.assert_close(trime.masked_fill(~valid, 0).view_as(ref), ref)
    assert torch.equal(in_memory & valid, hit.view(-1))
    assert len(grads) > 0
    for name, param in model.named_parameters():  # a missing gradient is a zero gradient
        zero = torch.zeros_like(param)
        torch.testing.assert_close(grads.get(name, zero), ref_grads.get(name, zero), msg=name)


# ----------------------------------------------------------------------------------------------
# loss and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("block", [0, 5])
def test_loss_and_gradient_equal_naive_reference(adaptive, block):
    """Fixed drop pattern (row 1 dropped), padding in the last row; dense and blockwise memory."""
    task = tiny_task()
    model = tiny_lm(task, adaptive=adaptive)
    dropped = [False, True, True]  # asymmetric: a pattern applied to the wrong rows differs
    crit = with_pattern(ext_criterion(task, p=0.5, block=block), dropped)
    sample = lm_sample(task, bsz=3, tsz=6, pad_last=2)
    ours, ref = ours_and_reference(model, task, crit, sample, dropped)
    assert_same(model, ours, ref)
    # the test can fail: the other segments change the loss, and so does the drop
    local, *_ = trime_criterion(task).token_losses(model, sample)
    assert not torch.allclose(local, ours[0])
    wrong, _ = naive_ext_losses(*_reference_inputs(model, task, sample), [False] * 3)
    assert not torch.allclose(wrong, ref[0])


def _reference_inputs(model, task, sample):
    with torch.no_grad():
        out = model(**sample["net_input"])
    return full_token_scores(model, out), out[1][TRIME_KEY], sample["target"], task.dictionary.pad()


@pytest.mark.parametrize("p,dropped", [(0.0, [False] * 3), (1.0, [True] * 3)])
def test_drawn_patterns_at_p0_and_p1(p, dropped):
    """p = 0: other segments + local memory for every segment; p = 1: other segments only
    (drawn patterns, not injected)."""
    task = tiny_task()
    model = tiny_lm(task)
    crit = ext_criterion(task, p=p)
    sample = lm_sample(task, bsz=3, tsz=5)
    ours, ref = ours_and_reference(model, task, crit, sample, dropped)
    assert_same(model, ours, ref)
    _, _, log = crit(model, sample)
    assert log["local_dropped"] == sum(dropped)


def test_single_segment_reduces_to_trime_loss_or_cross_entropy():
    """With one segment there are no other segments: p = 0 is trime_loss, p = 1 plain cross-entropy."""
    task = tiny_task()
    model = tiny_lm(task)
    sample = lm_sample(task, bsz=1, tsz=9)
    local, ce, _, _ = trime_criterion(task).token_losses(model, sample)
    keep, _, _, _ = ext_criterion(task, p=0.0).token_losses(model, sample)
    drop, _, in_memory, _ = ext_criterion(task, p=1.0).token_losses(model, sample)
    torch.testing.assert_close(keep, local)
    torch.testing.assert_close(drop, ce)
    assert not in_memory.any() and not torch.allclose(local, ce)


def test_blockwise_equals_dense_without_gradients():
    task = tiny_task()
    model = tiny_lm(task).eval()
    sample = lm_sample(task, bsz=4, tsz=5, pad_last=3)
    pattern = [True, False, False, True]
    with torch.no_grad():
        dense = with_pattern(ext_criterion(task, block=0), pattern).token_losses(model, sample)
        for block in (1, 7, 19, 20):
            blocked = with_pattern(ext_criterion(task, block=block), pattern).token_losses(model, sample)
            for a, b in zip(dense, blocked):
                torch.testing.assert_close(a, b)


def test_gradient_reaches_other_segments_keys():
    """Memory keys: the loss of one query of segment 1 sends gradient into every valid key of
    segment 0 (none into a pad position), also when segment 1's local memory is dropped."""
    task = tiny_task()
    pad = task.dictionary.pad()
    target = torch.tensor([[5, 6, 7, pad], [6, 5, 6, 7]])
    valid = target.ne(pad)
    for dropped, block in [([False, False], 0), ([False, True], 0), ([True, True], 3)]:
        keys = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
        crit = with_pattern(ext_criterion(task, block=block), dropped)
        memory = crit.training_memory(keys, target, valid, None)
        zero = torch.zeros(1, 8, dtype=torch.float64)
        log_prob = joint_target_log_prob(zero, zero + 2.0, *memory, target.view(1, 8))
        log_prob[0, 5].backward()  # segment 1, position 1
        grad = keys.grad.abs().sum(-1)
        assert (grad[0, :3] > 0).all() and grad[0, 3] == 0, "valid keys of the other segment, not the pad"
        assert (grad[1, 0] > 0) == (not dropped[1]), "own earlier key only with local memory"
        assert (grad[1, 2:] == 0).all(), "no own later keys"


def test_gradient_reaches_other_segments_through_the_model():
    """Rows do not attend to each other: segment 0's representations get gradient from
    segment 1's loss only through the ext memory (even with every local memory dropped)."""
    task = tiny_task()
    model = tiny_lm(task)
    sample = lm_sample(task, bsz=2, tsz=6)
    grads = {name: row_gradient(model, crit, sample, loss_row=1, grad_row=0)
             for name, crit in [("ext", ext_criterion(task, p=1.0)), ("local", trime_criterion(task))]}
    assert grads["ext"] > 0 and grads["local"] == 0


# ----------------------------------------------------------------------------------------------
# the drop pattern
# ----------------------------------------------------------------------------------------------


def _patterns(crit, updates, bsz, per_update=1):
    out = []
    for u in updates:
        crit.set_num_updates(u)
        out.append([crit.draw_local_drop(bsz) for _ in range(per_update)])
    return out


def test_drop_statistics_and_determinism(monkeypatch):
    task = tiny_task()
    p, bsz, updates = 0.3, 40, range(250)
    crit = ext_criterion(task, p=p, seed=7)
    draws = _patterns(crit, updates, bsz)
    share = torch.stack([d[0] for d in draws]).double().mean().item()
    n = bsz * len(updates)
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n), share  # binomial, 5 sigma
    # per segment independently: the number dropped per batch varies
    assert len({int(d[0].sum()) for d in draws}) > 3
    # same seed and update: same pattern (a fresh criterion, updates visited in another order)
    again = ext_criterion(task, p=p, seed=7)
    for u in (249, 3, 0, 100):
        again.set_num_updates(u)
        assert torch.equal(again.draw_local_drop(bsz), draws[u][0])
    # different across updates, seeds, accumulation steps and workers
    assert not torch.equal(draws[0][0], draws[1][0])
    other_seed = _patterns(ext_criterion(task, p=p, seed=8), updates, bsz)
    assert sum(torch.equal(a[0], b[0]) for a, b in zip(draws, other_seed)) < 3
    accumulated = _patterns(ext_criterion(task, p=p, seed=7), [5], bsz, per_update=3)[0]
    assert torch.equal(accumulated[0], draws[5][0])
    assert not torch.equal(accumulated[0], accumulated[1]) and not torch.equal(accumulated[1], accumulated[2])
    monkeypatch.setattr(TrimeExtLoss, "_rank", staticmethod(lambda: 1))
    assert not torch.equal(_patterns(ext_criterion(task, p=p, seed=7), [5], bsz)[0][0], draws[5][0])
    # the global RNG (model dropout) is untouched
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    crit.draw_local_drop(bsz)
    assert torch.equal(torch.rand(3), expected)


def test_no_drop_outside_training():
    """Validation (criterion in eval mode) keeps every local memory, even at p = 1."""
    task = tiny_task()
    model = tiny_lm(task).eval()
    sample = lm_sample(task, bsz=3, tsz=5)
    crit = ext_criterion(task, p=1.0).eval()
    assert not crit.draw_local_drop(50).any()
    with torch.no_grad():
        valid_loss, _, log = crit(model, sample)
        keep_loss, _, _ = ext_criterion(task, p=0.0)(model, sample)
        drop_loss, _, _ = ext_criterion(task, p=1.0)(model, sample)
    torch.testing.assert_close(valid_loss, keep_loss)
    assert log["local_dropped"] == 0 and not torch.allclose(valid_loss, drop_loss)


def test_logging_reports_the_dropped_share():
    from fairseq import metrics

    task = tiny_task()
    model = tiny_lm(task)
    sample = lm_sample(task, bsz=4, tsz=5)
    logs = []
    for pattern in ([True, False, False, True], [True, True, True, False]):
        _, _, log = with_pattern(ext_criterion(task), pattern)(model, sample)
        logs.append(log)
    assert [log["local_dropped"] for log in logs] == [2, 3]
    with metrics.aggregate() as agg:
        TrimeExtLoss.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["local_dropped"] == pytest.approx(5 / 8, abs=1e-3)
    for key in ("loss", "trime_loss", "ce_loss", "in_memory", "ppl", "ce_ppl"):
        assert key in values


# ----------------------------------------------------------------------------------------------
# errors and warnings
# ----------------------------------------------------------------------------------------------


def test_bad_options_are_clear_errors():
    task = tiny_task()
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"--local-drop-prob must lie in \[0, 1\]"):
            ext_criterion(task, p=p)
    with pytest.raises(ValueError, match="--memory-block-size must be >= 0"):
        ext_criterion(task, block=-1)
    n = MAX_DENSE_POSITIONS + 1
    keys = torch.zeros(1, n, 1)
    target = torch.full((1, n), 5)
    with pytest.raises(ValueError, match="set --memory-block-size"):
        ext_criterion(task, p=0.0, block=0).training_memory(keys, target, target.ne(1), None)
    crit = ext_criterion(task)
    crit.draw_local_drop = lambda bsz: torch.tensor([True, False])  # a pattern for 2 segments, batch of 1
    with pytest.raises(ValueError, match="drop pattern"):
        crit.training_memory(torch.zeros(1, 3, 2), target[:, :3], target[:, :3].ne(1), None)


def test_warns_without_bm25_batching(caplog):
    with caplog.at_level("WARNING", logger="trime_fairseq.criterions.trime_ext_loss"):
        ext_criterion(tiny_task())
    assert "--batching bm25" in caplog.text


# ----------------------------------------------------------------------------------------------
# configs/trime_ext
# ----------------------------------------------------------------------------------------------

EXT_CONFIGS = sorted((ROOT / "configs" / "trime_ext").glob("*.yaml"))


def test_ext_configs_exist():
    assert [p.stem for p in EXT_CONFIGS] == ["wiki103_247m", "wiki103_7m", "wikitext2_small"]


@pytest.mark.parametrize("path", EXT_CONFIGS, ids=lambda p: p.stem)
def test_ext_config_settings(path):
    """bm25 batching (order file required), m = 1, p = 0.9, other segments in every forward."""
    cfg = OmegaConf.load(path)
    assert cfg.task.batching == "bm25" and OmegaConf.is_missing(cfg.task, "bm25_order")
    assert "consecutive_segments" not in cfg.task  # m = 1
    assert cfg.criterion._name == "trime_ext_loss" and cfg.criterion.local_drop_prob == 0.9
    assert cfg.criterion.ce_warmup_ratio == 0.05
    segments = cfg.dataset.batch_size
    assert segments > 1, "other segments must share a worker's batch"
    assert cfg.dataset.max_tokens == segments * cfg.task.tokens_per_sample
    assert 0 < cfg.criterion.memory_block_size <= segments * cfg.task.tokens_per_sample
    # the architecture's sizes: tests/test_configs.py::test_hydra_config_builds_the_architecture_it_names
