"""SPALM's neighbours: datastore search with exclusion (against brute force), documents from inputs,
resumable neighbour files, and the pipeline end to end on a WikiText-2 slice through the real CLIs:
vanilla LM -> trime-build-datastore -> trime-neighbours -> fairseq-train --arch spalm_* -> fairseq-eval-lm."""

import json
import re

import numpy as np
import pytest

from conftest import PYTHON, ROOT, perplexity, run_cli
from test_datastore import _build, _data
from trime_fairseq.cli import build_datastore, neighbours, retrieval_accuracy
from trime_fairseq.memory.documents import DocumentBoundaries
from trime_fairseq.data.neighbours import NeighbourError, NeighbourFile, NeighbourWriter, document_labels
from trime_fairseq.memory.datastore import Datastore, Exclusion, target_ranks

ENV = {"OMP_NUM_THREADS": "1"}


# -- search with exclusion -------------------------------------------------------------------------


def brute_force(queries, keys, k, hidden):
    """Best k by exact (negative squared) L2 among the entries not hidden: ids (Q, k), -1 where none remain."""
    scores = -((queries[:, None, :] - keys.astype(np.float32)[None]) ** 2).sum(-1)
    scores[hidden] = -np.inf
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.where(np.isfinite(np.take_along_axis(scores, ids, 1)), ids, -1)


def test_search_excluding_own_entry_or_document_equals_brute_force(tmp_path):
    keys, values = _data(n=600)
    _build(tmp_path / "ds", keys, values, metric="l2")
    store = Datastore.load(tmp_path / "ds")
    queries = keys.astype(np.float32) * 1.0  # every entry's own key: its own entry is its best hit
    positions = np.arange(600)
    documents = positions // 50  # 12 documents of 50 entries
    _, own = store.search_ids(queries, 6, exclude=Exclusion.own_entry(positions))
    np.testing.assert_array_equal(own, brute_force(queries, keys, 6, positions[:, None] == positions[None]))
    assert not (own == positions[:, None]).any()
    _, plain = store.search_ids(queries, 6)
    assert (plain[:, 0] == positions).all()  # without exclusion a position retrieves itself
    _, doc = store.search_ids(queries, 6, exclude=Exclusion.same_label(documents, documents))
    np.testing.assert_array_equal(doc, brute_force(queries, keys, 6, documents[:, None] == documents[None]))
    shifted = np.maximum(documents - (positions % 50 == 0), 0)  # the first entry of a document queries as the last
    _, both = store.search_ids(queries, 6, exclude=Exclusion.own_entry(positions, shifted, documents))
    hidden = (shifted[:, None] == documents[None]) | (positions[:, None] == positions[None])
    np.testing.assert_array_equal(both, brute_force(queries, keys, 6, hidden))
    # a label of -1 hides nothing; a document that hides almost everything leaves the rest, then -1
    labels = np.where(positions < 10, 0, 1)
    scores, few = store.search_ids(queries[:3], 20, exclude=Exclusion.same_label(np.array([1, -1, 0]), labels))
    assert (few[0, :10] >= 0).all() and (few[0, 10:] == -1).all() and np.isneginf(scores[0, 10:]).all()
    assert (few[1] >= 0).all() and (labels[few[2]] == 1).all()
    batch = store.search(queries[:4], 3, exclude=Exclusion.own_entry(positions[:4]))
    assert batch.mask.all() and (batch.values.numpy() == values[own[:4, :3]]).all()


