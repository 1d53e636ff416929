#!/usr/bin/env bash
# Binarise a recall corpus (trime-recall make) for fairseq: train / valid / test as scripts/prepare_wikitext.sh
# does (one dictionary, from train), then the memory splits (the first occurrences alone) with the same
# dictionary as valid_memory / test_memory; the indexes ({split}.recall.json) are copied along.
#
#   scripts/prepare_recall.sh RAW DEST
set -euo pipefail
raw=${1:?usage: prepare_recall.sh RAW DEST}
dest=${2:?usage: prepare_recall.sh RAW DEST}
here=$(dirname "$0")
[ -f "$raw/recall.json" ] || { echo "$raw is not a recall corpus (no recall.json; run trime-recall make)" >&2; exit 1; }
"$here/prepare_wikitext.sh" wikitext-2 "$dest" "$raw"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fairseq-preprocess --only-source --srcdict "$dest/dict.txt" \
  --validpref "$raw/memory.valid.tokens" --testpref "$raw/memory.test.tokens" \
  --destdir "$work/memory" --workers "${WORKERS:-2}"
for split in valid test; do
  for ext in bin idx; do mv "$work/memory/$split.$ext" "$dest/${split}_memory.$ext"; done
done
cp "$raw"/*.recall.json "$raw/recall.json" "$dest/"
echo "binarised the recall corpus $raw into $dest (splits train valid test valid_memory test_memory)" >&2
