"""Evaluation modes as records (trime_fairseq/memory/modes): a toy mode registered here (one record) runs
through the full-vocabulary and the target-only drivers with no other edit, and every registered mode's
options, key kinds, describe(), flags and tuning axes agree with its composition."""

import math
import os
from dataclasses import replace

import pytest
import torch
from fairseq.sequence_scorer import SequenceScorer
from tiny_models import lm_sample, tiny_lm, tiny_task

from trime_fairseq.cli.grid_search import GRIDS
from trime_fairseq.memory.composition import LOCAL, LOCAL_F, LOCAL_G, LOCAL_KEYS, PART_OPTIONS
from trime_fairseq.memory.compose import composition
from trime_fairseq.memory.eval_memory import EvalMemory, attach_eval_memory
from trime_fairseq.memory.keys import TRIME_KEY
from trime_fairseq.memory.modes import REGISTRY, flag, mode_help, register_mode
from trime_fairseq.memory.modes.registry import PART_TEXT, SYMBOLS, Mode, Step, TermOf, dot
from trime_fairseq.memory.options import MemoryOptions

MODES = list(REGISTRY)  # the registered modes (the toy one joins only inside its test)


@pytest.fixture
def toy_mode():
    """``local_interp``: Eq. 7-8 over the local memory alone, (1 − λ)·p + λ·q, q ∝ Σ exp(g·g_j / (√d·τ′))."""

    @register_mode
    class LocalInterpolation(Mode):
        name = "local_interp"
        help = "interpolation with the local memory on g"
        steps = (Step((TermOf(LOCAL_G, dot("interpolation_temperature")),), "interpolation_lambda"),)
        axes = ("interpolation_temperature", "interpolation_lambda")

    yield REGISTRY["local_interp"]
    del REGISTRY["local_interp"]


def naive_interpolation(logits, keys, src, pad, tau, lam):
    """(B, T, V) float64: log((1 − λ)·softmax(logits) + λ·q), q over the row's earlier positions j
    (value src[j+1]) with weights exp(g_t·g_j / (√d·τ)); the model's own where nothing is visible.
    ``lam``: a number, or a function of the position's best score giving its λ (an adaptive step)."""
    bsz, tsz, vocab = logits.shape
    out = torch.zeros(bsz, tsz, vocab, dtype=torch.float64)
    for b in range(bsz):
        for t in range(tsz):
            p = torch.softmax(logits[b, t].double(), -1)
            mem = torch.zeros(vocab, dtype=torch.float64)
            best = None
            for j in range(t):
                value = int(src[b, j + 1])
                if value != pad:
                    score = torch.dot(keys[b, t].double(), keys[b, j].double()) / (math.sqrt(keys.size(-1)) * tau)
                    mem[value] += torch.exp(score)
                    best = score if best is None else max(best, score)
            if mem.sum() > 0:
                weight = lam(best) if callable(lam) else lam
                p = (1 - weight) * p + weight * mem / mem.sum()
            out[b, t] = p.log()
    return out


