"""SK-MT (--eval-memory sk_mt, trime-retrieve-pairs) against naive references: BM25 retrieval by source, the
per-sentence memory's entries, the per-step distribution, the row map under beam search (batched = alone),
causality (a sentence's own reference never matters) and refused retrieval files; through fairseq-generate
and trime-tune-mt in-process on a tiny binarized language pair and a random-weight transformer."""

import math
import re
import shutil
from argparse import Namespace

import numpy as np
import pytest
import torch
from conftest import ROOT
from fairseq import checkpoint_utils, options, tasks
from fairseq.data import Dictionary, indexed_dataset
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.sequence_generator import SequenceGenerator
from omegaconf import OmegaConf

import trime_fairseq  # noqa: F401
from trime_fairseq.cli import retrieve_pairs
from trime_fairseq.data.retrieved_pairs import RetrievedPairs, RetrievedPairsError
from trime_fairseq.memory.eval_memory import EvalMemory
from trime_fairseq.memory.keys import TRIME_FEATURE, get_keys
from trime_fairseq.memory.modes.sk_mt import DistanceLambda
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.sentence_pairs import SENTENCE_ROWS
from trime_fairseq.memory.sources import MemoryBatch

WORDS = 20
SPLITS = {"train": 40, "valid": 8, "test": 6}
USER_DIR = str(ROOT / "trime_fairseq")


# -- data, checkpoint, retrieval files -------------------------------------------------------------------

def sentences(seed=0):
    """{split: [(source ids, target ids)]}: skewed word choices (sources share words), targets a noisy copy."""
    g = np.random.default_rng(seed)
    d = dictionary()
    out = {}
    for split, n in SPLITS.items():
        pairs = []
        for _ in range(n):
            src = (g.random(int(g.integers(3, 9))) ** 2 * WORDS).astype(int) + d.nspecial
            tgt = np.where(g.random(len(src)) < 0.3, g.integers(0, WORDS, len(src)) + d.nspecial, src)
            pairs.append((list(src) + [d.eos()], list(tgt[:int(g.integers(2, len(src) + 1))]) + [d.eos()]))
        out[split] = pairs
    return out


def dictionary() -> Dictionary:
    d = Dictionary()
    for i in range(WORDS):
        d.add_symbol(f"w{i}", n=WORDS - i)
    return d


