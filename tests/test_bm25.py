"""BM25 scoring (against rank_bm25 and the formula), blockwise top-k, pruning, chaining, order file,
fairseq segments and the ``bm25`` batching."""

import math
import os

import numpy as np
import pytest
import rank_bm25

from trime_fairseq.data.bm25 import (
    TopKScorer,
    bm25_params,
    bm25_topk,
    bm25_weights,
    document_frequency,
    greedy_chain,
    kept_terms,
    offsets_of,
    read_order_file,
    score_matrix,
    term_counts,
    write_order_file,
)


def _corpus(n=40, vocab=60, seed=0, max_len=50):
    """Zipfian segments with repeated terms, a few empty ones, and a term in every segment."""
    rng = np.random.default_rng(seed)
    segs = []
    for i in range(n):
        length = 0 if i in (5, 17) else int(rng.integers(1, max_len))
        s = (rng.zipf(1.4, size=length) % (vocab - 1)) + 1
        segs.append(np.concatenate([s, [0]]) if i % 3 else s)  # term 0: in 2/3 of the segments (negative idf)
    return segs


def _okapi_reference(segs):
    model = rank_bm25.BM25Okapi([[int(t) for t in s] for s in segs])
    return np.array([model.get_scores([int(t) for t in s]) for s in segs])


def _lucene_reference(segs, k1=0.9, b=0.4):
    """The Lucene >= 8 formula, term by term (queries repeat terms)."""
    n = len(segs)
    tfs = [{} for _ in segs]
    for tf, s in zip(tfs, segs):
        for t in s:
            tf[int(t)] = tf.get(int(t), 0) + 1
    avgdl = sum(len(s) for s in segs) / n
    df = {}
    for tf in tfs:
        for t in tf:
            df[t] = df.get(t, 0) + 1
    out = np.zeros((n, n))
    for i, q in enumerate(segs):
        for j, tf in enumerate(tfs):
            for t in q:
                f = tf.get(int(t), 0)
                idf = math.log(1 + (n - df[int(t)] + 0.5) / (df[int(t)] + 0.5))
                out[i, j] += idf * f / (f + k1 * (1 - b + b * len(segs[j]) / avgdl))
    return out


def _matrices(segs, variant, vocab=60, **kw):
    tokens, offsets = offsets_of(segs)
    counts = term_counts(tokens, offsets, vocab)
    weights, idf = bm25_weights(counts, bm25_params(variant, **kw))
    return counts, weights, idf


def test_okapi_scores_equal_rank_bm25():
    segs = _corpus()
    counts, weights, idf = _matrices(segs, "okapi")
    assert idf[0] > 0 and (document_frequency(counts)[0] > len(segs) / 2)  # floored negative idf
    np.testing.assert_allclose(score_matrix(counts, weights), _okapi_reference(segs), rtol=1e-12, atol=1e-12)
    # other k1 / b pass through
    model = rank_bm25.BM25Okapi([[int(t) for t in s] for s in segs], k1=1.2, b=0.5)
    counts, weights, _ = _matrices(segs, "okapi", k1=1.2, b=0.5)
    np.testing.assert_allclose(score_matrix(counts, weights)[3], model.get_scores([int(t) for t in segs[3]]),
                               rtol=1e-12)


def test_lucene_scores_equal_the_formula():
    segs = _corpus(seed=1)
    counts, weights, _ = _matrices(segs, "lucene")
    np.testing.assert_allclose(score_matrix(counts, weights), _lucene_reference(segs), rtol=1e-12, atol=1e-12)


def test_ignored_tokens_are_not_terms_and_not_length():
    segs = [np.array([1, 2, 2, 9]), np.array([9, 3, 2]), np.array([1, 9, 9, 9])]
    tokens, offsets = offsets_of(segs)
    counts = term_counts(tokens, offsets, 10, ignore=[9])
    plain = term_counts(*offsets_of([s[s != 9] for s in segs]), 10)
    assert (counts != plain).nnz == 0
    with pytest.raises(ValueError, match="token ids must lie"):
        term_counts(tokens, offsets, 5)


