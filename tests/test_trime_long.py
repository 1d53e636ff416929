"""TRIMELM_long: consecutive-segment batching, trime_long_loss, evaluation with a long-term memory.

Every computation is checked against a naive reference (explicit loops, double
precision) that builds the memory entry by entry; the CLI test trains a tiny model
with trime_long_loss and evaluates it with long memories of two sizes.
"""

import math
import re

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, copy_first_lines, run_cli
from fairseq.data import Dictionary, ListDataset, MonolingualDataset, TokenBlockDataset
from fairseq.sequence_scorer import SequenceScorer
from tiny_models import lm_sample, row_gradient, tiny_lm, trime_criterion

from trime_fairseq.criterions.trime_long_loss import TrimeLongLoss
from trime_fairseq.data.consecutive import batches_for_epoch, segment_dataset
from trime_fairseq.memory.documents import DocumentBoundaries
from trime_fairseq.data.segments import plan_runs
from trime_fairseq.memory.blockwise import causal_target_memory
from trime_fairseq.memory.eval_memory import EvalMemory, MemoryOptions
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY, ensure_key_capture
from trime_fairseq.memory.mixing import joint_target_log_prob
from trime_fairseq.memory.ring_buffer import RingBuffer
from trime_fairseq.memory.sources import causal_memory, dot_scale
from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def heading_dictionary(words: int = 12) -> Dictionary:
    d = Dictionary()
    for i in range(words):
        d.add_symbol(f"w{i}")
    d.add_symbol("=")
    return d


def make_task(tokens_per_sample: int = 8, dictionary=None, **options) -> TrimeLMTask:
    cfg = TrimeLMConfig(tokens_per_sample=tokens_per_sample, **options)
    return TrimeLMTask(cfg, dictionary or heading_dictionary())


def long_criterion(task, block: int = 0) -> TrimeLongLoss:
    return TrimeLongLoss(task, 0.0, None, 0, False, block)


def random_lines(d: Dictionary, n_lines: int, seed: int, headings: bool = False, types: int = 5):
    """Lines of token ids (no eos) over a few word types; with ``headings`` some lines are
    WikiText headings '= w =' (a new document) or sub-headings '= = w = ='."""
    g = np.random.default_rng(seed)
    eq = d.index("=")
    lines = []
    for i in range(n_lines):
        words = list(d.nspecial + g.integers(0, types, size=int(g.integers(1, 7))))
        if headings and i % 6 == 1:
            words = [eq, words[0], eq]
        elif headings and i % 6 == 4:
            words = [eq, eq, words[0], eq, eq]
        lines.append(words)
    return lines


def stream_dataset(task, lines):
    """fairseq's language-modeling split over ``lines``: blocks of tokens_per_sample, break mode none."""
    d = task.dictionary
    tensors = [torch.tensor(line + [d.eos()], dtype=torch.long) for line in lines]
    sizes = np.array([len(t) for t in tensors])
    blocks = TokenBlockDataset(
        ListDataset(tensors, sizes), sizes, task.args.tokens_per_sample, d.pad(), d.eos(),
        break_mode="none", include_targets=True,
    )
    return MonolingualDataset(blocks, blocks.sizes, d, d, add_eos_for_other_targets=False, shuffle=True,
                              targets=["future"])


def eval_samples(task, lines, batch_size: int, context_window: int = 0):
    """The batches fairseq-eval-lm scores (same task.eval_lm_dataloader), in its order."""
    itr = task.eval_lm_dataloader(stream_dataset(task, lines), max_tokens=100000, batch_size=batch_size,
                                  context_window=context_window, num_workers=0)
    return [s for s in itr if s]


def score_stream(model, task, samples, softmax_batch=None):
    """Positional log-probabilities of every scored token, in stream order (SequenceScorer)."""
    scorer = SequenceScorer(task.target_dictionary, softmax_batch)
    out = []
    for sample in samples:
        out += [h[0]["positional_scores"] for h in scorer.generate([model], sample)]
    return torch.cat(out)


def stream_tokens(lines, eos):
    return np.array([t for line in lines for t in line + [eos]], dtype=np.int64)