def binarize(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        dictionary().save(str(folder / f"dict.{lang}.txt"))
    for split, pairs in data.items():
        for side, lang in enumerate(("de", "en")):
            prefix = str(folder / f"{split}.de-en.{lang}")
            builder = indexed_dataset.MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
            for pair in pairs:
                builder.add_item(torch.tensor(pair[side], dtype=torch.int32))
            builder.finalize(prefix + ".idx")
    return folder


def checkpoint(path, data, seed=1):
    """A random-weight 1+1-layer transformer (d = 16) for ``data``, saved as fairseq-train saves one."""
    argv = [str(data), "--user-dir", USER_DIR, "--task", "trime_translation", "--source-lang", "de",
            "--target-lang", "en", "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
            "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
            "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
            "--share-all-embeddings", "--dropout", "0", "--criterion", "cross_entropy", "--optimizer", "adam",
            "--lr", "0.01", "--cpu", "--seed", str(seed)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    torch.manual_seed(seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    torch.save({"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    return path


def retrieve(data, split, output, m=4):
    args = retrieve_pairs.get_parser().parse_args([
        "--data", str(data), "--source-lang", "de", "--target-lang", "en", "--split", split, "--m", str(m),
        "--output", str(output), "--no-progress-bar"])
    return retrieve_pairs.main(args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sk")
    data = binarize(root / "data", sentences())
    for split in ("train", "valid"):
        retrieve(data, split, root / f"{split}.npz")
    return Namespace(root=root, data=data, ckpt=checkpoint(root / "ckpt.pt", data), pairs=sentences())


def load(setup, split="valid", data=None, double=True, **flags):
    """(task with --eval-memory sk_mt, model, dataset of ``split``)."""
    argv = [str(data or setup.data), "--user-dir", USER_DIR, "--task", "trime_translation", "--source-lang", "de",
            "--target-lang", "en", "--path", str(setup.ckpt), "--gen-subset", split, "--cpu", "--eval-memory",
            "sk_mt", "--sk-pairs", str(flags.pop("pairs", setup.root / f"{split}.npz"))]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), argv))
    task = tasks.setup_task(cfg.task)
    task.load_dataset(split)
    models, _ = checkpoint_utils.load_model_ensemble([str(setup.ckpt)], task=task)
    model = models[0].eval()
    return task, (model.double() if double else model), task.dataset(split)


# -- naive references ------------------------------------------------------------------------------------

def naive_bm25(queries, docs, m, same, k1=0.9, b=0.4, ignore=(0, 1, 2, 3)):
    """Lucene BM25 by loops: the m best docs of every query (positive scores, ties by lower id, self excluded)."""
    docs = [[t for t in doc if t not in ignore] for doc in docs]
    n, avgdl = len(docs), sum(len(doc) for doc in docs) / len(docs)
    df = {}
    for doc in docs:
        for t in set(doc):
            df[t] = df.get(t, 0) + 1
    out = []
    for qi, query in enumerate(queries):
        scored = []
        for di, doc in enumerate(docs):
            if same and di == qi:
                continue
            score = 0.0
            for t in query:
                if t in ignore or t not in doc:
                    continue
                tf = doc.count(t)
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
            if score > 0:
                scored.append((-score, di))
        best = [di for _, di in sorted(scored)[:m]]
        out.append(best + [-1] * (m - len(best)))
    return np.array(out)


def naive_entries(setup, pair_ids):
    """Keys f (E, d) and values (E,) of training pairs forced-decoded one at a time, in ``pair_ids`` order, by the
    checkpoint's model without any memory (float64)."""
    if not hasattr(setup, "plain"):
        setup.plain = checkpoint_utils.load_model_ensemble([str(setup.ckpt)])[0][0].eval().double()
    model = setup.plain
    keys, values = [], []
    for i in pair_ids:
        if i < 0:
            continue
        src, tgt = (torch.tensor([p]) for p in setup.pairs["train"][i])
        prev = torch.cat([tgt[:, -1:], tgt[:, :-1]], 1)  # eos first, as fairseq's collater
        with torch.no_grad():
            out = model(src_tokens=src, src_lengths=torch.tensor([src.size(1)]), prev_output_tokens=prev)
        keys.append(get_keys(out, TRIME_FEATURE)[0].double())
        values.append(tgt[0])
    return torch.cat(keys), torch.cat(values)


def naive_step(logits, query, keys, values, k, T, tau, max_lambda=0.99):
    """(V,) float64: log((1 − λ)·p_MT + λ·p_kNN), p_kNN ∝ exp(−d_i/T) over the k nearest, λ = ReLU(1 − d_0/τ)."""
    p = torch.softmax(logits.double(), -1)
    if not len(values):
        return p.log()
    d = ((keys - query.double()) ** 2).sum(-1)
    top = d.topk(min(k, len(d)), largest=False)
    knn = torch.zeros_like(p).scatter_add_(0, values[top.indices], torch.softmax(-top.values / T, -1))
    lam = min(max_lambda, max(0.0, 1 - float(top.values[0]) / tau))
    return ((1 - lam) * p + lam * knn).log()


# -- tests -------------------------------------------------------------------------------------------------

def test_retrieval_equals_naive_bm25_by_source(setup):
    """Valid sentences against the training sources, training sentences against the others (never themselves);
    the file records what it was built from."""
    for split, same in (("valid", False), ("train", True)):
        got = RetrievedPairs.read(setup.root / f"{split}.npz")
        queries = [src for src, _ in setup.pairs[split]]
        expected = naive_bm25(queries, [src for src, _ in setup.pairs["train"]], 4, same)
        np.testing.assert_array_equal(got.ids, expected)
        assert got.meta["split"] == split and got.meta["num_sentences"] == len(queries) and got.meta["m"] == 4
        assert got.meta["excludes_self"] == same and got.meta["num_train"] == SPLITS["train"]
        if same:
            assert not (got.ids == np.arange(len(queries))[:, None]).any()
    assert (RetrievedPairs.read(setup.root / "valid.npz").ids >= 0).sum() > 20  # the toy sources share words


def test_entries_equal_a_naive_forced_decode_and_l2_top_k(setup):
    task, model, dataset = load(setup, sk_m=3, knn_k=5)
    memory = model.trime_eval_memory.sentence_pairs
    sample = dataset.collater([dataset[i] for i in (5, 0, 3, 7)])
    memory.prepare(model, sample)
    file_ids = RetrievedPairs.read(setup.root / "valid.npz").ids
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, 2, 3, 3, 1, 0, 2])
    queries = torch.randn(len(rows), 16, generator=g, dtype=torch.float64)
    got = memory.search(queries, rows, 5)
    for r, (row, query) in enumerate(zip(rows.tolist(), queries)):
        keys, values = naive_entries(setup, file_ids[int(sample["id"][row])][:3])
        d = ((keys - query) ** 2).sum(-1)
        top = d.topk(min(5, len(d)), largest=False)
        n = top.indices.numel()
        assert got.mask[r, :n].all() and not got.mask[r, n:].any()
        torch.testing.assert_close(-got.scores[r, :n], top.values, rtol=1e-9, atol=1e-9)
        assert got.values[r, :n].tolist() == values[top.indices].tolist()


def beam_search(task, model, sample, beam=3, max_len_b=6, record=None):
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_b=max_len_b)
    memory = model.trime_eval_memory
    original = memory.step_log_probs
    if record is not None:
        def step(decoder, net_output):
            out = original(decoder, net_output)
            record.append((net_output[0][:, -1].clone(), get_keys(net_output, TRIME_FEATURE)[:, -1].clone(),
                           net_output[1][SENTENCE_ROWS].clone(), out.clone()))
            return out
        memory.step_log_probs = step
    try:
        with torch.no_grad():
            return task.inference_step(generator, [model], sample)
    finally:
        memory.step_log_probs = original


