"""``trime-train-skip-predictor``: fit kNN-LM / kNN-MT's retrieval-skip predictor on a validation split.

Adaptive retrieval (He et al. 2021, "Efficient Nearest Neighbor Language Models"): takes
``fairseq-eval-lm`` options with ``--eval-memory knn --datastore DIR`` (and the ``--knn-*``
values to evaluate with), or ``--task trime_translation`` with the same memory options (a
teacher-forced pass over the split's sentence pairs), and for every scored position records the
skip features (:mod:`trime_fairseq.memory.skip`: entropy and max log-probability of the model's
token distribution, norm of the query -- nothing that reads the target) and whether the
kNN-interpolated log-probability of the target beats the model's own. The first
``1 - --holdout`` of the positions (in the split's order) train a small MLP (``--hidden 0``:
logistic regression); on the held-out rest each threshold of ``--thresholds`` gives the
fraction of positions skipped and the perplexity with skipping, and the threshold that skips
most within ``--max-ppl-increase`` of exact kNN's perplexity is written into the file, with the
table (the file is written atomically, with the dictionary's and the model's checksums:
evaluation refuses it for another model)::

    trime-train-skip-predictor data-bin/wikitext-103 --task trime_lm --path ckpt.pt --gen-subset valid \\
        --tokens-per-sample 3072 --context-window 2560 --eval-memory knn --datastore dstore/train \\
        --knn-k 1024 --knn-temperature 1 --knn-lambda 0.25 --output skip.json
    fairseq-eval-lm ... --eval-memory knn --datastore dstore/train --knn-skip-predictor skip.json
"""

import logging
from typing import Iterator

import torch

from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
from trime_fairseq.cli import setup_logging
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.skip import SkipPredictor, choose_threshold, fit, threshold_table

logger = logging.getLogger("trime_fairseq.cli.train_skip_predictor")

DEFAULT_THRESHOLDS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"


def add_args(parser):
    g = parser.add_argument_group("trime-train-skip-predictor")
    g.add_argument("--output", required=True, help="predictor file to write (JSON, atomically)")
    g.add_argument("--hidden", type=int, default=16, help="hidden units of the MLP (0: logistic regression)")
    g.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps")
    g.add_argument("--learning-rate", type=float, default=0.01)
    g.add_argument("--holdout", type=float, default=0.3,
                   help="share of the split's positions (its end) that choose the threshold, not the weights")
    g.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="comma list of P(helps) thresholds to report "
                   "(with 0 and the deciles of the held-out predictions)")
    g.add_argument("--max-ppl-increase", type=float, default=0.01,
                   help="the chosen threshold keeps the held-out perplexity within this share of exact kNN's")
    g.add_argument("--max-positions-for-training", type=int, default=None, help="stop after N scored positions")


def get_parser():
    """fairseq-eval-lm's parser plus this CLI's options (parse with ``options.parse_args_and_arch``)."""
    from fairseq import options

    parser = options.get_eval_lm_parser()
    add_args(parser)
    return parser


def translation_batches(cfg, task, models) -> Iterator[dict]:
    """Teacher-forced batches of the split's sentence pairs (fairseq's length order, unshuffled)."""
    from fairseq import utils

    task.load_dataset(cfg.dataset.gen_subset)
    itr = task.get_batch_iterator(
        dataset=task.dataset(cfg.dataset.gen_subset), max_tokens=cfg.dataset.max_tokens or 8000,
        max_sentences=cfg.dataset.batch_size, max_positions=utils.resolve_max_positions(
            task.max_positions(), *[m.max_positions() for m in models]),
        ignore_invalid_inputs=False, seed=1, num_workers=cfg.dataset.num_workers,
    ).next_epoch_itr(shuffle=False)
    device = next(models[0].parameters()).device
    for sample in itr:
        if sample and "net_input" in sample:
            yield utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample


def scored_forwards(model, batches, limit=None, who="trime-train-skip-predictor",
                    purpose="the kNN-LM / kNN-MT whose retrieval it learns to skip"):
    """(memory, net_output, sample, scored) of every batch of a kNN memory's model, without gradients: ``scored``
    (k,) the flat positions whose target is not padding; the stream memory advanced after each; stops after
    ``limit`` scored positions. ``who`` needs ``--eval-memory knn`` (exact: no skip predictor) for ``purpose``."""
    memory = getattr(model, "trime_eval_memory", None)
    if memory is None or memory.options.mode != "knn":
        raise ValueError(f"{who} needs --eval-memory knn --datastore DIR ({purpose})")
    if memory.options.skips:
        raise ValueError(f"{who} works against exact kNN: give no --knn-skip-predictor")
    n = 0
    with torch.no_grad():
        for sample in batches:
            net_output = model(**sample["net_input"])
            scored = sample["target"].reshape(-1).ne(memory.pad).nonzero().squeeze(1)  # (k,) flat positions
            yield memory, net_output, sample, scored
            memory.advance(net_output, sample)
            n += scored.numel()
            if limit is not None and n >= limit:
                break
    if n == 0:
        raise ValueError("the split has no scored positions")


