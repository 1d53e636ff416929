#!/usr/bin/env bash
# IWSLT'14 de-en as fairseq's examples/translation/prepare-iwslt14.sh makes it, binarised for trime_translation.
#
#   scripts/prepare_iwslt14.sh DEST
#       downloads the TED talks (dl.fbaipublicfiles.com mirror of fairseq's script), strips the XML,
#       Moses-tokenises (sacremoses, XML escaping, as tokenizer.perl), cleans (1-175 tokens, length ratio
#       <= 1.5, as clean-corpus-n.perl), lowercases, takes every 23rd training pair as valid, test =
#       dev2010 + tedx.dev2012 + tst2010-2012, learns a joint BPE of 10,000 merges, binarises with
#       fairseq-preprocess's default (one dictionary per language: 8,848 de / 6,632 en types;
#       160,239 train / 7,283 valid / 6,750 test pairs).
#   scripts/prepare_iwslt14.sh DEST --tokenized DIR
#       binarises an already prepared folder (fairseq's output: {train,valid,test}.{de,en}, BPE'd; a split
#       that is missing, e.g. train in ../shared/data/iwslt14.tokenized.de-en, is skipped).
#   scripts/prepare_iwslt14.sh DEST --tokenized DIR --codes CODES --dict DICT
#       maps that text into another model's vocabulary (domain adaptation): removes DIR's BPE, applies
#       CODES (e.g. data-bin/multi30k/bpe/code) and binarises with the joined dictionary DICT.
#
# Environment: MERGES (10000), WORKERS (2), URL (the tgz).
set -euo pipefail
dest=${1:?usage: prepare_iwslt14.sh DEST [--tokenized DIR [--codes CODES --dict DICT]]}
shift
tokenized="" codes="" dict=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tokenized) tokenized=$2; shift 2 ;;
    --codes) codes=$2; shift 2 ;;
    --dict) dict=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
MERGES=${MERGES:-10000}
WORKERS=${WORKERS:-2}
URL=${URL:-http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz}
[ -n "$codes" ] && [ -z "$dict" ] && { echo "--codes needs --dict (the vocabulary the codes belong to)" >&2; exit 2; }
[ -n "$dict" ] && [ -z "$codes" ] && { echo "--dict needs --codes" >&2; exit 2; }
tmp="$dest.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
tok() { sacremoses -l "$1" -j "$WORKERS" tokenize -x; }
lower() { python -c "import sys; [sys.stdout.write(l.lower()) for l in sys.stdin]"; }

if [ -z "$tokenized" ]; then  # the standard procedure from the raw TED talks
  (cd "$tmp" && curl -fsSL "$URL" -o de-en.tgz && tar xzf de-en.tgz)
  orig="$tmp/de-en"
  for l in de en; do
    grep -v '<url>' "$orig/train.tags.de-en.$l" | grep -v '<talkid>' | grep -v '<keywords>' \
      | sed -e 's/<title>//g' -e 's/<\/title>//g' -e 's/<description>//g' -e 's/<\/description>//g' \
      | tok $l > "$tmp/train.tok.$l"
  done
  python - "$tmp" <<'EOF'  # clean-corpus-n.perl -ratio 1.5 ... 1 175, then lowercase
import sys
tmp = sys.argv[1]
de, en = (open(f"{tmp}/train.tok.{l}", encoding="utf-8").read().splitlines() for l in ("de", "en"))
out = {l: open(f"{tmp}/train.tags.{l}", "w", encoding="utf-8") for l in ("de", "en")}
for d, e in zip(de, en):
    nd, ne = len(d.split()), len(e.split())
    if 1 <= nd <= 175 and 1 <= ne <= 175 and max(nd / ne, ne / nd) <= 1.5:
        out["de"].write(d.lower() + "\n")
        out["en"].write(e.lower() + "\n")
EOF
  for l in de en; do
    awk '{if (NR%23 == 0) print}' "$tmp/train.tags.$l" > "$tmp/valid.tok.$l"
    awk '{if (NR%23 != 0) print}' "$tmp/train.tags.$l" > "$tmp/train.tok.$l"
    : > "$tmp/test.tok.$l"
    for part in IWSLT14.TED.dev2010 IWSLT14.TEDX.dev2012 IWSLT14.TED.tst2010 IWSLT14.TED.tst2011 IWSLT14.TED.tst2012; do
      grep '<seg id' "$orig/$part.de-en.$l.xml" | sed -e 's/<seg id="[0-9]*">\s*//g' -e 's/\s*<\/seg>\s*//g' \
        -e "s/\’/\'/g" | tok $l | lower >> "$tmp/test.tok.$l"
    done
  done
  cat "$tmp/train.tok.de" "$tmp/train.tok.en" | subword-nmt learn-bpe -s "$MERGES" > "$tmp/code" 2> /dev/null
  for split in train valid test; do
    for l in de en; do
      subword-nmt apply-bpe -c "$tmp/code" < "$tmp/$split.tok.$l" > "$tmp/$split.$l" 2> /dev/null
    done
  done
else
  [ -f "$tokenized/valid.de" ] || { echo "$tokenized holds no valid.de / valid.en" >&2; exit 1; }
  for split in train valid test; do
    for l in de en; do
      [ -f "$tokenized/$split.$l" ] || continue
      if [ -n "$codes" ]; then  # into another vocabulary: undo this BPE, apply the other one
        sed -e 's/@@ //g' -e 's/@@$//' "$tokenized/$split.$l" | subword-nmt apply-bpe -c "$codes" \
          > "$tmp/$split.$l" 2> /dev/null
      else
        cp "$tokenized/$split.$l" "$tmp/$split.$l"
      fi
    done
  done
  [ -f "$tokenized/code" ] && [ -z "$codes" ] && cp "$tokenized/code" "$tmp/code"
fi

prefs=()
for split in train valid test; do
  [ -f "$tmp/$split.de" ] && prefs+=("--${split}pref" "$tmp/$split")
done
if [ -n "$dict" ]; then
  vocab=(--srcdict "$dict" --joined-dictionary)
elif [ -f "$tmp/train.de" ]; then
  vocab=()  # fairseq's IWSLT'14 recipe: a dictionary per language
else
  echo "no train split to build a dictionary from: give --codes and --dict of the model's vocabulary" >&2
  exit 1
fi
fairseq-preprocess --source-lang de --target-lang en "${prefs[@]}" --destdir "$tmp/bin" ${vocab[@]+"${vocab[@]}"} \
  --workers "$WORKERS" > "$tmp/preprocess.log" 2>&1 || { cat "$tmp/preprocess.log" >&2; exit 1; }
mkdir -p "$tmp/bin/bpe"
for f in "$tmp"/{train,valid,test}.{de,en} "$tmp/code"; do
  [ -f "$f" ] && mv "$f" "$tmp/bin/bpe/"
done
rm -rf "$dest"
mv "$tmp/bin" "$dest"
rm -rf "$tmp"
echo "binarized IWSLT'14 de-en into $dest: $(for s in train valid test; do [ -f "$dest/bpe/$s.en" ] && \
  echo -n "$s $(wc -l < "$dest/bpe/$s.en") "; done)pairs"
