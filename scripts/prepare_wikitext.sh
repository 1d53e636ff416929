#!/usr/bin/env bash
# Binarize WikiText-2 or WikiText-103 for fairseq (fairseq-preprocess --only-source).
#
#   scripts/prepare_wikitext.sh wikitext-2 data-bin/wikitext-2 [RAW_DIR] [MAX_TRAIN_LINES]
#
# RAW_DIR holds wiki.{train,valid,test}.tokens (e.g. ../shared/data/wikitext-2).
# Without it the tokenized v1 release is downloaded from its public source.
# MAX_TRAIN_LINES keeps only the first lines of the training split (quick runs).
set -euo pipefail
usage="usage: prepare_wikitext.sh wikitext-2|wikitext-103 DEST [RAW_DIR] [MAX_TRAIN_LINES]"
name=${1:?$usage}
dest=${2:?$usage}
raw=${3:-}
max_lines=${4:-}
case "$name" in wikitext-2|wikitext-103) ;; *) echo "unknown dataset '$name' (wikitext-2 or wikitext-103)" >&2; exit 2;; esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "$raw" ]; then
  url="https://wikitext.smerity.com/${name}-v1.zip"
  echo "downloading $url" >&2
  if ! curl -fL --retry 3 -o "$work/raw.zip" "$url"; then
    echo "download failed; pass a local copy as RAW_DIR" >&2; exit 1
  fi
  (cd "$work" && unzip -q raw.zip)
  raw="$work/$name"
fi
for split in train valid test; do
  [ -f "$raw/wiki.$split.tokens" ] || { echo "missing $raw/wiki.$split.tokens" >&2; exit 1; }
done
if [ -n "$max_lines" ]; then
  head -n "$max_lines" "$raw/wiki.train.tokens" > "$work/wiki.train.tokens"
  cp "$raw/wiki.valid.tokens" "$raw/wiki.test.tokens" "$work/"
  raw="$work"
fi
fairseq-preprocess --only-source \
  --trainpref "$raw/wiki.train.tokens" --validpref "$raw/wiki.valid.tokens" --testpref "$raw/wiki.test.tokens" \
  --destdir "$dest.tmp" --workers "${WORKERS:-2}"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "binarized $name into $dest" >&2