def _check_topk(ids, scores, full, k):
    """Each row: the returned scores are the k best exact scores (self excluded), best first."""
    full = full.copy()
    np.fill_diagonal(full, -np.inf)
    for i in range(len(full)):
        expected = np.sort(full[i][full[i] > 0])[::-1][:k]
        got = scores[i][ids[i] >= 0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(full[i, ids[i][ids[i] >= 0]], got, rtol=1e-5, atol=1e-6)
        assert i not in ids[i] and np.all(ids[i][len(got):] == -1)


@pytest.mark.parametrize("variant", ["lucene", "okapi"])
@pytest.mark.parametrize("path", [
    dict(dense_ratio=0.3),  # dense product for frequent terms
    dict(dense_ratio=10.0),  # sparse only, one column block
    dict(dense_ratio=10.0, col_block=7),  # sparse only, several column blocks
    dict(dense_ratio=0.3, col_block=7, workers=2),  # forked workers
])
def test_blockwise_topk_equals_naive(variant, path):
    segs = _corpus(n=60, seed=2)
    counts, weights, _ = _matrices(segs, variant)
    workers = path.pop("workers", 1)
    scorer = TopKScorer(counts, weights, **path)
    ids, scores = bm25_topk(scorer, 6, block_rows=11, workers=workers, progress=False)
    _check_topk(ids, scores, score_matrix(counts, weights), 6)


def test_pruned_candidates_are_rescored_exactly():
    segs = _corpus(n=80, seed=3, vocab=60)
    counts, weights, idf = _matrices(segs, "lucene")
    full = score_matrix(counts, weights)
    n = len(segs)
    df = document_frequency(counts)
    # the pruned code path with nothing pruned and every candidate re-scored: the exact top-k
    scorer = TopKScorer(counts, weights, query_terms=1000, candidates=n, idf=idf)
    assert scorer.pruned
    ids, scores = bm25_topk(scorer, 5, block_rows=16, progress=False)
    _check_topk(ids, scores, full, 5)
    # real pruning: returned scores are still exact, neighbours share a candidate term
    scorer = TopKScorer(counts, weights, keep=kept_terms(df, n, 0.2), query_terms=3, candidates=8, idf=idf)
    ids, scores = bm25_topk(scorer, 5, block_rows=16, progress=False)
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)
    found = ids >= 0
    np.testing.assert_allclose(scores[found], full[rows[found], ids[found]], rtol=1e-5)
    assert found.sum() > 0 and np.all(np.diff(np.where(found, scores, -1), axis=1) <= 1e-6)
    with pytest.raises(ValueError, match="max_df"):
        kept_terms(df, n, 1.5)


def test_greedy_chain_invariants():
    rng = np.random.default_rng(0)
    n, k = 300, 5
    neighbours = np.full((n, k), -1)
    for i in range(n):
        m = int(rng.integers(0, k + 1))
        cand = rng.choice(np.delete(np.arange(n), i), size=m, replace=False)
        neighbours[i, :m] = cand
    order, jumps = greedy_chain(neighbours, seed=7)
    assert sorted(order.tolist()) == list(range(n))  # a permutation
    used, counted = set(), 0
    for step, (prev, nxt) in enumerate(zip(order[:-1], order[1:])):
        used.add(int(prev))
        free = [int(y) for y in neighbours[prev] if y >= 0 and int(y) not in used]
        if free:
            assert nxt == free[0], f"step {step}: must follow the best unused neighbour"
        else:
            counted += 1
    assert counted == jumps > 0
    again, _ = greedy_chain(neighbours, seed=7)
    other, _ = greedy_chain(neighbours, seed=8)
    assert np.array_equal(order, again) and not np.array_equal(order, other)


