"""The memory parts of one forward pass: each gathers its raw entries for the positions a driver scores.

:class:`ForwardState` is what the ``get_normalized_probs`` calls of one forward pass share
(created by :class:`~trime_fairseq.memory.eval_memory.EvalMemory` for each new ``extra`` dict
of fairseq's output; nothing is written into that output): the ``--softmax-batch`` chunk
offset, the stream batch, the scorable positions, one :class:`PartSource` per memory part
and the memoised target summaries.

A part source answers two questions, and holds what it computed for this forward:

* :meth:`PartSource.gather` ``(options, positions)`` -- the raw entries of flat positions (n,)
  of the (B, T) output, as pieces (n, M_i) (a driver concatenates them, or summarises them
  piece by piece);
* :meth:`PartSource.cache_key` ``(options)`` -- what, besides the forward, those entries
  depend on: summaries of the same term under the same key are the same.

| part | source | entries | cache key |
|---|---|---|---|
| ``LOCAL_G`` / ``LOCAL_F`` | :class:`LocalPart` on g / f | the row's earlier positions (+ ring buffer, + the batch's stream entries), raw scores computed once per key kind for the scorable positions | window, long-term memory size, reset |
| ``DATASTORE`` | :class:`DatastorePart` | the first ``knn_k`` hits; each position searched once, at the EvalMemory's K; none where a skip predictor skips it | ``knn_k`` |
| ``NEIGHBOURS`` | :class:`NeighbourPart` | the k neighbours a SPALM model used (its ``extra``), else the batch's | -- |
| ``SENTENCE_PAIRS`` | :class:`SentencePairPart` | the ``knn_k`` nearest entries of the row's sentence's retrieved pairs (:mod:`trime_fairseq.memory.sentence_pairs`) | ``knn_k`` |

A new memory is one source here (and its name in :mod:`trime_fairseq.memory.composition`).
"""

from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor

from trime_fairseq.memory.blockwise import target_sums
from trime_fairseq.memory.composition import DATASTORE, LOCAL_F, LOCAL_G, NEIGHBOURS, SENTENCE_PAIRS, Term
from trime_fairseq.memory.keys import NEIGHBOUR_TOKENS, TRIME_FEATURE, TRIME_KEY, get_keys, get_neighbours
from trime_fairseq.memory.mixing import fp32
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.sentence_pairs import sentence_rows
from trime_fairseq.memory.skip import skip_features
from trime_fairseq.memory.sources import MemoryBatch, concat_memory, scaled_dot
from trime_fairseq.memory.stream import StreamBatch
from trime_fairseq.memory.token_scores import all_token_log_probs, target_token_scores

Sums = Tuple[Tensor, Tensor]  # (match, other) log-sums (Q,) of one term at the targets


def next_tokens(src_tokens: Tensor, pad: int) -> Tensor:
    """Memory value of every input position: the token that follows it in the row, (B, T);
    ``pad`` for the last column (no position of the row sees it)."""
    return torch.cat([src_tokens[:, 1:], src_tokens.new_full((src_tokens.size(0), 1), pad)], 1)


class PartSource:
    """One memory part of one forward pass (see the module docstring)."""

    def __init__(self, state: "ForwardState"):
        self.state = state

    def cache_key(self, options: MemoryOptions) -> Hashable:
        return None

    def gather(self, options: MemoryOptions, positions: Tensor) -> List[MemoryBatch]:
        raise NotImplementedError


