"""kNN-LM and TRIMELM_ext evaluation (--eval-memory knn / trime_ext) against naive loops,
through fairseq's SequenceScorer (the scorer of fairseq-eval-lm), plus their errors."""

import math

import numpy as np
import pytest
import torch
from fairseq.sequence_scorer import SequenceScorer
from tiny_models import lm_sample, tiny_lm, tiny_task

from trime_fairseq.checksums import dictionary_checksum, model_checksum
from trime_fairseq.memory.datastore import DatastoreError, DatastoreSpec, DatastoreWriter
from trime_fairseq.memory.eval_memory import MemoryOptions
from trime_fairseq.memory.keys import TRIME_KEY, get_keys

PAD_CONTEXT = 3  # the first positions of every row are context (target = pad), as with --context-window


def scored(model, task, sample, softmax_batch=None):
    scorer = SequenceScorer(task.target_dictionary, softmax_batch=softmax_batch)
    hypos = scorer.generate([model], dict(sample))
    return torch.cat([h[0]["positional_scores"] for h in hypos])


def eval_sample(task, seed=3, bsz=2, tsz=10):
    sample = lm_sample(task, bsz=bsz, tsz=tsz, seed=seed)
    sample["target"][:, :PAD_CONTEXT] = task.dictionary.pad()
    sample["start_indices"] = [PAD_CONTEXT] * bsz
    return sample


def forward(model, sample):
    with torch.no_grad():
        return model(**sample["net_input"])


def build_datastore(path, model, task, samples, metric="ip", key_type=TRIME_KEY):
    """Exact (Flat) datastore of the model's keys at every real-target position of ``samples``."""
    model.eval()
    pad = task.dictionary.pad()
    keys, values = [], []
    for sample in samples:
        k = get_keys(forward(model, sample), key_type)
        real = sample["target"].ne(pad)
        keys.append(k[real].float())
        values.append(sample["target"][real])
    keys, values = torch.cat(keys), torch.cat(values)
    spec = DatastoreSpec(dim=keys.size(1), key_type=key_type, metric=metric, dictionary_size=len(task.dictionary),
                         dictionary_sha256=dictionary_checksum(task.dictionary), model_path="tiny.pt",
                         model_sha256=model_checksum(model.state_dict()))
    writer = DatastoreWriter(path, spec, capacity=len(values))
    writer.add(keys.half().numpy(), values.int().numpy())
    writer.commit(1)
    writer.finish_keys()
    writer.build_index("Flat", progress_bar=False)
    writer.finalize()
    return keys.half().double(), values  # what the datastore holds


def memory_model(path, **options):
    """A task with the memory options and its model (same weights as tiny_lm(seed=0))."""
    task = tiny_task(datastore=str(path), **options)
    return task, tiny_lm(task).eval()


def naive(model, sample, store_keys, store_values, pad, mode, k, T=1.0, lam=0.25, tau=1.0, cache_lam=0.0,
          theta=0.3, metric="ip"):
    """(B, T) log P(target) with explicit per-position distributions and a brute-force top-k search."""
    out = forward(model, sample)
    logits = out[0].double()  # (B, T, V) full-softmax logits
    g = get_keys(out, TRIME_KEY).double()
    f = out[1]["trime_feature"].double()
    src, target = sample["net_input"]["src_tokens"], sample["target"]
    bsz, tsz, vocab = logits.shape
    d = g.size(-1)
    res = torch.zeros(bsz, tsz, dtype=torch.float64)
    for b in range(bsz):
        for t in range(tsz):
            w = int(target[b, t])
            if w == pad:
                continue
            p_lm = torch.softmax(logits[b, t], -1)
            q = g[b, t].float().double()  # faiss searches with float32 queries
            if metric == "ip":
                raw = store_keys @ q
            else:
                raw = -((store_keys - q) ** 2).sum(-1)
            top = torch.argsort(raw, descending=True)[:k]
            if mode == "knn":
                weights = torch.exp(raw[top] / T)
                p_knn = torch.zeros(vocab, dtype=torch.float64).index_add_(0, store_values[top], weights)
                p = (1 - lam) * p_lm + lam * p_knn / weights.sum()
                cache = torch.zeros(vocab, dtype=torch.float64)
                for j in range(t):
                    cache[src[b, j + 1]] += torch.exp(theta * f[b, t] @ f[b, j])
                if cache_lam > 0 and t > 0:
                    p = (1 - cache_lam) * p + cache_lam * cache / cache.sum()
            else:  # trime_ext: Eq. 6 over vocab ∪ local ∪ retrieved, then Eq. 7-8
                sims = [(torch.dot(g[b, t], g[b, j]), int(src[b, j + 1])) for j in range(t)]
                sims += [(raw[i], int(store_values[i])) for i in top]
                mem = torch.zeros(vocab, dtype=torch.float64)
                mem2 = torch.zeros(vocab, dtype=torch.float64)
                for s, v in sims:
                    mem[v] += torch.exp(s / (math.sqrt(d) * tau))
                    mem2[v] += torch.exp(s / (math.sqrt(d) * T))
                tok = torch.exp(logits[b, t])
                p6 = (tok + mem) / (tok.sum() + mem.sum())
                p = (1 - lam) * p6 + lam * mem2 / mem2.sum()
            res[b, t] = p[w].log()
    return res


