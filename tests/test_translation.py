"""kNN-MT and TRIME-MT (trime_translation, trime_mt_loss, translation datastores, BM25 sentence
batching) against naive references, through fairseq's SequenceGenerator / SequenceScorer, and
end to end through the real CLIs on a Multi30k slice."""

import json
import math
import re
from argparse import Namespace

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, run_cli
from fairseq.data import Dictionary, LanguagePairDataset
from fairseq.sequence_generator import SequenceGenerator
from fairseq.sequence_scorer import SequenceScorer

import trime_fairseq  # noqa: F401
from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
from trime_fairseq.criterions.trime_mt_loss import TrimeMTLoss
from trime_fairseq.memory.datastore import DatastoreError, DatastoreSpec, DatastoreWriter
from trime_fairseq.memory.keys import TRIME_KEY, get_keys
from trime_fairseq.tasks.trime_translation import TrimeTranslationConfig, TrimeTranslationTask

VOCAB = 24


def dictionary(size=VOCAB) -> Dictionary:
    d = Dictionary()
    for i in range(size - d.nspecial):
        d.add_symbol(f"w{i}")
    return d


def mt_task(src_dict=None, tgt_dict=None, **options) -> TrimeTranslationTask:
    d = dictionary()
    cfg = TrimeTranslationConfig(source_lang="de", target_lang="en", **options)
    return TrimeTranslationTask(cfg, src_dict or d, tgt_dict or d)


def tiny_mt(task, seed=0):
    """A 2+2-layer transformer (float64, no dropout)."""
    from fairseq.models.transformer import base_architecture

    torch.manual_seed(seed)
    args = Namespace(arch="transformer", encoder_layers=2, decoder_layers=2, encoder_embed_dim=16,
                     decoder_embed_dim=16, encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32,
                     encoder_attention_heads=2, decoder_attention_heads=2, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, max_source_positions=64, max_target_positions=64,
                     share_all_embeddings=task.source_dictionary == task.target_dictionary)
    base_architecture(args)
    return task.build_model(args).double().eval()


def pairs(task, n=6, seed=1, types=8):
    """Random sentence pairs over few word types (targets repeat across sentences)."""
    g = np.random.default_rng(seed)
    d = task.target_dictionary
    src = [torch.tensor(list(d.nspecial + g.integers(0, types, g.integers(2, 7))) + [d.eos()]) for _ in range(n)]
    tgt = [torch.tensor(list(d.nspecial + g.integers(0, types, g.integers(2, 7))) + [d.eos()]) for _ in range(n)]
    return LanguagePairDataset(src, [len(s) for s in src], d, tgt, [len(t) for t in tgt], d, shuffle=False)


def batch(dataset, ids=None):
    ids = range(len(dataset)) if ids is None else ids
    return dataset.collater([dataset[i] for i in ids])


def teacher_forced_keys(model, sample, key=TRIME_KEY):
    with torch.no_grad():
        out = model(**sample["net_input"])
    return out, get_keys(out, key)


def build_datastore(path, model, task, sample, metric="l2"):
    """Exact (Flat) datastore of the decoder's g at every target position of ``sample``."""
    _, g = teacher_forced_keys(model, sample)
    real = sample["target"].ne(task.target_dictionary.pad())
    keys, values = g[real].float(), sample["target"][real]
    d = task.target_dictionary
    spec = DatastoreSpec(dim=keys.size(1), key_type=TRIME_KEY, metric=metric, dictionary_size=len(d),
                         dictionary_sha256=dictionary_checksum(d), model_path="tiny.pt",
                         model_sha256=loaded_model_checksum(model))
    writer = DatastoreWriter(path, spec, capacity=len(values), overwrite=True)
    writer.add(keys, values.int())
    writer.commit(1)
    writer.finish_keys()
    writer.build_index("Flat", progress_bar=False)
    writer.finalize()
    return keys.half().double(), values


def memory_mt(path, **options):
    task = mt_task(datastore=str(path), **options)
    return task, tiny_mt(task)