class LocalPart(PartSource):
    """The local memory on one key kind: the scored row's earlier positions, and with a long-term
    memory the ring buffer and the batch's earlier stream entries, limited to the document on reset."""

    def __init__(self, state: "ForwardState", key_kind: str):
        super().__init__(state)
        self.key_kind = key_kind
        self._row_raw: Optional[Tensor] = None  # (k, T)
        self._long_raw: Optional[Tuple[Tensor, Tensor]] = None  # (k, N), (k, S)
        self._pieces: Dict[Hashable, List[MemoryBatch]] = {}  # cache key -> pieces of the k scorable positions

    def cache_key(self, options: MemoryOptions) -> Hashable:
        return options.window, options.long_memory_size, options.memory_reset

    def gather(self, options: MemoryOptions, positions: Tensor) -> List[MemoryBatch]:
        rows = self.state.scorable_index(positions)
        return [piece.rows(rows) for piece in self._all_pieces(options)]

    def row_raw(self) -> Tensor:
        """(k, T) raw q·k of every scorable position against the positions of its row."""
        if self._row_raw is None:
            state = self.state
            flat, _ = state.scorable()
            keys = state.keys(self.key_kind)
            rows = flat // state.tsz
            out = fp32(keys).new_empty(flat.numel(), state.tsz)
            for b in rows.unique().tolist():  # one (n_b, d) x (d, T) product per row
                sel = (rows == b).nonzero().squeeze(1)
                out[sel] = scaled_dot(keys[b, flat[sel] % state.tsz], keys[b], 1.0)
            self._row_raw = out
        return self._row_raw

    def long_raw(self) -> Tuple[Tensor, Tensor]:
        """Raw scores of the scorable positions against the ring buffer (k, N) and the batch's own
        stream entries (k, S)."""
        if self._long_raw is None:
            state = self.state
            flat, _ = state.scorable()
            keys = state.keys(self.key_kind)
            keys = keys.reshape(-1, keys.size(-1))  # (B·T, d)
            queries = keys[flat]
            buffer = state.memory.stream.buffer(self.key_kind)
            self._long_raw = (buffer.scores(queries), scaled_dot(queries, keys[state.stream_batch.flat], 1.0))
        return self._long_raw

    def _all_pieces(self, options: MemoryOptions) -> List[MemoryBatch]:
        """The raw pieces of every scorable position (k, M_i): the row (k, T), then with a long-term
        memory the ring buffer (k, N) and the batch's earlier entries (k, S)."""
        key = self.cache_key(options)
        if key in self._pieces:
            return self._pieces[key]
        state = self.state
        reset = options.memory_reset == "document"
        size = options.long_memory_size
        flat, _ = state.scorable()
        src = state.src_tokens()
        rows, cols = flat // state.tsz, flat % state.tsz
        values = next_tokens(src, state.memory.pad)  # (B, T)
        j = torch.arange(state.tsz, device=state.device).unsqueeze(0)  # (1, T)
        offset = cols.unsqueeze(1) - j  # (k, T) i - j
        mask = (offset > 0) & values[rows].ne(state.memory.pad)
        if options.window is not None:
            mask &= offset <= options.window
        batch = state.stream_batch
        if batch is not None:
            entries = batch.entry_of_flat[flat]
            if (entries < 0).any():
                raise RuntimeError("a scorable position is no entry of the evaluation stream")
            doc_lo, lo, hi = batch.query_bounds(entries, size, state.memory.documents if reset else None)
            if reset:
                mask &= batch.row_start[rows].unsqueeze(1) + j >= doc_lo.unsqueeze(1)
        pieces = [MemoryBatch(self.row_raw(), values[rows], mask)]
        if size > 0:
            ring_raw, batch_raw = self.long_raw()
            buffer = state.memory.stream.buffer(self.key_kind)
            pos = batch.positions.unsqueeze(0)
            pieces.append(MemoryBatch(ring_raw, buffer.slot_values(state.device), buffer.window(lo, hi)))
            pieces.append(MemoryBatch(batch_raw, batch.values().unsqueeze(0),
                                      (pos >= lo.unsqueeze(1)) & (pos < hi.unsqueeze(1))))
        self._pieces[key] = pieces
        return pieces


class DatastorePart(PartSource):
    """The K nearest datastore entries: each flat position is searched once (at the EvalMemory's K),
    whatever chunks and options ask for it; ``knn_k`` keeps the first hits."""

    def __init__(self, state: "ForwardState"):
        super().__init__(state)
        self._hits: Optional[MemoryBatch] = None  # (searched, K)
        self._hit_row = torch.full((state.total,), -1, dtype=torch.long, device=state.device)  # (B·T,)

    def cache_key(self, options: MemoryOptions) -> Hashable:
        return options.knn_k

    def gather(self, options: MemoryOptions, positions: Tensor) -> List[MemoryBatch]:
        missing = positions[self._hit_row[positions] < 0].unique()
        if missing.numel():
            external = self.state.memory.external
            keys = self.state.keys(external.key_type)
            features = self.state.skip_features(missing) if external.skips else None  # (n, 3)
            found = external.search(keys.reshape(-1, keys.size(-1))[missing], features)
            start = 0 if self._hits is None else self._hits.mask.size(0)
            self._hits = found if self._hits is None else MemoryBatch(
                torch.cat([self._hits.scores, found.scores]), torch.cat([self._hits.values, found.values]),
                torch.cat([self._hits.mask, found.mask]))
            self._hit_row[missing] = torch.arange(start, start + missing.numel(), device=self.state.device)
        return [self._hits.rows(self._hit_row[positions]).first(options.knn_k)]


