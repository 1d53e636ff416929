"""Where documents start in a token stream (WikiText's `` = Title = `` headings).

fairseq's binarized LM data is a stream of lines, each ending with ``eos``; the
document structure is gone. WikiText marks a document by a level-1 heading line
`` = Title = `` (sub-sections are `` = = Section = = ``), so a document is found
from the tokens themselves, through the dictionary's ``=`` symbol.

The rule is stated on stream *entries* -- entry k is the pair (x_k, x_{k+1}) of an
input token and the token that follows it, i.e. a memory entry / a scored
position -- and training (whole token arrays) and evaluation (a stream arriving
batch by batch) use literally the same test:

    entry b starts a document  iff  x_{b-1} = eos,  x_b = "=",  x_{b+1} != "="

i.e. the first entry of a document is the one that *reads* the heading's opening
``=`` (and predicts the title's first word); the entry predicting that ``=`` from
the previous line's ``eos`` is the last entry of the previous document. The stream
start (entry 0) always starts a document.

**Causality.** Whether b starts a document depends on x_{b+1}, the token b
predicts. So a *query* never uses the start it sits on: the memory of the
position q is limited to the latest document start b < q (strictly before it;
entry 0 for q = 0). Position b itself still sees the previous document, and
from b + 1 on -- once x_{b+1} has been read as an input -- the new document's
entries only (entry b included). Nothing a position is scored on depends on
its own target (``tests/test_causality.py`` perturbs every target and checks it).
Training runs (``--batching consecutive``) are cut at the starts b: that is data
layout, not a memory bound of a scored query.

In a token array ``tokens`` (targets), entry k has x_k = tokens[k-1] (eos for
k = 0) and x_{k+1} = tokens[k].
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

HEADING = "="


@dataclass(frozen=True)
class DocumentBoundaries:
    eos: int
    heading: int  # id of "="

    @classmethod
    def from_dictionary(cls, dictionary, required: bool = True) -> Optional["DocumentBoundaries"]:
        heading = dictionary.index(HEADING)
        if heading == dictionary.unk():
            if required:
                raise ValueError(
                    "document boundaries are found from WikiText's ' = Title = ' headings, but the "
                    f"dictionary has no '{HEADING}' symbol; pass --cross-documents (training) or do not "
                    "ask for --memory-reset document (evaluation)"
                )
            return None
        return cls(eos=dictionary.eos(), heading=heading)

    def starts(self, prev_src, src, next_src):
        """Element-wise rule on entries (numpy arrays or torch tensors of equal shape):
        True where the entry b with x_b = ``src`` starts a document, ``prev_src``
        being x_{b-1} and ``next_src`` x_{b+1}. Only queries after b may use it."""
        return (prev_src == self.eos) & (src == self.heading) & (next_src != self.heading)

    def starts_in_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Sorted entry indices k (= target positions in ``tokens``) that start a
        document, always including 0. Vectorised; ``tokens`` may be a memmap."""
        n = len(tokens)
        if n < 2:
            return np.zeros(1, dtype=np.int64)
        is_eos = tokens == self.eos
        is_head = tokens == self.heading
        # entry k >= 1: x_k = tokens[k-1], x_{k-1} = tokens[k-2] (eos for k = 1), y_k = tokens[k]
        prev_eos = np.concatenate([[True], is_eos[:-2]])  # x_{k-1} == eos for k = 1..n-1
        hits = prev_eos & is_head[:-1] & ~is_head[1:]
        starts = np.flatnonzero(hits) + 1
        return np.concatenate([[0], starts]).astype(np.int64)