def naive_step(logits, query, keys, values, mode, k, metric, T=1.0, lam=0.25, tau=1.0, tau2=1.0):
    """(B', V) log-probabilities of one decoding step with a brute-force search over the datastore."""
    d = query.size(-1)
    scores = query @ keys.T if metric == "ip" else -torch.cdist(query, keys) ** 2  # (B', N)
    top = scores.topk(k, dim=-1)
    vals = values[top.indices]  # (B', k)
    p_lm = torch.softmax(logits, -1)
    if mode == "knn":
        p = torch.zeros_like(p_lm).scatter_add_(1, vals, torch.softmax(top.values / T, -1))
        return ((1 - lam) * p_lm + lam * p).log()
    tok = torch.exp(logits)
    mem = torch.zeros_like(tok).scatter_add_(1, vals, torch.exp(top.values / (math.sqrt(d) * tau)))
    p6 = (tok + mem) / (tok.sum(-1, keepdim=True) + mem.sum(-1, keepdim=True))
    p7 = torch.zeros_like(tok).scatter_add_(1, vals, torch.softmax(top.values / (math.sqrt(d) * tau2), -1))
    return ((1 - lam) * p6 + lam * p7).log()


CASES = [
    (dict(eval_memory="knn", knn_k=5, knn_temperature=3.0, knn_lambda=0.4), "l2"),
    (dict(eval_memory="trime_ext", knn_k=6, memory_temperature=0.7, interpolation_temperature=2.0,
          interpolation_lambda=0.3), "ip"),
]


@pytest.fixture
def store(tmp_path):
    """Datastores (l2 and ip) of tiny_mt(seed=0)'s decoder keys over a batch of other sentence pairs."""
    task = mt_task()
    model = tiny_mt(task)
    sample = batch(pairs(task, n=8, seed=5))
    out = {}
    for metric in ("l2", "ip"):
        out[metric] = (tmp_path / metric, *build_datastore(tmp_path / metric, model, task, sample, metric))
    return out