class NeighbourPart(PartSource):
    """The precomputed neighbours: those a SPALM model used (its output's ``extra``), else the batch's."""

    def __init__(self, state: "ForwardState"):
        super().__init__(state)
        self._found: Optional[MemoryBatch] = None  # (B·T, k)

    def gather(self, options: MemoryOptions, positions: Tensor) -> List[MemoryBatch]:
        if self._found is None:
            state = self.state
            source = state.extra if state.extra.get(NEIGHBOUR_TOKENS) is not None else state.sample["net_input"]
            found = get_neighbours(source, state.memory.pad)
            if tuple(found.mask.shape[:2]) != (state.bsz, state.tsz):
                raise ValueError(f"the batch's neighbours {tuple(found.mask.shape)} do not match the scored "
                                 f"positions ({state.bsz}, {state.tsz})")
            self._found = found.flatten()
        return [self._found.rows(positions)]


class SentencePairPart(PartSource):
    """SK-MT: the nearest forced-decoded target positions of the pairs retrieved for each position's sentence
    (its row's, as the decoder output's ``extra`` says), searched exactly."""

    def cache_key(self, options: MemoryOptions) -> Hashable:
        return options.knn_k

    def gather(self, options: MemoryOptions, positions: Tensor) -> List[MemoryBatch]:
        state = self.state
        memory = state.memory.sentence_pairs
        keys = state.keys(memory.key_type)
        rows = sentence_rows(state.extra)[positions // state.tsz]  # (n,) the batch row of each position
        return [memory.search(keys.reshape(-1, keys.size(-1))[positions], rows, options.knn_k)]


#: part name -> its source (a new memory part is one entry)
PART_SOURCES: Dict[str, Callable[["ForwardState"], PartSource]] = {
    LOCAL_G: lambda state: LocalPart(state, TRIME_KEY),
    LOCAL_F: lambda state: LocalPart(state, TRIME_FEATURE),
    DATASTORE: DatastorePart,
    NEIGHBOURS: NeighbourPart,
    SENTENCE_PAIRS: SentencePairPart,
}


class ForwardState:
    """What the ``get_normalized_probs`` calls of one forward pass share (see the module docstring)."""

    def __init__(self, memory, net_output, sample):
        self.memory = memory
        self.extra = net_output[1]
        keys = self.extra.get(TRIME_KEY) if self.extra.get(TRIME_KEY) is not None else self.extra.get(TRIME_FEATURE)
        if keys is None:
            get_keys(net_output)  # raises the error that explains key capture
        self.bsz, self.tsz = keys.shape[:2]
        self.total = self.bsz * self.tsz
        self.device = keys.device
        self.next_position = 0  # the next --softmax-batch chunk starts here
        self.sample = sample
        self.stream_batch: Optional[StreamBatch] = None
        if memory.stream is not None:
            self.stream_batch = memory.stream.place(sample, self.src_tokens())
        self._scorable: Optional[Tuple[Tensor, Tensor]] = None
        self._sources: Dict[str, PartSource] = {}
        self._sums: Dict[Hashable, Tuple[Tensor, Tensor]] = {}  # (term, part's cache key) -> (match, other)
        self._sum_positions: Optional[Tensor] = None
        self._target_scores: Optional[Tuple[Tensor, Tensor]] = None
        self._outputs = None  # (decoder, first flat position, (n, ·) outputs of the call being scored)

    # -- positions --------------------------------------------------------------------------------
    def claim(self, x: Tensor) -> int:
        """The flat position of the first row of ``x``: 0 for the whole (B, T) output, else the
        chunk that follows the previous one."""
        n = x.shape[0] * x.shape[1]
        if tuple(x.shape[:2]) == (self.bsz, self.tsz):
            start = 0
        else:
            start = self.next_position
        if start + n > self.total:
            raise RuntimeError("get_normalized_probs got more positions than the forward pass produced")
        self.next_position = start + n
        return start

    @property
    def done(self) -> bool:
        return self.next_position == self.total

    def record_targets(self, start: int, target: Tensor) -> None:
        """Targets of flat positions [start, start + n): the stream commits the batch with them."""
        if self.stream_batch is not None:
            self.stream_batch.add_targets(start, target.reshape(-1))

    def src_tokens(self) -> Tensor:
        src = self.sample["net_input"].get("src_tokens")
        if src is None or tuple(src.shape) != (self.bsz, self.tsz):
            raise ValueError("the local memory reads the scored sequence from net_input['src_tokens'] (B, T), "
                             "aligned with the decoder's positions (a language model)")
        return src

    def scorable(self) -> Tuple[Tensor, Tensor]:
        """(flat positions (k,) that can be scored -- not context, not padding --, index (B·T,)
        of each flat position among them or -1)."""
        if self._scorable is None:
            src = self.src_tokens()
            context = self.sample.get("start_indices")
            context = torch.as_tensor(context if context is not None else [0] * self.bsz, device=self.device)
            cols = torch.arange(self.tsz, device=self.device)
            scorable = (cols.unsqueeze(0) >= context.view(-1, 1)) & src.ne(self.memory.pad)
            flat = scorable.reshape(-1).nonzero().squeeze(1)
            index = torch.full((self.total,), -1, dtype=torch.long, device=self.device)
            index[flat] = torch.arange(flat.numel(), device=self.device)
            self._scorable = (flat, index)
        return self._scorable

    def scorable_index(self, positions: Tensor) -> Tensor:
        """The index among the scorable positions of flat ``positions`` (n,); an error for context / padding."""
        rows = self.scorable()[1][positions]
        if (rows < 0).any():
            raise RuntimeError("a scored position lies in the context or padding of its row")
        return rows

    def keys(self, name: str) -> Tensor:
        return get_keys((None, self.extra), name)  # (B, T, d)

    def offer_outputs(self, decoder, start: int, x: Tensor, log_probs: Optional[Tensor] = None) -> None:
        """The decoder and the outputs (logits or adaptive-softmax features) of the positions a driver scores
        now: flat positions [start, start + n) of ``x`` (…, ·), and optionally their token log-probabilities
        (n, V) computed without the target, not yet mixed; what :meth:`skip_features` reads."""
        self._outputs = (decoder, start, x.reshape(-1, x.size(-1)), log_probs)

    def skip_features(self, positions: Tensor) -> Tensor:
        """(n, 3) skip features of flat ``positions`` (:func:`~trime_fairseq.memory.skip.skip_features`): the
        model's token distribution computed without the target (an adaptive softmax fills every cluster) and
        the query; positions of the outputs offered last."""
        if self._outputs is None:
            raise RuntimeError("skip features need the scored outputs (offer_outputs)")
        decoder, start, x, log_probs = self._outputs
        rows = positions - start
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= x.size(0)):
            raise RuntimeError("skip features asked for positions outside the outputs being scored")
        if log_probs is None:
            log_probs = all_token_log_probs(decoder, x[rows], partition=False)[0]  # (n, V), no target: the decision never reads it
        else:
            log_probs = log_probs[rows]
        keys = self.keys(self.memory.external.key_type)
        return skip_features(log_probs, keys.reshape(-1, keys.size(-1))[positions])

    # -- the parts --------------------------------------------------------------------------------
    def source(self, part: str) -> PartSource:
        if part not in self._sources:
            self._sources[part] = PART_SOURCES[part](self)
        return self._sources[part]

    def gather(self, part: str, options: MemoryOptions, positions: Tensor) -> List[MemoryBatch]:
        """Raw entries of ``part`` for flat ``positions`` (n,), as pieces (n, M_i)."""
        return self.source(part).gather(options, positions)

    def entries(self, options: MemoryOptions, positions: Tensor) -> Callable[[Tuple[Term, ...]], MemoryBatch]:
        """``entries(terms)``: the scaled entries (n, M) of ``terms`` at flat ``positions``, concatenated (what an
        adaptive step's rule reads in :func:`~trime_fairseq.memory.compose.target_log_prob`)."""

        def of(terms: Tuple[Term, ...]) -> MemoryBatch:
            return concat_memory([concat_memory(self.gather(t.part, options, positions)).scaled(t.scale)
                                  for t in terms])

        return of

    def target_scores(self, decoder, net_output, target: Tensor) -> Tuple[Tensor, Tensor]:
        """(token score of the target, token log-partition), each (B·T,): once per forward, whatever
        the options (tuning asks for them at every grid point)."""
        if self._target_scores is None:
            self._target_scores = target_token_scores(decoder, net_output, target)
        return self._target_scores

    def summarizer(self, options: MemoryOptions, positions: Tensor, target: Tensor) -> Callable[[Term], Sums]:
        """``summarize(term)`` for :func:`~trime_fairseq.memory.compose.target_log_prob` at flat
        ``positions`` (the forward's scored positions), memoised per (term, the part's cache key)."""
        if self._sum_positions is None:
            self._sum_positions = positions
        elif not torch.equal(self._sum_positions, positions):
            raise RuntimeError("target summaries of one forward pass are for one set of scored positions")

        def summarize(term: Term) -> Sums:
            key = (term, self.source(term.part).cache_key(options))
            if key not in self._sums:
                self._sums[key] = target_sums(self.gather(term.part, options, positions), target, term.scale)
            return self._sums[key]

        return summarize
