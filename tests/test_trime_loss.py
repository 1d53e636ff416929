"""trime_loss (Eq. 5, local memory) against naive references; causality; adaptive softmax; errors."""

import math

import pytest
import torch
from tiny_models import lm_sample, tiny_lm, tiny_task, trime_criterion

from trime_fairseq.memory.keys import TRIME_KEY, ensure_key_capture
from trime_fairseq.memory.mixing import joint_target_log_prob, masked_logsumexp
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.token_scores import adaptive_target_log_prob, target_token_scores


def naive_trime_losses(token_scores_full, keys, target, pad):
    """Eq. 5 with explicit loops: P(w) ∝ exp(s_w) + Σ_{j<t, x_j = w} exp(g_t·g_j/√d).

    token_scores_full: (B, T, V) unnormalised token log-scores; keys: (B, T, d).
    Returns (B, T) -log P(target), 0 at padding.
    """
    bsz, tsz, vocab = token_scores_full.shape
    d = keys.size(-1)
    out = torch.zeros(bsz, tsz, dtype=torch.float64)
    for b in range(bsz):
        for t in range(tsz):
            if target[b, t] == pad:
                continue
            p = [torch.exp(token_scores_full[b, t, w]) for w in range(vocab)]
            for j in range(t):
                if target[b, j] == pad:
                    continue
                sim = torch.dot(keys[b, t], keys[b, j]) / math.sqrt(d)
                p[int(target[b, j])] = p[int(target[b, j])] + torch.exp(sim)
            total = sum(p)
            out[b, t] = -torch.log(p[int(target[b, t])] / total)
    return out


def full_token_scores(model, net_output):
    """(B, T, V) explicit token log-scores, computed independently of token_scores.py."""
    asm = model.decoder.adaptive_softmax
    x = net_output[0]
    if asm is None:
        return x
    head = asm.head(x)
    head_lp = head.log_softmax(-1)
    first = asm.cutoff[0]
    parts = [head_lp[..., :first]]
    for i, tail in enumerate(asm.tail):  # p(w) = p(cluster i) p(w | cluster i)
        parts.append(tail(x).log_softmax(-1) + head_lp[..., first + i : first + i + 1])
    return torch.cat(parts, -1) + torch.logsumexp(head, dim=-1, keepdim=True)


@pytest.mark.parametrize("adaptive", [False, True])
def test_loss_and_gradient_equal_naive_reference(adaptive):
    task = tiny_task()
    model = tiny_lm(task, adaptive=adaptive)
    crit = trime_criterion(task)
    sample = lm_sample(task, bsz=2, tsz=7, pad_last=2)
    pad = task.dictionary.pad()

    model.zero_grad()
    trime, ce, in_memory, valid = crit.token_losses(model, sample)
    trime.masked_fill(~valid, 0).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    ensure_key_capture(model)
    net_output = model(**sample["net_input"])
    reference = naive_trime_losses(
        full_token_scores(model, net_output), net_output[1][TRIME_KEY], sample["target"], pad
    )
    reference.sum().backward()
    theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(trime.masked_fill(~valid, 0).view_as(reference), reference)
    assert len(ours) > 0
    for name, param in model.named_parameters():  # a missing gradient is a zero gradient
        zero = torch.zeros_like(param)
        torch.testing.assert_close(ours.get(name, zero), theirs.get(name, zero), msg=name)
    # memory makes a difference here (the test could fail): some targets are in memory
    assert in_memory.any() and not torch.allclose(trime[valid], ce[valid])


def test_gradient_reaches_every_memory_key():
    keys = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[5, 5, 5, 5, 5, 5]])
    from trime_fairseq.memory.sources import causal_memory, dot_scale

    mem = causal_memory(keys, keys, target, target.ne(1), dot_scale(4))
    score = torch.zeros(1, 6, dtype=torch.float64)
    lp = joint_target_log_prob(score, score + 3.0, *mem, target)
    lp[0, -1].backward()  # the last position's loss alone
    assert (keys.grad[0, :-1].abs().sum(-1) > 0).all(), "every earlier key must receive gradient"


