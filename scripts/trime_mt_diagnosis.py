#!/usr/bin/env python
"""What TRIME-MT's training memory holds and who carries each target (docs/results_mt.md, "Why TRIME-MT collapsed").

Runs a trained translation checkpoint (eval mode: no dropout) over the first ``--batches`` training batches of
its task's batching (``--batching bm25 --bm25-order FILE`` as trained, or fairseq's shuffled batches), builds each
batch's ``trime_mt_loss`` memory (the criterion's own ``training_memory``, with the checkpoint's τ_train / top-K
or the ones given) and reports, per target class (EOS, the ``--frequent`` most frequent target types of the
training split, the rest = rare):

* what the memory of a target position holds: visible entries, of them EOS / padding / BOS entries and entries
  of the position's own sentence (the last three must be 0);
* ``in_memory``: the target's token among the visible entries;
* the memory's share of Eq. 5's numerator, exp(s_mem(target)) / (exp(s_target) + exp(s_mem(target)));
* p_token(target) (softmax over the vocabulary alone) and P(target) under Eq. 5;
* the gradient the target's token logit receives, ∂(−log P)/∂s_target, under trime_mt_loss (autograd through the
  library's Eq. 5; it equals −(token share of the numerator)·(1 − P)) and under cross-entropy on the same batch,
  −(1 − p_token).

    python scripts/trime_mt_diagnosis.py data-bin/multi30k --path runs/.../checkpoint_last.pt --batches 20 \\
        [--bm25-order data-bin/multi30k/bm25-target.order --bm25-fill real --max-tokens 3880] \\
        [--train-memory-temperature 10 --train-memory-topk 8] [--json out.json]
"""

import argparse
import json
import logging
import sys
from collections import Counter
from typing import Dict, Optional

import torch
from torch import Tensor

logger = logging.getLogger("trime_mt_diagnosis")

CLASSES = ("eos", "frequent", "rare", "all")


def position_statistics(token_logits: Tensor, scores: Tensor, values: Tensor, mask: Tensor,
                        target: Tensor) -> Dict[str, Tensor]:
    """Per target position (N,) statistics of Eq. 5, P and its gradient from the library's Eq. 5
    (:func:`~trime_fairseq.memory.mixing.joint_target_log_prob`).

    token_logits: (N, V) float; scores, mask: (N, M) memory similarities (already scaled) and bool visibility;
    values: (N, M) or (1, M) next token of each entry; target: (N,).
    """
    from trime_fairseq.memory.mixing import fp32, joint_target_log_prob, masked_logsumexp

    logits = fp32(token_logits)
    s_target = logits.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,)
    lse_vocab = torch.logsumexp(logits, dim=-1)  # (N,)
    log_p_token = s_target - lse_vocab
    # s_target enters Eq. 5 as the target's score and through the token log-partition:
    # ∂/∂s_target = ∂/∂score + ∂/∂lse · p_token
    score = s_target.detach().double().requires_grad_(True)
    lse = lse_vocab.detach().double().requires_grad_(True)
    log_p_joint = joint_target_log_prob(score, lse, scores.detach().double(), values, mask, target)  # (N,)
    grad_score, grad_lse = torch.autograd.grad(-log_p_joint.sum(), (score, lse))
    match = mask & (values == target.unsqueeze(1))  # (N, M)
    lse_match = masked_logsumexp(fp32(scores), match)  # -inf where the target is not in memory
    return {
        "entries": mask.sum(-1).float(),
        "in_memory": match.any(-1).float(),
        "memory_share": torch.exp(lse_match - torch.logaddexp(s_target, lse_match)),
        "p_token": torch.exp(log_p_token),
        "p_joint": torch.exp(log_p_joint.detach()),
        "grad_trime": grad_score + grad_lse * torch.exp(log_p_token.double()),
        "grad_ce": torch.exp(log_p_token) - 1.0,
        "log_p_joint": log_p_joint.detach(),
        "log_p_token": log_p_token,
    }


def target_classes(target: Tensor, eos: int, frequent: Tensor) -> Dict[str, Tensor]:
    """bool (N,) masks of the classes; ``frequent``: bool (V,) of the frequent types (EOS not among them)."""
    is_eos = target == eos
    is_frequent = frequent[target] & ~is_eos
    return {"eos": is_eos, "frequent": is_frequent, "rare": ~is_eos & ~is_frequent,
            "all": torch.ones_like(is_eos)}


def summarise(stats: Dict[str, Tensor], classes: Dict[str, Tensor]) -> Dict[str, Dict[str, float]]:
    out = {}
    for name, chosen in classes.items():
        n = int(chosen.sum())
        row = {"targets": n}
        if n:
            for key, value in stats.items():
                row[key] = float(value[chosen].double().mean())
            row["grad_ratio"] = float(stats["grad_trime"][chosen].double().sum() / stats["grad_ce"][chosen].double().sum())
        out[name] = row
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--path", required=True, help="translation checkpoint (trime_translation)")
    p.add_argument("--batches", type=int, default=20, help="training batches to analyse")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--bm25-order", default=None, help="BM25 batches (default: the checkpoint's batching)")
    p.add_argument("--bm25-fill", default=None, choices=("padded", "real"))
    p.add_argument("--shuffled", action="store_true", help="fairseq's shuffled batches instead of BM25")
    p.add_argument("--train-memory-temperature", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--train-memory-topk", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--frequent", type=int, default=100, help="this many most frequent target types are 'frequent'")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None, help="write the summary here")
    return p


