"""FAISS datastore: round trip against brute force, metadata checks, truncation, interrupted builds, CLI."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import PYTHON, ROOT, run_cli
from trime_fairseq.checksums import dictionary_checksum, model_checksum
from trime_fairseq.memory import faiss_index as fi
from trime_fairseq.memory.datastore import Datastore, DatastoreError, DatastoreSpec, DatastoreWriter
from trime_fairseq.memory.mixing import interpolate_memory, memory_log_probs

VOCAB = 50


def _data(n=3000, d=16, seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float16)
    values = rng.integers(0, vocab, n)
    return keys, values


def _spec(d=16, metric="ip", vocab=VOCAB, model_sha="1" * 64, dict_sha="0" * 64, key_type="trime_key",
          key_dtype="float16"):
    return DatastoreSpec(dim=d, key_type=key_type, metric=metric, dictionary_size=vocab, dictionary_sha256=dict_sha,
                         model_path="ckpt.pt", model_sha256=model_sha, key_dtype=key_dtype)


def _build(path, keys, values, factory="Flat", metric="ip", chunk=700, nprobe=None, **spec_kw):
    w = DatastoreWriter(path, _spec(keys.shape[1], metric, **spec_kw), capacity=len(keys) + 5)  # capacity > N
    for i in range(0, len(keys), chunk):
        w.add(keys[i:i + chunk], values[i:i + chunk])
        w.commit(i // chunk + 1)
    w.finish_keys()
    w.build_index(factory, ntrain=100_000, add_chunk=500, progress_bar=False)
    return w.finalize(nprobe=nprobe)


def _brute(queries, keys, metric, k):
    keys = keys.astype(np.float32)
    if metric == "ip":
        s = queries @ keys.T
    else:
        s = -((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_datastore_equals_brute_force_and_reloads(tmp_path, metric):
    keys, values = _data()
    meta = _build(tmp_path / "ds", keys, values, metric=metric)
    assert meta["size"] == len(keys) and os.path.getsize(tmp_path / "ds" / "keys.f16") == keys.nbytes
    assert not (tmp_path / "ds" / "progress.json").exists()
    q = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    ids, scores = _brute(q, keys, metric, 10)
    store = Datastore.load(tmp_path / "ds", expect_dim=16)
    out = store.search(torch.from_numpy(q), 10)
    assert out.scores.dtype == torch.float32 and out.values.dtype == torch.long and out.mask.dtype == torch.bool
    assert out.scores.shape == out.values.shape == out.mask.shape == (7, 10) and bool(out.mask.all())
    np.testing.assert_allclose(out.scores.numpy(), scores, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out.values.numpy(), values[ids])
    np.testing.assert_array_equal(np.asarray(store.keys), keys)
    np.testing.assert_array_equal(np.asarray(store.values), values.astype(np.int32))
    again = Datastore.load(tmp_path / "ds").search(q, 10)  # numpy queries work too
    assert torch.equal(again.scores, out.scores) and torch.equal(again.values, out.values)


def test_ivfpq_round_trip_rescoring_and_missing_hits(tmp_path):
    keys, values = _data(n=2000)
    _build(tmp_path / "ds", keys, values, factory="IVF16,PQ4x4", nprobe=4)
    q = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    a = Datastore.load(tmp_path / "ds")
    assert a.meta["index"]["nprobe"] == 4 and a.meta["index"]["factory"] == "IVF16,PQ4x4"
    first = a.search(q, 8)
    second = Datastore.load(tmp_path / "ds").search(q, 8)  # reload: the same neighbours
    assert torch.equal(first.values, second.values) and torch.allclose(first.scores, second.scores)
    # re-scoring with the stored keys: exact scores of the same hits, best first
    approx_scores, approx_ids = Datastore.load(tmp_path / "ds", nprobe=16).search_ids(q, 8)
    scores, ids = Datastore.load(tmp_path / "ds", rescore=True, nprobe=16).search_ids(q, 8)
    full = q @ keys.astype(np.float32).T  # (5, N) exact
    np.testing.assert_allclose(scores, np.take_along_axis(full, ids, 1), rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert all(set(a) == set(b) for a, b in zip(approx_ids, ids))
    assert not np.allclose(approx_scores, np.take_along_axis(full, approx_ids, 1), atol=1e-2)  # PQ approximates
    # more neighbours asked than the probed lists hold: masked, -inf, value 0
    few = Datastore.load(tmp_path / "ds", nprobe=1).search(q, 1500)
    assert not bool(few.mask.all())
    assert torch.isneginf(few.scores[~few.mask]).all() and (few.values[~few.mask] == 0).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_search_equals_the_numpy_search(tmp_path, metric):
    """--knn-gpu searches through faiss.contrib.torch_utils (no numpy round trip on the GPU); on the
    CPU the same path must give the numpy path's hits, missing hits included."""
    keys, values = _data(n=2000)
    _build(tmp_path / "ds", keys, values, factory="IVF16,Flat", metric=metric, nprobe=2)
    store = Datastore.load(tmp_path / "ds")
    q = np.random.default_rng(4).standard_normal((6, 16)).astype(np.float32)
    for k in (8, 1500):  # 1500 > what 2 probed lists hold: missing hits
        a, b = store.search(q, k), store.search_torch(torch.from_numpy(q), k)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.values, b.values)
        torch.testing.assert_close(a.scores, b.scores)
    assert not bool(b.mask.all())