@pytest.mark.parametrize("adaptive", [False, True])
def test_causality(adaptive):
    """Changing tokens after position t+1 leaves every loss term at positions <= t unchanged."""
    task = tiny_task()
    model = tiny_lm(task, adaptive=adaptive).eval()
    crit = trime_criterion(task)
    tsz, t = 10, 4
    sample = lm_sample(task, bsz=2, tsz=tsz)
    trime, *_ = crit.token_losses(model, sample)

    perturbed = lm_sample(task, bsz=2, tsz=tsz)
    x = torch.cat([sample["net_input"]["src_tokens"], sample["target"][:, -1:]], 1)
    y = x.clone()
    y[:, t + 2 :] = (x[:, t + 2 :] + 1 - task.dictionary.nspecial) % (len(task.dictionary) - task.dictionary.nspecial) + task.dictionary.nspecial
    perturbed["net_input"]["src_tokens"], perturbed["target"] = y[:, :-1], y[:, 1:]
    trime2, *_ = crit.token_losses(model, perturbed)
    a, b = trime.view(2, tsz), trime2.view(2, tsz)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :]), "the perturbation must change later terms"


def test_adaptive_target_scores_equal_explicit_log_probs():
    task = tiny_task()
    model = tiny_lm(task, adaptive=True).eval()
    asm = model.decoder.adaptive_softmax
    x = torch.randn(11, 16, dtype=torch.float64)
    target = torch.arange(4, 15) % len(task.dictionary)
    log_prob, head_lse = adaptive_target_log_prob(asm, x, target)
    full = asm.get_log_prob(x.unsqueeze(0), None).squeeze(0)
    torch.testing.assert_close(log_prob, full.gather(1, target.unsqueeze(1)).squeeze(1))
    torch.testing.assert_close(head_lse, torch.logsumexp(asm.head(x), -1))
    # the token term's partition is Z_head: the scores of all words sum to it
    torch.testing.assert_close(torch.logsumexp(full + head_lse.unsqueeze(1), -1), head_lse)


def test_target_token_scores_full_softmax():
    logits = torch.randn(2, 3, 9, dtype=torch.float64)
    target = torch.randint(0, 9, (2, 3))

    class Decoder:
        adaptive_softmax = None

    score, lse = target_token_scores(Decoder(), (logits, {}), target)
    torch.testing.assert_close(score, logits.reshape(6, 9).gather(1, target.reshape(6, 1)).squeeze(1))
    torch.testing.assert_close(lse, logits.reshape(6, 9).logsumexp(-1))


def test_all_masked_rows_fall_back_to_token_term_without_nan():
    scores = torch.full((3, 5), 1e4, dtype=torch.float32, requires_grad=True)  # huge, fp16-scale logits
    values = torch.randint(0, 7, (3, 5))
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2] = True
    token_target = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)
    token_lse = torch.tensor([5.0, 6.0, 7.0])
    target = values[:, 2]
    lp = joint_target_log_prob(token_target, token_lse, scores, values, mask, target)
    torch.testing.assert_close(lp[[0, 2]], (token_target - token_lse)[[0, 2]].detach())
    lp.sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(token_target.grad).all()
    assert masked_logsumexp(scores, mask).isneginf()[[0, 2]].all()


def test_half_precision_inputs_are_reduced_in_float32():
    keys = (torch.randn(1, 8, 32) * 30).half()  # q·k overflows fp16 if computed there
    from trime_fairseq.memory.sources import causal_memory, dot_scale

    mem = causal_memory(keys, keys, torch.randint(4, 9, (1, 8)), torch.ones(1, 8, dtype=torch.bool), dot_scale(32))
    assert mem.scores.dtype == torch.float32 and torch.isfinite(mem.scores).all()


