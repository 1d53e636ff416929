"""``trime-neighbours``: SPALM's precomputed neighbours of every token of a split.

From a datastore built with a separate vanilla LM (``trime-build-datastore``, key =
that LM's hidden state), run the same LM over a split exactly as the datastore build
did (its ``--tokens-per-sample`` / ``--context-window``, blocks in stream order), search
the datastore with the key of every position and store the K best entries' next
tokens, scores and ids, aligned to the split's token stream
(:mod:`trime_fairseq.data.neighbours`)::

    trime-neighbours --datastore dstore/wt103-train --gen-subset train --output neighbours/wt103 --k 4
    trime-neighbours --datastore dstore/wt103-train --gen-subset valid --output neighbours/wt103 --k 4

On the datastore's own split a position never retrieves its own entry, and by
default no entry of its own document (``--neighbour-exclude document``; ``self``:
only its own entry, so entries of the same document -- also its *later* positions,
whose next tokens are the position's own future -- may be retrieved). Documents are
WikiText's `` = Title = `` articles by :mod:`trime_fairseq.memory.documents`' rule; a
position's own document is decided from the document starts strictly before it
(:func:`~trime_fairseq.data.neighbours.document_labels`), never from its target. Exclusion is
explicit: the index is asked for more entries than K and the excluded ids are
dropped (``Datastore.search(..., exclude=...)``), never "the first hit is the
query itself". On that split the recomputed keys are also checked against the
datastore's stored keys (and the tokens against its values), so ids are positions.

An interrupted run resumes when started again with the same arguments
(``--overwrite`` recomputes complete neighbours).
"""

import argparse
import logging
import os
import time

import numpy as np
import torch

from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
from trime_fairseq.cli import setup_logging
from trime_fairseq.cli.build_datastore import default_max_tokens, is_translation, load_model, scored_batches, scored_keys
from trime_fairseq.memory.documents import DocumentBoundaries
from trime_fairseq.data.neighbours import EXCLUSIONS, NeighbourError, NeighbourWriter, document_labels
from trime_fairseq.memory.datastore import Datastore, Exclusion, read_metadata, target_ranks

logger = logging.getLogger("trime_fairseq.cli.neighbours")