def test_ivf_search_refetches_rows_left_short(tmp_path):
    keys, values = _data(n=3000)
    _build(tmp_path / "ds", keys, values, factory="IVF8,Flat", metric="l2", nprobe=8)  # all lists: exact
    store = Datastore.load(tmp_path / "ds")
    queries = keys[:40].astype(np.float32)
    documents = np.arange(3000) % 7  # each query's document holds 1/7 of the entries, its nearest among them
    _, ids = store.search_ids(queries, 5, exclude=Exclusion.same_label(documents[:40], documents))
    np.testing.assert_array_equal(ids, brute_force(queries, keys, 5, documents[:40, None] == documents[None]))
    store.set_nprobe(1)  # one list: fewer candidates than asked for some rows -> kept as missing, never looped
    _, ids = store.search_ids(queries, 400, exclude=Exclusion.own_entry(np.arange(40)))
    assert not (ids == np.arange(40)[:, None]).any() and (ids == -1).any()


# -- documents from inputs ---------------------------------------------------------------------------


def test_a_query_document_never_depends_on_its_target_or_later_tokens():
    eos, heading, a, b = 2, 9, 5, 6
    rule = DocumentBoundaries(eos=eos, heading=heading)
    # stream: "= T =" eos "a b" eos "= = S = =" eos "a" eos "= T =" eos "b"
    tokens = np.array([heading, a, heading, eos, a, b, eos, heading, heading, b, heading, heading, eos, a, eos,
                       heading, b, heading, eos, b])
    query, entry = document_labels(tokens, rule)
    # entries 1 and 16 read an opening "=" followed by a title word: they start documents (the section
    # heading at 7-8 does not); as queries, positions 1 and 16 still belong to the previous document
    np.testing.assert_array_equal(entry, [0] + [1] * 15 + [2] * 4)
    np.testing.assert_array_equal(query, [0] * 2 + [1] * 15 + [2] * 3)
    for t in range(len(tokens)):  # change the target of t and everything after it
        changed = tokens.copy()
        changed[t:] = np.where(changed[t:] == heading, a, heading)
        np.testing.assert_array_equal(document_labels(changed, rule)[0][: t + 1], query[: t + 1])


# -- neighbour files -----------------------------------------------------------------------------------