@pytest.fixture
def store(tmp_path):
    """A datastore of tiny_lm(seed=0)'s keys over two other batches, and its contents."""
    task = tiny_task()
    model = tiny_lm(task)
    keys, values = build_datastore(tmp_path / "ds", model, task, [eval_sample(task, seed=s) for s in (7, 8)])
    return tmp_path / "ds", keys, values


@pytest.mark.parametrize("softmax_batch", [None, 7])
@pytest.mark.parametrize("options", [
    dict(eval_memory="knn", knn_k=5, knn_temperature=2.0, knn_lambda=0.3),
    dict(eval_memory="knn", knn_k=4, knn_lambda=0.4, cache_lambda=0.2, cache_theta=0.5),
    dict(eval_memory="trime_ext", knn_k=6, memory_temperature=0.8, interpolation_temperature=1.5,
         interpolation_lambda=0.3),
])
def test_external_memory_equals_naive_reference(store, options, softmax_batch):
    path, keys, values = store
    task, model = memory_model(path, **options)
    sample = eval_sample(task)
    pad = task.dictionary.pad()
    got = scored(model, task, sample, softmax_batch)
    expect = naive(model, sample, keys, values, pad, options["eval_memory"], options["knn_k"],
                   T=options.get("knn_temperature", options.get("interpolation_temperature", 1.0)),
                   lam=options.get("knn_lambda", options.get("interpolation_lambda")),
                   tau=options.get("memory_temperature", 1.0), cache_lam=options.get("cache_lambda", 0.0),
                   theta=options.get("cache_theta", 0.3))
    real = sample["target"].ne(pad)
    torch.testing.assert_close(got.double(), expect[real], rtol=1e-5, atol=1e-5)  # scorer drops pad targets
    # target-only scoring (trime-tune) gives the same numbers
    memory = model.trime_eval_memory
    target_only = memory.target_log_probs(model.decoder, forward(model, sample), sample, memory.options)
    torch.testing.assert_close(target_only[real].double(), expect[real], rtol=1e-5, atol=1e-5)


def test_only_positions_with_a_real_target_are_searched(store, monkeypatch):
    path, _, _ = store
    task, model = memory_model(path, eval_memory="knn", knn_k=3)
    sample = eval_sample(task)
    searched = []
    external = model.trime_eval_memory.external
    original = external.search
    monkeypatch.setattr(external, "search", lambda q, features=None: searched.append(q.size(0)) or original(q, features))
    scored(model, task, sample, softmax_batch=6)  # chunks cut rows in the middle
    assert sum(searched) == int(sample["target"].ne(task.dictionary.pad()).sum())


def test_datastore_of_the_evaluated_text_drives_perplexity_far_down(tmp_path):
    task = tiny_task()
    model = tiny_lm(task)
    sample = eval_sample(task)
    build_datastore(tmp_path / "ds", model, task, [sample])
    plain = scored(model, task, sample)
    task, model = memory_model(tmp_path / "ds", eval_memory="knn", knn_k=1, knn_lambda=0.9)
    with_knn = scored(model, task, sample)
    # every context's own entry is its nearest neighbour (score q·q) and holds the target
    assert with_knn.mean() > math.log(0.9) - 1e-4 > plain.mean() + 1.0  # (scores of real targets only)


def test_knn_lambda_zero_is_the_plain_model(store):
    path, _, _ = store
    task, model = memory_model(path, eval_memory="knn", knn_k=4, knn_lambda=0.0)
    sample = eval_sample(task)
    plain_task = tiny_task()
    plain = scored(tiny_lm(plain_task).eval(), plain_task, sample)
    torch.testing.assert_close(scored(model, task, sample), plain.double(), rtol=1e-6, atol=1e-6)  # fairseq: fp32


def test_datastore_mismatches_are_refused(store, tmp_path):
    path, _, _ = store
    with pytest.raises(FileNotFoundError, match="not found"):
        memory_model(tmp_path / "nowhere", eval_memory="knn")
    with pytest.raises(DatastoreError, match="another dictionary"):
        task = tiny_task(words=25, eval_memory="knn", datastore=str(path), knn_k=2)
        tiny_lm(task)
    task, model = memory_model(path, eval_memory="knn", knn_k=2)
    other = tiny_lm(tiny_task(), seed=5)  # same shapes, other weights
    model.load_state_dict(other.state_dict())
    with pytest.raises(DatastoreError, match="another model"):
        scored(model, task, eval_sample(task))
    task = tiny_task(eval_memory="knn", datastore=str(path), knn_k=2)
    with pytest.raises(DatastoreError, match="dimension"):
        model = tiny_lm(task, dim=8)
        scored(model, task, eval_sample(task))
    with pytest.raises(DatastoreError, match="more neighbours"):
        memory_model(path, eval_memory="knn", knn_k=10_000)


