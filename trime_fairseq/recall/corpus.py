"""The recall corpus: WikiText text with spans that reappear after a controlled gap, seeded.

A split is a token stream exactly as ``fairseq-preprocess`` binarises it: every line's whitespace-separated
words, then one end-of-line token (``EOS`` here; fairseq's ``</s>``), empty lines included. Every position
below is a position in that stream.

An *episode* places the same word sequence twice: its first occurrence at [first, first + S) and its second at
[second, second + S) with ``second = first + S + gap``, i.e. exactly ``gap`` stream tokens (end-of-line tokens
included) lie between the end of the first and the start of the second. Two variants:

* ``span``: S words copied from a line of the split's own text that is kept out of the filler (so the span
  never occurs a third time); the scored tokens are the span's words but the first (nothing announces it);
* ``passkey``: ``the pass key of NAME is K1 … Kk .`` with NAME and the keys random words of the training
  vocabulary; the scored tokens are the keys (the marker announces them).

Occurrences are placed at random (seeded) where they overlap no other occurrence; the rest of the stream is
the filler text in its order. valid / test are streams with a fixed number of episodes per (variant, gap);
train is the training text with episodes inserted at a rate (episodes per 1,000 tokens). For valid / test a
*memory* split holds the first occurrences alone, one per line in stream order: the datastore of kNN-LM /
TRIMELM_ext / SPALM is built from it, so it holds no second occurrence.
"""

import hashlib
import json
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from trime_fairseq.atomic import atomic_write_text

EOS = "\n"  # a line end in a token stream: fairseq-preprocess appends one </s> per line
FORMAT = "trime-recall-index/1"
VARIANTS = ("span", "passkey")
PASSKEY_MARKER = ("the", "pass", "key", "of")  # + NAME + "is" + keys + "."


@dataclass
class Episode:
    id: int
    variant: str
    gap: int
    words: List[str]
    scored_from: int  # offsets [scored_from, scored_to) of ``words`` are scored
    scored_to: int
    first: int = -1  # stream position of the first occurrence's first word
    second: int = -1
    memory: int = -1  # position of the first occurrence in the memory split (valid / test)

    @property
    def length(self) -> int:
        return len(self.words)


@dataclass
class SplitPlan:
    split: str
    tokens: List[str]
    episodes: List[Episode]
    source: Dict = field(default_factory=dict)


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The generator of one split: the same (seed, split) gives the same split whatever the others ask."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(split.encode())]))


def read_lines(path: Path, limit: int = 0) -> List[List[str]]:
    """The words of every line (``limit`` > 0: the first lines only)."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit and i >= limit:
                break
            lines.append(line.split())
    return lines


def line_tokens(lines: Sequence[Sequence[str]]) -> List[str]:
    tokens: List[str] = []
    for words in lines:
        tokens.extend(words)
        tokens.append(EOS)
    return tokens


def token_lines(tokens: Sequence[str]) -> str:
    """The text whose fairseq stream is ``tokens`` (which end with EOS)."""
    if tokens and tokens[-1] != EOS:
        raise ValueError("a stream ends with an end of line")
    out, line = [], []
    for t in tokens:
        if t == EOS:
            out.append(" ".join(line) + "\n")
            line = []
        else:
            line.append(t)
    return "".join(out)


def is_heading(words: Sequence[str]) -> bool:
    return bool(words) and words[0] == "="


def reserve_span_lines(lines: List[List[str]], rng, spans: int, length: int) -> Tuple[List[List[str]], List[List[str]]]:
    """(filler lines, span lines): enough random text lines (no headings, >= ``length`` words) for ``spans``
    spans, taken out of the filler so that a span never occurs a third time."""
    eligible = [i for i, words in enumerate(lines) if len(words) >= length and not is_heading(words)]
    if spans == 0:
        return lines, []
    if not eligible:
        raise ValueError(f"no line of at least {length} words to take spans from")
    rng.shuffle(eligible)
    reserved, capacity = [], 0
    for i in eligible:  # room for every span twice over, and at least 2 lines
        if capacity >= 2 * spans and len(reserved) >= 2:
            break
        reserved.append(i)
        capacity += len(lines[i]) // length
    if capacity < spans:
        raise ValueError(f"the text holds room for {capacity} spans of {length} words, {spans} are needed")
    chosen = set(reserved)
    return [w for i, w in enumerate(lines) if i not in chosen], [lines[i] for i in sorted(chosen)]


def draw_spans(pool: List[List[str]], rng, count: int, length: int) -> List[List[str]]:
    """``count`` distinct spans of ``length`` words from non-overlapping slots of the pool lines."""
    slots = [(i, o) for i, words in enumerate(pool) for o in range(0, len(words) - length + 1, length)]
    if len(slots) < count:
        raise ValueError(f"room for {len(slots)} spans, {count} needed")
    picked = rng.choice(len(slots), size=count, replace=False)
    return [pool[slots[k][0]][slots[k][1]:slots[k][1] + length] for k in picked]


def key_vocabulary(train_lines: Sequence[Sequence[str]], min_count: int) -> List[str]:
    """Pass-key words: alphabetic lower-case words seen at least ``min_count`` times in training (so the model
    has an embedding for them), the marker's words left out; sorted, so a seed picks the same ones."""
    counts = Counter(w for words in train_lines for w in words)
    banned = set(PASSKEY_MARKER) | {"is"}
    vocab = sorted(w for w, c in counts.items() if c >= min_count and w.isalpha() and w.islower() and w not in banned)
    if len(vocab) < 16:
        raise ValueError(f"only {len(vocab)} pass-key words occur >= {min_count} times in training; lower --key-min-count")
    return vocab