def test_search_feeds_the_shared_mixing_functions(tmp_path):
    keys, values = _data(n=500)
    _build(tmp_path / "ds", keys, values, metric="l2")
    memory = Datastore.load(tmp_path / "ds").search(np.asarray(keys[:4], np.float32), 16)
    assert torch.equal(memory.scores[:, 0], torch.zeros(4))  # a stored key finds itself at distance 0
    q = memory_log_probs(memory.scores / 10.0, memory.values, memory.mask, VOCAB)  # temperature by the caller
    torch.testing.assert_close(q.exp().sum(-1), torch.ones(4))
    log_p = torch.log_softmax(torch.randn(4, VOCAB), -1)
    mixed = interpolate_memory(log_p, memory.scores / 10.0, memory.values, memory.mask, 0.25)
    torch.testing.assert_close(mixed.exp(), 0.75 * log_p.exp() + 0.25 * q.exp())


def test_values_are_int32_for_large_vocabularies(tmp_path):
    keys, _ = _data(n=300)
    values = np.arange(300) * 900 + 12  # up to 269,112: overflows int16
    _build(tmp_path / "ds", keys, values, vocab=270_000)
    out = Datastore.load(tmp_path / "ds").search(np.asarray(keys[:3], np.float32), 300)
    assert int(out.values.max()) == int(values.max())
    with pytest.raises(DatastoreError, match="token ids"):
        DatastoreWriter(tmp_path / "bad", _spec(vocab=10), capacity=5).add(keys[:2], np.array([3, 10]))


def test_mismatched_model_dictionary_dimension_are_refused(tmp_path):
    from fairseq.data import Dictionary

    d = Dictionary()
    for w in ("a", "b", "c"):
        d.add_symbol(w)
    other = Dictionary()
    for w in ("a", "c", "b"):
        other.add_symbol(w)
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    keys, values = _data(n=200, vocab=len(d))
    _build(tmp_path / "ds", keys, values, vocab=len(d), dict_sha=dictionary_checksum(d),
           model_sha=model_checksum(state))
    d.save(str(tmp_path / "dict.txt"))
    ok = Datastore.load(tmp_path / "ds", expect_dim=16, expect_dictionary=d, expect_model=state,
                        expect_key_type="trime_key", expect_metric="ip")
    assert ok.size == 200
    Datastore.load(tmp_path / "ds", expect_dictionary=str(tmp_path / "dict.txt"))
    with pytest.raises(DatastoreError, match="dimension 16 but the model's queries have 32"):
        Datastore.load(tmp_path / "ds", expect_dim=32)
    with pytest.raises(DatastoreError, match="another dictionary"):
        Datastore.load(tmp_path / "ds", expect_dictionary=other)
    changed = dict(state, b=torch.full((2,), 2.0))
    with pytest.raises(DatastoreError, match="another model"):
        Datastore.load(tmp_path / "ds", expect_model=changed)
    with pytest.raises(DatastoreError, match="another model"):
        Datastore.load(tmp_path / "ds", expect_model="f" * 64)
    with pytest.raises(DatastoreError, match="trime_feature"):
        Datastore.load(tmp_path / "ds", expect_key_type="trime_feature")
    with pytest.raises(ValueError, match=r"queries must be \(Q, 16\)"):
        ok.search(np.zeros((2, 8), np.float32), 3)