def test_trime_ext_needs_an_inner_product_datastore_of_g(tmp_path):
    task = tiny_task()
    model = tiny_lm(task)
    build_datastore(tmp_path / "l2", model, task, [eval_sample(task, seed=7)], metric="l2")
    with pytest.raises(DatastoreError, match="metric ip"):
        memory_model(tmp_path / "l2", eval_memory="trime_ext", knn_k=2)
    memory_model(tmp_path / "l2", eval_memory="knn", knn_k=2)  # kNN-LM takes an L2 datastore


def test_option_errors():
    with pytest.raises(ValueError, match="needs --datastore"):
        MemoryOptions("knn")
    with pytest.raises(ValueError, match="--datastore is used by"):
        MemoryOptions("trime", datastore="x")
    with pytest.raises(ValueError, match="--knn-k"):
        MemoryOptions("knn", datastore="x", knn_k=0)
    with pytest.raises(ValueError, match="--knn-lambda"):
        MemoryOptions("knn", datastore="x", knn_lambda=1.5)
    with pytest.raises(ValueError, match="--interpolation-lambda"):
        MemoryOptions("trime_ext", datastore="x", interpolation_lambda=1.5)
    with pytest.raises(ValueError, match="--knn-temperature has no effect with --eval-memory trime_ext"):
        tiny_task(eval_memory="trime_ext", datastore="x", knn_temperature=2.0)
    with pytest.raises(ValueError, match="--knn-temperature"):
        MemoryOptions("knn", datastore="x", knn_temperature=0)
    with pytest.raises(ValueError, match="long-term memory"):
        MemoryOptions("knn", datastore="x", long_memory_size=10)  # kNN-LM's long memory is its cache's
    with pytest.raises(ValueError, match="--knn-k has no effect with --eval-memory trime"):
        tiny_task(eval_memory="trime", knn_k=5)
    with pytest.raises(ValueError, match="--knn-rescore has no effect with --eval-memory cache"):
        tiny_task(eval_memory="cache", knn_rescore=True)
    with pytest.raises(ValueError, match="--cache-lambda has no effect with --eval-memory trime_ext"):
        tiny_task(eval_memory="trime_ext", datastore="x", cache_lambda=0.1)


def test_generation_mixes_the_datastore_at_every_step(store):
    """fairseq's SequenceGenerator (beam 2, incremental decoding) calls get_normalized_probs without
    a sample: the per-step driver searches the live hypotheses' last position once per step, and every
    step's distribution equals (1-λ) p_LM + λ p_kNN over a brute-force top-K."""
    from fairseq.sequence_generator import SequenceGenerator

    path, keys, values = store
    k, lam, temp = 3, 0.4, 2.0
    task, model = memory_model(path, eval_memory="knn", knn_k=k, knn_lambda=lam, knn_temperature=temp)
    memory = model.trime_eval_memory
    calls, original = [], memory.step_log_probs

    def record(decoder, net_output):
        out = original(decoder, net_output)
        calls.append((net_output[0][:, -1].double(), get_keys(net_output, TRIME_KEY)[:, -1].double(), out.clone()))
        return out

    memory.step_log_probs = record
    prompt = lm_sample(task, bsz=2, tsz=3)["net_input"]["src_tokens"]
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=6, min_len=6)
    sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.full((2,), 3)}}
    with torch.no_grad():
        hypos = generator.generate([model], sample, prefix_tokens=prompt)
    assert len(hypos) == 2 and len(calls) >= 6
    for logits, query, got in calls:
        assert query.size(0) in (2, 4) and got.shape == (query.size(0), 1, logits.size(-1))  # B x beam rows
        scores = query @ keys.T  # (B', N) brute force over the whole datastore
        top = scores.topk(k, dim=-1)
        p_knn = torch.zeros_like(logits)
        p_knn.scatter_add_(1, values[top.indices], torch.softmax(top.values / temp, -1))
        expected = ((1 - lam) * torch.softmax(logits, -1) + lam * p_knn).log()
        torch.testing.assert_close(got[:, 0].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(eval_memory="trime"),
                                     dict(eval_memory="knn", knn_k=2, cache_lambda=0.2)])
def test_generation_refuses_a_memory_it_cannot_apply_step_by_step(store, options):
    from fairseq.sequence_generator import SequenceGenerator

    path, _, _ = store
    task = tiny_task(**(dict(options, datastore=str(path)) if options["eval_memory"] == "knn" else options))
    model = tiny_lm(task).eval()
    prompt = lm_sample(task, bsz=1, tsz=2)["net_input"]["src_tokens"]
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=3)
    with pytest.raises(ValueError, match="uses the local memory of the scored sequence"):
        generator.generate([model], {"net_input": {"src_tokens": prompt, "src_lengths": torch.full((1,), 2)}})