def reference_stream_scores(model, samples, pad, opt: MemoryOptions, doc_starts=None):
    """Single pass over the whole stream with explicit loops.

    Entries (key, next token) of every scored token are recorded in stream order with the
    key of the row that scored it; the memory of a scored token is then built entry by
    entry: earlier positions of its row (context included), plus recorded stream entries
    at positions [s - N, s - c) (s: first scored position of the row, c: its context),
    limited to the token's document when ``doc_starts`` is given (the latest start before it).
    """
    key_name = TRIME_KEY if opt.mode == "trime" else TRIME_FEATURE
    rows, records = [], []
    pos = 0
    for sample in samples:
        with torch.no_grad():
            out = model(**sample["net_input"])
        src, tgt = sample["net_input"]["src_tokens"], sample["target"]
        starts = sample.get("start_indices", [0] * src.size(0))
        for i in range(src.size(0)):
            c, length = int(starts[i]), int(src[i].ne(pad).sum())
            assert tgt[i, :c].eq(pad).all() and tgt[i, c:length].ne(pad).all() and tgt[i, length:].eq(pad).all()
            values = [int(src[i, j + 1]) if j + 1 < length else int(tgt[i, j]) for j in range(length)]
            keys = out[1][key_name][i]
            rows.append(dict(logits=out[0][i], keys=keys, values=values, c=c, length=length, s=pos,
                             targets=tgt[i]))
            for j in range(c, length):
                records.append((keys[j], int(tgt[i, j])))
                pos += 1
    scores = []
    for row in rows:
        keys, c, s = row["keys"], row["c"], row["s"]
        d = keys.size(-1)
        for j in range(c, row["length"]):
            p = s + (j - c)
            # the latest document start strictly before p (a start b is known from b + 1 on)
            doc = -1 if doc_starts is None else int(doc_starts[doc_starts < max(p, 1)].max())
            memory = [(keys[jj], row["values"][jj]) for jj in range(j) if s - c + jj >= doc]
            memory += [records[q] for q in range(max(s - opt.long_memory_size, doc, 0), s - c)]
            logits = row["logits"][j].double()
            target = int(row["targets"][j])
            if opt.mode == "trime":
                sims = [torch.dot(keys[j], k) / (math.sqrt(d) * opt.memory_temperature) for k, _ in memory]
                num = torch.exp(logits[target]) + sum((torch.exp(x) for x, (_, v) in zip(sims, memory) if v == target),
                                                      torch.tensor(0.0, dtype=torch.float64))
                den = torch.exp(logits).sum() + sum((torch.exp(x) for x in sims), torch.tensor(0.0, dtype=torch.float64))
                scores.append(torch.log(num / den))
            else:
                p_lm = torch.softmax(logits, -1)[target]
                if memory:
                    w = torch.stack([torch.exp(opt.cache_theta * torch.dot(keys[j], k)) for k, _ in memory])
                    q = sum(wi for wi, (_, v) in zip(w, memory) if v == target) / w.sum()
                    scores.append(torch.log((1 - opt.cache_lambda) * p_lm + opt.cache_lambda * q))
                else:
                    scores.append(torch.log(p_lm))
    return torch.stack(scores), torch.tensor([v for _, v in records])


# ----------------------------------------------------------------------------------------------
# evaluation with a long-term memory
# ----------------------------------------------------------------------------------------------

EVAL_CASES = [
    # (options, batch size, context window, softmax batch)
    (dict(eval_memory="trime", memory_temperature=0.7, long_memory_size=13), 3, 0, None),
    (dict(eval_memory="trime", memory_temperature=0.7, long_memory_size=13), 2, 4, 7),
    (dict(eval_memory="trime", long_memory_size=40), 1, 3, None),
    (dict(eval_memory="trime", long_memory_size=6), 3, 0, 5),
    (dict(eval_memory="cache", cache_lambda=0.3, cache_theta=0.5, long_memory_size=11), 2, 4, None),
    (dict(eval_memory="cache", cache_lambda=0.3, cache_theta=0.5, long_memory_size=11), 3, 0, 4),
]


@pytest.mark.parametrize("options,batch_size,context,softmax_batch", EVAL_CASES)
def test_long_memory_across_batches_equals_single_pass_reference(options, batch_size, context, softmax_batch):
    task = make_task(tokens_per_sample=8, **options)
    model = tiny_lm(task).eval()
    lines = random_lines(task.dictionary, 30, seed=5)
    samples = eval_samples(task, lines, batch_size, context)
    assert len(samples) >= 3, "the stream must span several batches"
    ours = score_stream(model, task, samples, softmax_batch)
    expected, values = reference_stream_scores(model, samples, task.dictionary.pad(), task.trime_memory_options)
    assert torch.equal(values, torch.from_numpy(stream_tokens(lines, task.dictionary.eos())))  # whole stream, in order
    torch.testing.assert_close(ours, expected)
    local = score_stream(tiny_lm(make_task(8, eval_memory=options["eval_memory"])).eval(), task, samples)
    assert not torch.allclose(ours, local), "the long memory must change the scores"


