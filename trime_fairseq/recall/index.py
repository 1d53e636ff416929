"""A split's recall index (``{split}.recall.json``, written by ``trime-recall make``): read and checked."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from trime_fairseq.recall.corpus import FORMAT, Episode


class RecallIndexError(ValueError):
    pass


@dataclass
class RecallIndex:
    path: Path
    split: str
    tokens: int
    settings: Dict
    episodes: List[Episode]
    position: np.ndarray  # (P,) stream positions of the scored second-occurrence tokens
    first_position: np.ndarray  # (P,) the same tokens in the first occurrence
    words: List[str]
    gap: np.ndarray
    variant: np.ndarray  # (P,) str
    episode: np.ndarray
    memory: Dict

    @classmethod
    def load(cls, path) -> "RecallIndex":
        path = Path(path)
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            raise RecallIndexError(f"{path} is not a recall index ({FORMAT})")
        s = doc["scored"]
        index = cls(path=path, split=doc["split"], tokens=int(doc["tokens"]), settings=doc["settings"],
                    episodes=[Episode(**e) for e in doc["episodes"]],
                    position=np.asarray(s["position"], dtype=np.int64),
                    first_position=np.asarray(s["first_position"], dtype=np.int64), words=list(s["word"]),
                    gap=np.asarray(s["gap"], dtype=np.int64), variant=np.asarray(s["variant"]),
                    episode=np.asarray(s["episode"], dtype=np.int64), memory=doc.get("memory") or {})
        index.check()
        return index

    @property
    def gaps(self) -> List[int]:
        return sorted({e.gap for e in self.episodes})

    @property
    def variants(self) -> List[str]:
        return [v for v in ("span", "passkey") if any(e.variant == v for e in self.episodes)]

    def check(self) -> None:
        """Every episode's gap is exact and its first occurrence lies strictly before its second; occurrences
        never overlap; the scored table agrees with the episodes."""
        spans = []
        for e in self.episodes:
            if e.first < 0 or e.second != e.first + e.length + e.gap:
                raise RecallIndexError(f"episode {e.id}: second occurrence at {e.second}, expected first {e.first} "
                                       f"+ length {e.length} + gap {e.gap}")
            if not e.first + e.length <= e.second:
                raise RecallIndexError(f"episode {e.id}: the first occurrence does not end before the second starts")
            if e.second + e.length > self.tokens:
                raise RecallIndexError(f"episode {e.id} ends beyond the stream's {self.tokens} tokens")
            if not 0 <= e.scored_from < e.scored_to <= e.length:
                raise RecallIndexError(f"episode {e.id}: scored offsets [{e.scored_from}, {e.scored_to}) out of range")
            spans += [(e.first, e.first + e.length), (e.second, e.second + e.length)]
        spans.sort()
        for (a0, a1), (b0, _) in zip(spans, spans[1:]):
            if b0 < a1:
                raise RecallIndexError(f"occurrences overlap at stream positions {b0}..{a1}")
        expected = sum(e.scored_to - e.scored_from for e in self.episodes)
        if len(self.position) != expected or np.any(self.first_position >= self.position):
            raise RecallIndexError(f"{self.path}: the scored table disagrees with the episodes")

    def check_stream(self, token_ids: np.ndarray, dictionary, memory_ids: np.ndarray = None) -> None:
        """The binarised split (``token_ids``: the stream as fairseq reads it) holds every indexed word at its
        position, in both occurrences (and the memory split, when given, every first occurrence)."""
        if len(token_ids) != self.tokens:
            raise RecallIndexError(f"split '{self.split}' has {len(token_ids)} tokens, the index {self.tokens}: "
                                   "binarised from another text?")
        for e in self.episodes:
            want = np.array([dictionary.index(w) for w in e.words])
            places = [("first", token_ids, e.first), ("second", token_ids, e.second)]
            if memory_ids is not None:
                places.append(("memory", memory_ids, e.memory))
            for name, ids, start in places:
                got = np.asarray(ids[start:start + e.length])
                if not np.array_equal(got, want):
                    raise RecallIndexError(f"episode {e.id}: the {name} occurrence at {start} reads "
                                           f"{dictionary.string(got)!r}, expected {' '.join(e.words)!r}")


def split_tokens(data: str, split: str) -> np.ndarray:
    """A binarised split's token stream (the lines' tokens one after another, one </s> each) as fairseq reads it."""
    from fairseq.data import indexed_dataset

    dataset = indexed_dataset.MMapIndexedDataset(str(Path(data) / split))
    return np.concatenate([dataset[i].numpy() for i in range(len(dataset))]) if len(dataset) else np.zeros(0, int)


def positions_of(index: RecallIndex, occurrence: str) -> np.ndarray:
    if occurrence == "second":
        return index.position
    if occurrence == "first":
        return index.first_position
    raise ValueError(f"occurrence is 'first' or 'second', got {occurrence!r}")


def selection(index: RecallIndex, variant: str, gap: int) -> np.ndarray:
    return (index.variant == variant) & (index.gap == gap)