def test_interrupted_neighbour_file_resumes_and_never_loads_half_written(tmp_path):
    identity = dict(split="valid", datastore=dict(fingerprint="a" * 64))
    n, k = 10, 2
    values = np.arange(n * k, dtype=np.int32).reshape(n, k)
    writer = NeighbourWriter(tmp_path / "valid", identity, n, k)
    writer.add(values[:4], values[:4].astype(np.float32), values[:4].astype(np.int64), np.arange(4))
    writer.commit(1)
    writer.add(values[4:6], values[4:6].astype(np.float32), values[4:6].astype(np.int64), np.arange(4, 6))
    del writer  # killed before committing rows 4..5
    with pytest.raises(NeighbourError, match="incomplete neighbours"):
        NeighbourFile.load(tmp_path / "valid")
    with pytest.raises(NeighbourError, match="other settings"):
        NeighbourWriter(tmp_path / "valid", dict(identity, split="test"), n, k)
    writer = NeighbourWriter(tmp_path / "valid", identity, n, k)
    assert writer.next_position == 4 and writer.batches_done == 1
    with pytest.raises(NeighbourError, match="not fully covered"):
        writer.finalize({"split": "valid"})
    writer.add(values[4:], values[4:].astype(np.float32), values[4:].astype(np.int64), np.arange(4, n))
    writer.finalize(dict(identity, dictionary_sha256="0" * 64))
    loaded = NeighbourFile.load(tmp_path / "valid", "valid")
    np.testing.assert_array_equal(loaded.values, values)
    np.testing.assert_array_equal(loaded.targets, np.arange(n))
    with pytest.raises(NeighbourError, match="--overwrite"):
        NeighbourWriter(tmp_path / "valid", identity, n, k)
    with open(tmp_path / "valid" / "scores.f32", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(NeighbourError, match="truncated"):
        NeighbourFile.load(tmp_path / "valid")


def test_exclusion_applies_to_the_datastore_split_only():
    assert neighbours.exclusion_mode(None, True, "train") == "document"
    assert neighbours.exclusion_mode("self", True, "train") == "self"
    assert neighbours.exclusion_mode(None, False, "valid") == "none"
    with pytest.raises(NeighbourError, match="own split"):
        neighbours.exclusion_mode("document", False, "valid")


# -- end to end on a WikiText-2 slice ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(wikitext2_bin, tmp_path_factory):
    """Vanilla LM -> datastore of the slice's *valid* split (standing in for train) -> neighbours of valid
    (own document excluded; and own entry only, elsewhere) and test. SPALM then trains on valid."""
    tmp = tmp_path_factory.mktemp("spalm")
    run_cli([
        PYTHON, "-m", "fairseq_cli.train", wikitext2_bin, "--user-dir", ROOT / "trime_fairseq", "--task", "trime_lm",
        "--tokens-per-sample", "64", "--batch-size", "8", "--arch", "transformer_lm", "--decoder-layers", "1",
        "--decoder-embed-dim", "32", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
        "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2", "--optimizer", "adam", "--lr", "0.005",
        "--max-update", "30", "--disable-validation", "--cpu", "--num-workers", "0", "--save-dir", tmp / "vanilla",
        "--no-epoch-checkpoints", "--log-format", "simple", "--seed", "3",
    ], env=ENV)
    build_datastore.main(build_datastore.get_parser().parse_args([
        "--path", str(tmp / "vanilla" / "checkpoint_last.pt"), "--data", str(wikitext2_bin), "--gen-subset", "valid",
        "--tokens-per-sample", "64", "--context-window", "32", "--batch-size", "16", "--output", str(tmp / "dstore"),
        "--key-type", "trime_feature", "--metric", "ip", "--index-factory", "IVF16,Flat", "--nprobe", "4", "--cpu",
        "--no-progress-bar"]))

    def compute(split, output, *extra):
        return neighbours.main(neighbours.get_parser().parse_args([
            "--datastore", str(tmp / "dstore"), "--gen-subset", split, "--output", str(output), "--k", "4", "--cpu",
            "--no-progress-bar", "--commit-every", "5", *extra]))

    compute("valid", tmp / "nb")
    compute("test", tmp / "nb")
    compute("valid", tmp / "nb_self", "--neighbour-exclude", "self")
    return tmp, compute


def test_training_positions_never_retrieve_their_entry_or_document(pipeline, wikitext2_bin):
    from fairseq.data import Dictionary

    tmp, _ = pipeline
    d = Dictionary.load(str(wikitext2_bin / "dict.txt"))
    store = Datastore.load(tmp / "dstore")
    query_docs, entry_docs = document_labels(np.asarray(store.values), DocumentBoundaries.from_dictionary(d))
    assert entry_docs[-1] >= 3  # the slice's valid split holds several articles
    positions = np.arange(store.size)
    by_doc = NeighbourFile.load(tmp / "nb" / "valid", "valid", d, store.size, store.fingerprint)
    by_self = NeighbourFile.load(tmp / "nb_self" / "valid", "valid", d, store.size, store.fingerprint)
    assert by_doc.meta["exclude"] == "document" and by_self.meta["exclude"] == "self"
    for found in (by_doc, by_self):
        np.testing.assert_array_equal(found.targets, store.values)  # aligned with the datastore's entries
        ids = np.asarray(found.ids)
        valid = ids >= 0
        assert valid.mean() > 0.99
        assert not (ids == positions[:, None]).any()
        np.testing.assert_array_equal(np.asarray(found.values)[valid], np.asarray(store.values)[ids[valid]])
        assert (np.diff(np.where(valid, found.scores, -np.inf), axis=1) <= 1e-5).all()  # best first
    same_doc = lambda f: valid_same_doc(np.asarray(f.ids), query_docs, entry_docs)  # noqa: E731
    assert not same_doc(by_doc).any()
    assert same_doc(by_self).mean() > 0.2  # what document exclusion removes: the position's own article
    test = NeighbourFile.load(tmp / "nb" / "test", "test", d, expect_datastore=store.fingerprint)
    assert test.meta["exclude"] == "none" and (np.asarray(test.ids) >= 0).all()
    for found in (by_doc, by_self, test):  # the neighbour encoder's quality, as the files hold it
        values, targets = np.asarray(found.values), np.asarray(found.targets)
        quality = found.meta["neighbour_quality"]
        assert quality["positions"] == len(targets)
        assert quality["top1_hit_rate"] == round(float((values[:, 0] == targets).mean()), 4)
        assert quality["any_hit_rate"] == round(float((values == targets[:, None]).any(1).mean()), 4)
    assert by_self.meta["neighbour_quality"]["any_hit_rate"] >= by_doc.meta["neighbour_quality"]["any_hit_rate"]


def test_target_ranks_equal_a_loop():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=(200, 7))
    values[rng.random((200, 7)) < 0.1] = -1  # missing hits
    targets = rng.integers(0, 5, size=200)
    expected = [next((j for j in range(7) if values[i, j] == targets[i]), 7) for i in range(200)]
    np.testing.assert_array_equal(target_ranks(values, targets), expected)
    with pytest.raises(ValueError):
        target_ranks(values, targets[:5])


