"""``trime-train-adaptive-knn``: train adaptive kNN-MT's Meta-k network (Zheng et al. 2021) on a validation split.

Takes the options of ``trime-train-skip-predictor`` (``fairseq-eval-lm``'s parser: data, ``--path``,
``--gen-subset valid``, ``--max-tokens``) with ``--task trime_translation`` (a teacher-forced pass over the
split's sentence pairs; ``--task trime_lm``: fairseq-eval-lm's stream) and the vanilla kNN memory it learns
from: ``--eval-memory knn --datastore DIR --knn-k K --knn-temperature T`` (``--knn-lambda λ``: the fixed-λ
baseline to report; default: the best λ on the training part). The model stays frozen: one pass caches every
scored position's K raw hits and the model's log-probability of the target; the network
(:mod:`trime_fairseq.memory.adaptive_knn`) is then trained by Adam on −log p(target) of
``--eval-memory adaptive_knn``'s composition (:func:`trime_fairseq.memory.compose.target_log_prob` with the
network's rule: the code evaluation runs, no second copy of the mixture) over the first ``1 − --holdout`` of the
positions (in the split's order); the held-out rest reports the NLL of the model alone, of vanilla kNN and of
the network before and after training (per epoch, and in the file's report); fairseq's ``--seed`` seeds the
initialisation and the shuffling. The file (JSON, written
atomically) records K, T, the weights and the checksums of the dictionary and of the datastore's model::

    trime-train-adaptive-knn data-bin/multi30k --user-dir trime_fairseq --task trime_translation \\
        --path runs/multi30k-mt-1000/transformer/checkpoint_last.pt --gen-subset valid --cpu --max-tokens 8000 \\
        --eval-memory knn --datastore runs/multi30k-mt-1000/dstore_transformer --knn-k 16 --knn-temperature 10 \\
        --output runs/multi30k-mt-1000/adaptive_knn_k16.json
    fairseq-generate ... --eval-memory adaptive_knn --datastore runs/multi30k-mt-1000/dstore_transformer \\
        --knn-k 16 --knn-temperature 10 --knn-adaptive-network runs/multi30k-mt-1000/adaptive_knn_k16.json
"""

import logging
import math
import time

import torch

from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
from trime_fairseq.cli import setup_logging
from trime_fairseq.cli.train_skip_predictor import scored_forwards, translation_batches
from trime_fairseq.memory.adaptive_knn import AdaptiveKnnNetwork, AdaptiveRule, MetaKNetwork
from trime_fairseq.memory.compose import target_log_prob
from trime_fairseq.memory.modes import mode_of
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.sources import MemoryBatch

logger = logging.getLogger("trime_fairseq.cli.train_adaptive_knn")

WHO = "trime-train-adaptive-knn"
#: the fixed λ of the vanilla kNN baseline, chosen on the training part when --knn-lambda is not given
BASELINE_LAMBDAS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def add_args(parser):
    g = parser.add_argument_group("trime-train-adaptive-knn")
    g.add_argument("--output", required=True, help="network file to write (JSON, atomically)")
    g.add_argument("--hidden", type=int, default=32, help="hidden units of the Meta-k network")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout after the hidden layer (training only)")
    g.add_argument("--epochs", type=int, default=20, help="passes over the training positions")
    g.add_argument("--learning-rate", type=float, default=3e-4, help="Adam's learning rate")
    g.add_argument("--batch-positions", type=int, default=128, help="positions per Adam step")
    g.add_argument("--holdout", type=float, default=0.2,
                   help="share of the split's positions (its end) held out to report NLL, never trained on")
    g.add_argument("--max-positions-for-training", type=int, default=None, help="stop after N scored positions")


def get_parser():
    """fairseq-eval-lm's parser plus this CLI's options (parse with ``options.parse_args_and_arch``)."""
    from fairseq import options

    parser = options.get_eval_lm_parser()
    add_args(parser)
    return parser


