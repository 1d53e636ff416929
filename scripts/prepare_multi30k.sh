#!/usr/bin/env bash
# Multi30k (task 1, de-en) for translation on CPU: lowercase + Moses tokenisation (sacremoses, XML
# escaping as tokenizer.perl), a joint BPE learned on train (subword-nmt), binarised with one joined
# dictionary -- the same steps as fairseq's prepare-iwslt14.sh, so IWSLT'14 text can be mapped into
# this vocabulary (scripts/prepare_iwslt14.sh --codes DEST/bpe/code --dict DEST/dict.en.txt).
#
#   scripts/prepare_multi30k.sh DEST [RAW]        # RAW: folder with train/val/test_2016_flickr .de/.en
#
# Environment: MERGES (BPE merges, 10000), WORKERS (2). Writes DEST/{train,valid,test}.de-en.{de,en}.{bin,idx},
# DEST/dict.{de,en}.txt (joined), DEST/bpe/ (codes, BPE'd and tokenised text, lowercased raw references).
set -euo pipefail
dest=${1:?usage: prepare_multi30k.sh DEST [RAW]}
raw=${2:-${TRIME_DATA:-$(dirname "$0")/../../shared/data}/multi30k}
MERGES=${MERGES:-10000}
WORKERS=${WORKERS:-2}
[ -f "$raw/train.de" ] || { echo "Multi30k not found in $raw (train.de, train.en, val.*, test_2016_flickr.*)" >&2; exit 1; }
tmp="$dest.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
lower() { python -c "import sys; [sys.stdout.write(l.lower()) for l in sys.stdin]"; }
for pair in train:train valid:val test:test_2016_flickr; do
  split=${pair%%:*}
  name=${pair#*:}
  for l in de en; do
    lower < "$raw/$name.$l" > "$tmp/$split.raw.$l"  # lowercased references (BLEU)
    sacremoses -l $l -j "$WORKERS" tokenize -x < "$tmp/$split.raw.$l" > "$tmp/$split.tok.$l"
  done
done
cat "$tmp/train.tok.de" "$tmp/train.tok.en" | subword-nmt learn-bpe -s "$MERGES" > "$tmp/code" 2> "$tmp/learn-bpe.log"
for split in train valid test; do
  for l in de en; do
    subword-nmt apply-bpe -c "$tmp/code" < "$tmp/$split.tok.$l" > "$tmp/$split.$l"
  done
done
fairseq-preprocess --source-lang de --target-lang en --trainpref "$tmp/train" --validpref "$tmp/valid" \
  --testpref "$tmp/test" --destdir "$tmp/bin" --joined-dictionary --workers "$WORKERS" > "$tmp/preprocess.log" 2>&1
mkdir -p "$tmp/bin/bpe"
mv "$tmp"/code "$tmp"/*.raw.* "$tmp"/*.tok.* "$tmp"/{train,valid,test}.{de,en} "$tmp/bin/bpe/"
rm -rf "$dest"
mv "$tmp/bin" "$dest"
rm -rf "$tmp"
echo "binarized Multi30k de-en into $dest ($(wc -l < "$dest/bpe/train.en") training pairs, $(wc -l < "$dest/dict.en.txt") joined types)"