@pytest.mark.parametrize("victim", ["keys.f16", "values.i32", "index.faiss"])
def test_truncated_or_missing_files_give_clear_errors(tmp_path, victim):
    keys, values = _data(n=400)
    _build(tmp_path / "ds", keys, values)
    path = tmp_path / "ds" / victim
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(DatastoreError, match="truncated"):
        Datastore.load(tmp_path / "ds")
    path.unlink()
    with pytest.raises(DatastoreError, match="missing"):
        Datastore.load(tmp_path / "ds")
    (tmp_path / "ds" / "datastore.json").unlink()
    with pytest.raises(DatastoreError, match="not a datastore"):
        Datastore.load(tmp_path / "ds")


def test_index_factory_too_large_for_the_datastore_is_refused(tmp_path):
    keys, values = _data(n=1000)
    w = DatastoreWriter(tmp_path / "ds", _spec(), capacity=1000)
    w.add(keys, values)
    w.commit(1)
    w.finish_keys()
    with pytest.raises(fi.IndexConfigError, match=r"needs at least 159744 training keys.*at most IVF16"):
        w.build_index("IVF4096,PQ8", progress_bar=False)
    with pytest.raises(fi.IndexConfigError, match="divisible by 5"):
        w.build_index("IVF4,PQ5x4", progress_bar=False)
    with pytest.raises(fi.IndexConfigError, match="nprobe applies to IVF"):
        fi.set_nprobe(fi.new_index("Flat", 16, "ip"), 4)