def main(argv=None) -> Dict[str, Dict[str, float]]:
    args = get_parser().parse_args(argv)
    from trime_fairseq.cli import setup_logging

    setup_logging()
    from fairseq import checkpoint_utils

    import trime_fairseq  # noqa: F401  (registers the task and criterion)
    from trime_fairseq.criterions.trime_mt_loss import TrimeMTLoss
    from trime_fairseq.memory.keys import ensure_key_capture, get_keys

    overrides = {"data": args.data}
    if args.shuffled:
        overrides.update(batching="shuffled", bm25_order=None, bm25_fill="padded")
    elif args.bm25_order:
        overrides.update(batching="bm25", bm25_order=args.bm25_order)
    if args.bm25_fill:
        overrides["bm25_fill"] = args.bm25_fill
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides=overrides)
    model = models[0].float().eval()
    ensure_key_capture(model)
    crit_cfg = cfg.criterion
    tau = args.train_memory_temperature or float(getattr(crit_cfg, "train_memory_temperature", 1.0) or 1.0)
    topk = args.train_memory_topk if args.train_memory_topk is not None else int(
        getattr(crit_cfg, "train_memory_topk", 0) or 0)
    criterion = TrimeMTLoss(task, ce_warmup_ratio=0.0, ce_warmup_updates=0, max_update=0, sentence_avg=False,
                            train_memory_temperature=tau, memory_block_size=0, train_memory_topk=topk)
    every_entry = TrimeMTLoss(task, ce_warmup_ratio=0.0, ce_warmup_updates=0, max_update=0, sentence_avg=False,
                              train_memory_temperature=tau, memory_block_size=0)
    task.load_dataset("train")
    dataset = task.dataset("train")
    tgt_dict = task.target_dictionary
    counts = Counter()
    for i in range(len(dataset.tgt)):
        counts.update(dataset.tgt[i].tolist())
    frequent = torch.zeros(len(tgt_dict), dtype=torch.bool)
    ranked = [w for w, _ in counts.most_common() if w != tgt_dict.eos()]
    frequent[ranked[: args.frequent]] = True
    max_tokens = args.max_tokens or cfg.dataset.max_tokens
    itr = task.get_batch_iterator(dataset=dataset, max_tokens=max_tokens, max_sentences=cfg.dataset.batch_size,
                                  max_positions=None, seed=args.seed, epoch=1, disable_iterator_cache=True)
    logger.info(f"batching {task.cfg.batching} (fill {getattr(task.cfg, 'bm25_fill', 'padded')}), --max-tokens "
                f"{max_tokens}; memory: τ_train {tau}, top-K {topk or 'all'}; {args.batches} batches")
    gathered = {}
    specials = Counter()
    for b, sample in enumerate(itr.next_epoch_itr(shuffle=True)):
        if b >= args.batches:
            break
        with torch.no_grad():
            net_output = model(**sample["net_input"])
        target = sample["target"]  # (B, T)
        bsz, tsz = target.shape
        valid = target.ne(tgt_dict.pad())
        keys = get_keys(net_output)  # (B, T, d)
        memory = criterion.training_memory(keys, target, valid, sample)  # (1, N, M)
        scores, mask = memory.scores[0], memory.mask[0]  # (N, M)
        values = memory.values[0].expand_as(mask)
        flat_target, flat_valid = target.reshape(-1), valid.reshape(-1)
        # what the memory holds: entries are the valid positions in row-major order (one worker), or top-K of them
        # (the top-K memory is a subset of the dense one, whose entries are the valid positions in row-major order)
        dense = memory if topk == 0 else every_entry.training_memory(keys, target, valid, sample)
        entry_rows = valid.nonzero()[:, 0]  # (M_all,) sentence of each dense entry
        own = dense.mask[0] & (entry_rows.view(1, -1) == torch.arange(bsz).repeat_interleave(tsz).view(-1, 1))
        specials["own_sentence"] += int(own[flat_valid].sum())
        specials["pad"] += int((mask & (values == tgt_dict.pad()))[flat_valid].sum())
        specials["bos"] += int((mask & (values == tgt_dict.bos()))[flat_valid].sum())
        logits = net_output[0].reshape(bsz * tsz, -1)
        stats = position_statistics(logits, scores, values, mask, flat_target)
        stats["eos_entries"] = (mask & (values == tgt_dict.eos())).sum(-1).float()
        for key, value in stats.items():
            gathered.setdefault(key, []).append(value[flat_valid])
        gathered.setdefault("_target", []).append(flat_target[flat_valid])
    targets = torch.cat(gathered.pop("_target"))
    stats = {k: torch.cat(v) for k, v in gathered.items()}
    summary = summarise(stats, target_classes(targets, tgt_dict.eos(), frequent))
    summary["_memory"] = {"tau_train": tau, "topk": topk, "batches": args.batches, "max_tokens": max_tokens,
                          "batching": str(task.cfg.batching), **{f"{k}_entries_total": v for k, v in specials.items()}}
    print(f"memory: τ_train {tau}, top-K {topk or 'all'}, batching {task.cfg.batching}; entries seen over all "
          f"targets: own sentence {specials['own_sentence']}, padding {specials['pad']}, "
          f"BOS {specials['bos']}")
    print("| class | targets | entries | EOS entries | in_memory | memory share of numerator | p_token | P Eq.5 | "
          "∂/∂s_target TRIME | ∂/∂s_target CE | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in CLASSES:
        r = summary[name]
        if not r["targets"]:
            continue
        print(f"| {name} | {r['targets']} | {r['entries']:.0f} | {r['eos_entries']:.1f} | {r['in_memory']:.3f} | "
              f"{r['memory_share']:.3f} | {r['p_token']:.3f} | {r['p_joint']:.3f} | {r['grad_trime']:.3f} | "
              f"{r['grad_ce']:.3f} | {r['grad_ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