def test_long_memory_within_context_window_adds_nothing():
    """Every stream token is in a memory at most once: with N <= C the row's context
    already holds the N tokens, so the scores equal the local memory's."""
    lines = random_lines(heading_dictionary(), 30, seed=6)
    for size in (0, 2, 4):
        task = make_task(8, eval_memory="trime", long_memory_size=size)
        samples = eval_samples(task, lines, 2, context_window=4)
        ours = score_stream(tiny_lm(task).eval(), task, samples)
        if size == 0:
            local = ours
        torch.testing.assert_close(ours, local)
    task = make_task(8, eval_memory="trime", long_memory_size=5)
    bigger = score_stream(tiny_lm(task).eval(), task, eval_samples(task, lines, 2, context_window=4))
    assert not torch.allclose(bigger, local)


@pytest.mark.parametrize("size,context", [(0, 0), (9, 0), (9, 3)])
def test_memory_reset_at_document_boundaries(size, context):
    task = make_task(8, eval_memory="trime", long_memory_size=size, memory_reset="document")
    model = tiny_lm(task).eval()
    lines = random_lines(task.dictionary, 36, seed=7, headings=True)
    samples = eval_samples(task, lines, 2, context)
    tokens = stream_tokens(lines, task.dictionary.eos())
    starts = DocumentBoundaries.from_dictionary(task.dictionary).starts_in_tokens(tokens)
    assert len(starts) == 1 + 6, "one document per '= w =' line (sub-headings are no boundary)"
    assert all(tokens[k - 1] == task.dictionary.index("=") and tokens[k - 2] == task.dictionary.eos() for k in starts[1:])
    ours = score_stream(model, task, samples, softmax_batch=5)
    expected, _ = reference_stream_scores(model, samples, task.dictionary.pad(), task.trime_memory_options, starts)
    torch.testing.assert_close(ours, expected)
    no_reset = make_task(8, eval_memory="trime", long_memory_size=size)
    assert not torch.allclose(ours, score_stream(tiny_lm(no_reset).eval(), no_reset, samples))


def test_tuning_path_reads_the_stream_and_advances_explicitly():
    """target_log_probs (tuning) + advance() give the scores of get_normalized_probs, for
    every memory size up to the buffer's, trime and cache, on one pass."""
    task = make_task(8, eval_memory="trime", long_memory_size=20)
    model = tiny_lm(task).eval()
    lines = random_lines(task.dictionary, 24, seed=8)
    samples = eval_samples(task, lines, 2, context_window=3)
    pad = task.dictionary.pad()
    points = [MemoryOptions("trime", memory_temperature=0.8, long_memory_size=n) for n in (0, 7, 20)]
    points.append(MemoryOptions("cache", cache_lambda=0.2, cache_theta=0.4, long_memory_size=9))
    memory = EvalMemory(MemoryOptions("trime", long_memory_size=20), pad, stream_keys=(TRIME_KEY, TRIME_FEATURE))
    got = {opt: [] for opt in points}
    for sample in samples:
        with torch.no_grad():
            net_output = model(**sample["net_input"])
        scored = sample["target"].ne(pad)
        for opt in points:
            got[opt].append(memory.target_log_probs(model.decoder, net_output, sample, opt)[scored])
        memory.advance(net_output, sample)
    for opt in points:
        expected, _ = reference_stream_scores(model, samples, pad, opt)
        torch.testing.assert_close(torch.cat(got[opt]), expected)
    with pytest.raises(ValueError, match="holds 20"):
        memory.target_log_probs(model.decoder, net_output, samples[0], MemoryOptions("trime", long_memory_size=21))


