#!/usr/bin/env python
"""Detokenised sacreBLEU (with its signature) of a fairseq-generate output.

    python scripts/sacrebleu_from_generate.py GENERATE_OUTPUT [--refs RAW_REFERENCES] [--lang en]

Reads the H- (hypothesis) and T- (reference) lines that ``fairseq-generate --remove-bpe`` prints,
orders them by sentence id, detokenises them with sacremoses (undoing the Moses tokenisation and XML
escaping of scripts/prepare_*.sh) and scores the hypotheses with sacreBLEU's defaults (13a). With
``--refs`` the references are that file's lines (e.g. data-bin/multi30k/bpe/test.raw.en, the
lowercased raw text) instead of the detokenised T-lines. Prints one line: the score with its signature.
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


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("generate_output")
    p.add_argument("--refs", default=None, help="raw reference file, one sentence per line (by sentence id)")
    p.add_argument("--lang", default="en")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    hyps, refs = read(args.generate_output)
    if not hyps:
        sys.exit(f"no H- lines in {args.generate_output} (run fairseq-generate with --remove-bpe)")
    ids = sorted(hyps)
    detok = MosesDetokenizer(lang=args.lang)
    system = [detok.detokenize(hyps[i].split()) for i in ids]
    if args.refs:
        with open(args.refs, encoding="utf-8") as f:
            lines = f.read().splitlines()
        reference = [lines[i] for i in ids]
    else:
        reference = [detok.detokenize(refs[i].split()) for i in ids]
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(system, [reference])
    print(f"{score} | {bleu.get_signature()} | {len(ids)} sentences")


if __name__ == "__main__":
    main()
