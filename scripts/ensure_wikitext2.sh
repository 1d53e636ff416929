#!/usr/bin/env bash
# Binarized WikiText-2 at DEST unless it is already there (DEST/dict.txt): from RAW when it holds
# wiki.train.tokens, else downloaded (scripts/prepare_wikitext.sh). Used by the WikiText-2 pipelines.
#   scripts/ensure_wikitext2.sh DEST RAW
set -euo pipefail
dest=${1:?usage: ensure_wikitext2.sh DEST RAW}
raw=${2:-}
[ -f "$dest/dict.txt" ] && exit 0
here=$(dirname "$0")
if [ -n "$raw" ] && [ -f "$raw/wiki.train.tokens" ]; then
  "$here/prepare_wikitext.sh" wikitext-2 "$dest" "$raw"
else
  "$here/prepare_wikitext.sh" wikitext-2 "$dest"
fi