def passkey_words(rng, vocab: Sequence[str], key_length: int) -> Tuple[List[str], int, int]:
    """(words, scored_from, scored_to): ``the pass key of NAME is K1 … Kk .``, the keys scored."""
    picked = [vocab[i] for i in rng.choice(len(vocab), size=key_length + 1, replace=False)]
    prefix = list(PASSKEY_MARKER) + [picked[0], "is"]
    return prefix + picked[1:] + ["."], len(prefix), len(prefix) + key_length


def place(episodes: List[Episode], filler: int, rng, margin: int) -> int:
    """Choose every episode's first / second position (second = first + length + gap) in a stream of
    ``filler`` + inserted tokens so that no two occurrences come within ``margin`` tokens of each other and
    the stream starts and ends with ``margin`` filler tokens; returns the stream's length."""
    total = filler + sum(2 * e.length for e in episodes)
    busy = np.zeros(total, dtype=bool)
    for e in sorted(episodes, key=lambda e: -(e.gap + 2 * e.length)):
        extent = 2 * e.length + e.gap
        high = total - margin - extent  # the last possible first position
        if high < margin:
            raise ValueError(f"a stream of {total} tokens is too short for a gap of {e.gap} (episode {e.id}): "
                             "use more text (fewer limited lines) or smaller gaps")
        for _ in range(10_000):
            a = int(rng.integers(margin, high + 1))
            b = a + e.length + e.gap
            if not busy[a - margin:a + e.length + margin].any() and not busy[b - margin:b + e.length + margin].any():
                break
        else:
            raise ValueError(f"no room for episode {e.id} (gap {e.gap}) in {total} tokens: fewer episodes or more text")
        busy[a:a + e.length] = True
        busy[b:b + e.length] = True
        e.first, e.second = a, b
    return total


def build_stream(filler: Sequence[str], episodes: Sequence[Episode], total: int) -> List[str]:
    """The stream: occurrences at their positions, the filler in order everywhere else."""
    stream: List = [None] * total
    for e in episodes:
        for start in (e.first, e.second):
            stream[start:start + e.length] = e.words
    it = iter(filler)
    for i in range(total):
        if stream[i] is None:
            stream[i] = next(it)
    if next(it, None) is not None:
        raise AssertionError("filler left over")
    return stream


def memory_split(episodes: List[Episode]) -> List[str]:
    """The first occurrences alone, one line each in stream order; sets ``Episode.memory``."""
    tokens: List[str] = []
    for e in sorted(episodes, key=lambda e: e.first):
        e.memory = len(tokens)
        tokens.extend(e.words)
        tokens.append(EOS)
    return tokens


def new_episode(id: int, variant: str, gap: int, spans: List[List[str]], rng, vocab, key_length: int) -> Episode:
    """A span episode (the next of ``spans``; its first word unscored) or a pass key (its keys scored)."""
    if variant == "span":
        words = spans.pop()
        return Episode(id, variant, gap, list(words), 1, len(words))
    words, lo, hi = passkey_words(rng, vocab, key_length)
    return Episode(id, variant, gap, words, lo, hi)


def eval_episodes(rng, pool, vocab, variants, gaps, per_bucket, span_length, key_length) -> List[Episode]:
    """``per_bucket`` episodes of every (variant, gap)."""
    buckets = [(v, g) for v in variants for g in gaps]
    spans = draw_spans(pool, rng, per_bucket * len(gaps), span_length) if "span" in variants else []
    episodes = []
    for variant, gap in buckets:
        for _ in range(per_bucket):
            episodes.append(new_episode(len(episodes), variant, gap, spans, rng, vocab, key_length))
    return episodes


def train_episodes(rng, pool, vocab, count, gaps, passkey_share, span_length, key_length) -> List[Episode]:
    passkeys = int(rng.binomial(count, passkey_share)) if vocab is not None else 0
    spans = draw_spans(pool, rng, count - passkeys, span_length)
    kinds = ["passkey"] * passkeys + ["span"] * (count - passkeys)
    rng.shuffle(kinds)
    episodes = []
    for variant in kinds:
        gap = int(gaps[rng.integers(len(gaps))])
        episodes.append(new_episode(len(episodes), variant, gap, spans, rng, vocab, key_length))
    return episodes