def collect(model, batches, limit=None):
    """(features (N, 3), kNN log-prob (N,), plain log-prob (N,)) of every scored position, in order."""
    plain = MemoryOptions("none")
    feats, knn, own = [], [], []
    for memory, net_output, sample, scored in scored_forwards(model, batches, limit):
        knn.append(memory.target_log_probs(model.decoder, net_output, sample, memory.options).reshape(-1)[scored])
        own.append(memory.target_log_probs(model.decoder, net_output, sample, plain).reshape(-1)[scored])
        feats.append(memory.skip_features(model.decoder, net_output, sample, scored))
    return torch.cat(feats).cpu(), torch.cat(knn).cpu().double(), torch.cat(own).cpu().double()


def train(features, knn, plain, args) -> dict:
    """Fit on the head, choose the threshold on the held-out tail; the predictor's fields."""
    n = features.size(0)
    if not 0.0 < args.holdout < 1.0:
        raise ValueError(f"--holdout must lie in (0, 1), got {args.holdout}")
    cut = int(round(n * (1 - args.holdout)))
    if cut < 2 or n - cut < 1:
        raise ValueError(f"{n} scored positions are too few to train and hold out")
    helps = knn > plain  # (N,) the kNN-interpolated target log-probability beats the model's own
    mean, std, layers = fit(features[:cut], helps[:cut], args.hidden, args.epochs, args.learning_rate)
    draft = SkipPredictor(mean, std, layers, 0.0, "0" * 64, "0" * 64)
    benefit = draft.benefit(features[cut:].float())
    deciles = torch.quantile(benefit.double(), torch.linspace(0.1, 0.9, 9, dtype=torch.float64))  # finer rows
    thresholds = sorted({0.0, *(float(t) for t in args.thresholds.split(",")), *(round(float(q), 4) for q in deciles)})
    table = threshold_table(benefit, knn[cut:], plain[cut:], thresholds)
    knn_ppl = float((-knn[cut:].mean()).exp())
    best = choose_threshold(table, knn_ppl, args.max_ppl_increase)
    accuracy = float(((draft.benefit(features[cut:].float()) >= 0.5) == helps[cut:]).double().mean())
    report = dict(positions=n, trained_on=cut, held_out=n - cut, helps=float(helps.double().mean()),
                  held_out_accuracy=accuracy, plain_ppl=float((-plain[cut:].mean()).exp()), knn_ppl=knn_ppl,
                  max_ppl_increase=args.max_ppl_increase, thresholds=table, hidden=args.hidden, epochs=args.epochs)
    return dict(mean=mean, std=std, layers=layers, threshold=best["threshold"], report=report)


def print_report(report: dict, threshold: float) -> None:
    print(f"{report['positions']} scored positions ({report['trained_on']} fit the predictor, {report['held_out']} "
          f"held out); retrieval helps at {report['helps']:.1%}; held-out accuracy {report['held_out_accuracy']:.3f}")
    print(f"held out: plain perplexity {report['plain_ppl']:.3f}, exact kNN {report['knn_ppl']:.3f}")
    print()
    print("| threshold | skipped | perplexity | vs exact kNN |")
    print("|---:|---:|---:|---:|")
    for row in report["thresholds"]:
        mark = " **chosen**" if row["threshold"] == threshold else ""
        print(f"| {row['threshold']:g}{mark} | {row['skipped']:.3f} | {row['ppl']:.3f} | "
              f"{row['ppl'] / report['knn_ppl'] - 1:+.2%} |")


def main(argv=None) -> SkipPredictor:
    from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models

    cfg, args = eval_lm_config(argv, add_args)
    models, task = load_eval_models(cfg)
    model = models[0]
    model.eval()
    translation = cfg.task._name == "trime_translation"
    batches = translation_batches(cfg, task, models) if translation else eval_batches(cfg, task, models)
    features, knn, plain = collect(model, batches, args.max_positions_for_training)
    fields = train(features, knn, plain, args)
    external = model.trime_eval_memory.external
    predictor = SkipPredictor(**fields, dictionary_sha256=dictionary_checksum(task.target_dictionary),
                              model_sha256=external.model_sha256 or loaded_model_checksum(model))
    predictor.report.update(datastore=str(cfg.task.datastore), split=cfg.dataset.gen_subset,
                            knn=model.trime_eval_memory.options.record.flags(model.trime_eval_memory.options,
                                                                           ("knn_k",)))
    predictor.save(args.output)
    print_report(predictor.report, predictor.threshold)
    print(f"\nwrote {args.output} (threshold {predictor.threshold:g}); evaluate with --knn-skip-predictor "
          f"{args.output}")
    return predictor


def cli_main():
    setup_logging(stdout=True)
    main()


if __name__ == "__main__":
    cli_main()
