"""Causality of every evaluation memory bound, by perturbation.

For a stream scored by fairseq-eval-lm's batches (several batches, context windows,
--softmax-batch chunks), changing the target of position t (= the next input token)
must leave the whole distribution of position t unchanged: its in-row memory, its
long-term (stream) memory and its document bound may depend on x_1..x_t only.
The perturbed positions include WikiText headings, where a document bound is
decided (turning `= Title =` into a sub-heading `= = ...` and back).
"""

import numpy as np
import pytest
import torch
from test_trime_long import eval_samples, heading_dictionary, make_task, random_lines
from tiny_models import tiny_lm

from trime_fairseq.memory.documents import DocumentBoundaries


def stream_distributions(model, samples, pad, softmax_batch=None):
    """(S, V) log-probabilities of every scored position, in stream order (blocks by sample id),
    computed as fairseq's SequenceScorer calls get_normalized_probs (chunks of the flat positions)."""
    rows = {}
    for sample in samples:
        with torch.no_grad():
            out = model(**sample["net_input"])
        target = sample["target"]
        if softmax_batch is None:
            probs = model.get_normalized_probs(out, True, sample)
            probs = probs.reshape(-1, probs.size(-1))
        else:
            flat = out[0].reshape(1, -1, out[0].size(-1))
            flat_target = target.reshape(1, -1)
            chunks = []
            for s in range(0, flat.size(1), softmax_batch):
                chunk = dict(sample, target=flat_target[:, s : s + softmax_batch])
                part = model.get_normalized_probs((flat[:, s : s + softmax_batch],) + tuple(out[1:]), True, chunk)
                chunks.append(part.reshape(-1, part.size(-1)))
            probs = torch.cat(chunks)
        probs = probs.view(*target.shape, -1)
        for b, block in enumerate(sample["id"].tolist()):
            rows[block] = probs[b][target[b].ne(pad)]
    return torch.cat([rows[block] for block in sorted(rows)])


def lines_of(tokens, eos):
    lines, line = [], []
    for t in tokens.tolist():
        if t == eos:
            lines.append(line)
            line = []
        else:
            line.append(t)
    return lines


def score(task, lines, batch_size, context, softmax_batch):
    model = tiny_lm(task).eval()
    samples = eval_samples(task, lines, batch_size, context)
    return stream_distributions(model, samples, task.dictionary.pad(), softmax_batch)


def perturbation_positions(tokens, d):
    """Stream positions t (entries; tokens[t] is t's target) to perturb, with the new target:
    headings first -- turning a document start into a sub-heading and back -- then others."""
    eq, eos = d.index("="), d.eos()
    out = []
    for t in range(2, len(tokens) - 1):
        if tokens[t - 1] == eq and tokens[t - 2] == eos and tokens[t] != eos:
            out.append((t, eq if tokens[t] != eq else d.nspecial))  # '= w' <-> '= ='
    g = np.random.default_rng(0)
    others = [t for t in g.choice(np.arange(1, len(tokens) - 1), size=12, replace=False) if tokens[t] != eos]
    out += [(int(t), d.nspecial + (int(tokens[t]) - d.nspecial + 1) % 5) for t in others]
    return out


CASES = [
    # (task options, batch size, context window, softmax batch)
    (dict(eval_memory="trime", long_memory_size=9, memory_reset="document"), 2, 3, 5),
    (dict(eval_memory="trime", long_memory_size=9, memory_reset="document"), 3, 0, None),
    (dict(eval_memory="cache", cache_lambda=0.3, cache_theta=0.5, long_memory_size=11, memory_reset="document"),
     2, 0, 7),
    (dict(eval_memory="trime", memory_reset="document"), 2, 4, None),
    (dict(eval_memory="cache", cache_lambda=0.3, cache_theta=0.5, cache_size=3), 2, 4, 6),
    (dict(eval_memory="trime"), 3, 0, None),
]


@pytest.mark.parametrize("options,batch_size,context,softmax_batch", CASES)
def test_a_position_never_sees_its_own_target(options, batch_size, context, softmax_batch):
    task = make_task(tokens_per_sample=8, **options)
    d = task.dictionary
    lines = random_lines(d, 30, seed=11, headings=True)
    tokens = np.array([t for line in lines for t in line + [d.eos()]], dtype=np.int64)
    base = score(task, lines, batch_size, context, softmax_batch)
    assert base.size(0) == len(tokens)
    positions = perturbation_positions(tokens, d)
    assert len(positions) >= 15 and sum(tokens[t - 1] == d.index("=") for t, _ in positions) >= 5
    changed_later = 0
    for t, new in positions:
        perturbed = tokens.copy()
        perturbed[t] = new
        got = score(task, lines_of(perturbed, d.eos()), batch_size, context, softmax_batch)
        torch.testing.assert_close(got[: t + 1], base[: t + 1], msg=lambda m: f"position {t}: {m}")
        changed_later += int(not torch.allclose(got[t + 1 :], base[t + 1 :]))
    assert changed_later >= len(positions) // 2, "the perturbation must reach later positions"


def test_document_bounds_follow_the_inputs():
    """A heading read as an input moves the bound from the next position on, not at the
    heading's own position (whose target decides whether it is a document start)."""
    task = make_task(tokens_per_sample=64, eval_memory="trime", long_memory_size=4, memory_reset="document")
    d = task.dictionary
    eq, eos, w = d.index("="), d.eos(), d.nspecial
    lines = [[w, w + 1], [eq, w + 2, eq], [w + 3, w + 1]]
    tokens = np.array([t for line in lines for t in line + [eos]])
    starts = DocumentBoundaries.from_dictionary(d).starts_in_tokens(tokens)
    b = int(np.flatnonzero(tokens == w + 2)[0])  # the entry that reads '=' and predicts the title
    assert starts.tolist() == [0, b]
    memory = tiny_lm(task).eval().trime_eval_memory
    samples = eval_samples(task, lines, 1)
    from trime_fairseq.memory.stream import StreamBatch

    sample = samples[0]
    batch = StreamBatch([0], sample["net_input"]["src_tokens"], torch.zeros(1, dtype=torch.long), 0, d.pad(), 0,
                        d.pad())
    bounds = batch.query_doc_bounds(memory.documents)
    assert bounds[: b + 1].tolist() == [0] * (b + 1)  # up to the heading itself: the previous document
    assert bounds[b + 1 :].tolist() == [b] * (len(tokens) - b - 1)
