"""``trime-retrieval-accuracy``: top-K retrieval accuracy of a datastore (TRIME §6, Table 9).

The datastore's own LM (the one whose keys it holds) runs over a split exactly as the build did
(its ``--tokens-per-sample`` / ``--context-window``, blocks in stream order); every scored position
queries the index for the best max(K) entries, and counts as a hit at K when one of the first K
entries' next tokens is its target. Table 9 compares kNN-LM's datastore (a vanilla LM's keys, L2)
with TRIMELM_ext's (g keys, inner product) this way, on the development set::

    trime-retrieval-accuracy --datastore runs/wikitext2-ext-2000/dstore_vanilla --gen-subset valid \\
        --ks 1,8,64,1024 --cpu --output-json runs/wikitext2-ext-2000/retrieval_vanilla.json

The datastore's own split is refused: its positions would retrieve their own entries (and their
documents' later tokens); score a split the datastore does not hold.
"""

import argparse
import json
import logging
import os
import time

import numpy as np

from trime_fairseq.cli import setup_logging
from trime_fairseq.cli.build_datastore import default_max_tokens, scored_batches, scored_keys
from trime_fairseq.cli.neighbours import add_query_arguments, open_query
from trime_fairseq.data.neighbours import NeighbourError
from trime_fairseq.memory.datastore import target_ranks

logger = logging.getLogger("trime_fairseq.cli.retrieval_accuracy")


def parse_ks(text: str):
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks takes comma-separated integers, got {text!r}")
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--ks must be positive integers, got {text!r}")
    return ks


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trime-retrieval-accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", required=True, help="datastore folder written by trime-build-datastore")
    p.add_argument("--gen-subset", default="valid", help="split whose positions query the datastore")
    p.add_argument("--ks", type=parse_ks, default=[1, 8, 64, 1024], help="K values (default 1,8,64,1024)")
    p.add_argument("--output-json", default=None, help="write the result here (atomically)")
    p.add_argument("--no-progress-bar", action="store_true")
    add_query_arguments(p)
    return p


def main(args) -> dict:
    t0 = time.time()
    model, task, store, store_meta, device = open_query(args)
    source = store_meta["source"]
    if source["split"] == args.gen_subset and os.path.abspath(args.data) == source["data"]:
        raise NeighbourError(f"the datastore holds '{args.gen_subset}' itself: its positions would retrieve their "
                             "own entries; measure retrieval on another split (e.g. valid)")
    k = max(args.ks)
    if k > store.size:
        raise NeighbourError(f"K {k} exceeds the datastore's {store.size} entries")
    task.load_dataset(args.gen_subset)
    dataset = task.dataset(args.gen_subset)
    itr, num_batches = scored_batches(args, task, model, dataset, default_max_tokens(args, False))
    hits = np.zeros(len(args.ks), dtype=np.int64)  # positions whose target is among the first K entries
    positions = 0
    ks = np.asarray(args.ks)
    for _, keys, targets in scored_keys(model, task, itr, num_batches, store_meta["key_type"], device,
                                        progress=not args.no_progress_bar, desc=f"retrieval on {args.gen_subset}"):
        _, ids = store.search_ids(keys.float().cpu().numpy(), k)  # (n, k); -1 where the index found none
        values = np.where(ids >= 0, np.asarray(store.values)[np.maximum(ids, 0)], -1)
        ranks = target_ranks(values, targets.cpu().numpy())  # (n,)
        hits += (ranks[:, None] < ks[None, :]).sum(axis=0)
        positions += len(ranks)
    if positions == 0:
        raise NeighbourError(f"split '{args.gen_subset}' has no scored positions")
    result = dict(
        datastore=os.path.abspath(args.datastore), key_type=store_meta["key_type"], metric=store.metric,
        entries=store.size, index=store_meta["index"]["factory"],
        nprobe=args.nprobe if args.nprobe is not None else store_meta["index"].get("nprobe"),
        split=args.gen_subset, positions=positions,
        accuracy={str(kk): round(float(h) / positions, 4) for kk, h in zip(args.ks, hits)},
        seconds=round(time.time() - t0, 1),
    )
    logger.info("top-K retrieval accuracy on %s (%d positions): %s", args.gen_subset, positions,
                ", ".join(f"K {kk}: {100 * v:.2f}%" for kk, v in result["accuracy"].items()))
    if args.output_json:
        tmp = f"{args.output_json}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.output_json)
    return result


def cli_main(argv=None):
    setup_logging(stdout=True)
    result = main(get_parser().parse_args(argv))
    print(json.dumps(result["accuracy"]))


if __name__ == "__main__":
    cli_main()