FLAGS = dict(knn_k=3, knn_temperature=5.0, sk_lambda_temperature=40.0)


def test_beam_search_steps_equal_a_float64_loop_and_decoding_each_sentence_alone(setup):
    """Beam 3 over a batch whose sentences finish at different steps: every step's distribution is the explicit
    float64 mixture over the row's own sentence's entries, and every hypothesis (tokens, scores) is what decoding
    its sentence alone gives -- the row map survives fairseq's reordering and shrinking."""
    task, model, dataset = load(setup, **FLAGS)
    file_ids = RetrievedPairs.read(setup.root / "valid.npz").ids
    ids = list(range(len(dataset)))
    sample = dataset.collater([dataset[i] for i in ids])
    calls = []
    hypos = beam_search(task, model, sample, record=calls)
    assert any(c[0].size(0) not in (len(ids) * 3, len(ids)) for c in calls), "finished sentences leave the batch"
    entries = {}
    mixed = 0
    for logits, query, rows, got in calls:
        for r in range(len(rows)):
            sid = int(sample["id"][int(rows[r])])
            if sid not in entries:
                entries[sid] = naive_entries(setup, file_ids[sid])
            expected = naive_step(logits[r], query[r], *entries[sid], 3, 5.0, 40.0)
            torch.testing.assert_close(got[r, 0].double(), expected, rtol=1e-6, atol=1e-6)
            mixed += int(not torch.allclose(expected, torch.log_softmax(logits[r].double(), -1)))
    assert mixed > len(calls), "the memory changes the distribution (λ > 0) at many steps"
    for position, sid in enumerate(sample["id"].tolist()):
        alone = beam_search(task, model, dataset.collater([dataset[sid]]))[0]
        assert [h["tokens"].tolist() for h in alone] == [h["tokens"].tolist() for h in hypos[position]]
        for a, b in zip(alone, hypos[position]):
            torch.testing.assert_close(a["positional_scores"], b["positional_scores"], rtol=1e-7, atol=1e-7)


def test_distance_lambda_rule():
    scores = torch.tensor([[-0.5, -2.0], [-3.0, -1.0], [0.0, 0.0]])  # −d/T with T = 4
    entries = MemoryBatch(scores, torch.zeros(3, 2, dtype=torch.long), torch.tensor([[True, True], [True, True],
                                                                                      [False, False]]))
    same, lam = DistanceLambda(4.0, 10.0)(entries)
    assert same is entries
    torch.testing.assert_close(lam, torch.tensor([1 - 2.0 / 10, 1 - 4.0 / 10, 0.0]))
    assert DistanceLambda(4.0, 1.0)(entries)[1].tolist() == [0.0, 0.0, 0.0]  # ReLU: far entries give λ = 0