def test_stream_order_errors_and_explicit_reset():
    task = make_task(8, eval_memory="trime", long_memory_size=10)
    model = tiny_lm(task).eval()
    samples = eval_samples(task, random_lines(task.dictionary, 20, seed=9), 2, context_window=2)
    first = score_stream(model, task, samples)
    with pytest.raises(ValueError, match="out of order"):  # a second pass without reset
        score_stream(model, task, samples)
    model.trime_eval_memory.reset()
    torch.testing.assert_close(score_stream(model, task, samples), first)
    model.trime_eval_memory.reset()
    shuffled = dict(samples[0], id=samples[0]["id"].flip(0))
    with pytest.raises(ValueError, match="consecutive blocks"):
        score_stream(model, task, [shuffled])
    # the tuning path must advance before the next batch
    memory, opt = EvalMemory(task.trime_memory_options, task.dictionary.pad()), task.trime_memory_options
    with torch.no_grad():
        outputs = [model(**sample["net_input"]) for sample in samples[:2]]
    memory.target_log_probs(model.decoder, outputs[0], samples[0], opt)
    with pytest.raises(RuntimeError, match="advance"):
        memory.target_log_probs(model.decoder, outputs[1], samples[1], opt)


def test_option_errors_are_clear():
    with pytest.raises(ValueError, match="--long-memory-size has no effect with --eval-memory none"):
        make_task(8, long_memory_size=10)
    with pytest.raises(ValueError, match="give one of them"):
        make_task(8, eval_memory="cache", cache_size=5, long_memory_size=10)
    with pytest.raises(ValueError, match=">= 0"):
        make_task(8, eval_memory="trime", long_memory_size=-1)
    with pytest.raises(ValueError, match="unknown memory reset"):
        make_task(8, eval_memory="trime", memory_reset="sometimes")
    plain = Dictionary()
    plain.add_symbol("w0")
    with pytest.raises(ValueError, match="no '=' symbol"):
        tiny_lm(make_task(8, dictionary=plain, eval_memory="trime", memory_reset="document"))
    with pytest.raises(ValueError, match="--consecutive-segments needs --batching consecutive"):
        make_task(8, consecutive_segments=4)
    with pytest.raises(ValueError, match="shuffled"):
        long_criterion(make_task(8))


