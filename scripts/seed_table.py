#!/usr/bin/env python
"""One markdown table of a score over seeds (perplexity, BLEU): per-seed valid / test, mean ± sd, paired differences.

The WikiText-2 pipelines write one perplexity per file (``perplexity`` of scripts/lib.sh); this reads them back::

    python scripts/seed_table.py --ppl '{dir}/ppl_{row}_{split}' --seeds 1 2 3 \
        --dir 1=runs/wikitext2-ext-2000 --dir 2=runs/wikitext2-ext-2000-seed2 --dir 3=runs/wikitext2-ext-2000-seed3 \
        --row 'knn_cache_long=vanilla: kNN-LM + cache (long memory 1024)' --row 'trime_ext_long=TRIMELM_ext' \
        --paired trime_ext_long-knn_cache_long

``--file`` (or ``--ppl``) is a template with ``{row}``, ``{split}``, ``{seed}`` and ``{dir}`` (the seed's ``--dir``).
With ``--number REGEX`` the score is the regex's first group in the file (e.g. the BLEU of the
scripts/sacrebleu_from_generate.py output that scripts/multi30k_mt.sh writes per row)::

    python scripts/seed_table.py --file '{dir}/gen_{row}.bleu' --number '^BLEU = ([0-9.]+)' --splits test \
        --seeds 1 2 3 --dir 1=runs/multi30k-mt-multi30k_d256-2200-seed1 ... --row transformer=Transformer

``--scale 100`` multiplies every score (fractions as percent: the top-K retrieval accuracies of
``trime-retrieval-accuracy``'s JSON, ``--number '"8": ([0-9.]+)'``).

A missing or empty file, or one without the number, is an error naming it: a table never has a blank or a mean over
fewer seeds than its header says.
"""

import argparse
import re
import statistics
import sys
from pathlib import Path

SPLITS = ("valid", "test")


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise SystemExit(f"seed_table.py: {what} {text!r} is not KEY=VALUE")
    return key, value


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", "--ppl", dest="file", required=True,
                        help="path template with {row}, {split}, {seed}, {dir}")
    parser.add_argument("--number", default=None, metavar="REGEX",
                        help="the score is this regex's first group (multiline) in the file (default: the whole file)")
    parser.add_argument("--seeds", nargs="+", required=True)
    parser.add_argument("--dir", action="append", default=[], metavar="SEED=DIR", help="{dir} of one seed")
    parser.add_argument("--row", action="append", required=True, metavar="NAME=LABEL")
    parser.add_argument("--paired", action="append", default=[], metavar="A-B",
                        help="per-seed difference of two rows (A minus B), with its mean ± sd")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every score by this (100: percent)")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)

    dirs = dict(pair(d, "--dir") for d in args.dir)
    rows = [pair(r, "--row") for r in args.row]
    if "{dir}" in args.file and (missing := [s for s in args.seeds if s not in dirs]):
        raise SystemExit(f"seed_table.py: no --dir for seed(s) {', '.join(missing)}")
    names = {name for name, _ in rows}
    paired = []
    for p in args.paired:
        a, sep, b = p.partition("-")
        if not sep or a not in names or b not in names:
            raise SystemExit(f"seed_table.py: --paired {p!r} is not A-B over the --row names {sorted(names)}")
        paired.append((a, b))

    ppl = {}
    for name, _ in rows:
        for seed in args.seeds:
            for split in args.splits:
                path = Path(args.file.format(row=name, split=split, seed=seed, dir=dirs.get(seed, "")))
                text = path.read_text().strip() if path.is_file() else ""
                if not text:
                    raise SystemExit(f"seed_table.py: {path} is missing or empty (row {name}, seed {seed}, {split})")
                if args.number is not None:
                    found = re.search(args.number, text, re.MULTILINE)
                    if not found:
                        raise SystemExit(f"seed_table.py: {path} has no match of --number {args.number!r}")
                    text = found.group(1)
                ppl[name, seed, split] = float(text) * args.scale

    splits = " / ".join(args.splits)
    print(f"| model | " + " | ".join(f"seed {s} {splits}" for s in args.seeds) + " | "
          + " | ".join(f"{sp} (mean ± sd)" for sp in args.splits) + " |")
    print("|---|" + "---:|" * (len(args.seeds) + len(args.splits)))
    for name, label in rows:
        cells = [" / ".join(f"{ppl[name, s, sp]:.2f}" for sp in args.splits) for s in args.seeds]
        means = [mean_sd([ppl[name, s, sp] for s in args.seeds]) for sp in args.splits]
        print(f"| {label} | " + " | ".join(cells + means) + " |")
    labels = dict(rows)
    for a, b in paired:
        for sp in args.splits:
            d = [ppl[a, s, sp] - ppl[b, s, sp] for s in args.seeds]
            print(f"\n{labels[a]} − {labels[b]}, {sp}, paired by seed: {', '.join(f'{x:+.2f}' for x in d)}; "
                  f"mean {mean_sd(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