def test_retrieval_accuracy_equals_the_neighbour_files_hit_rates(pipeline, tmp_path):
    """trime-retrieval-accuracy (TRIME Table 9) at K 1 and 4 equals the hit rates counted from the stored
    k = 4 neighbours of the same datastore and split; it grows with K; the datastore's own split is refused."""
    tmp, _ = pipeline
    out = tmp_path / "acc.json"

    def measure(*extra):
        return retrieval_accuracy.main(retrieval_accuracy.get_parser().parse_args([
            "--datastore", str(tmp / "dstore"), "--cpu", "--no-progress-bar", *extra]))

    # the same K as the neighbour files' k = 4: a search for more entries may order entries of equal score at the
    # 4th place differently (FAISS keeps ties in heap order), so the comparison searches for the same K
    result = measure("--gen-subset", "test", "--ks", "4,1", "--output-json", str(out))
    found = NeighbourFile.load(tmp / "nb" / "test")
    values, targets = np.asarray(found.values), np.asarray(found.targets)
    assert result["positions"] == len(targets)
    assert result["accuracy"]["1"] == round(float((values[:, 0] == targets).mean()), 4)
    assert result["accuracy"]["4"] == round(float((values == targets[:, None]).any(1).mean()), 4)
    wider = measure("--gen-subset", "test", "--ks", "1,4,16")
    assert wider["accuracy"]["1"] <= wider["accuracy"]["4"] <= wider["accuracy"]["16"]
    assert json.loads(out.read_text())["accuracy"] == result["accuracy"]
    with pytest.raises(NeighbourError, match="own entries"):
        measure("--gen-subset", "valid")
    with pytest.raises(SystemExit):
        retrieval_accuracy.get_parser().parse_args(["--datastore", "x", "--ks", "0,8"])


def valid_same_doc(ids, query_docs, entry_docs):
    return (ids >= 0) & (entry_docs[np.where(ids >= 0, ids, 0)] == query_docs[:, None])


def test_resumed_neighbours_equal_an_uninterrupted_run(pipeline, tmp_path, monkeypatch):
    tmp, compute = pipeline
    calls = {"n": 0}
    add = NeighbourWriter.add

    def killed_after_six_batches(self, *args):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return add(self, *args)

    monkeypatch.setattr(NeighbourWriter, "add", killed_after_six_batches)
    with pytest.raises(KeyboardInterrupt):
        compute("test", tmp_path)
    progress = json.loads((tmp_path / "test" / "progress.json").read_text())
    assert progress["batches"] == 5 and progress["rows"] > 0  # committed every 5 batches
    monkeypatch.setattr(NeighbourWriter, "add", add)
    compute("test", tmp_path)
    again, first = NeighbourFile.load(tmp_path / "test"), NeighbourFile.load(tmp / "nb" / "test")
    for name in ("values", "ids", "targets", "scores"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))