def test_ring_buffer_keeps_the_last_entries_and_windows_by_position():
    buf = RingBuffer(4)
    q = torch.randn(2, 3, dtype=torch.float64)
    assert buf.search(q, 1.0, torch.zeros(2, dtype=torch.long), torch.full((2,), 9)).mask.shape == (2, 0)
    keys = torch.randn(6, 3, dtype=torch.float64)
    buf.append(keys[:3], torch.arange(3), torch.arange(3))
    buf.append(keys[3:], torch.arange(3, 6), torch.arange(3, 6))  # wraps: keeps positions 2..5
    assert sorted(buf.positions.tolist()) == [2, 3, 4, 5] and buf.size == 4
    found = buf.search(q, 0.5, torch.tensor([0, 4]), torch.tensor([4, 6]))
    for r, (lo, hi) in enumerate([(0, 4), (4, 6)]):
        visible = {int(p) for p, m in zip(buf.positions, found.mask[r]) if m}
        assert visible == set(range(max(lo, 2), hi))
        for slot in range(4):
            p = int(buf.positions[slot])
            torch.testing.assert_close(found.scores[r, slot], 0.5 * torch.dot(q[r], keys[p]))
            assert int(found.values[0, slot]) == p
    buf.reset()
    assert buf.size == 0 and not buf.search(q, 1.0, torch.zeros(2, dtype=torch.long), torch.full((2,), 9)).mask.any()
    with pytest.raises(ValueError, match="dimension"):
        buf.append(torch.randn(1, 5), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# consecutive-segment batching
# ----------------------------------------------------------------------------------------------


def data_task(data, seg_len=64, m=4, **options) -> TrimeLMTask:
    """A trime_lm task on binarized data, in process (the interpolated fields set by hand)."""
    cfg = TrimeLMConfig(
        data=str(data), tokens_per_sample=seg_len, batching="consecutive", consecutive_segments=m,
        dataset_impl="mmap", use_plasma_view=False, plasma_path=None, seed=1, batch_size=None,
        batch_size_valid=None, data_buffer_size=0, tpu=False, **options,
    )
    task = TrimeLMTask.setup_task(cfg)
    task.load_dataset("train")
    return task


def epoch_batches(task, epoch=1, seed=3, num_shards=1, shard_id=0, state=None, batch_size=8):
    itr = task.get_batch_iterator(task.dataset("train"), max_sentences=batch_size, seed=seed, epoch=epoch,
                                  num_shards=num_shards, shard_id=shard_id, num_workers=0)
    if state is not None:
        itr.load_state_dict(state)
    return itr, itr.next_epoch_itr(shuffle=True)


def check_runs(batch, segments, doc_starts, tokens, pad, eos):
    """Every group of m rows is one run: m consecutive segments of one document, in order;
    the rows hold exactly the stream's tokens (source = target shifted by one)."""
    m, ids = segments.m, batch["id"].tolist()
    src, tgt = batch["net_input"]["src_tokens"], batch["target"]
    assert batch["segments_per_run"] == m and len(ids) % m == 0
    doc_end = np.append(doc_starts[1:], len(tokens))
    for r in range(len(ids) // m):
        run = ids[r * m : (r + 1) * m]
        assert run == list(range(run[0], run[0] + m)) and run[0] % m == 0
        ranges = segments.segments[run]
        doc = np.searchsorted(doc_starts, ranges[0, 0], side="right") - 1
        assert ranges[0, 0] == doc_starts[doc] or (ranges[0, 0] - doc_starts[doc]) % (m * len(src[0])) >= 0
        for j, (s, e) in enumerate(ranges):
            row = r * m + j
            if j > 0:
                assert s == ranges[j - 1][1], "consecutive in the stream"
            if s == e:  # filler: only after the document's end
                assert e == doc_end[doc] and src[row, 0] == eos and tgt[row].eq(pad).all()
                continue
            assert doc_starts[doc] <= s < e <= doc_end[doc], "one document"
            assert torch.equal(tgt[row, : e - s], torch.from_numpy(tokens[s:e].astype(np.int64)))
            prev = tokens[s - 1 : e - 1] if s > 0 else np.concatenate([[eos], tokens[: e - 1]])
            assert torch.equal(src[row, : e - s], torch.from_numpy(prev.astype(np.int64)))
            assert tgt[row, e - s :].eq(pad).all()


def test_document_starts_are_the_wikitext_headings(wikitext2_bin, wikitext2_raw):
    task = data_task(wikitext2_bin)
    segments = segment_dataset(task, task.dataset("train"))
    tokens = segments.stream.tokens
    starts = DocumentBoundaries.from_dictionary(task.dictionary).starts_in_tokens(tokens)
    with open(wikitext2_raw / "wiki.train.tokens", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(3000), f)]
    headings = [line for line in lines if re.fullmatch(r" = [^=].* = \n", line)]
    assert len(starts) == 1 + len(headings) > 5
    eq, eos = task.dictionary.index("="), task.dictionary.eos()
    for k in starts[1:]:
        assert tokens[k - 1] == eq and tokens[k - 2] == eos and tokens[k] != eq


def test_every_segment_once_per_epoch_in_runs_of_one_document(wikitext2_bin):
    task = data_task(wikitext2_bin)
    segments = segment_dataset(task, task.dataset("train"))
    tokens = segments.stream.tokens
    d = task.dictionary
    doc_starts = DocumentBoundaries.from_dictionary(d).starts_in_tokens(tokens)
    _, itr = epoch_batches(task)
    seen = []
    for batch in itr:
        check_runs(batch, segments, doc_starts, tokens, d.pad(), d.eos())
        seen += batch["id"].tolist()
    assert sorted(seen) == list(range(len(segments))), "every segment (and filler) exactly once"
    real = segments.segments[~segments.is_filler]
    order = np.argsort(real[:, 0])
    assert real[order[0], 0] == 0 and real[order[-1], 1] == len(tokens)
    assert np.array_equal(real[order[1:], 0], real[order[:-1], 1]), "the segments tile the stream"
    assert (real[:, 1] - real[:, 0]).max() == 64


def test_order_changes_every_epoch_and_replays_after_resume(wikitext2_bin):
    task = data_task(wikitext2_bin)
    ids = {}
    for epoch in (1, 2):
        _, itr = epoch_batches(task, epoch=epoch)
        ids[epoch] = [b["id"].tolist() for b in itr]
    assert ids[1] != ids[2] and sorted(sum(ids[1], [])) == sorted(sum(ids[2], []))
    # resume from a checkpointed iterator state, with a fresh task (as fairseq-train after a restart)
    first, itr = epoch_batches(task, epoch=1)
    consumed = [next(itr)["id"].tolist() for _ in range(3)]
    state = first.state_dict()
    assert consumed == ids[1][:3]
    _, resumed = epoch_batches(data_task(wikitext2_bin), epoch=state["epoch"], state=state)
    assert [b["id"].tolist() for b in resumed] == ids[1][3:]
    # two workers: whole runs each, together every segment once
    shard_ids = []
    for shard in (0, 1):
        _, itr = epoch_batches(task, num_shards=2, shard_id=shard)
        for batch in itr:
            if batch:
                assert len(batch["id"]) % 4 == 0
                shard_ids += batch["id"].tolist()
    assert sorted(shard_ids) == sorted(sum(ids[1], []))


def test_cross_documents_cuts_the_whole_stream(wikitext2_bin):
    task = data_task(wikitext2_bin, seg_len=64, m=3, cross_documents=True)
    segments = segment_dataset(task, task.dataset("train"))
    total = len(segments.stream)
    assert np.array_equal(segments.segments[:, 0], np.minimum(np.arange(len(segments)) * 64, total))
    assert int(segments.is_filler.sum()) < 3
    with pytest.raises(ValueError, match="cannot hold a run"):
        epoch_batches(task, batch_size=2)


def test_plan_runs_fills_the_last_run_of_each_document():
    runs = plan_runs(np.array([0, 5, 7]), 20, seg_len=3, m=2)
    assert runs.tolist() == [
        [[0, 3], [3, 5]], [[5, 7], [7, 7]], [[7, 10], [10, 13]], [[13, 16], [16, 19]], [[19, 20], [20, 20]],
    ]


# ----------------------------------------------------------------------------------------------
# trime_long_loss
# ----------------------------------------------------------------------------------------------


def run_sample(task, m=2, runs=2, tsz=6, seed=1):
    """Rows of runs of m consecutive segments: the last run ends early (padding, then a filler row)."""
    sample = lm_sample(task, bsz=m * runs, tsz=tsz, seed=seed, distinct=5)
    pad, eos = task.dictionary.pad(), task.dictionary.eos()
    sample["net_input"]["src_tokens"][-2, -2:] = pad
    sample["target"][-2, -2:] = pad
    sample["net_input"]["src_tokens"][-1] = pad
    sample["net_input"]["src_tokens"][-1, 0] = eos
    sample["target"][-1] = pad
    sample["segments_per_run"] = m
    return sample


def naive_run_losses(logits, keys, target, pad, m):
    """Eq. 5 with the memory of Eq. 2 + 3, built with loops: position t of segment i of a run
    sees every earlier valid position of segments 1..i of the run. Returns (B, T)."""
    bsz, tsz, _ = logits.shape
    d = keys.size(-1)
    out = torch.zeros(bsz, tsz, dtype=torch.float64)
    for row in range(bsz):
        first = row - row % m
        for t in range(tsz):
            if target[row, t] == pad:
                continue
            num = torch.exp(logits[row, t, target[row, t]])
            den = torch.exp(logits[row, t]).sum()
            for r in range(first, row + 1):
                for j in range(tsz if r < row else t):
                    if target[r, j] == pad:
                        continue
                    e = torch.exp(torch.dot(keys[row, t], keys[r, j]) / math.sqrt(d))
                    den = den + e
                    if target[r, j] == target[row, t]:
                        num = num + e
            out[row, t] = -torch.log(num / den)
    return out


@pytest.mark.parametrize("block", [0, 5])
def test_long_loss_and_gradient_equal_naive_reference(block):
    task = make_task(6, batching="consecutive", consecutive_segments=2)
    model = tiny_lm(task)
    sample = run_sample(task)
    pad = task.dictionary.pad()
    crit = long_criterion(task, block)
    model.zero_grad()
    trime, _, _, valid = crit.token_losses(model, sample)
    trime.masked_fill(~valid, 0).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    ensure_key_capture(model)
    out = model(**sample["net_input"])
    reference = naive_run_losses(out[0], out[1][TRIME_KEY], sample["target"], pad, 2)
    reference.sum().backward()
    torch.testing.assert_close(trime.masked_fill(~valid, 0).view_as(reference), reference)
    for name, param in model.named_parameters():
        zero = torch.zeros_like(param)
        torch.testing.assert_close(ours.get(name, zero), param.grad if param.grad is not None else zero, msg=name)
    local, _, _, _ = trime_criterion(task).token_losses(model, sample)
    assert not torch.allclose(local, trime), "the earlier segments must be in memory"


def test_gradient_reaches_the_earlier_segments():
    """The loss of a run's second segment reaches the first segment's representations
    (only through the memory: rows do not attend to each other)."""
    task = make_task(6, batching="consecutive", consecutive_segments=2)
    model = tiny_lm(task)
    sample = run_sample(task, runs=2)  # run 0: rows 0, 1
    grads = {name: row_gradient(model, crit, sample, loss_row=1, grad_row=0)
             for name, crit in [("long", long_criterion(task)), ("local", trime_criterion(task))]}
    assert grads["long"] > 0 and grads["local"] == 0


def test_blockwise_memory_equals_dense():
    torch.manual_seed(0)
    r, s, d = 2, 11, 4
    keys = torch.randn(r, s, d, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (r, s))
    valid = torch.rand(r, s) > 0.2
    token = torch.randn(r, s, dtype=torch.float64)
    lse = token + torch.rand(r, s, dtype=torch.float64)
    scale = dot_scale(d)

    def loss_of(memory):
        log_p = joint_target_log_prob(token, lse, *memory, target)
        in_memory = (memory.mask & (memory.values == target.unsqueeze(-1))).any(-1)
        grad = torch.autograd.grad(log_p.masked_fill(~valid, 0).sum(), keys)[0]
        return log_p, in_memory, grad

    dense = loss_of(causal_memory(keys, keys, target, valid, scale))
    for block in (1, 4, 11, 20):
        blocked = loss_of(causal_target_memory(keys, keys, target, valid, target, scale, block))
        for ours, ref in zip(blocked, dense):
            torch.testing.assert_close(ours, ref)
    with torch.no_grad():  # inference: no checkpointing, same values
        torch.testing.assert_close(
            joint_target_log_prob(token, lse, *causal_target_memory(keys, keys, target, valid, target, scale, 3), target),
            dense[0],
        )


def test_criterion_needs_runs():
    task = make_task(6, batching="consecutive", consecutive_segments=2)
    sample = lm_sample(task, bsz=2, tsz=4)
    with pytest.raises(ValueError, match="segments_per_run"):
        long_criterion(task).token_losses(tiny_lm(task), sample)
    with pytest.raises(ValueError, match="memory block size"):
        causal_target_memory(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long),
                             torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.long), 1.0, 0)