def test_warmup_uses_cross_entropy_then_trime():
    task = tiny_task()
    model = tiny_lm(task)
    crit = trime_criterion(task, ce_warmup_updates=2)
    sample = lm_sample(task)
    crit.train()
    crit.set_num_updates(0)
    memory = crit.training_memory
    crit.training_memory = lambda *a: pytest.fail("the warm-up must not build the memory")
    loss_warm, _, log_warm = crit(model, sample)
    assert "trime_loss" not in log_warm and "in_memory" not in log_warm
    crit.training_memory = memory
    crit.set_num_updates(2)
    loss_trime, _, log = crit(model, sample)
    torch.testing.assert_close(loss_warm, log_warm["ce_loss"])
    torch.testing.assert_close(loss_trime, log["trime_loss"])
    assert not torch.allclose(loss_warm, loss_trime)


def test_warmup_ratio_is_a_fraction_of_max_update():
    task = tiny_task()
    assert trime_criterion(task, ce_warmup_ratio=0.05, max_update=1000).warmup_updates == 50
    with pytest.raises(ValueError, match="max-update"):
        trime_criterion(task, ce_warmup_ratio=0.05, max_update=0)
    with pytest.raises(ValueError, match="ce-warmup-ratio"):
        trime_criterion(task, ce_warmup_ratio=1.5, max_update=10)


def test_a_decoder_without_feed_forward_block_serves_f_only():
    """lstm_lm has no g: the continuous cache (on f) and plain evaluation work with --task
    trime_lm; what needs g is refused with a clear error, at build time or at the first loss."""
    from fairseq.models.lstm_lm import LSTMLanguageModel

    from trime_fairseq.memory.eval_memory import EvalMemory
    from trime_fairseq.memory.keys import TRIME_FEATURE, get_keys

    for mode in ("none", "cache"):
        task = tiny_task(eval_memory=mode)
        model = task.build_model(_lstm_args()).double().eval()
        sample = lm_sample(task, bsz=2, tsz=6)
        out = model(**sample["net_input"])
        assert get_keys(out, TRIME_FEATURE).shape == (2, 6, 8) and out[1]["attn"] is None
        lp = model.get_normalized_probs(out, True, sample)
        torch.testing.assert_close(lp.exp().sum(-1).double(), torch.ones(2, 6, dtype=torch.float64))
        if mode == "cache":  # f is the LSTM output fed to fc_out, not the logits
            plain = EvalMemory(MemoryOptions("none"), task.dictionary.pad()).log_probs(model.decoder, out, sample)
            assert not torch.allclose(lp, plain)
    with pytest.raises(ValueError, match="--eval-memory trime needs the memory key g"):
        tiny_task(eval_memory="trime").build_model(_lstm_args())
    task = tiny_task()
    model = task.build_model(_lstm_args())
    with pytest.raises(ValueError, match="no 'trime_key'"):
        trime_criterion(task).token_losses(model, lm_sample(task))
    assert isinstance(model, LSTMLanguageModel)


def test_checkpoint_activations_keep_the_gradient_of_g():
    """fairseq's --checkpoint-activations runs layers without gradients in the forward pass:
    the last layer is taken out of checkpointing so that g carries gradients, and the TRIME
    gradient equals the one without checkpointing."""
    task = tiny_task()
    grads = []
    for checkpointed in (False, True):
        model = tiny_lm(task, checkpoint_activations=checkpointed)
        model.train()
        trime, *_ = trime_criterion(task).token_losses(model, lm_sample(task))
        trime.sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0])
    assert hasattr(model.decoder.layers[0], "precheckpoint_forward")  # the other layers stay checkpointed


def _lstm_args():
    from argparse import Namespace

    from fairseq.models.lstm_lm import base_architecture

    args = Namespace(arch="lstm_lm", tokens_per_sample=64, max_target_positions=64, criterion="cross_entropy")
    base_architecture(args)
    args.decoder_embed_dim = args.decoder_hidden_size = args.decoder_out_embed_dim = 8
    return args
