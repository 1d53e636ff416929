"""Training step time of trime_mt_loss on BM25 batches: one padded forward vs ``--forward-chunks C``.

    OMP_NUM_THREADS=1 python benchmarks/bench_mt_forward_chunks.py data-bin/multi30k \
        --bm25-order data-bin/multi30k/bm25-target.order [--chunks 1,2,4,8] [--batches 4] [--runs 3]

Builds the model of ``--config`` (configs/trime_mt/multi30k_d256.yaml: 3+3 layers, d 256; its ``model`` node read
from the file) over the data's dictionaries, takes the first ``--batches`` BM25 batches of train as the seeded runs build them (``--bm25-fill real --max-tokens 3880``),
and times forward + backward of the released objective (top-8, τ 10) for each C, alternating C step by step
(paired: the same batches and load), dropout off. Prints the share of real tokens in the padded batches and
in the chunks (and, for comparison, in fairseq's length-sorted batches of the Transformer, ``--max-tokens 4096``), the median step time per C and its ratio to C = 1. The loss is the same for every C
(tests/test_translation.py::test_forward_chunks_give_the_one_forward_loss_and_gradients); only time differs.
"""

import argparse
import statistics
import time

import torch

SHARE_BATCHES = 60


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--bm25-order", required=True)
    parser.add_argument("--config", default="configs/trime_mt/multi30k_d256.yaml")
    parser.add_argument("--chunks", default="1,2,4,8")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    return parser


def main():
    args = get_parser().parse_args()

    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    import trime_fairseq  # noqa: F401
    from trime_fairseq.criterions.trime_mt_loss import TrimeMTLoss, length_chunks

    model_node = OmegaConf.to_container(OmegaConf.load(args.config).model)
    model_args = ["--arch", model_node.pop("_name")]
    for key, value in {**model_node, "dropout": 0.0}.items():
        flag = "--" + key.replace("_", "-")
        model_args += [flag] if value is True else [] if value is False else [flag, str(value)]

    def setup(batching, max_tokens, n):  # cfg, task and the first n batches of train as the task builds them
        fairseq_args = options.parse_args_and_arch(options.get_training_parser(), [
            args.data, "--user-dir", "trime_fairseq", "--task", "trime_translation", "--source-lang", "de",
            "--target-lang", "en", *batching, "--max-tokens", str(max_tokens), *model_args, "--cpu"])
        cfg = convert_namespace_to_omegaconf(fairseq_args)
        task = tasks.setup_task(cfg.task)
        task.load_dataset("train")
        dataset = task.dataset("train")
        itr = task.get_batch_iterator(dataset, max_tokens=max_tokens, max_positions=(1024, 1024), seed=1, epoch=1,
                                      required_batch_size_multiple=8)
        return cfg, task, [dataset.collater([dataset[i] for i in b]) for b in itr.frozen_batches[:n]]

    # real-token shares over SHARE_BATCHES batches of each batching (no forward: cheap); timing on the first --batches
    _, _, sorted_samples = setup(["--batching", "shuffled"], 4096, SHARE_BATCHES)
    cfg, task, share_samples = setup(["--batching", "bm25", "--bm25-order", args.bm25_order, "--bm25-fill", "real"],
                                     3880, max(SHARE_BATCHES, args.batches))
    samples = share_samples[:args.batches]
    model = task.build_model(cfg.model).train()
    chunk_counts = [int(c) for c in args.chunks.split(",")]
    pad = task.target_dictionary.pad()

    def real_share(sample, c):
        real = padded = 0
        for _, chunk in length_chunks(sample, c, task.cfg.left_pad_source, pad):
            src, tgt = chunk["net_input"]["src_tokens"], chunk["target"]
            real += int(src.ne(pad).sum() + tgt.ne(pad).sum())
            padded += src.numel() + tgt.numel()
        return real / padded

    criteria = {c: TrimeMTLoss(task, ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False,
                               train_memory_temperature=10.0, memory_block_size=0, train_memory_topk=8,
                               forward_chunks=c) for c in chunk_counts}
    times = {c: [] for c in chunk_counts}
    for run in range(args.runs + 1):  # the first round warms up, not timed
        for c in chunk_counts:
            start = time.perf_counter()
            for sample in samples:
                loss, _, _ = criteria[c](model, sample)
                loss.backward()
                model.zero_grad(set_to_none=True)
            if run:
                times[c].append(time.perf_counter() - start)
    base = statistics.median(times[chunk_counts[0]])
    print(f"{len(samples)} BM25 batches, {sum(int(s['target'].ne(pad).sum()) for s in samples) // len(samples)} "
          f"real target tokens each; torch threads {torch.get_num_threads()}; {args.runs} paired runs")
    print(f"real share of source + target tokens over the first {SHARE_BATCHES} batches: fairseq's length-sorted "
          f"(--max-tokens 4096) "
          f"{statistics.mean(real_share(s, 1) for s in sorted_samples):.2f}")
    print("| chunks | real share of source + target tokens | step time (s, median) | vs chunks 1 |")
    print("|---:|---:|---:|---:|")
    for c in chunk_counts:
        share = statistics.mean(real_share(s, c) for s in share_samples)
        t = statistics.median(times[c])
        print(f"| {c} | {share:.2f} | {t / len(samples):.2f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