def test_fairseq_generate_and_tune_mt_in_process(setup, tmp_path, capsys):
    """Stock fairseq-generate (beam 2, batches of several sentences) prints, per sentence, the hypothesis and score
    that decoding the sentence alone gives; --score-reference and trime-tune-mt run the same memory."""
    from fairseq_cli import generate

    from trime_fairseq.cli import tune_mt

    base = [str(setup.data), "--user-dir", USER_DIR, "--task", "trime_translation", "--source-lang", "de",
            "--target-lang", "en", "--path", str(setup.ckpt), "--gen-subset", "valid", "--cpu", "--beam", "2",
            "--max-len-a", "0", "--max-len-b", "6", "--batch-size", "5", "--eval-memory", "sk_mt",
            "--sk-pairs", str(setup.root / "valid.npz"), "--knn-k", "3", "--knn-temperature", "5",
            "--sk-lambda-temperature", "40"]
    generate.main(options.parse_args_and_arch(options.get_generation_parser(), base + ["--results-path",
                                                                                      str(tmp_path / "gen")]))
    text = (tmp_path / "gen" / "generate-valid.txt").read_text()
    printed = {int(i): (float(s), h) for i, s, h in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", text, re.M)}
    assert sorted(printed) == list(range(SPLITS["valid"]))
    task, model, dataset = load(setup, double=False, **FLAGS)
    for sid, (score, hyp) in printed.items():
        best = beam_search(task, model, dataset.collater([dataset[sid]]), beam=2)[0][0]
        assert hyp == task.target_dictionary.string(best["tokens"])
        assert score == pytest.approx(float(best["score"]) / math.log(2), abs=1e-4)
    generate.main(options.parse_args_and_arch(options.get_generation_parser(), base + ["--score-reference"]))
    assert "Generate valid with beam=2" in capsys.readouterr().out
    best, results = tune_mt.main(base[:base.index("--knn-k")] + ["--ks", "2,3", "--knn-temperatures", "5",
                                                                 "--sk-lambda-temperatures", "40",
                                                                 "--widen-edges", "0"])
    assert best.mode == "sk_mt" and best.knn_k in (2, 3) and len(results) == 2  # the plain point is reported apart


def perturbed(setup, tmp_path, split, sid):
    """A copy of the data whose ``split`` sentence ``sid`` has another target (its source unchanged)."""
    data = {s: list(p) for s, p in setup.pairs.items()}
    src, tgt = data[split][sid]
    d = dictionary()
    data[split][sid] = (src, [d.nspecial + (t * 7 + 3) % WORDS for t in tgt[:-1]] + [5, d.eos()])
    return binarize(tmp_path / f"perturbed-{split}", data), data


def test_a_sentences_own_reference_never_changes_its_scores(setup, tmp_path):
    """Translating training sentence s (its pairs retrieved from the training split, itself excluded): another
    target for s leaves its hypotheses and scores unchanged, and changes those of a sentence that retrieved s;
    another reference for a valid sentence leaves its translation unchanged."""
    ids = RetrievedPairs.read(setup.root / "train.npz").ids
    sid = int(np.bincount(ids[ids >= 0]).argmax())  # the pair retrieved most often
    other = int(np.nonzero((ids == sid).any(1))[0][0])
    batch = sorted({sid, other, (sid + 1) % SPLITS["train"]})

    def decode(data, split, ids_):
        task, model, dataset = load(setup, split, data=data, **FLAGS)
        hypos = beam_search(task, model, dataset.collater([dataset[i] for i in ids_]))
        return {int(i): [(h["tokens"].tolist(), h["positional_scores"]) for h in hs]
                for i, hs in zip(dataset.collater([dataset[i] for i in ids_])["id"], hypos)}

    changed, _ = perturbed(setup, tmp_path, "train", sid)
    before, after = decode(setup.data, "train", batch), decode(changed, "train", batch)
    for (tokens_a, scores_a), (tokens_b, scores_b) in zip(before[sid], after[sid]):
        assert tokens_a == tokens_b
        torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=0)
    assert any(not torch.equal(a[1], b[1]) or a[0] != b[0] for a, b in zip(before[other], after[other])), \
        "a sentence that retrieved s sees s's new target"
    valid, _ = perturbed(setup, tmp_path, "valid", 2)
    a, b = decode(setup.data, "valid", [2, 4]), decode(valid, "valid", [2, 4])
    assert all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a[2], b[2]))