def checked(cfg, args) -> MemoryOptions:
    """The kNN memory options of a parsed command line, after every check that needs no model and no data."""
    from trime_fairseq.tasks.memory_config import LOCAL_FLAGS, RETRIEVAL_FLAGS, memory_options

    flags = RETRIEVAL_FLAGS | (LOCAL_FLAGS if cfg.task._name == "trime_lm" else frozenset())
    options = memory_options(cfg.task, flags)
    if options.mode != "knn" or options.skips or options.cache_weight > 0:
        raise ValueError(f"{WHO} needs --eval-memory knn --datastore DIR --knn-k K --knn-temperature T (exact "
                         "kNN, no skip predictor, no cache): the hits the network learns to weigh")
    if not 0.0 < args.holdout < 1.0:
        raise ValueError(f"--holdout must lie in (0, 1), got {args.holdout}")
    for name in ("epochs", "batch_positions", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must lie in [0, 1), got {args.dropout}")
    return options


def collect(model, batches, limit=None):
    """(raw hits (N, K) as a MemoryBatch, the model's log-prob of the target (N,), targets (N,)) of every
    scored position, in order, on the CPU."""
    plain = MemoryOptions("none")
    scores, values, masks, own, targets = [], [], [], [], []
    start, n = time.time(), 0
    for memory, net_output, sample, scored in scored_forwards(model, batches, limit, WHO,
                                                              "the hits the Meta-k network learns to weigh"):
        hits = memory.datastore_hits(model.decoder, net_output, sample, scored)
        scores.append(hits.scores.float().cpu())
        values.append(hits.values.expand_as(hits.mask).cpu())
        masks.append(hits.mask.cpu())
        own.append(memory.target_log_probs(model.decoder, net_output, sample, plain).reshape(-1)[scored].float().cpu())
        targets.append(sample["target"].reshape(-1)[scored].cpu())
        n += scored.numel()
        if len(own) % 20 == 0:
            logger.info(f"{n} positions collected ({time.time() - start:.0f}s)")
    hits = MemoryBatch(torch.cat(scores), torch.cat(values), torch.cat(masks))
    return hits, torch.cat(own), torch.cat(targets)


def nll(comp, hits: MemoryBatch, own, target, rows=None) -> torch.Tensor:
    """Mean −log p(target) of ``comp`` (a composition of one adaptive step over the datastore) at ``rows``."""
    if rows is not None:
        hits, own, target = hits.rows(rows), own[rows], target[rows]

    def entries(terms):
        (term,) = terms
        return hits.scaled(term.scale)

    def summarize(term):
        raise AssertionError("an adaptive step reads its entries")

    return -target_log_prob(comp, own, torch.zeros_like(own), target, summarize, entries).mean()


def fixed(lam: float):
    """The rule of vanilla kNN with one λ for every row (the same composition code as the network's)."""
    return lambda batch: (batch, torch.full(batch.mask.shape[:1], lam, dtype=torch.float32))


def train(hits: MemoryBatch, own, target, options: MemoryOptions, args, given_lambda=None):
    """(trained MetaKNetwork, report) with the split's head trained on and its tail held out."""
    record = mode_of("adaptive_knn")
    n, k, T = own.numel(), options.knn_k, options.knn_temperature
    cut = int(round(n * (1 - args.holdout)))
    if cut < 1 or n - cut < 1:
        raise ValueError(f"{n} scored positions are too few to train and hold out")
    if hits.mask.size(-1) != k:
        raise ValueError(f"the search gave {hits.mask.size(-1)} hits per position, --knn-k is {k}")
    head, tail = torch.arange(cut), torch.arange(cut, n)
    with torch.no_grad():
        plain = float(-own[tail].mean())
        lambdas = (given_lambda,) if given_lambda is not None else BASELINE_LAMBDAS
        on_head = {lam: float(nll(record.composition_of(fixed(lam), T), hits, own, target, head)) for lam in lambdas}
        best = min(on_head, key=on_head.get)
        knn = float(nll(record.composition_of(fixed(best), T), hits, own, target, tail))
    torch.manual_seed(args.seed)
    network = MetaKNetwork(k, args.hidden, args.dropout, seed=args.seed)
    comp = record.composition_of(AdaptiveRule(network, T), T)
    network.eval()
    with torch.no_grad():
        initial = float(nll(comp, hits, own, target, tail))
    print(f"{n} scored positions ({cut} train the network, {n - cut} held out); held-out NLL: model {plain:.4f}, "
          f"kNN (K = {k}, T = {T:g}, λ = {best:g}{'' if given_lambda is not None else ' best on the train part'}) "
          f"{knn:.4f}, untrained network {initial:.4f}", flush=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate)
    gen = torch.Generator().manual_seed(args.seed)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        network.train()
        order = head[torch.randperm(cut, generator=gen)]
        total = 0.0
        for i in range(0, cut, args.batch_positions):
            rows = order[i:i + args.batch_positions]
            loss = nll(comp, hits, own, target, rows)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * rows.numel()
        network.eval()
        with torch.no_grad():
            held = float(nll(comp, hits, own, target, tail))
        epochs.append(dict(epoch=epoch, train_nll=total / cut, held_out_nll=held))
        print(f"epoch {epoch}: train NLL {total / cut:.4f}, held-out NLL {held:.4f}", flush=True)
    with torch.no_grad():
        weights = AdaptiveRule(network, T).log_weights(hits.rows(tail).scaled(1.0 / T)).exp().mean(0)  # (R,)
    report = dict(positions=n, trained_on=cut, held_out=n - cut, plain_nll=plain, knn_nll=knn, knn_lambda=best,
                  knn_lambda_chosen=given_lambda is None, initial_nll=initial, adaptive_nll=epochs[-1]["held_out_nll"],
                  epochs=epochs, held_out_mean_weights=dict(zip(map(str, network.choices), weights.tolist())),
                  hidden=args.hidden, dropout=args.dropout, learning_rate=args.learning_rate,
                  batch_positions=args.batch_positions, seed=args.seed)
    return network, report


def main(argv=None) -> AdaptiveKnnNetwork:
    from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models

    cfg, args = eval_lm_config(argv, add_args)
    options = checked(cfg, args)
    models, task = load_eval_models(cfg)
    model = models[0]
    model.eval()
    translation = cfg.task._name == "trime_translation"
    batches = translation_batches(cfg, task, models) if translation else eval_batches(cfg, task, models)
    hits, own, target = collect(model, batches, args.max_positions_for_training)
    network, report = train(hits, own, target, options, args, cfg.task.knn_lambda)
    external = model.trime_eval_memory.external
    report.update(datastore=str(cfg.task.datastore), split=cfg.dataset.gen_subset)
    stored = AdaptiveKnnNetwork.of(network, options.knn_temperature, dictionary_checksum(task.target_dictionary),
                                   external.model_sha256 or loaded_model_checksum(model), report)
    stored.save(args.output)
    change = report["adaptive_nll"] - report["knn_nll"]
    print(f"\nheld out: model {report['plain_nll']:.4f}, kNN {report['knn_nll']:.4f}, adaptive "
          f"{report['adaptive_nll']:.4f} ({change:+.4f} vs kNN; perplexity {math.exp(report['adaptive_nll']):.3f})")
    print(f"wrote {args.output}; evaluate with --eval-memory adaptive_knn --datastore {cfg.task.datastore} "
          f"--knn-k {options.knn_k} --knn-temperature {options.knn_temperature:g} --knn-adaptive-network "
          f"{args.output}")
    return stored


def cli_main():
    setup_logging(stdout=True)
    main()


if __name__ == "__main__":
    cli_main()