def scored_table(episodes: Sequence[Episode]) -> Dict[str, list]:
    """One entry per scored second-occurrence token: its stream position, its first occurrence's position, the
    word, the episode, the offset in the span, the gap (bucket) and the variant."""
    table = {k: [] for k in ("position", "first_position", "word", "episode", "offset", "gap", "variant")}
    for e in episodes:
        for j in range(e.scored_from, e.scored_to):
            table["position"].append(e.second + j)
            table["first_position"].append(e.first + j)
            table["word"].append(e.words[j])
            table["episode"].append(e.id)
            table["offset"].append(j)
            table["gap"].append(e.gap)
            table["variant"].append(e.variant)
    return table


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def index_document(plan: SplitPlan, text: str, settings: Dict, memory_text: str = None) -> Dict:
    doc = dict(format=FORMAT, split=plan.split, tokens=len(plan.tokens), stream_sha256=sha256_text(text),
               settings=settings, source=plan.source, episodes=[asdict(e) for e in plan.episodes],
               scored=scored_table(plan.episodes))
    if memory_text is not None:
        doc["memory"] = dict(split=f"{plan.split}_memory", file=f"memory.{plan.split}.tokens",
                             tokens=sum(e.length + 1 for e in plan.episodes), stream_sha256=sha256_text(memory_text))
    return doc


def parse_gaps(text: str) -> List[int]:
    gaps = sorted({int(x) for x in str(text).split(",") if x.strip()})
    if not gaps or gaps[0] < 0:
        raise ValueError(f"gaps must be a comma-separated list of integers >= 0, got '{text}'")
    return gaps


def make_corpus(source: Path, output: Path, *, seed: int = 1, span_length: int = 16, key_length: int = 4,
                gaps="16,64,512,3072,8192,32768", episodes: int = 8, variants=VARIANTS,
                train_gaps="16,64,256,512,1024,3072", train_rate: float = 1.0, train_passkey_share: float = 0.5,
                train_lines: int = 0, eval_lines: int = 0, key_min_count: int = 20, margin: int = 4) -> Dict:
    """Write ``wiki.{train,valid,test}.tokens``, ``memory.{valid,test}.tokens``, ``{split}.recall.json``
    (the indexes) and ``recall.json`` (the settings) into ``output``; returns the settings."""
    source, output = Path(source), Path(output)
    variants = tuple(variants)
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ValueError(f"variants must be among {VARIANTS}, got {variants}")
    if span_length < 2 or key_length < 1 or margin < 1 or episodes < 1:
        raise ValueError("need --span-length >= 2, --key-length >= 1, --margin >= 1, --episodes >= 1")
    gaps, train_gaps = parse_gaps(gaps), parse_gaps(train_gaps)
    settings = dict(seed=seed, span_length=span_length, key_length=key_length, gaps=gaps, episodes=episodes,
                    variants=list(variants), train_gaps=train_gaps, train_rate=train_rate,
                    train_passkey_share=train_passkey_share, train_lines=train_lines, eval_lines=eval_lines,
                    key_min_count=key_min_count, margin=margin, passkey_marker=list(PASSKEY_MARKER))
    texts = {}
    for split in ("train", "valid", "test"):
        path = source / f"wiki.{split}.tokens"
        if not path.is_file():
            raise FileNotFoundError(f"missing {path} (a WikiText folder: wiki.{{train,valid,test}}.tokens)")
        texts[split] = read_lines(path, train_lines if split == "train" else eval_lines)
    vocab = key_vocabulary(texts["train"], key_min_count) if "passkey" in variants else None
    output.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split in ("train", "valid", "test"):
        rng = split_rng(seed, split)
        lines = texts[split]
        if split == "train":
            count = int(round(train_rate * len(line_tokens(lines)) / 1000))
            share = train_passkey_share if "passkey" in variants else 0.0
            spans_needed = count  # at most every episode a span
            filler_lines, pool = reserve_span_lines(lines, rng, spans_needed, span_length)
            eps = train_episodes(rng, pool, vocab, count, train_gaps, share, span_length, key_length)
        else:
            spans_needed = episodes * len(gaps) if "span" in variants else 0
            filler_lines, pool = reserve_span_lines(lines, rng, spans_needed, span_length)
            eps = eval_episodes(rng, pool, vocab, variants, gaps, episodes, span_length, key_length)
        filler = line_tokens(filler_lines)
        total = place(eps, len(filler), rng, margin)
        plan = SplitPlan(split, build_stream(filler, eps, total), eps,
                         source=dict(file=str(source / f"wiki.{split}.tokens"), lines=len(lines),
                                     span_lines=len(pool)))
        text = token_lines(plan.tokens)
        atomic_write_text(output / f"wiki.{split}.tokens", text)
        memory_text = None
        if split != "train":
            memory_text = token_lines(memory_split(eps))
            atomic_write_text(output / f"memory.{split}.tokens", memory_text)
        doc = index_document(plan, text, settings, memory_text)
        atomic_write_text(output / f"{split}.recall.json", json.dumps(doc) + "\n")
        summary[split] = dict(tokens=total, episodes=len(eps), scored=len(doc["scored"]["position"]))
    manifest = dict(format=FORMAT, source=str(source), settings=settings, splits=summary)
    atomic_write_text(output / "recall.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
