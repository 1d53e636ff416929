#!/usr/bin/env python
"""Detokenised sacreBLEU (with its signature) of a fairseq-generate output.

    python scripts/sacrebleu_from_generate.py GENERATE_OUTPUT [--refs RAW_REFERENCES] [--lang en]

Reads the H- (hypothesis) and T- (reference) lines that ``fairseq-generate --remove-bpe`` prints,
orders them by sentence id, detokenises them with sacremoses (undoing the Moses tokenisation and XML
escaping of scripts/prepare_*.sh) and scores the hypotheses with sacreBLEU's defaults (13a). With
``--refs`` the references are that file's lines (e.g. data-bin/multi30k/bpe/test.raw.en, the
lowercased raw text) instead of the detokenised T-lines. Prints one line: the score with its signature.

Every sentence must have been decoded: with ``--refs``, one hypothesis per line of that file; without, the
sentence ids must be 0 .. N-1 with a reference for each (and N = ``--num-sentences`` when given). An output
that lacks any sentence is refused (exit status 1), never scored on what it holds.
"""

import argparse
import re
import sys

import sacrebleu
from sacremoses import MosesDetokenizer


def read(path):
    hyps, refs = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^([HT])-(\d+)\t(.*)$", line.rstrip("\n"))
            if not m:
                continue
            kind, sid, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "H":
                hyps[sid] = rest.split("\t", 1)[1] if "\t" in rest else ""
            else:
                refs[sid] = rest
    return hyps, refs


def check_complete(hyps, refs, path, num_lines=None, expected=None):
    """The sorted sentence ids, after checking that the output decoded every sentence of the split."""
    ids = sorted(hyps)
    total = num_lines if num_lines is not None else (max(ids) + 1)
    if expected is not None and expected != total:
        sys.exit(f"{path}: expected {expected} sentences, the split has {total}")
    missing = sorted(set(range(total)) - set(ids))
    extra = [i for i in ids if i >= total]
    if num_lines is None:
        missing += sorted(set(ids) - set(refs))  # a hypothesis without its T- line
    if missing or extra:
        shown = ", ".join(map(str, (missing or extra)[:10]))
        sys.exit(f"{path}: {len(ids)} hypotheses for {total} sentences; "
                 + (f"{len(missing)} missing (ids {shown}...)" if missing else f"ids beyond the references ({shown})")
                 + ": refusing to score a partial output")
    return ids


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("generate_output")
    p.add_argument("--refs", default=None, help="raw reference file, one sentence per line (by sentence id)")
    p.add_argument("--lang", default="en")
    p.add_argument("--num-sentences", type=int, default=None,
                   help="the split's number of sentences (checked; default: the --refs file's lines)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    hyps, refs = read(args.generate_output)
    if not hyps:
        sys.exit(f"no H- lines in {args.generate_output} (run fairseq-generate with --remove-bpe)")
    lines = None
    if args.refs:
        with open(args.refs, encoding="utf-8") as f:
            lines = f.read().splitlines()
    ids = check_complete(hyps, refs, args.generate_output, num_lines=None if lines is None else len(lines),
                         expected=args.num_sentences)
    detok = MosesDetokenizer(lang=args.lang)
    system = [detok.detokenize(hyps[i].split()) for i in ids]
    if lines is not None:
        reference = [lines[i] for i in ids]
    else:
        reference = [detok.detokenize(refs[i].split()) for i in ids]
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(system, [reference])
    print(f"{score} | {bleu.get_signature()} | {len(ids)} sentences")


if __name__ == "__main__":
    main()