def test_mismatched_or_stale_retrieval_files_are_refused(setup, tmp_path):
    with pytest.raises(RetrievedPairsError, match="split 'valid', not of 'test'"):
        load(setup, "test", pairs=setup.root / "valid.npz")
    original = RetrievedPairs.read(setup.root / "valid.npz")
    cases = {
        "changed since": dict(split_source_sha256="0" * 64),
        "another source dictionary": dict(source_dictionary_sha256="0" * 64),
        "training sources changed": dict(train_source_sha256="0" * 64),
    }
    for message, meta in cases.items():
        path = tmp_path / f"{len(meta)}-{message[:5]}.npz"
        RetrievedPairs(original.ids, original.scores, dict(original.meta, **meta)).write(path)
        with pytest.raises(RetrievedPairsError, match=message):
            load(setup, pairs=path)
    fewer = tmp_path / "fewer.npz"
    RetrievedPairs(original.ids[:-1], original.scores[:-1], dict(original.meta, num_sentences=7)).write(fewer)
    with pytest.raises(RetrievedPairsError, match="8 sentences"):
        load(setup, pairs=fewer)
    np.savez(tmp_path / "bad.npz", ids=original.ids)
    with pytest.raises(RetrievedPairsError, match="not a trime-retrieve-pairs file"):
        load(setup, pairs=tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="trime-retrieve-pairs"):
        load(setup, pairs=tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="--sk-m 5 asks for more pairs"):
        load(setup, sk_m=5)
    with pytest.raises(ValueError, match="needs --sk-pairs"):
        MemoryOptions.from_flags("sk_mt", {})
    with pytest.raises(ValueError, match="it is for translation"):
        EvalMemory(MemoryOptions.from_flags("sk_mt", {"sk_pairs": "x"}), 1)
    # a batch encoded without its memory prepared (the task's inference_step skipped) is an error, not stale memory
    task, model, dataset = load(setup)
    with pytest.raises(RuntimeError, match="was not prepared"):
        model(**dataset.collater([dataset[0]])["net_input"])
    task._sk_split = None  # sentences of no checked split (fairseq-interactive's) have no retrieved pairs
    with pytest.raises(ValueError, match="have no retrieved pairs"):
        beam_search(task, model, dataset.collater([dataset[0]]))
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_lambda_is_capped_so_that_every_token_stays_possible():
    from trime_fairseq.memory.modes.sk_mt import DistanceLambda
    from trime_fairseq.memory.options import MemoryOptions
    from trime_fairseq.memory.sources import MemoryBatch

    entries = MemoryBatch(torch.tensor([[0.0, -0.5], [-0.2, -3.0]]), torch.tensor([[5, 6], [7, 8]]),
                          torch.ones(2, 2, dtype=torch.bool))  # row 0: d_0 = 0 (an exact repeat)
    _, lam = DistanceLambda(10.0, 10.0, 0.99)(entries)
    torch.testing.assert_close(lam, torch.tensor([0.99, 0.8]))
    _, lam = DistanceLambda(10.0, 10.0, 1.0)(entries)
    torch.testing.assert_close(lam, torch.tensor([1.0, 0.8]))
    assert MemoryOptions.from_flags("sk_mt", {"sk_pairs": "f"}).sk_max_lambda == 0.99
    with pytest.raises(ValueError, match="--sk-max-lambda must lie in"):
        MemoryOptions.from_flags("sk_mt", {"sk_pairs": "f", "sk_max_lambda": 1.5})
    with pytest.raises(ValueError, match="--sk-max-lambda has no effect"):
        MemoryOptions.from_flags("knn", {"datastore": "d", "sk_max_lambda": 0.5})
