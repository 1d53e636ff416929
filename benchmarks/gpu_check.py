"""The checks that need a CUDA GPU, in one process; run by benchmarks/gpu_check.sh.

1. fp16 training steps (fairseq's own ``Trainer`` with ``--fp16``: half model, fp32 master weights,
   dynamic loss scale) of ``adaptive_loss`` (the plain criterion), ``trime_loss``, ``trime_long_loss``
   and ``trime_ext_loss`` on the paper's 150M setting (``trime_lm_wiki103_150m``, one update = 240
   segments x 150 tokens = 36,000 tokens = one TRIMELM_long run of 36,000 positions, Table 11): every
   loss and gradient norm finite, overflow-skipped steps counted, median step time and its ratio to
   the plain criterion.
2. faiss-gpu: an IVF4096,PQ64 datastore of synthetic d = 1024 keys trained and filled on the GPU
   (``DatastoreWriter.build_index(use_gpu=True)``) with its rates, and GPU search vs nprobe.
3. ``--knn-gpu``: a flat datastore of a small LM's keys searched on the GPU (torch queries, as the
   evaluation does) equals the CPU search, and kNN-LM log-probabilities with ``knn_gpu`` equal those
   without.
4. fast retrieval: compressed (OPQ / PCA) datastores searched with CUDA queries, and the retrieval-skip
   predictor under ``--knn-gpu``, equal to the CPU.
5. the translation modes (``knn``, ``adaptive_knn``, ``sk_mt``) decoding a tiny corpus with fairseq's
   beam search on the GPU (``--knn-gpu`` where the mode searches a datastore) vs the same on the CPU.

Without a CUDA GPU (or without faiss-gpu) the GPU parts are skipped with a clear message; part 1
then runs 2 fp32 CPU steps of each criterion at a tiny size, and part 3 its CPU side, so the script
itself is checked. Writes ``results.json`` and ``results.md`` to ``--out``.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import trime_fairseq  # noqa: E402,F401  (registers the plugin)

SKIP = "SKIPPED"


def fairseq_setup(data_dir, argv):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, [data_dir, *argv]))
    task = tasks.setup_task(cfg.task)
    return cfg, task


def write_dictionary(folder, vocab):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dict.txt"), "w") as f:
        for i in range(vocab):
            f.write(f"w{i} {vocab - i}\n")
    return folder


def run_sample(task, bsz, tsz, m, seed):
    """A batch of random tokens with Zipfian frequencies; rows = one run of m segments (ids r·m + j)."""
    g = torch.Generator().manual_seed(seed)
    d = task.dictionary
    vocab = len(d) - d.nspecial
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    x = torch.multinomial(1.0 / ranks, bsz * (tsz + 1), replacement=True, generator=g).view(bsz, tsz + 1) + d.nspecial
    sample = {"id": torch.arange(bsz), "nsentences": bsz, "ntokens": bsz * tsz,
              "net_input": {"src_tokens": x[:, :-1].contiguous(), "src_lengths": torch.full((bsz,), tsz)},
              "target": x[:, 1:].contiguous()}
    if m > 1:
        sample["segments_per_run"] = m
    return sample


CRITERIA = {  # name -> (criterion options, batching options, segments per run)
    "adaptive_loss": (["--criterion", "adaptive_loss"], [], 1),
    "trime_loss": (["--criterion", "trime_loss", "--ce-warmup-updates", "0"], [], 1),
    "trime_long_loss": (["--criterion", "trime_long_loss", "--ce-warmup-updates", "0", "--memory-block-size", "2048"],
                        ["--batching", "consecutive", "--consecutive-segments", "{bsz}"], "bsz"),
    "trime_ext_loss": (["--criterion", "trime_ext_loss", "--ce-warmup-updates", "0", "--memory-block-size", "2048",
                        "--local-drop-prob", "0.9"], [], 1),
}


def criteria_steps(args, gpu: bool, work: str):
    from fairseq.logging import metrics
    from fairseq.trainer import Trainer

    if gpu:
        arch, vocab, bsz, tsz, precision = "trime_lm_wiki103_150m", 267_744, 240, 150, ["--fp16"]
        warmup, steps = 3, args.steps
    else:
        arch, vocab, bsz, tsz, precision = "trime_lm_wikitext2_small", 2_000, 8, 32, ["--cpu"]
        warmup, steps = 0, 2
    data = write_dictionary(os.path.join(work, "dict"), vocab)
    results = {}
    for name, (criterion, batching, m) in CRITERIA.items():
        m = bsz if m == "bsz" else m
        argv = ["--user-dir", trime_fairseq.__path__[0], "--task", "trime_lm",
                "--arch", arch, "--tokens-per-sample", str(tsz), "--batch-size", str(bsz), "--optimizer", "adam",
                "--lr", "1e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--clip-norm", "0.1",
                "--seed", "1", "--max-update", "1000", "--ddp-backend", "legacy_ddp", *precision, *criterion,
                *[b.format(bsz=bsz) for b in batching]]
        if arch.endswith("small"):
            argv += ["--decoder-layers", "2", "--adaptive-softmax-cutoff", "500,1000", "--adaptive-input-cutoff",
                     "500,1000"]
        cfg, task = fairseq_setup(data, argv)
        model = task.build_model(cfg.model)
        trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
        times, losses, norms, skipped = [], [], [], 0
        for step in range(warmup + steps):
            sample = run_sample(task, bsz, tsz, m, seed=step)
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            before = trainer.get_num_updates()
            out = trainer.train_step([sample])
            if gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if trainer.get_num_updates() == before or out is None:  # fp16 overflow: fairseq skipped the update
                skipped += 1
                continue
            if step >= warmup:
                times.append(elapsed)
            losses.append(float(out["loss"]))
            norms.append(float(metrics.get_meter("train", "gnorm").val))  # this update's gradient norm
        finite = all(math.isfinite(v) for v in losses + norms) and len(losses) > 0
        scaler = getattr(trainer.optimizer, "scaler", None)  # fp16: fairseq's dynamic loss scaler
        results[name] = dict(median_step_s=statistics.median(times) if times else float("nan"), steps=len(times),
                             skipped_overflow=skipped, finite=finite, first_loss=losses[0] if losses else None,
                             last_loss=losses[-1] if losses else None, max_gnorm=max(norms) if norms else None,
                             loss_scale=scaler.loss_scale if scaler is not None else None)
        del trainer, model
        if gpu:
            torch.cuda.empty_cache()
        print(f"  {name}: {results[name]}", flush=True)
    plain = results["adaptive_loss"]["median_step_s"]
    for r in results.values():
        r["ratio_to_plain"] = r["median_step_s"] / plain
    return dict(arch=arch, batch=f"{bsz} x {tsz}", precision="fp16" if gpu else "fp32 (CPU, script check)",
                criteria=results)


def faiss_gpu_build(args, work: str):
    from trime_fairseq.memory import faiss_index as fi
    from trime_fairseq.memory.datastore import Datastore, DatastoreSpec, DatastoreWriter

    if not fi.gpu_available():
        return {SKIP: "faiss-gpu is not installed or sees no GPU (pip uninstall -y faiss-cpu && "
                      "pip install 'faiss-gpu>=1.15')"}
    from bench_datastore_scale import Keys

    keys = Keys(1024)
    n, chunk = args.faiss_keys, 65536
    spec = DatastoreSpec(dim=1024, key_type="trime_key", metric="ip", dictionary_size=267_744,
                         dictionary_sha256="0" * 64, model_path="synthetic", model_sha256="0" * 64)
    path = os.path.join(work, "gpu_store")
    t = time.perf_counter()
    writer = DatastoreWriter(path, spec, capacity=n, overwrite=True)
    for i in range(n // chunk):
        writer.add(keys.chunk(i, chunk), np.zeros(chunk, np.int32))
    writer.commit(1)
    writer.finish_keys()
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    writer.build_index("IVF4096,PQ64", ntrain=min(n, 262_144), add_chunk=262_144, use_gpu=True, progress_bar=False)
    index_s = time.perf_counter() - t
    train_s = writer.progress.get("train_seconds", float("nan"))
    writer.finalize(nprobe=32)
    store = Datastore.load(path, use_gpu=True)
    q = torch.from_numpy(keys.chunk(99_999, 1024).astype(np.float32)).cuda()
    rows = []
    for nprobe in (8, 32, 128):
        store.set_nprobe(nprobe)
        store.search(q[:8], 1024)
        torch.cuda.synchronize()
        t = time.perf_counter()
        store.search(q, 1024)
        torch.cuda.synchronize()
        rows.append(dict(nprobe=nprobe, queries_per_s=len(q) / (time.perf_counter() - t)))
    return dict(keys=n, dim=1024, factory="IVF4096,PQ64", ntrain=min(n, 262_144), write_s=write_s, train_s=train_s,
                add_s=index_s - train_s, add_keys_per_s=n / max(index_s - train_s, 1e-9), search=rows)


def tiny_lm_and_store(work: str):
    """A 2-layer d = 64 transformer LM (random weights, 500 words) and a Flat l2 datastore of its keys over 4
    random batches: (task, dictionary, model, model config, batches, datastore folder, generator)."""
    from fairseq.data import Dictionary
    from fairseq.models.transformer_lm import TransformerLanguageModelConfig
    from omegaconf import OmegaConf

    from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
    from trime_fairseq.memory.datastore import DatastoreSpec, DatastoreWriter
    from trime_fairseq.memory.keys import ensure_key_capture, get_keys
    from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask

    d = Dictionary()
    for i in range(500):
        d.add_symbol(f"w{i}")
    task = TrimeLMTask(TrimeLMConfig(tokens_per_sample=64), d)
    cfg = TransformerLanguageModelConfig(_name="transformer_lm", decoder_layers=2, decoder_embed_dim=64,
                                         decoder_input_dim=64, decoder_output_dim=64, decoder_ffn_embed_dim=128,
                                         decoder_attention_heads=2, dropout=0.0, tokens_per_sample=64,
                                         max_target_positions=64, add_bos_token=False, tpu=False)
    torch.manual_seed(0)
    model = task.build_model(OmegaConf.structured(cfg)).eval()
    ensure_key_capture(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(d.nspecial, len(d), (8, 65), generator=g) for _ in range(4)]
    spec = DatastoreSpec(dim=64, key_type="trime_key", metric="l2", dictionary_size=len(d),
                         dictionary_sha256=dictionary_checksum(d), model_path="tiny",
                         model_sha256=loaded_model_checksum(model))
    path = os.path.join(work, "knn_store")
    writer = DatastoreWriter(path, spec, capacity=8 * 64 * len(batches), overwrite=True)
    with torch.no_grad():
        for x in batches:
            keys = get_keys(model(x[:, :-1]))
            writer.add(keys.reshape(-1, 64), x[:, 1:].reshape(-1).int())
    writer.commit(len(batches))
    writer.finish_keys()
    writer.build_index("Flat", progress_bar=False)
    writer.finalize()
    return task, d, model, cfg, batches, path, g


def knn_gpu_check(gpu: bool, work: str):
    from trime_fairseq.memory import faiss_index as fi
    from trime_fairseq.memory.datastore import Datastore
    from trime_fairseq.memory.eval_memory import attach_eval_memory, build_eval_memory
    from trime_fairseq.memory.options import MemoryOptions

    task, d, model, cfg, batches, path, g = tiny_lm_and_store(work)
    result = {}
    cpu = Datastore.load(path)
    queries = torch.randn(256, 64, generator=g)
    ref = cpu.search(queries, 32)
    if not (gpu and fi.gpu_available()):
        result["search_equal"] = SKIP + ": needs a CUDA GPU and faiss-gpu (CPU search ran: "
        result["search_equal"] += f"{int(ref.mask.sum())} hits)"
        result["knn_lm_equal"] = SKIP + ": needs a CUDA GPU and faiss-gpu"
        return result
    on_gpu = Datastore.load(path, use_gpu=True)
    hits = on_gpu.search(queries.cuda(), 32)
    same_values = bool(torch.equal(hits.values.cpu(), ref.values))
    max_score_diff = float((hits.scores.cpu() - ref.scores).abs().max())
    result["search_equal"] = dict(values_equal=same_values, max_score_difference=max_score_diff,
                                  ok=same_values and max_score_diff <= 1e-2 * float(ref.scores.abs().max()))
    log_probs = {}
    for use_gpu in (False, True):
        lm = task.build_model(OmegaConf.structured(cfg)).eval()
        lm.load_state_dict(model.state_dict())
        lm = lm.cuda()
        options = MemoryOptions.from_flags("knn", dict(datastore=path, knn_k=32, knn_gpu=use_gpu))
        attach_eval_memory(lm, build_eval_memory(options, d))
        x = batches[0].cuda()
        sample = {"net_input": {"src_tokens": x[:, :-1]}, "target": x[:, 1:]}
        with torch.no_grad():
            out = lm(x[:, :-1])
            log_probs[use_gpu] = lm.get_normalized_probs(out, log_probs=True, sample=sample).float().cpu()
    diff = float((log_probs[True] - log_probs[False]).abs().max())
    result["knn_lm_equal"] = dict(max_log_prob_difference=diff, ok=diff <= 1e-3)
    return result


def fast_retrieval_check(gpu: bool, work: str):
    """Issue 19 on the GPU: compressed datastores (OPQ, PCA key transforms inside the index) searched with CUDA
    queries -- the transforms applied in torch, no numpy round trip -- against the CPU search; and kNN-LM with
    the retrieval-skip predictor under --knn-gpu: the same positions skipped, the same log-probabilities as on the
    CPU. Without a GPU the CPU torch path runs (it checks the script) and the GPU comparisons are skipped."""
    import numpy as np
    from omegaconf import OmegaConf

    from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
    from trime_fairseq.memory import faiss_index as fi
    from trime_fairseq.memory.datastore import Datastore, DatastoreSpec, DatastoreWriter
    from trime_fairseq.memory.eval_memory import attach_eval_memory, build_eval_memory
    from trime_fairseq.memory.options import MemoryOptions
    from trime_fairseq.memory.skip import SkipPredictor, skip_features
    from trime_fairseq.memory.token_scores import all_token_log_probs

    result = {}
    rng = np.random.default_rng(0)
    n, dim = 20_000, 64
    keys = (rng.standard_normal((n, 32)) @ rng.standard_normal((32, dim)) + 0.05 * rng.standard_normal((n, dim)))
    queries = torch.from_numpy((rng.standard_normal((256, 32)) @ rng.standard_normal((32, dim))).astype(np.float32))
    use_gpu = gpu and fi.gpu_available()
    for factory in ("OPQ16_32,IVF64,PQ16", "PCA32,IVF64,Flat"):
        spec = DatastoreSpec(dim=dim, key_type="trime_key", metric="l2", dictionary_size=100, dictionary_sha256="0" * 64,
                             model_path="synthetic", model_sha256="1" * 64)
        path = os.path.join(work, "compressed_" + factory.split(",")[0])
        writer = DatastoreWriter(path, spec, capacity=n, overwrite=True)
        writer.add(keys.astype(np.float16), rng.integers(0, 100, n).astype(np.int32))
        writer.commit(1)
        writer.finish_keys()
        writer.build_index(factory, ntrain=n, progress_bar=False)
        writer.finalize(nprobe=16)
        cpu = Datastore.load(path)
        ref = cpu.search(queries, 32)
        torch_cpu = cpu.search_torch(queries, 32)  # the --knn-gpu code path, on the CPU
        entry = dict(torch_path_on_cpu_equal=bool(torch.equal(ref.values, torch_cpu.values)))
        if use_gpu:
            hits = Datastore.load(path, use_gpu=True).search(queries.cuda(), 32)
            overlap = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 32
                                     for a, b in zip(hits.values.cpu(), ref.values)]))
            entry.update(on_gpu=hits.scores.is_cuda, value_overlap_with_cpu=overlap)
            entry["ok"] = entry["torch_path_on_cpu_equal"] and hits.scores.is_cuda and overlap >= 0.9
        else:
            entry["gpu"] = SKIP + ": needs a CUDA GPU and faiss-gpu"
            entry["ok"] = entry["torch_path_on_cpu_equal"]
        result[factory] = entry

    task, d, model, cfg, batches, path, g = tiny_lm_and_store(work)
    x = batches[0]
    with torch.no_grad():
        out = model(x[:, :-1])
    entropy = skip_features(all_token_log_probs(model.decoder, out[0])[0], out[1]["trime_key"].reshape(-1, 64))[:, 0]
    cut = float(entropy.median())
    skip_file = os.path.join(work, "skip.json")
    SkipPredictor([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [([[50.0, 0.0, 0.0]], [-50.0 * cut])], 0.5,
                  dictionary_checksum(d), loaded_model_checksum(model)).save(skip_file)
    devices = [False, True] if gpu else [False]
    log_probs, skipped = {}, {}
    for on_gpu in devices:
        lm = task.build_model(OmegaConf.structured(cfg)).eval()
        lm.load_state_dict(model.state_dict())
        lm = lm.cuda() if on_gpu else lm
        options = MemoryOptions.from_flags("knn", dict(datastore=path, knn_k=32, knn_gpu=on_gpu and fi.gpu_available(),
                                                       knn_skip_predictor=skip_file))
        memory = build_eval_memory(options, d)
        attach_eval_memory(lm, memory)
        xs = x.cuda() if on_gpu else x
        sample = {"net_input": {"src_tokens": xs[:, :-1]}, "target": xs[:, 1:]}
        with torch.no_grad():
            log_probs[on_gpu] = lm.get_normalized_probs(lm(xs[:, :-1]), log_probs=True, sample=sample).float().cpu()
        skipped[on_gpu] = (memory.external.searched, memory.external.skipped)
    entry = dict(searched_skipped_cpu=skipped[False])
    if gpu:
        diff = float((log_probs[True] - log_probs[False]).abs().max())
        entry.update(searched_skipped_gpu=skipped[True], max_log_prob_difference=diff,
                     ok=skipped[True] == skipped[False] and diff <= 1e-3)
    else:
        entry["gpu"] = SKIP + ": no CUDA GPU"
        entry["ok"] = 0 < skipped[False][1] < sum(skipped[False])
    result["skip_predictor"] = entry
    return result


def mt_modes_check(gpu: bool, work: str, beam: int = 4):
    """kNN-MT, adaptive kNN-MT (a Meta-k network trained on valid by trime-train-adaptive-knn) and SK-MT (pairs from
    trime-retrieve-pairs) decoding the valid split of a tiny corpus with a random-weight transformer: the GPU run
    (model on CUDA, ``--knn-gpu`` for the datastore modes) must give the CPU run's hypotheses (>= 90% identical:
    near-ties of a random model may flip) with their scores within 1e-3. Without a GPU the CPU decodes alone."""
    from pathlib import Path

    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny_checkpoint import ROOT, tiny_mt_checkpoint, tiny_mt_corpus

    from trime_fairseq.cli import build_datastore, retrieve_pairs, train_adaptive_knn
    from trime_fairseq.memory import faiss_index as fi

    root = Path(work) / "mt_modes"
    data = tiny_mt_corpus(root / "data")
    checkpoint = str(tiny_mt_checkpoint(root / "mt.pt", data))
    store, network, pairs = str(root / "ds"), str(root / "meta_k.json"), str(root / "valid.pairs.npz")
    build_datastore.main(build_datastore.get_parser().parse_args(
        ["--path", checkpoint, "--gen-subset", "train", "--output", store, "--index-factory", "Flat", "--metric", "l2",
         "--cpu", "--no-progress-bar"]))
    common = [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_translation", "-s", "de", "-t",
              "en", "--path", checkpoint, "--gen-subset", "valid", "--max-tokens", "2000"]
    knn = ["--datastore", store, "--knn-k", "8", "--knn-temperature", "10"]
    train_adaptive_knn.main(common + ["--cpu", "--eval-memory", "knn", *knn, "--output", network, "--epochs", "3",
                                      "--no-progress-bar"])
    retrieve_pairs.main(retrieve_pairs.get_parser().parse_args(
        ["--data", str(data), "--source-lang", "de", "--target-lang", "en", "--split", "valid", "--m", "4",
         "--output", pairs, "--no-progress-bar"]))
    modes = {"knn": (["--eval-memory", "knn", *knn, "--knn-lambda", "0.5"], True),
             "adaptive_knn": (["--eval-memory", "adaptive_knn", *knn, "--knn-adaptive-network", network], True),
             "sk_mt": (["--eval-memory", "sk_mt", "--sk-pairs", pairs], False)}

    def decode(flags, cuda: bool):
        argv = common + ["--beam", str(beam)] + flags + ([] if cuda else ["--cpu"])
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), argv))
        task = tasks.setup_task(cfg.task)
        task.load_dataset("valid")
        models, _ = checkpoint_utils.load_model_ensemble([checkpoint], task=task)
        model = models[0].eval()
        if cuda:
            model.cuda()
        generator = task.build_generator([model], cfg.generation)
        itr = task.get_batch_iterator(dataset=task.dataset("valid"), max_tokens=2000).next_epoch_itr(shuffle=False)
        out = {}
        with torch.no_grad():
            for sample in itr:
                if cuda:
                    sample = utils.move_to_cuda(sample)
                for i, hypos in zip(sample["id"].tolist(), task.inference_step(generator, [model], sample)):
                    out[i] = (hypos[0]["tokens"].tolist(), float(hypos[0]["score"]))
        return out

    from fairseq import utils

    result = {}
    for mode, (flags, searches) in modes.items():
        cpu = decode(flags, cuda=False)
        entry = dict(sentences=len(cpu))
        if not gpu:
            entry["gpu"] = SKIP + ": no CUDA GPU (the CPU decoding ran)"
            entry["ok"] = len(cpu) == 60
        elif searches and not fi.gpu_available():
            entry["gpu"] = SKIP + ": no faiss-gpu for --knn-gpu"
            entry["ok"] = len(cpu) == 60
        else:
            on_gpu = decode(flags + (["--knn-gpu"] if searches else []), cuda=True)
            same = [i for i in cpu if on_gpu[i][0] == cpu[i][0]]
            diff = max((abs(on_gpu[i][1] - cpu[i][1]) for i in same), default=float("inf"))
            entry.update(identical_share=len(same) / len(cpu), max_score_difference=diff,
                         ok=len(same) >= 0.9 * len(cpu) and diff <= 1e-3)
        result[mode] = entry
    return result


def markdown(results) -> str:
    env = results["environment"]
    lines = [f"# gpu_check ({env['date']}, {env['device']}, torch {env['torch']}, faiss {env['faiss']})", ""]
    crit = results["criteria"]
    lines += [f"## Training steps: {crit['arch']}, batch {crit['batch']}, {crit['precision']}", "",
              "| criterion | median step (s) | ratio to plain | finite loss and gnorm | overflow-skipped steps |",
              "|---|---|---|---|---|"]
    for name, r in crit["criteria"].items():
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {r['ratio_to_plain']:.2f} | {r['finite']} | "
                     f"{r['skipped_overflow']} |")
    faiss_part = results["faiss_gpu"]
    lines += ["", "## faiss-gpu datastore build and search", ""]
    if SKIP in faiss_part:
        lines.append(f"{SKIP}: {faiss_part[SKIP]}")
    else:
        lines += [f"{faiss_part['keys']:,} keys, d = 1024, {faiss_part['factory']} trained on {faiss_part['ntrain']:,}: "
                  f"write {faiss_part['write_s']:.1f} s, train {faiss_part['train_s']:.1f} s, add "
                  f"{faiss_part['add_s']:.1f} s ({faiss_part['add_keys_per_s']:,.0f} keys/s)", "",
                  "| nprobe | queries/s (K = 1024) |", "|---|---|"]
        lines += [f"| {r['nprobe']} | {r['queries_per_s']:,.0f} |" for r in faiss_part["search"]]
    lines += ["", "## --knn-gpu vs CPU search (flat index)", "", f"* search: {results['knn_gpu']['search_equal']}",
              f"* kNN-LM log-probs: {results['knn_gpu']['knn_lm_equal']}"]
    lines += ["", "## Fast retrieval: compressed indexes and the skip predictor on the GPU", ""]
    lines += [f"* {name}: {value}" for name, value in results["fast_retrieval"].items()]
    lines += ["", "## Translation modes: beam search on the GPU vs the CPU (tiny corpus, random model)", ""]
    lines += [f"* {name}: {value}" for name, value in results["mt_modes"].items()]
    return "\n".join(lines) + "\n"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--steps", type=int, default=10, help="timed fp16 steps per criterion (GPU)")
    p.add_argument("--faiss-keys", type=int, default=1 << 20, help="synthetic keys of the faiss-gpu build")
    return p


def main():
    args = get_parser().parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.is_available()
    import faiss

    results = {"environment": dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, faiss=faiss.__version__,
                                   device=torch.cuda.get_device_name(0) if gpu else "CPU only",
                                   faiss_gpus=faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)}
    if not gpu:
        print(f"{SKIP}: no CUDA GPU -- fp16 steps, faiss-gpu and --knn-gpu are skipped; the criteria run 2 fp32 CPU "
              "steps at a tiny size to check this script", flush=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    failed = False
    for part, fn in (("criteria", lambda: criteria_steps(args, gpu, work)),
                     ("faiss_gpu", lambda: faiss_gpu_build(args, work) if gpu else {SKIP: "no CUDA GPU"}),
                     ("knn_gpu", lambda: knn_gpu_check(gpu, work)),
                     ("fast_retrieval", lambda: fast_retrieval_check(gpu, work)),
                     ("mt_modes", lambda: mt_modes_check(gpu, work))):
        print(f"== {part}", flush=True)
        try:
            results[part] = fn()
        except Exception as e:  # report every part; the exit status says something failed
            traceback.print_exc()
            results[part] = {"error": f"{type(e).__name__}: {e}"}
            failed = True
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    if not failed:
        text = markdown(results)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
        print(text)
    crit = results.get("criteria", {}).get("criteria", {})
    bad = [name for name, r in crit.items() if not r.get("finite")]
    for part in ("knn_gpu", "fast_retrieval", "mt_modes"):
        bad += [k for k, v in results.get(part, {}).items() if isinstance(v, dict) and not v.get("ok")]
    if bad:
        print(f"FAILED checks: {bad}", flush=True)
    sys.exit(1 if failed or bad else 0)


if __name__ == "__main__":
    main()