def test_interrupted_build_is_not_loadable_and_resumes(tmp_path, monkeypatch):
    keys, values = _data(n=2400)
    ref = tmp_path / "ref"
    _build(ref, keys, values, factory="IVF16,PQ4x4", chunk=600, nprobe=16)

    path = tmp_path / "ds"
    w = DatastoreWriter(path, _spec(), capacity=len(keys) + 5)
    w.add(keys[:600], values[:600])
    w.commit(1)
    w.add(keys[600:1200], values[600:1200])  # written but never committed: lost in the "crash"
    del w
    with pytest.raises(DatastoreError, match="incomplete datastore.*stage 'keys', 600 keys"):
        Datastore.load(path)
    with pytest.raises(DatastoreError, match="other settings.*metric"):
        DatastoreWriter(path, _spec(metric="l2"), capacity=len(keys) + 5)
    w = DatastoreWriter(path, _spec(), capacity=len(keys) + 5)
    assert (w.stage, w.rows, w.batches_done) == ("keys", 600, 1)
    for i in range(600, len(keys), 600):
        w.add(keys[i:i + 600], values[i:i + 600])
        w.commit(i // 600 + 1)
    w.finish_keys()

    calls = {"n": 0}
    real = fi.as_float32

    def crash_on_third_chunk(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption while adding keys")
        return real(x)

    monkeypatch.setattr(fi, "as_float32", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        w.build_index("IVF16,PQ4x4", ntrain=100_000, add_chunk=500, save_every=1, progress_bar=False)
    monkeypatch.setattr(fi, "as_float32", real)
    with pytest.raises(DatastoreError, match="stage 'adding'"):
        Datastore.load(path)
    w = DatastoreWriter(path, _spec(), capacity=len(keys) + 5)
    assert w.progress["added"] == 1000 and (path / "index.partial.faiss").exists()
    w.build_index("IVF16,PQ4x4", ntrain=100_000, add_chunk=500, save_every=1, progress_bar=False)
    w.finalize(nprobe=16)
    assert sorted(os.listdir(path)) == ["datastore.json", "index.faiss", "keys.f16", "values.i32"]
    q = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32)
    a, b = Datastore.load(path).search(q, 12), Datastore.load(ref).search(q, 12)
    assert torch.equal(a.values, b.values) and torch.equal(a.scores, b.scores)
    np.testing.assert_array_equal(np.asarray(Datastore.load(path).keys), keys)
    with pytest.raises(DatastoreError, match="--overwrite"):
        DatastoreWriter(path, _spec(), capacity=10)


def test_non_finite_keys_are_refused_with_their_entry_and_float32_keys_hold_them(tmp_path):
    keys, values = _data(n=50)
    big = keys.astype(np.float32)
    big[37, 5] = 1e5  # an unnormalised feature beyond float16's range (65504)
    w = DatastoreWriter(tmp_path / "f16", _spec(), capacity=50)
    w.add(big[:30], values[:30])
    with pytest.raises(DatastoreError, match=r"entry 37 .*not finite in float16.*--key-dtype float32"):
        w.add(big[30:], values[30:])
    nan = big.copy()
    nan[3, 0] = np.nan
    with pytest.raises(DatastoreError, match=r"entry 3 .*not finite in the model"):
        DatastoreWriter(tmp_path / "nan", _spec(key_dtype="float32"), capacity=50).add(nan, values)
    w = DatastoreWriter(tmp_path / "f32", _spec(key_dtype="float32"), capacity=50)
    w.add(big, values)
    w.commit(1)
    w.finish_keys()
    w.build_index("Flat", progress_bar=False)
    meta = w.finalize()
    assert meta["key_dtype"] == "float32" and (tmp_path / "f32" / "keys.f32").exists()
    store = Datastore.load(tmp_path / "f32")
    assert store.keys.dtype == np.float32 and store.keys[37, 5] == 1e5
    hit = store.search(big[37:38], 1, rescore=True)
    assert int(hit.values[0, 0]) == int(values[37])


# -- the CLI on a trained model ----------------------------------------------------------------

def test_cli_builds_a_datastore_from_a_trained_checkpoint(wikitext2_bin, tmp_path):
    from fairseq import utils

    from trime_fairseq.cli import build_datastore
    from trime_fairseq.memory.keys import get_keys

    save = tmp_path / "ckpt"
    run_cli([
        PYTHON, "-m", "fairseq_cli.train", wikitext2_bin, "--user-dir", ROOT / "trime_fairseq", "--task", "trime_lm",
        "--tokens-per-sample", "64", "--batch-size", "8", "--arch", "transformer_lm", "--decoder-layers", "2",
        "--decoder-embed-dim", "32", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
        "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2", "--criterion", "trime_loss",
        "--ce-warmup-updates", "0", "--optimizer", "adam", "--lr", "0.002", "--max-update", "2",
        "--disable-validation", "--cpu", "--num-workers", "0", "--save-dir", save, "--no-epoch-checkpoints",
        "--log-format", "simple", "--seed", "2",
    ], env={"OMP_NUM_THREADS": "1"})
    ckpt, out = save / "checkpoint_last.pt", tmp_path / "dstore"
    args = ["--path", ckpt, "--gen-subset", "valid", "--context-window", "32", "--max-tokens", "4096",
            "--output", out, "--index-factory", "IVF16,PQ8x4", "--nprobe", "16", "--metric", "l2", "--cpu",
            "--no-progress-bar"]
    log = run_cli([PYTHON, "-m", "trime_fairseq.cli.build_datastore", *args], env={"OMP_NUM_THREADS": "1"})
    assert "datastore complete" in log

    store = Datastore.load(out, expect_dim=32, expect_model=str(ckpt),
                           expect_dictionary=str(wikitext2_bin / "dict.txt"), expect_metric="l2")
    meta = json.loads((out / "datastore.json").read_text())
    assert meta["source"]["context_window"] == 32 and meta["key_type"] == "trime_key"
    # every valid token is stored once, as the value of the position before it
    model, task, _ = build_datastore.load_lm(build_datastore.get_parser().parse_args([str(a) for a in args]))
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    tokens = np.concatenate([dataset[i]["target"].numpy() for i in range(len(dataset))])
    assert store.size == len(tokens)
    np.testing.assert_array_equal(np.bincount(store.values, minlength=len(task.target_dictionary)),
                                  np.bincount(tokens, minlength=len(task.target_dictionary)))
    # the first rows are the keys of the first batch, read exactly as the builder reads them
    itr = task.eval_lm_dataloader(dataset=dataset, max_tokens=4096, batch_size=None,
                                  max_positions=utils.resolve_max_positions(task.max_positions(),
                                                                            model.max_positions()),
                                  num_workers=0, context_window=32)
    sample = next(iter(itr))
    model.eval()
    with torch.no_grad():
        g = get_keys(model(**sample["net_input"]))  # (B, T, 32)
    scored = sample["target"].ne(task.target_dictionary.pad())
    n = int(scored.sum())
    np.testing.assert_allclose(np.asarray(store.keys[:n], np.float32), g[scored].half().float().numpy())
    np.testing.assert_array_equal(store.values[:n], sample["target"][scored].numpy())
    # a stored key's nearest entry (exact re-scoring) is at distance 0
    hit = store.search(np.asarray(store.keys[:3], np.float32), 4, rescore=True)
    assert torch.equal(hit.scores[:, 0], torch.zeros(3))

    # an old checkpoint that fairseq upgrades on load (layer norms under their pre-2019 names):
    # the builder and the evaluation hash the model as loaded, so they agree -- and agree with the
    # same weights saved in today's layout
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    renames = {"self_attn_layer_norm": "layer_norms.0", "final_layer_norm": "layer_norms.2"}
    state["model"] = {
        next((k.replace(new, old) for new, old in renames.items() if f".{new}." in k), k): v
        for k, v in state["model"].items()
    }
    assert any(".layer_norms.0." in k for k in state["model"])
    old = tmp_path / "old.pt"
    torch.save(state, old)
    old_out = tmp_path / "dstore_old"
    build_datastore.main(build_datastore.get_parser().parse_args(
        ["--path", str(old), "--gen-subset", "valid", "--context-window", "32", "--max-tokens", "4096",
         "--output", str(old_out), "--index-factory", "Flat", "--metric", "l2", "--cpu", "--no-progress-bar"]))
    old_meta = json.loads((old_out / "datastore.json").read_text())
    assert old_meta["model_sha256"] == meta["model_sha256"]
    Datastore.load(old_out, expect_model=str(old))  # the checkpoint path, loaded (and upgraded) by fairseq
    from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models

    cfg, _ = eval_lm_config([str(wikitext2_bin), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_lm",
                             "--path", str(old), "--gen-subset", "valid", "--tokens-per-sample", "64",
                             "--context-window", "32", "--cpu", "--eval-memory", "knn", "--datastore", str(old_out),
                             "--knn-k", "4", "--max-tokens", "4096"])
    models, task = load_eval_models(cfg)
    sample = next(eval_batches(cfg, task, models))
    with torch.no_grad():
        out = models[0](**sample["net_input"])
        lp = models[0].get_normalized_probs(out, True, sample)  # searches: refuses keys of another model
    assert torch.isfinite(lp[sample["target"].ne(task.target_dictionary.pad())]).all()


# -- sharded builds ------------------------------------------------------------------------------

def tiny_checkpoint(data, save):
    """One update of a tiny transformer LM, trained in this process (fairseq_cli.train)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    argv = [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_lm", "--arch", "transformer_lm",
            "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-input-dim", "16",
            "--decoder-output-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
            "--share-decoder-input-output-embed", "--tokens-per-sample", "32", "--batch-size", "4",
            "--criterion", "trime_loss", "--ce-warmup-updates", "0", "--optimizer", "adam", "--lr", "0.01",
            "--max-update", "1", "--disable-validation", "--cpu", "--num-workers", "0", "--save-dir", str(save),
            "--no-epoch-checkpoints", "--seed", "2"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    distributed_utils.call_main(cfg, train.main)
    return save / "checkpoint_last.pt"


def test_sharded_build_merged_equals_the_single_build(wikitext2_tiny_bin, tmp_path, monkeypatch):
    """2 parts (keys of the first and the second half of the batches) merged = the single build, row for row
    (with a context window, which fairseq takes from the batch collated before), and the same search results on a
    flat index; missing, unfinished and mismatched parts are refused."""
    import shutil

    from trime_fairseq.cli import build_datastore
    from trime_fairseq.memory import datastore as ds

    ckpt = tiny_checkpoint(wikitext2_tiny_bin, tmp_path / "ckpt")

    def build(output, *extra):
        return build_datastore.main(build_datastore.get_parser().parse_args(
            ["--path", str(ckpt), "--data", str(wikitext2_tiny_bin), "--gen-subset", "valid", "--context-window",
             "16", "--max-tokens", "200", "--output", str(output), "--cpu", "--no-progress-bar", *extra]))

    def merge(output, *extra):
        return build_datastore.main(build_datastore.get_parser().parse_args(
            ["--output", str(output), "--merge-shards", "2", "--index-factory", "Flat", "--no-progress-bar", *extra]))

    build(tmp_path / "single", "--index-factory", "Flat")
    sharded = tmp_path / "sharded"
    part0 = build(sharded, "--num-shards", "2", "--shard-id", "0")
    with pytest.raises(DatastoreError, match="missing part"):
        merge(sharded)
    part1 = build(sharded, "--num-shards", "2", "--shard-id", "1")
    batches = part0["spec"]["source"]["batches"] + part1["spec"]["source"]["batches"]
    assert part0["rows"] > 0 and part1["rows"] > 0 and batches[0] == 0 and batches[1] == batches[2] > 2
    with pytest.raises(DatastoreError, match="not a datastore|incomplete"):
        Datastore.load(ds.part_folder(sharded, 0, 2))  # a part is no datastore

    # a merge interrupted after part 0 is not a datastore; rerun, it copies part 1 and completes
    real_add, calls = ds.DatastoreWriter.add, []

    def crash_on_second(self, keys, values):
        calls.append(len(keys))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(self, keys, values)

    monkeypatch.setattr(ds.DatastoreWriter, "add", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        merge(sharded)
    with pytest.raises(DatastoreError, match="incomplete"):
        Datastore.load(sharded)
    meta = merge(sharded)
    assert calls == [part0["rows"], part1["rows"], part1["rows"]], "the rerun copies what was not committed"
    assert meta["parts"] == 2 and meta["source"]["num_shards"] == 2

    single, merged = Datastore.load(tmp_path / "single"), Datastore.load(sharded, expect_model=str(ckpt))
    assert merged.size == single.size == part0["rows"] + part1["rows"]
    np.testing.assert_array_equal(np.asarray(merged.keys), np.asarray(single.keys))
    np.testing.assert_array_equal(np.asarray(merged.values), np.asarray(single.values))
    queries = np.asarray(single.keys[::7], np.float32) + np.float32(0.01)
    for a, b in zip(merged.search_ids(queries, 8), single.search_ids(queries, 8)):
        np.testing.assert_array_equal(a, b)

    # parts that do not belong together, or an unfinished one, are refused
    odd = tmp_path / "odd"
    shutil.copytree(ds.part_folder(sharded, 0, 2), ds.part_folder(odd, 0, 2))
    build(odd, "--num-shards", "2", "--shard-id", "1", "--context-window", "8")
    with pytest.raises(DatastoreError, match="does not match part 0.*context_window"):
        merge(odd)
    (ds.part_folder(odd, 1, 2) / ds.PART).unlink()
    with pytest.raises(DatastoreError, match="is incomplete"):
        merge(odd)
    with pytest.raises(ValueError, match="--shard-id must lie"):
        build(odd, "--num-shards", "2", "--shard-id", "2")


# -- key compression (issue 19): transforms inside the index, fp16 key storage ------------------------------------

@pytest.mark.parametrize("factory,metric", [("OPQ4,Flat", "ip"), ("OPQ4,Flat", "l2"), ("PCA16,Flat", "l2")])
def test_full_rank_key_transforms_keep_exact_search(tmp_path, factory, metric):
    """A rotation (OPQ without reduction) or a full-rank PCA (metric l2) keeps every score: the hits are
    brute force's, with the model's own (untransformed) queries -- FAISS transforms them inside the index."""
    keys, values = _data(n=10_000)
    meta = _build(tmp_path / "ds", keys, values, factory=factory, metric=metric)
    assert meta["index"]["transforms"] == [factory.split(",")[0]] and meta["index"]["search_dim"] == 16
    q = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    ids, scores = _brute(q, keys, metric, 8)
    store = Datastore.load(tmp_path / "ds")
    found_scores, found_ids = store.search_ids(q, 8)
    assert (found_ids == ids).mean() > 0.95  # ties / float rounding of the rotation may swap neighbours
    np.testing.assert_allclose(found_scores, scores, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("factory,metric", [("OPQ4_8,IVF8,PQ4", "ip"), ("OPQ4_8,IVF8,PQ4", "l2"),
                                            ("PCA8,IVF8,Flat", "l2"), ("PCAR8,Flat", "l2")])
def test_compressed_datastores_answer_searches_and_record_their_compression(tmp_path, factory, metric):
    rng = np.random.default_rng(0)  # keys near an 8-dimensional subspace: what 16 -> 8 compression keeps
    keys = (rng.standard_normal((10_000, 8)) @ rng.standard_normal((8, 16))
            + 0.05 * rng.standard_normal((10_000, 16))).astype(np.float16)
    values = rng.integers(0, VOCAB, 10_000)
    meta = _build(tmp_path / "ds", keys, values, factory=factory, metric=metric, nprobe=8)
    assert meta["index"]["search_dim"] == 8 and meta["index"]["factory"] == factory
    assert json.loads((tmp_path / "ds" / "datastore.json").read_text())["index"]["transforms"] == [factory.split(",")[0]]
    store = Datastore.load(tmp_path / "ds", expect_dim=16)
    q = np.random.default_rng(3).standard_normal((20, 16)).astype(np.float32)
    hits = store.search(q, 32)
    assert hits.scores.dtype == torch.float32 and bool(hits.mask.all())
    exact, _ = _brute(q, keys, metric, 32)
    _, found = store.search_ids(q, 32)
    recall = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(exact, found)])
    assert recall > 0.5  # a real neighbour set
    # the torch path (--knn-gpu) applies the same transforms in torch: the same hits
    b = store.search_torch(torch.from_numpy(q), 32)
    assert torch.equal(hits.values, b.values) and torch.equal(hits.mask, b.mask)
    torch.testing.assert_close(hits.scores, b.scores, rtol=1e-4, atol=1e-4)
    # a query of the searched (compressed) or any other dimension is refused with the expected one
    for wrong in (8, 17):
        with pytest.raises(ValueError, match=r"queries must be \(Q, 16\)"):
            store.search(q[:, :wrong] if wrong < 16 else np.pad(q, ((0, 0), (0, 1))), 4)
        with pytest.raises(ValueError, match=r"queries must be \(Q, 16\)"):
            store.search_torch(torch.zeros(2, wrong), 4)
    with pytest.raises(DatastoreError, match="dimension 16 but the model's queries have 8"):
        store.check(dim=8)


@pytest.mark.parametrize("factory,metric,match", [
    ("PCA8,Flat", "ip", "centres the keys"),
    ("PCAW8,Flat", "l2", "whitens"),
    ("OPQ4_8,PQ3", "l2", "PQ3 needs a key dimension divisible by 3"),
    ("OPQ3_8,Flat", "l2", "divisible by 3"),
    ("PCA32,Flat", "l2", "maps dimension 16 to 32"),
    ("OPQ4_8,IVF8,PQ4", "l2", "needs at least 9984 training keys"),
])
def test_impossible_key_compressions_are_refused(tmp_path, factory, metric, match):
    keys, values = _data(n=3000)
    with pytest.raises(fi.IndexConfigError, match=match):
        _build(tmp_path / "ds", keys, values, factory=factory, metric=metric)


def test_pca_flag_prefixes_the_factory_and_refuses_two_transforms():
    from trime_fairseq.cli.build_datastore import get_parser, index_factory

    args = get_parser().parse_args(["--output", "x", "--pca", "64", "--index-factory", "IVF256,PQ32"])
    assert index_factory(args) == "PCA64,IVF256,PQ32"
    assert index_factory(get_parser().parse_args(["--output", "x"])) == "IVF4096,PQ64"
    with pytest.raises(ValueError, match="both transform the keys"):
        index_factory(get_parser().parse_args(["--output", "x", "--pca", "64", "--index-factory", "OPQ8,Flat"]))


def test_fp16_key_storage_halves_the_disk_and_is_checked_on_reading(tmp_path):
    """float16 keys (the default) take half the bytes of float32 ones; the metadata records the storage,
    the search itself is in float32, and a key file that does not match the recorded storage is refused."""
    keys, values = _data(n=2000)
    for dtype in ("float16", "float32"):
        meta = _build(tmp_path / dtype, keys.astype(dtype), values, key_dtype=dtype)
        assert meta["key_dtype"] == dtype
    f16, f32 = tmp_path / "float16" / "keys.f16", tmp_path / "float32" / "keys.f32"
    assert os.path.getsize(f16) * 2 == os.path.getsize(f32) == 2000 * 16 * 4
    q = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    a, b = Datastore.load(tmp_path / "float16"), Datastore.load(tmp_path / "float32")
    assert a.keys.dtype == np.float16 and a.search(q, 5).scores.dtype == torch.float32
    assert torch.equal(a.search(q, 5).values, b.search(q, 5).values)  # the same (float16-representable) keys
    meta_path = tmp_path / "float16" / "datastore.json"
    meta = json.loads(meta_path.read_text())
    meta["key_dtype"] = "float32"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatastoreError, match="missing keys.f32"):
        Datastore.load(tmp_path / "float16")
    os.rename(f16, tmp_path / "float16" / "keys.f32")
    with pytest.raises(DatastoreError, match="has 64000 bytes, expected 128000"):
        Datastore.load(tmp_path / "float16")


def test_a_model_trained_in_any_order_can_build_a_datastore(tmp_path):
    """A checkpoint's task config keeps its training order; the builder reads the split in its own order, so it must
    reset every option of every order (TRIMELM_long's --batching consecutive --consecutive-segments 4 failed with
    '--consecutive-segments needs --batching consecutive')."""
    from tiny_checkpoint import tiny_corpus, tiny_lm_checkpoint

    from trime_fairseq.cli import build_datastore
    from trime_fairseq.data.batching import EVALUATION_ORDER

    data = tiny_corpus(tmp_path / "data")
    path = tiny_lm_checkpoint(tmp_path / "ckpt.pt", data)
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["cfg"]["task"].update(batching="consecutive", consecutive_segments=4, cross_documents=True)
    torch.save(state, path)
    args = build_datastore.get_parser().parse_args(
        ["--path", str(path), "--data", str(data), "--gen-subset", "valid", "--output", str(tmp_path / "out"), "--cpu"])
    _, task, _ = build_datastore.load_model(args)
    kept = {key: task.args[key] for key in EVALUATION_ORDER if key in task.args}  # bm25_fill: translation's
    assert kept == {key: EVALUATION_ORDER[key] for key in kept} and {"consecutive_segments", "cross_documents"} <= set(kept)