def test_order_file_round_trip_truncation_and_atomicity(tmp_path, monkeypatch):
    order = np.random.default_rng(0).permutation(50)
    path = tmp_path / "x.order"
    write_order_file(path, order, {"split": "train", "tokens_per_sample": 8})
    got, meta = read_order_file(path)
    assert np.array_equal(got, order) and meta["num_segments"] == 50 and meta["split"] == "train"
    text = path.read_text()
    (tmp_path / "cut.order").write_text(text[: len(text) - 7])
    with pytest.raises(ValueError, match="truncated"):
        read_order_file(tmp_path / "cut.order")
    (tmp_path / "dup.order").write_text(text.replace(f"\n{order[3]}\n", f"\n{order[4]}\n"))
    with pytest.raises(ValueError, match="not a permutation"):
        read_order_file(tmp_path / "dup.order")
    (tmp_path / "plain.txt").write_text("1\n0\n")
    with pytest.raises(ValueError, match="bad header"):
        read_order_file(tmp_path / "plain.txt")
    with pytest.raises(ValueError, match="not a permutation"):
        write_order_file(tmp_path / "bad.order", np.array([0, 0, 1]), {})

    def die(*a, **k):
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(np, "savetxt", die)
    with pytest.raises(KeyboardInterrupt):
        write_order_file(path, order[::-1], {})
    assert path.read_text() == text, "an interrupted write leaves the old file"
    assert sorted(os.listdir(tmp_path)) == ["cut.order", "dup.order", "plain.txt", "x.order"], "no temporary left"


# -- fairseq data --------------------------------------------------------------------------------

def _task(data, order, extra=()):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from conftest import ROOT

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_lm", "--arch", "transformer_lm",
        "--tokens-per-sample", "64", "--batching", "bm25", "--bm25-order", str(order), "--seed", "5", *extra])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset("train")
    task.load_dataset("valid")
    return task


@pytest.fixture(scope="module")
def wt2_order(wikitext2_bin, tmp_path_factory):
    from trime_fairseq.cli import bm25_batches

    out = tmp_path_factory.mktemp("bm25") / "train-64.order"
    meta = bm25_batches.main(bm25_batches.get_parser().parse_args([
        "--data", str(wikitext2_bin), "--tokens-per-sample", "64", "--output", str(out), "--topk", "10",
        "--no-progress-bar"]))
    return out, meta