KEY_TOLERANCE = 1e-2  # max |recomputed key − stored float16 key|, relative to the key's largest entry


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trime-neighbours", description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", required=True, help="datastore folder written by trime-build-datastore")
    p.add_argument("--gen-subset", default="train", help="split whose positions get neighbours")
    p.add_argument("--output", required=True, help="neighbour folder; the split is written to OUTPUT/<split>")
    p.add_argument("--k", type=int, default=4, help="neighbours per position (paper: 4 for words, 2 for characters)")
    p.add_argument("--neighbour-exclude", choices=EXCLUSIONS, default=None,
                   help="on the datastore's own split: 'document' (default) hides every entry of the position's "
                   "document, 'self' only its own entry; not allowed on other splits (nothing to exclude)")
    add_query_arguments(p)
    p.add_argument("--commit-every", type=int, default=50, help="record progress every N batches")
    p.add_argument("--overwrite", action="store_true", help="recompute complete neighbours of the split")
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def add_query_arguments(p: argparse.ArgumentParser) -> None:
    """The options of querying a datastore with its own LM over a split (trime-neighbours,
    trime-retrieval-accuracy)."""
    p.add_argument("--path", default=None, help="checkpoint of the datastore's LM (default: the one it records)")
    p.add_argument("--data", default=None, help="binarized data folder (default: the datastore's)")
    p.add_argument("--nprobe", type=int, default=None, help="inverted lists probed (default: the datastore's)")
    p.add_argument("--rescore", action="store_true", help="re-rank the index's hits with the exact stored keys")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (default: the datastore build's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--model-overrides", default="{}", help="dict of model args to override, as eval-lm")
    p.add_argument("--cpu", action="store_true", help="run the LM on the CPU even if CUDA is available")
    p.add_argument("--fp16", action="store_true", help="run the LM in float16")
    p.add_argument("--use-gpu-index", action="store_true", help="search on the GPU (needs faiss-gpu)")
    p.add_argument("--num-workers", type=int, default=0)


def open_query(args):
    """The datastore's LM set up as its build ran it (its --tokens-per-sample / --context-window, batches)
    and the datastore, checked against that model and its dictionary: (model, task, store, store_meta, device).
    Fills ``args.path`` / ``args.data`` / the batching from the datastore's record where not given."""
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    store_meta = read_metadata(args.datastore)  # where its keys came from
    source = store_meta["source"]
    args.path = args.path or store_meta["model_path"]
    args.data = args.data or source["data"]
    args.tokens_per_sample, args.context_window = source["tokens_per_sample"], source["context_window"]
    if args.max_tokens is None and args.batch_size is None:
        args.max_tokens, args.batch_size = source.get("max_tokens"), source.get("batch_size")
    model, task, state = load_model(args)
    if is_translation(task):
        raise NeighbourError(f"queries are aligned to a language model's token stream; {args.path} is a "
                             "translation model")
    model_sha = loaded_model_checksum(model)  # what the datastore build recorded (before --fp16)
    del state
    if args.fp16:
        model.half()
    model.to(device).eval()
    store = Datastore.load(args.datastore, expect_dictionary=task.target_dictionary, expect_model=model_sha,
                           nprobe=args.nprobe, rescore=args.rescore, use_gpu=args.use_gpu_index)
    return model, task, store, store_meta, device


def exclusion_mode(requested, own_split: bool, split: str) -> str:
    """What a position may not retrieve: 'document' (default) or 'self' on the datastore's split, else 'none'."""
    if own_split:
        return requested or "document"
    if requested is not None:
        raise NeighbourError(f"--neighbour-exclude {requested} applies to the datastore's own split; '{split}' "
                             "is another split, whose positions have no entries in the datastore")
    return "none"


def check_alignment(store: Datastore, start: int, keys: np.ndarray, targets: np.ndarray, split: str) -> None:
    """On the datastore's split, entry start+i must be position start+i: same next token, same key."""
    stop = start + len(targets)
    if stop > store.size or not np.array_equal(np.asarray(store.values[start:stop]), targets):
        raise NeighbourError(
            f"the datastore's entries {start}..{stop} are not the tokens of '{split}' at those positions: it was "
            "built from other data, or in another order (rebuild it with this version of trime-build-datastore)"
        )
    stored = np.asarray(store.keys[start:stop], dtype=np.float32)
    scale = max(float(np.abs(keys).max()), 1.0) if keys.size else 1.0
    error = float(np.abs(stored - keys).max()) / scale if keys.size else 0.0
    if error > KEY_TOLERANCE:
        raise NeighbourError(
            f"the keys recomputed for positions {start}..{stop} of '{split}' differ from the datastore's (relative "
            f"difference {error:.3g}): the datastore was built with other model settings or another context window"
        )


def main(args) -> dict:
    progress = not args.no_progress_bar
    if args.k < 1:
        raise NeighbourError(f"--k must be >= 1, got {args.k}")
    t0 = time.time()
    model, task, store, store_meta, device = open_query(args)
    source = store_meta["source"]
    dictionary = task.target_dictionary
    if args.k > store.size:
        raise NeighbourError(f"--k {args.k} asks for more neighbours than the datastore holds ({store.size})")

    task.load_dataset(args.gen_subset)
    dataset = task.dataset(args.gen_subset)
    size = int(np.sum(dataset.sizes))
    own_split = source["split"] == args.gen_subset and os.path.abspath(args.data) == source["data"]
    exclude = exclusion_mode(args.neighbour_exclude, own_split, args.gen_subset)
    if own_split and size != store.size:
        raise NeighbourError(f"split '{args.gen_subset}' has {size} tokens but the datastore built from it holds "
                             f"{store.size} entries")
    query_docs = entry_docs = None
    if exclude == "document":
        boundaries = DocumentBoundaries.from_dictionary(dictionary, required=False)
        if boundaries is None:
            raise NeighbourError("documents are found from WikiText's ' = Title = ' headings but the dictionary has "
                                 "no '=': pass --neighbour-exclude self")
        query_docs, entry_docs = document_labels(np.asarray(store.values), boundaries)
        logger.info(f"{entry_docs[-1] + 1} documents in '{args.gen_subset}' (WikiText headings)")

    meta = dict(
        split=args.gen_subset, data=os.path.abspath(args.data),
        dictionary_size=len(dictionary), dictionary_sha256=dictionary_checksum(dictionary),
        datastore=dict(path=os.path.abspath(args.datastore), fingerprint=store.fingerprint, size=store.size,
                       split=source["split"], key_type=store_meta["key_type"], metric=store.metric,
                       dim=store.dim, model_sha256=store_meta["model_sha256"]),
        exclude=exclude,
        query=dict(model_path=os.path.abspath(args.path), tokens_per_sample=args.tokens_per_sample,
                   context_window=args.context_window, fp16=bool(args.fp16)),
        search=dict(nprobe=args.nprobe if args.nprobe is not None else store_meta["index"].get("nprobe"),
                    rescore=bool(args.rescore), index=store_meta["index"]["factory"]),
    )
    folder = os.path.join(args.output, args.gen_subset)
    writer = NeighbourWriter(folder, meta, size, args.k, overwrite=args.overwrite)
    done = writer.batches_done
    if done:
        logger.info(f"resuming: {writer.rows} positions from {done} batches already written")
    short, batches, searched, search_seconds = 0, done, 0, 0.0
    hits_top1 = hits_any = 0  # positions whose best neighbour's / any neighbour's next token is their target
    itr, num_batches = scored_batches(args, task, model, dataset, default_max_tokens(args, False))
    for batches, keys, targets in scored_keys(model, task, itr, num_batches, store_meta["key_type"], device, done,
                                              progress, desc=f"neighbours of {args.gen_subset}"):
        start = writer.next_position
        keys = keys.float().cpu().numpy()
        targets = targets.cpu().numpy()
        if own_split:
            check_alignment(store, start, keys, targets, args.gen_subset)
        positions = np.arange(start, start + len(targets))  # = their datastore entries on the own split
        exclusion = None
        if exclude == "self":
            exclusion = Exclusion.own_entry(positions)
        elif exclude == "document":
            exclusion = Exclusion.own_entry(positions, query_docs[positions], entry_docs)
        t = time.time()
        scores, ids = store.search_ids(keys, args.k, exclude=exclusion)
        search_seconds += time.time() - t
        searched += len(targets)
        values = np.where(ids >= 0, np.asarray(store.values)[np.where(ids >= 0, ids, 0)], -1)
        short += int((ids < 0).any(axis=1).sum())
        ranks = target_ranks(values, targets)  # (n,): the first neighbour holding the target, k if none
        hits_top1 += int((ranks == 0).sum())
        hits_any += int((ranks < args.k).sum())
        writer.add(values, scores, ids, targets)
        if batches % args.commit_every == 0:
            writer.commit(batches)
    writer.commit(batches)
    seconds = time.time() - t0
    # the neighbour encoder's quality (SPALM's memory can help only where a neighbour holds the target);
    # of the positions searched in this run (a resumed run counts its own part only)
    quality = dict(positions=searched, top1_hit_rate=round(hits_top1 / searched, 4) if searched else None,
                   any_hit_rate=round(hits_any / searched, 4) if searched else None)
    result = writer.finalize(dict(
        meta, positions_with_fewer_than_k=short, neighbour_quality=quality,
        seconds=dict(total=round(seconds, 2), search=round(search_seconds, 2)),
        search_tokens_per_second=round(searched / search_seconds, 1) if search_seconds > 0 else None,
    ))
    if short:
        logger.warning(f"{short} positions got fewer than {args.k} neighbours (the probed inverted lists held too "
                       "few entries): they attend to the ones found")
    logger.info(f"neighbours complete: {folder} ({size} positions, k {args.k}, exclude {exclude}; "
                f"{seconds:.1f}s, search {searched / max(search_seconds, 1e-9):.0f} tokens/s); the target is the "
                f"top-1 neighbour's token at {quality['top1_hit_rate']} of the positions, among the {args.k} at "
                f"{quality['any_hit_rate']}")
    return result


def cli_main(argv=None):
    setup_logging(stdout=True)
    main(get_parser().parse_args(argv))


if __name__ == "__main__":
    cli_main()