@pytest.mark.parametrize("softmax_batch", [None, 5])
def test_a_toy_mode_is_one_record(toy_mode, softmax_batch):
    options = MemoryOptions.from_flags("local_interp", {"interpolation_temperature": 0.5, "interpolation_lambda": 0.3})
    with pytest.raises(ValueError, match="--knn-lambda has no effect with --eval-memory local_interp"):
        MemoryOptions.from_flags("local_interp", {"knn_lambda": 0.3})
    assert options.uses_local and not options.uses_datastore and options.record.local_keys(options) == (TRIME_KEY,)
    assert "interpolate λ with [local g at 1/(√d·τ′)]" in toy_mode.describe()
    assert toy_mode.flags(options, toy_mode.axes) == ("--eval-memory local_interp --interpolation-temperature 0.5 "
                                                      "--interpolation-lambda 0.3")

    task = tiny_task()  # no memory from the command line: the toy memory is attached below
    model = tiny_lm(task).eval()
    sample = lm_sample(task, bsz=3, tsz=10, pad_last=3)
    with torch.no_grad():
        net_output = model(**sample["net_input"])
    pad = task.dictionary.pad()
    reference = naive_interpolation(net_output[0], net_output[1][TRIME_KEY], sample["net_input"]["src_tokens"], pad,
                                    0.5, 0.3)
    target = sample["target"]
    expected = reference.gather(2, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    scored = target.ne(pad)

    # driver 1: the full vocabulary, through fairseq's scorer (get_normalized_probs)
    attach_eval_memory(model, EvalMemory(options, pad))
    hypos = SequenceScorer(task.target_dictionary, softmax_batch=softmax_batch).generate([model], sample)
    full = torch.cat([h[0]["positional_scores"] for h in hypos])
    torch.testing.assert_close(full.double(), expected[scored], rtol=1e-5, atol=1e-5)

    # driver 2: the target only, on the same forward pass, for this and another grid point
    memory = EvalMemory(options, pad)
    for point in (options, replace(options, interpolation_lambda=0.6)):
        fast = memory.target_log_probs(model.decoder, net_output, sample, point)
        whole = EvalMemory(point, pad).log_probs(model.decoder, net_output, sample)
        torch.testing.assert_close(fast, whole.gather(2, target.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(memory.target_log_probs(model.decoder, net_output, sample, options)[scored].double(),
                               expected[scored], rtol=1e-5, atol=1e-5)


def example_options(mode: Mode, with_optional: bool = True) -> MemoryOptions:
    """Options of ``mode`` with every scale and weight distinct, and its optional steps on."""
    values = dict(memory_temperature=0.7, cache_theta=0.4, knn_temperature=3.0, knn_lambda=0.35,
                  interpolation_temperature=1.5, interpolation_lambda=0.45, cache_lambda=0.2 if with_optional else 0.0)
    given = {name: value for name, value in values.items() if name in mode.options}
    given.update(required_files(mode))
    return MemoryOptions(mode.name, **given)


def required_files(mode: Mode) -> dict:
    """The file options ``mode`` cannot go without: a datastore folder and SK-MT's retrieval file (not opened by
    a composition) and adaptive_knn's network (read by its step rule: one for the default K and the examples' T = 3)."""
    files = {name: value for name, value in dict(datastore="a-datastore", sk_pairs="a-retrieval-file").items()
             if name in mode.options}
    if "knn_adaptive_network" in mode.options:
        import tempfile
        from pathlib import Path

        from trime_fairseq.memory.adaptive_knn import AdaptiveKnnNetwork, MetaKNetwork

        path = Path(tempfile.gettempdir()) / f"trime-test-modes-{os.getpid()}-adaptive.json"
        if not path.exists():
            AdaptiveKnnNetwork.of(MetaKNetwork(MemoryOptions().knn_k, hidden=1, seed=0), 3.0, "0" * 64,
                                  "0" * 64).save(path)
        files["knn_adaptive_network"] = str(path)
    return files


def recipe(mode: Mode):
    return [(mode.joint, None)] + [(step.terms, step) for step in mode.steps]


@pytest.mark.parametrize("name", MODES)
def test_describe_options_and_axes_agree_with_the_composition(name):
    mode = REGISTRY[name]
    options = example_options(mode)
    comp = composition(options, 16)
    read_by_recipe = {t.scale.option for terms, _ in recipe(mode) for t in terms}
    read_by_recipe |= {step.weight for _, step in recipe(mode) if step is not None and not step.adaptive}
    parts = {t.part for terms, _ in recipe(mode) for t in terms}

    # options: the recipe's scales and weights, the options of its parts and its own; nothing else is accepted
    assert mode.options == read_by_recipe | {o for p in parts for o in PART_OPTIONS[p]} | set(mode.own_options)
    MemoryOptions.from_flags(name, required_files(mode))
    for other in sorted({"memory_temperature", "cache_theta", "knn_lambda", "knn_k"} - mode.options):
        with pytest.raises(ValueError, match=f"{flag(other)} has no effect with --eval-memory {name}"):
            MemoryOptions.from_flags(name, {other: 1})

    # describe(): every term (part and scale) and every weight of the recipe, in words
    text = mode.describe()
    assert text in mode_help([name])
    if not parts:
        assert comp.terms == () and text == "the model's own token distribution"
    for terms, step in recipe(mode):
        for t in terms:
            assert f"{PART_TEXT[t.part]} at {t.scale.text()}" in text
        if step is not None:
            assert f"interpolate {'λ(x)' if step.adaptive else SYMBOLS[step.weight]} with" in text
    assert ("Eq. 6" in text) == bool(mode.joint) == bool(comp.joint)

    # key kinds and the dimension of g follow from the parts and scales
    local = comp.parts & LOCAL
    assert mode.local_keys(options) == tuple(LOCAL_KEYS[p] for p in (LOCAL_G, LOCAL_F) if p in local)
    if mode.needs_dim(options):
        with pytest.raises(ValueError, match="key dimension"):
            composition(options, None)
    else:
        assert composition(options, None) == comp
    assert options.uses_local == bool(local)

    # without a local memory: what the record says, and then no local term is left
    if mode.without_local:
        assert not composition(example_options(mode, with_optional=False), 16, False).parts & LOCAL
    else:
        with pytest.raises(ValueError, match=f"--eval-memory {name}"):
            composition(options, 16, False)

    # tuning axes: options the mode reads, with a grid option; each moves the composition or is a part's option
    for axis in mode.axes + mode.decoding_axes:
        assert axis in mode.options and axis in GRIDS
        if axis in read_by_recipe or axis in mode.own_options:  # a scale, a weight, or what a rule reads
            value = getattr(options, axis)
            moved = replace(options, **{axis: value / 2 if value is not None else 0.1})
            assert composition(moved, 16) != comp, axis
        else:
            assert any(axis in PART_OPTIONS[p] for p in comp.parts), axis

    # flags of a grid point: --eval-memory, every axis, then whatever else the composition reads
    words = mode.flags(options, mode.axes).split()
    assert words[:2] == ["--eval-memory", name]
    shown = dict(zip(words[2::2], words[3::2]))
    assert set(shown) == {flag(n) for n in set(mode.axes) | read_by_recipe}  # every step is on in these options
    for axis in mode.axes:
        assert float(shown[flag(axis)]) == pytest.approx(mode.value(options, axis))


@pytest.fixture
def toy_adaptive_mode():
    """``local_adaptive``: an adaptive step over the local memory: λ per row = σ(the row's best scaled score),
    q over the same entries (a rule reads only what the row retrieved)."""

    def rule(entries):
        best = entries.scores.masked_fill(~entries.mask, float("-inf")).max(-1).values  # (Q,)
        lam = torch.where(entries.mask.any(-1), torch.sigmoid(best), torch.zeros_like(best))
        return entries, lam

    @register_mode
    class LocalAdaptive(Mode):
        name = "local_adaptive"
        help = "adaptive interpolation with the local memory on g"
        steps = (Step((TermOf(LOCAL_G, dot("interpolation_temperature")),), adaptive=True),)
        axes = ("interpolation_temperature",)
        rule_text = "λ = σ(best score)"

        def step_rule(self, options, dim):
            return rule

    yield REGISTRY["local_adaptive"]
    del REGISTRY["local_adaptive"]


def test_an_adaptive_step_gives_lambda_per_row_in_every_driver(toy_adaptive_mode):
    options = MemoryOptions.from_flags("local_adaptive", {"interpolation_temperature": 0.5})
    with pytest.raises(ValueError, match="--interpolation-lambda has no effect"):
        MemoryOptions.from_flags("local_adaptive", {"interpolation_lambda": 0.3})
    assert "interpolate λ(x) with [local g at 1/(√d·τ′)], λ = σ(best score)" in toy_adaptive_mode.describe()
    assert toy_adaptive_mode.flags(options, toy_adaptive_mode.axes) == (
        "--eval-memory local_adaptive --interpolation-temperature 0.5")
    task = tiny_task()
    model = tiny_lm(task).eval()
    sample = lm_sample(task, bsz=3, tsz=10, pad_last=3)
    with torch.no_grad():
        net_output = model(**sample["net_input"])
    pad = task.dictionary.pad()
    reference = naive_interpolation(net_output[0], net_output[1][TRIME_KEY], sample["net_input"]["src_tokens"], pad,
                                    0.5, torch.sigmoid)
    target = sample["target"]
    expected = reference.gather(2, target.unsqueeze(-1)).squeeze(-1)
    scored = target.ne(pad)
    full = EvalMemory(options, pad).log_probs(model.decoder, net_output, sample)
    torch.testing.assert_close(full[scored].double(), reference[scored], rtol=1e-5, atol=1e-5)
    fast = EvalMemory(options, pad).target_log_probs(model.decoder, net_output, sample, options)
    torch.testing.assert_close(fast[scored].double(), expected[scored], rtol=1e-5, atol=1e-5)


def test_per_row_lambda_equals_one_lambda_and_is_checked():
    from trime_fairseq.memory.mixing import interpolate, interpolate_memory

    torch.manual_seed(0)
    log_p = torch.log_softmax(torch.randn(4, 7), -1)
    scores, values = torch.randn(4, 3), torch.randint(0, 7, (4, 3))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    lam = torch.tensor([0.3, 0.3, 0.0, 1.0])
    rows = interpolate_memory(log_p, scores, values, mask, lam)
    for q, one in enumerate(lam.tolist()):
        torch.testing.assert_close(rows[q], interpolate_memory(log_p, scores, values, mask, one)[q])
    log_q = torch.log_softmax(torch.randn(4, 7), -1)
    has = mask.any(-1)
    mixed = interpolate(log_p, log_q, lam, has)
    for q, one in enumerate(lam.tolist()):
        torch.testing.assert_close(mixed[q], interpolate(log_p, log_q, one, has)[q])
    for bad in (torch.tensor([0.1, 1.2, 0.0, 0.0]), torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError):
            interpolate_memory(log_p, scores, values, mask, bad)