def test_spalm_trains_and_evaluates_through_the_clis(pipeline, wikitext2_bin):
    tmp, _ = pipeline
    small = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
             "--decoder-attention-heads", "2"]
    out = run_cli([
        PYTHON, "-m", "fairseq_cli.train", wikitext2_bin, "--user-dir", ROOT / "trime_fairseq", "--task", "trime_lm",
        "--batching", "stream", "--neighbours", tmp / "nb", "--train-subset", "valid", "--valid-subset", "test",
        "--tokens-per-sample", "32", "--sample-break-mode", "none", "--arch", "spalm_wikitext2_small", *small,
        "--mem-len", "32", "--criterion", "adaptive_loss", "--optimizer", "adam", "--lr", "0.005",
        "--batch-size", "8", "--max-update", "12", "--validate-interval-updates", "12", "--max-valid-steps", "3",
        "--no-epoch-checkpoints", "--save-dir", tmp / "spalm", "--cpu", "--seed", "1", "--ddp-backend", "legacy_ddp",
        "--log-format", "simple", "--log-interval", "6",
    ], env=ENV)
    assert "num_updates 12" in out and "recurrence memory across batches: on (stream)" in out
    assert re.search(r"valid on 'test' subset \| loss [0-9.]+", out)

    def eval_lm(*extra):
        return run_cli(["fairseq-eval-lm", wikitext2_bin, "--user-dir", "trime_fairseq", "--task", "trime_lm",
                        "--path", tmp / "spalm" / "checkpoint_last.pt", "--gen-subset", "test", "--cpu",
                        "--num-workers", "0", "--neighbours", tmp / "nb", *extra], env=ENV)

    stream_args = ["--batching", "stream", "--tokens-per-sample", "32", "--batch-size", "8"]
    stream = perplexity(eval_lm(*stream_args))
    window = perplexity(eval_lm("--tokens-per-sample", "64", "--context-window", "32", "--batch-size", "8"))
    assert 1 < stream < 5000 and 1 < window < 5000, (stream, window)

    # SPALM + kNN: tuned on one pass by trime-tune, then fairseq-eval-lm reports the same number
    tuned = run_cli(["trime-tune", wikitext2_bin, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--path",
                     tmp / "spalm" / "checkpoint_last.pt", "--gen-subset", "test", "--cpu", "--no-progress-bar",
                     "--neighbours", tmp / "nb", *stream_args, "--eval-memory", "neighbour_knn",
                     "--knn-temperatures", "1,4", "--knn-lambdas", "0.25,0.5", "--widen-edges", "0"], env=ENV)
    best = re.search(r"best: (.*)  \(test perplexity ([0-9.]+); without memory ([0-9.]+)\)", tuned)
    assert best, tuned[-3000:]
    assert float(best.group(3)) == pytest.approx(stream, rel=1e-3)
    spalm_knn = perplexity(eval_lm(*stream_args, *best.group(1).split(), "--softmax-batch", "100"))
    assert spalm_knn == pytest.approx(float(best.group(2)), rel=1e-3) and spalm_knn != stream

    # kNN-LM over the same neighbours with a model that does not read them (here the vanilla LM)
    def vanilla(*extra):
        return perplexity(run_cli(["fairseq-eval-lm", wikitext2_bin, "--user-dir", "trime_fairseq", "--task",
                                   "trime_lm", "--path", tmp / "vanilla" / "checkpoint_last.pt", "--gen-subset",
                                   "test", "--cpu", "--tokens-per-sample", "64", "--context-window", "32",
                                   "--batch-size", "8", *extra], env=ENV))

    knn = vanilla("--neighbours", tmp / "nb", "--eval-memory", "neighbour_knn", "--knn-lambda", "0.5")
    assert 1 < knn < 5000 and knn != vanilla()