@pytest.mark.parametrize("options,metric", CASES)
def test_beam_search_steps_equal_a_naive_reference_and_full_prefix_scoring(store, options, metric):
    """fairseq's SequenceGenerator (beam 3, incremental decoding, sentences finishing at different
    steps): every step's distribution is the model's last-position distribution mixed with a
    brute-force top-K over the datastore, and equals scoring the whole prefix without
    incremental state."""
    path, keys, values = store[metric]
    task, model = memory_mt(path, **options)
    memory = model.trime_eval_memory
    calls, original = [], memory.step_log_probs

    def record(decoder, net_output):
        out = original(decoder, net_output)
        calls.append((net_output[0][:, -1].clone(), get_keys(net_output, TRIME_KEY)[:, -1].clone(), out.clone()))
        return out

    memory.step_log_probs = record
    sample = batch(pairs(task, n=3, seed=9))
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=6)
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    assert len(hypos) == 3 and len(calls) >= 3
    assert any(c[0].size(0) < 9 for c in calls), "finished sentences leave the batch"
    opts = dict(T=options.get("knn_temperature", 1.0), lam=options.get("knn_lambda", options.get("interpolation_lambda")),
                tau=options.get("memory_temperature", 1.0), tau2=options.get("interpolation_temperature", 1.0))
    for logits, query, got in calls:
        assert got.shape == (query.size(0), 1, logits.size(-1))
        expected = naive_step(logits.double(), query.double(), keys, values, options["eval_memory"],
                              options["knn_k"], metric, **opts)
        torch.testing.assert_close(got[:, 0].double(), expected, rtol=1e-6, atol=1e-6)
    # the final hypotheses' scores: teacher-forced full-prefix scoring of each hypothesis gives the same steps
    src = sample["net_input"]
    for i, hyp_list in enumerate(hypos):
        tokens = hyp_list[0]["tokens"]
        prev = torch.cat([tokens.new_tensor([task.target_dictionary.eos()]), tokens[:-1]]).unsqueeze(0)
        scored = dict(id=torch.tensor([i]), net_input=dict(src_tokens=src["src_tokens"][i:i + 1],
                                                            src_lengths=src["src_lengths"][i:i + 1],
                                                            prev_output_tokens=prev),
                      target=tokens.unsqueeze(0), ntokens=len(tokens), nsentences=1)
        full = SequenceScorer(task.target_dictionary).generate([model], scored)[0][0]["positional_scores"]
        torch.testing.assert_close(full.double(), hyp_list[0]["positional_scores"].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,metric", CASES)
def test_score_reference_equals_the_teacher_forced_mixture(store, options, metric):
    """--score-reference (SequenceScorer, the full-vocabulary driver): every reference token's score
    is the naive mixture at its teacher-forced decoder state; padding is never searched."""
    path, keys, values = store[metric]
    task, model = memory_mt(path, **options)
    sample = batch(pairs(task, n=4, seed=11))
    hypos = SequenceScorer(task.target_dictionary).generate([model], sample)
    plain = tiny_mt(mt_task())
    out, g = teacher_forced_keys(plain, sample)
    opts = dict(T=options.get("knn_temperature", 1.0), lam=options.get("knn_lambda", options.get("interpolation_lambda")),
                tau=options.get("memory_temperature", 1.0), tau2=options.get("interpolation_temperature", 1.0))
    pad = task.target_dictionary.pad()
    for i, h in enumerate(hypos):
        real = sample["target"][i].ne(pad)
        lp = naive_step(out[0][i][real].double(), g[i][real].double(), keys, values, options["eval_memory"],
                        options["knn_k"], metric, **opts)
        expected = lp.gather(1, sample["target"][i][real].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(h[0]["positional_scores"].double(), expected, rtol=1e-6, atol=1e-6)


# -- the training objective ------------------------------------------------------------------------

def mt_criterion(task, **overrides):
    options = dict(ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False,
                   train_memory_temperature=0.8, memory_block_size=0)
    options.update(overrides)
    return TrimeMTLoss(task, **options)


def naive_mt_losses(logits, g, target, pad, tau, topk=0):
    """Eq. 5 with memory = the target positions of the other sentences (only the ``topk`` most
    similar of them per position when ``topk`` > 0): explicit loops."""
    bsz, tsz, _ = logits.shape
    d = g.size(-1)
    out = torch.zeros(bsz, tsz, dtype=torch.float64)
    for b in range(bsz):
        for t in range(tsz):
            w = int(target[b, t])
            if w == pad:
                continue
            entries = []  # (similarity, next token) of every other sentence's real position
            for b2 in range(bsz):
                if b2 == b:
                    continue  # no entry of the sentence itself
                for t2 in range(tsz):
                    if int(target[b2, t2]) == pad:
                        continue
                    entries.append((torch.dot(g[b, t], g[b2, t2]) / (math.sqrt(d) * tau), int(target[b2, t2])))
            if topk:
                entries = sorted(entries, key=lambda e: e[0].item(), reverse=True)[:topk]
            num = torch.exp(logits[b, t, w])
            den = torch.exp(logits[b, t]).sum()
            for sim, value in entries:
                den = den + torch.exp(sim)
                if value == w:
                    num = num + torch.exp(sim)
            out[b, t] = -torch.log(num / den)
    return out


@pytest.mark.parametrize("block,topk", [(0, 0), (7, 0), (0, 3), (7, 5)])
def test_trime_mt_loss_and_gradient_equal_naive_loops(block, topk):
    """Value and gradients of trime_mt_loss equal a float64 loop over vocabulary ∪ the other
    sentences' positions, with every entry or the top-K (--train-memory-topk, which always scores
    the dense memory, whatever --memory-block-size)."""
    task = mt_task()
    model = tiny_mt(task).train()
    sample = batch(pairs(task, n=4, seed=2))
    crit = mt_criterion(task, memory_block_size=block, train_memory_topk=topk)
    trime, ce, in_memory, valid = crit.token_losses(model, sample)
    out = model(**sample["net_input"])
    g = get_keys(out, TRIME_KEY)
    pad = task.target_dictionary.pad()
    reference = naive_mt_losses(out[0].double(), g.double(), sample["target"], pad, 0.8, topk).view(-1)
    if topk:  # in_memory: the target among the kept entries only
        assert in_memory[valid].float().mean() < 1
    torch.testing.assert_close(trime[valid], reference[valid])
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(trime[valid].sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(reference[valid].sum(), params, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b)


def test_a_sentence_never_sees_its_own_target_entries():
    """Changing the targets (and keys) of a sentence leaves its own loss terms' memory unchanged:
    alone in a batch, the loss is plain cross-entropy; with others, their entries only."""
    task = mt_task()
    model = tiny_mt(task)
    data = pairs(task, n=3, seed=4)
    crit = mt_criterion(task)
    alone = batch(data, [0])
    trime, ce, in_memory, valid = crit.token_losses(model, alone)
    torch.testing.assert_close(trime[valid], ce[valid])
    assert not in_memory.any()
    # a sentence repeated twice: the other copy is memory, the copy itself is not
    same = data.collater([data[0], data[0]])
    trime2, ce2, in_memory2, valid2 = crit.token_losses(model, same)
    assert in_memory2[valid2].all() and (trime2[valid2] < ce2[valid2]).all()


# -- errors ----------------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors(store, tmp_path):
    path, _, _ = store["l2"]
    with pytest.raises(ValueError, match="--knn-temperature has no effect with --eval-memory trime_ext"):
        mt_task(eval_memory="trime_ext", datastore=str(path), knn_temperature=2.0)
    with pytest.raises(DatastoreError, match="metric ip"):
        memory_mt(path, eval_memory="trime_ext", knn_k=2)
    with pytest.raises(DatastoreError, match="more neighbours"):
        memory_mt(path, eval_memory="knn", knn_k=10_000)
    other = dictionary(VOCAB + 8)  # a datastore of another (e.g. the source) dictionary
    with pytest.raises(DatastoreError, match="another dictionary"):
        tiny_mt(mt_task(src_dict=dictionary(), tgt_dict=other, eval_memory="knn", datastore=str(path), knn_k=2))
    task, model = memory_mt(path, eval_memory="knn", knn_k=2)
    model.load_state_dict(tiny_mt(mt_task(), seed=3).state_dict())  # another model's weights
    with pytest.raises(DatastoreError, match="another model"):
        SequenceScorer(task.target_dictionary).generate([model], batch(pairs(task, n=2)))
    with pytest.raises(ValueError, match="not for translation"):
        mt_task(batching="consecutive")
    with pytest.raises(ValueError, match="needs --bm25-order"):
        mt_task(batching="bm25")


# -- end to end through the CLIs on a Multi30k slice -----------------------------------------------

def test_cli_train_datastore_generate_on_multi30k(multi30k_bin, tmp_path):
    """fairseq-train (trime_mt_loss with TRIME's released memory -- top-8, τ_train 10 --, BM25 batching of target
    sentences filled with real tokens) -> trime-build-datastore (every target token + EOS once; the checkpoint's
    training-only batching options reset) -> fairseq-generate --eval-memory knn: BLEU printed, and --score-reference."""
    data = multi30k_bin
    order = tmp_path / "bm25.order"
    run_cli([PYTHON, "-m", "trime_fairseq.cli.bm25_batches", "--data", data, "--source-lang", "de",
             "--target-lang", "en", "--output", order, "--no-progress-bar"], env={"OMP_NUM_THREADS": "1"})
    save = tmp_path / "ckpt"
    train = run_cli([
        PYTHON, "-m", "fairseq_cli.train", data, "--user-dir", ROOT / "trime_fairseq", "--task", "trime_translation",
        "--arch", "transformer_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim",
        "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-all-embeddings",
        "--criterion", "trime_mt_loss", "--ce-warmup-updates", "2", "--batching", "bm25", "--bm25-order", order,
        "--bm25-fill", "real", "--train-memory-topk", "8", "--train-memory-temperature", "10",
        "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "1500", "--max-update", "12", "--cpu",
        "--num-workers", "0", "--save-dir", save, "--no-epoch-checkpoints", "--disable-validation",
        "--log-format", "simple", "--log-interval", "4",
    ], env={"OMP_NUM_THREADS": "1"})
    assert "trime_loss=" in train and "bm25 batching" in train
    ckpt, dstore = save / "checkpoint_last.pt", tmp_path / "dstore"
    log = run_cli([PYTHON, "-m", "trime_fairseq.cli.build_datastore", "--path", ckpt, "--gen-subset", "train",
                   "--output", dstore, "--index-factory", "Flat", "--metric", "l2", "--cpu", "--no-progress-bar"],
                  env={"OMP_NUM_THREADS": "1"})
    meta = json.loads((dstore / "datastore.json").read_text())
    expected = sum(len(line.split()) + 1 for line in (data / "bpe" / "train.en").read_text().splitlines())
    assert meta["size"] == expected and meta["source"]["task"] == "translation", log[-2000:]
    generate = [PYTHON, "-m", "fairseq_cli.generate", data, "--user-dir", ROOT / "trime_fairseq", "--task",
                "trime_translation", "--path", ckpt, "--gen-subset", "test", "--cpu", "--beam", "3", "--max-tokens",
                "4000", "--remove-bpe", "--scoring", "sacrebleu", "--eval-memory", "knn", "--datastore", dstore,
                "--knn-k", "8", "--knn-lambda", "0.5", "--knn-temperature", "10"]
    out = run_cli(generate, env={"OMP_NUM_THREADS": "1"})
    assert re.search(r"Generate test with beam=3: BLEU = [0-9.]+", out), out[-2000:]
    scored = run_cli(generate + ["--score-reference"], env={"OMP_NUM_THREADS": "1"})
    assert "Generate test with beam=3" in scored
    # trime-tune-mt on valid: K on the edge of {4, 8}, the single T and λ, widened once; the best point's
    # BLEU is what fairseq-generate reports for its flags
    from trime_fairseq.cli import tune_mt

    tuned = tmp_path / "tune_mt.json"
    tune_args = [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_translation", "--path",
                 str(ckpt), "--gen-subset", "valid", "--cpu", "--beam", "3", "--max-tokens", "4000", "--remove-bpe",
                 "--eval-memory", "knn", "--datastore", str(dstore), "--ks", "4,8", "--knn-temperatures", "10",
                 "--knn-lambdas", "0.5", "--widen-edges", "1", "--results-json", str(tuned)]
    best, results = tune_mt.main(tune_args)
    report = json.loads(tuned.read_text())
    assert [r["axes"] for r in report["rounds"]][0] == {"knn_k": [4, 8], "knn_temperature": [10.0],
                                                         "knn_lambda": [0.5]}
    widened = report["rounds"][1]["axes"]
    assert widened["knn_k"] in ([2, 4, 8], [4, 8, 16]) and widened["knn_temperature"] == [5.0, 10.0, 20.0]
    assert widened["knn_lambda"] == pytest.approx([0.25, 0.5, 0.6])
    assert len(report["points"]) == len(results) == 2 + 25 and report["best"] == tune_mt.describe(best)
    points_log = tmp_path / "tune_mt.json.points.jsonl"
    assert not points_log.exists()  # removed once the results are written
    # an interrupted tuning resumes: started again with the same arguments it decodes only the points it lacks,
    # and their BLEU is the uninterrupted run's
    short = tune_args[:tune_args.index("--widen-edges")] + ["--widen-edges", "0", "--results-json",
                                                            str(tmp_path / "short.json")]
    decoded, real_bleu = [], tune_mt.bleu

    def interrupted(*args):
        if len(decoded) == 2:
            raise KeyboardInterrupt
        decoded.append(real_bleu(*args))
        return decoded[-1]

    tune_mt.bleu = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            tune_mt.main(short)
    finally:
        tune_mt.bleu = real_bleu
    assert len((tmp_path / "short.json.points.jsonl").read_text().splitlines()) == 1 + 2
    counted = []
    tune_mt.bleu = lambda *args: counted.append(1) or real_bleu(*args)
    try:
        _, resumed = tune_mt.main(short)
    finally:
        tune_mt.bleu = real_bleu
    assert len(counted) == 1 and len(resumed) == 2  # K 4, K 8 (and the plain point): two of the three from the log
    assert all(resumed[p] == pytest.approx(results[p]) for p in resumed)
    with pytest.raises(ValueError, match="another tuning"):  # a log of other arguments is not mixed in
        (tmp_path / "short.json.points.jsonl").write_text('{"score_log": {"checkpoint": "elsewhere"}}\n')
        tune_mt.main(short)
    # nor one scored against an earlier build of the datastore at the same path
    (tmp_path / "short.json.points.jsonl").unlink()
    def stopped(*args):  # before its first point
        raise KeyboardInterrupt

    tune_mt.bleu = stopped
    meta_path = dstore / "datastore.json"
    built = meta_path.read_text()
    try:
        with pytest.raises(KeyboardInterrupt):
            tune_mt.main(short)
        assert (tmp_path / "short.json.points.jsonl").exists()
        meta_path.write_text(json.dumps({**json.loads(built), "created": "rebuilt"}))
        with pytest.raises(ValueError, match="differs in: datastore"):
            tune_mt.main(short)
    finally:
        tune_mt.bleu = real_bleu
        meta_path.write_text(built)
    valid = run_cli([*generate[:generate.index("--gen-subset") + 1], "valid",
                     *generate[generate.index("--gen-subset") + 2:generate.index("--eval-memory")],
                     *report["best"].split(), "--datastore", dstore], env={"OMP_NUM_THREADS": "1"})
    reported = float(re.search(r"Generate valid with beam=3: BLEU = ([0-9.]+)", valid).group(1))
    assert report["best_bleu"] == pytest.approx(reported, abs=0.01), valid[-2000:]


def test_every_sentence_of_an_evaluation_split_is_batched():
    """fairseq 0.12 drops a last batch that is not a multiple of --required-batch-size-multiple (8):
    fairseq-generate would leave the longest sentences of a test set untranslated. Evaluation splits
    keep every sentence; the training split keeps the option as given (fairseq's own batches)."""
    task = mt_task()
    data = pairs(task, n=21)  # 21 = 2 x 8 + 5
    task.datasets["test"] = data

    def batches(dataset):
        itr = task.get_batch_iterator(dataset, max_sentences=8, required_batch_size_multiple=8, seed=1)
        return [list(b) for b in itr.frozen_batches]

    assert sorted(i for b in batches(data) for i in b) == list(range(21))
    from fairseq.tasks.translation import TranslationTask

    train = pairs(task, n=21)
    task.args.train_subset = "train"  # fairseq's --train-subset (dataset.train_subset)
    task.datasets["train"] = train
    fairseq_own = TranslationTask.get_batch_iterator(task, train, max_sentences=8, required_batch_size_multiple=8,
                                                     seed=1)
    assert batches(train) == [list(b) for b in fairseq_own.frozen_batches]


def test_bm25_order_of_other_data_is_a_clear_error(tmp_path):
    """The training split must be the order file's: another item count, an order of LM segments, or
    another dictionary never falls back to fairseq's random batches."""
    from trime_fairseq.data.bm25 import write_order_file

    data = pairs(mt_task(), n=6)
    d = data.tgt_dict
    good = dict(split="train", items="target_sentences", source_lang="de", target_lang="en",
                num_tokens=int(np.sum(data.tgt_sizes)), dictionary_sha256=dictionary_checksum(d))
    cases = [
        (dict(good), np.arange(5), "5 items vs 6"),
        (dict(good, items="segments"), np.arange(6), "an order of segments"),
        (dict(good, dictionary_sha256="0" * 64), np.arange(6), "a different dictionary"),
        (dict(good, num_tokens=3), np.arange(6), "3 tokens"),
    ]
    for i, (meta, order, message) in enumerate(cases):
        path = tmp_path / f"order{i}"
        write_order_file(path, order, meta)
        task = mt_task(batching="bm25", bm25_order=str(path))
        task.cfg.update_freq = [1]
        task.datasets["train"] = data
        with pytest.raises(ValueError, match=f"built for other training data.*{message}"):
            task.get_batch_iterator(data, max_tokens=100, max_positions=(64, 64))
    path = tmp_path / "order_ok"
    write_order_file(path, np.random.default_rng(0).permutation(6), good)
    task = mt_task(batching="bm25", bm25_order=str(path))
    task.cfg.update_freq = [1]
    task.datasets["train"] = data
    batches = list(task.get_batch_iterator(data, max_tokens=24, max_positions=(64, 64)).next_epoch_itr(shuffle=True))
    ids = sorted(int(i) for b in batches for i in b["id"])
    assert ids == list(range(6)), "every sentence once per epoch"
    for b in batches:  # filled up to --max-tokens, padding counted (as fairseq's batch_by_size)
        longest = max(max(int(data.src_sizes[i]), int(data.tgt_sizes[i])) for i in b["id"].tolist())
        assert len(b["id"]) * longest <= 24


def test_bm25_fill_real_counts_real_tokens():
    """--bm25-fill real: consecutive chain pieces of at most --max-tokens *real* tokens (each item's max(src, tgt)),
    every sentence once per epoch; padded (the default) never exceeds --max-tokens with padding; real holds more
    sentences per batch on a chain of mixed lengths; the option without --batching bm25 is an error."""
    from trime_fairseq.data.bm25_batching import chain_token_batches

    sizes = np.array([2, 9, 3, 8, 2, 9, 4, 7, 3, 6])
    chain = np.random.default_rng(0).permutation(len(sizes))
    padded = chain_token_batches(chain, sizes, 18, None, 1, 1, 1, shuffle=False)
    real = chain_token_batches(chain, sizes, 18, None, 1, 1, 1, shuffle=False, fill="real")
    for batches in (padded, real):
        assert np.array_equal(np.concatenate(batches), chain), "consecutive pieces of the chain, each item once"
    assert all(len(b) * sizes[b].max() <= 18 for b in padded)
    assert all(sizes[b].sum() <= 18 for b in real)
    assert all(sizes[b].sum() + sizes[n[0]] > 18 for b, n in zip(real, real[1:])), "filled before cutting"
    assert len(real) < len(padded)
    with pytest.raises(ValueError, match="--bm25-fill must be one of"):
        chain_token_batches(chain, sizes, 18, None, 1, 1, 1, fill="sum")
    with pytest.raises(ValueError, match="--bm25-fill applies to --batching bm25 only"):
        mt_task(bm25_fill="real")


def copy_pairs(task, n, seed=1, types=12):
    """Pairs whose target copies the source (3-8 words over few types, so targets repeat across sentences)."""
    g = np.random.default_rng(seed)
    d = task.target_dictionary
    sentences = [torch.tensor(list(d.nspecial + g.integers(0, types, g.integers(3, 9))) + [d.eos()]) for _ in range(n)]
    sizes = [len(s) for s in sentences]
    return LanguagePairDataset(sentences, sizes, d, sentences, sizes, d, shuffle=False)


def briefly_trained(topk, tau, steps=150, seed=0):
    """A tiny TRIME-MT model trained in-process on a copy task: (share of greedy hypotheses of its token
    distribution alone that end with EOS, token-only cross-entropy of a batch)."""
    task = mt_task()
    torch.manual_seed(seed)
    model = tiny_mt(task, seed).float().train()
    data = copy_pairs(task, 64)
    crit = mt_criterion(task, train_memory_temperature=tau, train_memory_topk=topk)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss, _, log = crit(model, batch(data, np.random.default_rng(step).permutation(64)[:32]))
        optimizer.zero_grad()
        (loss / log["ntokens"]).backward()
        optimizer.step()
    model.eval()
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=1, max_len_a=0, max_len_b=20)
    hypotheses = generator.generate([model], batch(data, range(16)))
    eos = task.target_dictionary.eos()
    ended = np.mean([h[0]["tokens"][-1] == eos and len(h[0]["tokens"]) < 20 for h in hypotheses])
    with torch.no_grad():
        _, ce, _, valid = crit.token_losses(model, batch(data, range(32)))
    return ended, float(ce[valid].mean())


def test_token_head_of_briefly_trained_trime_mt_emits_eos():
    """The released objective (top-8 entries, τ_train 10) trains a token distribution that ends its hypotheses;
    Eq. 5 over every entry of the other sentences at τ_train 1 starves it (the memory carries EOS and the
    frequent tokens, whose token logits then get almost no gradient): its token-only cross-entropy stays
    several times higher after the same updates (measured 2.6 vs 0.44 nats here)."""
    ended, ce_top8 = briefly_trained(topk=8, tau=10.0)
    assert ended >= 0.85, f"only {ended:.0%} of the greedy hypotheses of the token distribution end"
    _, ce_every = briefly_trained(topk=0, tau=1.0)
    assert ce_every > 3 * ce_top8, (ce_every, ce_top8)


def test_diagnosis_statistics_equal_naive_sums_and_autograd():
    """scripts/trime_mt_diagnosis.py: the memory's share of Eq. 5's numerator, P, and ∂(−log P)/∂s_target
    equal explicit sums over vocabulary ∪ entries and autograd over every logit; cross-entropy's gradient is
    p_token − 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trime_mt_diagnosis", ROOT / "scripts" / "trime_mt_diagnosis.py")
    diagnosis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnosis)
    g = torch.Generator().manual_seed(0)
    n, v, m = 5, 7, 6
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    scores = torch.randn(n, m, generator=g, dtype=torch.float64)
    values = torch.randint(0, v, (n, m), generator=g)
    mask = torch.rand(n, m, generator=g) < 0.7
    mask[0] = False  # a position with an empty memory
    target = torch.randint(0, v, (n,), generator=g)
    target[1] = values[1][mask[1]][0] if mask[1].any() else target[1]
    stats = diagnosis.position_statistics(logits, scores, values, mask, target)
    for i in range(n):
        tok = torch.exp(logits[i, target[i]])
        mem = sum(torch.exp(scores[i, j]) for j in range(m) if mask[i, j] and values[i, j] == target[i])
        numerator = tok + mem
        normaliser = torch.exp(logits[i]).sum() + sum(torch.exp(scores[i, j]) for j in range(m) if mask[i, j])
        torch.testing.assert_close(stats["memory_share"][i].double(), torch.as_tensor(mem / numerator, dtype=torch.float64))
        torch.testing.assert_close(stats["p_joint"][i].double(), numerator / normaliser)
        torch.testing.assert_close(stats["grad_trime"][i].double(), tok / normaliser - tok / numerator)
        torch.testing.assert_close(stats["grad_ce"][i].double(), torch.softmax(logits[i], -1)[target[i]] - 1)
    full = logits.clone().requires_grad_(True)  # autograd over every logit through the library's Eq. 5
    from trime_fairseq.memory.mixing import joint_target_log_prob

    log_p = joint_target_log_prob(full.gather(1, target.unsqueeze(1)).squeeze(1), torch.logsumexp(full, -1), scores,
                                  values, mask, target)
    (grad,) = torch.autograd.grad(-log_p.sum(), full)
    torch.testing.assert_close(stats["grad_trime"].double(), grad.gather(1, target.unsqueeze(1)).squeeze(1))
    assert stats["memory_share"][0] == 0 and stats["entries"][0] == 0


@pytest.mark.parametrize("left_pad_source", [True, False])
def test_forward_chunks_give_the_one_forward_loss_and_gradients(left_pad_source):
    """--forward-chunks: the batch's forward in length chunks, each cropped to its own longest sentence, gives
    the loss terms and gradients of one forward over the padded batch (the memory still spans the batch)."""
    task = mt_task(left_pad_source=left_pad_source)
    model = tiny_mt(task)  # eval: no dropout
    data = pairs(task, n=9, seed=5)
    data.left_pad_source = left_pad_source
    sample = batch(data)
    params = [p for p in model.parameters() if p.requires_grad]
    outs = {}
    for chunks in (1, 3, 20):
        trime, ce, in_memory, valid = mt_criterion(task, forward_chunks=chunks, train_memory_topk=3).token_losses(
            model, sample)
        grads = torch.autograd.grad(trime[valid].sum() + 0.5 * ce[valid].sum(), params, allow_unused=True)
        outs[chunks] = (trime[valid], ce[valid], in_memory[valid], grads)
    from trime_fairseq.criterions.trime_mt_loss import length_chunks

    pad = task.target_dictionary.pad()
    crops = [chunk["target"].shape for _, chunk in length_chunks(sample, 3, left_pad_source, pad)]
    assert sum(b for b, _ in crops) == 9 and min(t for _, t in crops) < sample["target"].size(1)  # really cropped
    for chunks in (3, 20):
        for a, b in zip(outs[1][:3], outs[chunks][:3]):
            torch.testing.assert_close(a, b)
        for a, b in zip(outs[1][3], outs[chunks][3]):
            if a is not None or b is not None:
                torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="--forward-chunks must be >= 1"):
        mt_criterion(task, forward_chunks=0)