# ----------------------------------------------------------------------------------------------
# end to end: fairseq-train with trime_long_loss, fairseq-eval-lm with long memories
# ----------------------------------------------------------------------------------------------


def _loss(output: str) -> float:
    found = re.findall(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", output)
    assert found, output[-2000:]
    return float(found[-1][0])


def test_cli_train_long_loss_then_evaluate_with_long_memory(wikitext2_bin, tmp_path):
    """fairseq-train (consecutive batching, trime_long_loss, blockwise memory), then
    fairseq-eval-lm with a long memory, and the sweep (sizes 0 and 1024 in one pass)
    reproducing fairseq-eval-lm's number."""
    from trime_fairseq.cli import sweep_memory

    save = tmp_path / "ckpt"
    train = run_cli([
        PYTHON, "-m", "fairseq_cli.train", wikitext2_bin, "--user-dir", ROOT / "trime_fairseq",
        "--task", "trime_lm", "--batching", "consecutive", "--consecutive-segments", "4",
        "--tokens-per-sample", "64", "--batch-size", "8", "--arch", "transformer_lm",
        "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
        "--decoder-attention-heads", "2", "--criterion", "trime_long_loss", "--ce-warmup-updates", "0",
        "--memory-block-size", "128", "--optimizer", "adam", "--lr", "0.002", "--max-update", "8",
        "--max-valid-steps", "2", "--cpu", "--num-workers", "0", "--save-dir", save, "--no-epoch-checkpoints",
        "--log-format", "simple", "--log-interval", "4", "--seed", "2",
    ], env={"OMP_NUM_THREADS": "1"})
    assert "consecutive batching" in train and (save / "checkpoint_last.pt").exists()
    valid = copy_first_lines(wikitext2_bin, tmp_path / "valid-120", {"valid": 120})
    eval_args = [
        str(valid), "--user-dir", str(ROOT / "trime_fairseq"), "--path", str(save / "checkpoint_last.pt"),
        "--task", "trime_lm", "--eval-memory", "trime", "--memory-temperature", "1.0",
        "--tokens-per-sample", "64", "--context-window", "32", "--batch-size", "4", "--gen-subset", "valid",
        "--cpu", "--num-workers", "0",
    ]
    out = run_cli([PYTHON, "-m", "fairseq_cli.eval_lm", *eval_args, "--long-memory-size", "1024"],
                  env={"OMP_NUM_THREADS": "1"})
    loss = _loss(out)
    out_dir = tmp_path / "sweep"
    results = sweep_memory.main([*eval_args, "--sizes", "0,1024", "--out-dir", str(out_dir)])
    swept = {r["long_memory_size"]: r["loss_base2"] for r in results["TRIMELM_long"]}
    assert abs(swept[1024] - loss) < 1e-4, "the sweep's one pass must equal fairseq-eval-lm"
    assert math.isfinite(swept[0]) and swept[0] != swept[1024]
    rows = [line.split(",") for line in (out_dir / "sweep.csv").read_text().splitlines()[1:]]
    assert [int(r[1]) for r in rows] == [0, 1024]
    import json

    data = json.loads((out_dir / "sweep.json").read_text())
    assert data["split"] == "valid" and [r["long_memory_size"] for r in data["results"]["TRIMELM_long"]] == [0, 1024]
    assert (out_dir / "sweep.png").stat().st_size > 1000 and "| 1024 |" in (out_dir / "sweep.md").read_text()


# ----------------------------------------------------------------------------------------------
# configs/trime_long: the architecture fairseq-hydra-train builds is the named one
# ----------------------------------------------------------------------------------------------

LONG_CONFIGS = sorted((ROOT / "configs" / "trime_long").glob("*.yaml"))


@pytest.mark.parametrize("path", LONG_CONFIGS, ids=lambda p: p.stem)
def test_long_config_builds_the_named_architecture(path):
    """fairseq-hydra-train fills the model node with transformer_lm's dataclass defaults
    (fairseq.dataclass.initialize.add_defaults) before the architecture function runs, which
    then keeps them: every size the architecture sets must be what the config holds.
    (tests/test_configs.py composes every config through hydra itself.)"""
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.models.transformer_lm import TransformerLanguageModelConfig
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(path)
    arch = cfg.model._name
    model = OmegaConf.merge(OmegaConf.structured(TransformerLanguageModelConfig), cfg.model)
    root = {"task": {"add_bos_token": False, "tokens_per_sample": 512, "max_target_positions": None},
            "common": {"tpu": False}}  # what the model node's interpolations point to
    built = OmegaConf.merge(root, {"model": model}).model
    expected = Namespace()
    ARCH_CONFIG_REGISTRY[arch](expected)
    with open_dict(built):
        ARCH_CONFIG_REGISTRY[arch](built)

    def same(a, b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return float(a) == float(b)
        return str(a) == str(b)

    shape = ["decoder_layers", "decoder_embed_dim", "decoder_input_dim", "decoder_output_dim",
             "decoder_ffn_embed_dim", "decoder_attention_heads", "decoder_normalize_before", "no_decoder_final_norm",
             "dropout", "attention_dropout", "activation_dropout", "activation_fn", "adaptive_input",
             "adaptive_input_cutoff", "adaptive_input_factor", "adaptive_softmax_cutoff", "adaptive_softmax_factor",
             "adaptive_softmax_dropout", "tie_adaptive_weights", "tie_adaptive_proj", "share_decoder_input_output_embed"]
    for name in shape:
        value = getattr(expected, name, None)
        if value is not None:
            assert same(built[name], value), f"{arch}.{name}: config gives {built[name]}, the architecture {value}"
    assert cfg.task.batching == "consecutive" and cfg.criterion._name == "trime_long_loss"
    m, seg = cfg.task.consecutive_segments, cfg.task.tokens_per_sample
    assert cfg.dataset.batch_size % m == 0 and cfg.dataset.max_tokens >= m * seg


def test_impossible_memory_sizes_and_empty_splits_are_clear_errors(tmp_path):
    task = make_task(8, eval_memory="trime", long_memory_size=10**12)
    lines = random_lines(task.dictionary, 6, seed=3)
    with pytest.raises(ValueError, match="--long-memory-size 1000000000000 exceeds the 3[0-9] tokens"):
        eval_samples(task, lines, 2)
    # an empty binarized split: the file and the split are named (fairseq fails inside numpy's mmap)
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

    d = heading_dictionary()
    d.save(str(tmp_path / "dict.txt"))
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "valid.bin"), dtype=np.uint16)
    builder.finalize(str(tmp_path / "valid.idx"))
    cfg = TrimeLMConfig(data=str(tmp_path), tokens_per_sample=8, dataset_impl="mmap", use_plasma_view=False,
                        plasma_path=None, seed=1, batch_size=None, batch_size_valid=None, data_buffer_size=0,
                        tpu=False)
    empty_task = TrimeLMTask.setup_task(cfg)
    with pytest.raises(ValueError, match=r"split 'valid' is empty: .*valid\.bin holds no tokens"):
        empty_task.load_dataset("valid")