def test_segments_are_the_task_training_items(wikitext2_bin, wt2_order):
    from trime_fairseq.data.bm25_segments import load_segments

    seg = load_segments(str(wikitext2_bin), "train", 64)
    task = _task(wikitext2_bin, wt2_order[0])
    dataset = task.dataset("train")
    assert seg.num_segments == len(dataset) == wt2_order[1]["num_segments"]
    for i in (0, 1, len(dataset) // 2, len(dataset) - 1):
        np.testing.assert_array_equal(seg.segment(i), dataset[i]["target"].numpy())


def test_cli_order_follows_bm25_neighbours(wikitext2_bin, wt2_order, tmp_path):
    from trime_fairseq.cli import bm25_batches
    from trime_fairseq.data.bm25_segments import load_segments

    order, meta = read_order_file(wt2_order[0])
    assert meta["bm25"]["variant"] == "lucene" and meta["topk"] == 10 and meta["random_jumps"] < len(order) / 2
    # the chain is the greedy chain over the exact top-k of the same segments
    seg = load_segments(str(wikitext2_bin), "train", 64)
    d = seg.dictionary
    counts = term_counts(seg.tokens, seg.offsets, len(d), ignore=[d.pad(), d.eos(), d.bos()])
    weights, _ = bm25_weights(counts, bm25_params("lucene"))
    ids, _ = bm25_topk(TopKScorer(counts, weights), 10, progress=False)
    expected, jumps = greedy_chain(ids, 1)
    assert np.array_equal(order, expected) and jumps == meta["random_jumps"]
    # pruned run: also a permutation, and it writes its neighbours
    out = tmp_path / "pruned.order"
    bm25_batches.main(bm25_batches.get_parser().parse_args([
        "--data", str(wikitext2_bin), "--tokens-per-sample", "64", "--output", str(out), "--max-df", "0.05",
        "--query-terms", "20", "--ignore-stopwords", "--save-neighbours", str(tmp_path / "nb.npz"),
        "--no-progress-bar", "--workers", "2"]))
    pruned, pmeta = read_order_file(out)
    assert sorted(pruned.tolist()) == list(range(len(order))) and pmeta["pruning"]["query_terms"] == 20
    assert np.load(tmp_path / "nb.npz")["ids"].shape == (len(order), 20)


def _epoch(itr, epoch_shuffle=True):
    return [s["id"].tolist() for s in itr.next_epoch_itr(shuffle=epoch_shuffle)]


def test_bm25_batching_epochs_workers_accumulation_and_resume(wikitext2_bin, wt2_order):
    chain, _ = read_order_file(wt2_order[0])
    n = len(chain)
    position = np.empty(n, int)
    position[chain] = np.arange(n)
    task = _task(wikitext2_bin, wt2_order[0], ["--update-freq", "3"])
    dataset = task.dataset("train")
    shards = [task.get_batch_iterator(dataset, max_sentences=4, seed=5, num_shards=2, shard_id=s,
                                      disable_iterator_cache=True) for s in (0, 1)]
    epochs = []
    for _ in range(2):
        per_shard = [_epoch(itr) for itr in shards]
        ids = sorted(i for batches in per_shard for b in batches for i in b)
        assert ids == list(range(n)), "every segment exactly once per epoch"
        # update u = batches u*3..u*3+2 of each of the 2 workers: 24 consecutive chain segments
        for u in range(len(per_shard[0]) // 3 - 1):
            segs = [i for s in (0, 1) for b in per_shard[s][u * 3:(u + 1) * 3] for i in b]
            pos = np.sort(position[segs])
            gaps = np.diff(pos)
            assert len(segs) == 24 and (gaps == 1).sum() >= 22, "an update is one piece of the (cyclic) chain"
        epochs.append(per_shard)
    assert epochs[0] != epochs[1], "the order changes between epochs"

    # resume mid-epoch from the iterator state, with a fresh task (as after a restart)
    itr = task.get_batch_iterator(dataset, max_sentences=4, seed=5, disable_iterator_cache=True)
    full = _epoch(itr)
    itr = task.get_batch_iterator(dataset, max_sentences=4, seed=5, disable_iterator_cache=True)
    ep = itr.next_epoch_itr()
    head = [next(ep)["id"].tolist() for _ in range(7)]
    state = itr.state_dict()
    fresh = _task(wikitext2_bin, wt2_order[0], ["--update-freq", "3"])
    resumed = fresh.get_batch_iterator(fresh.dataset("train"), max_sentences=4, seed=5, epoch=state["epoch"],
                                       disable_iterator_cache=True)
    resumed.load_state_dict(state)
    tail = [s["id"].tolist() for s in resumed.next_epoch_itr()]
    assert head + tail == full

    # validation keeps fairseq's iterator; batch size from --max-tokens
    valid = task.get_batch_iterator(task.dataset("valid"), max_sentences=4)
    assert type(valid).__name__ == "EpochBatchIterator"
    # every validation item, whatever --required-batch-size-multiple (fairseq 0.12 drops a last batch of 4 < 8)
    valid = task.get_batch_iterator(task.dataset("valid"), max_sentences=4, required_batch_size_multiple=8,
                                    disable_iterator_cache=True)
    assert sorted(i for b in _epoch(valid, False) for i in b) == list(range(len(task.dataset("valid"))))
    by_tokens = task.get_batch_iterator(dataset, max_tokens=64 * 5, seed=5, disable_iterator_cache=True)
    assert max(len(b) for b in _epoch(by_tokens)) == 5


def test_bm25_batching_refuses_a_mismatched_order_file(wikitext2_bin, wt2_order, tmp_path):
    from trime_fairseq.data.bm25_batching import chain_batches

    order, meta = read_order_file(wt2_order[0])
    other = tmp_path / "other.order"
    write_order_file(other, order, dict(meta, tokens_per_sample=128))
    task = _task(wikitext2_bin, other)
    with pytest.raises(ValueError, match="--tokens-per-sample 128 vs 64"):
        task.get_batch_iterator(task.dataset("train"), max_sentences=4)
    with pytest.raises(ValueError, match="needs --bm25-order"):
        _task(wikitext2_bin, "")
    # the partial group stays last: every full group starts on a group boundary
    batches = chain_batches(np.arange(23), 2, 3, seed=1, epoch=4)
    assert [len(b) for b in batches] == [2] * 9 + [2, 2, 1]
    assert sorted(np.concatenate(batches).tolist()) == list(range(23))
