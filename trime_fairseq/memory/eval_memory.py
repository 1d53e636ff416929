"""Evaluation-time memory behind ``get_normalized_probs``: the drivers of the mode composition.

What a mode computes is :mod:`trime_fairseq.memory.compose` (one description per
mode); this module *gathers* the memory parts of a composition for the positions
a caller scores and hands them to its combiners. Three drivers, one composition:

* **full vocabulary** -- :meth:`EvalMemory.log_probs`, the ``get_normalized_probs``
  hook of ``fairseq-eval-lm`` and ``fairseq-generate --score-reference``. fairseq
  calls it once per forward pass, or once per ``--softmax-batch`` chunk of the
  flattened (B·T) positions; positions whose target is padding (the context of
  ``--context-window``, padding) are not scored by fairseq, so they get the
  model's own distribution and no memory work;
* **target only** -- :meth:`EvalMemory.target_log_probs` (``trime-tune``,
  ``trime-sweep-memory``): log P(target) under any options on the same forward
  pass; every distinct (part, scale) summary is computed once per forward and
  reused by every grid point;
* **per step** -- :meth:`EvalMemory.step_log_probs`, the hook under
  ``fairseq-generate`` / sampling (``sample=None``): the last position of every
  live hypothesis searches the datastore, in one batched search. A composition
  with a local memory cannot be applied step by step (the hypothesis' own prefix
  is not kept): that is an error, never the plain distribution.

Parts and where they come from (raw scores; the composition scales them):

* local (``LOCAL_G`` on g, ``LOCAL_F`` on f): the earlier positions of the
  scored position's input row (with ``--context-window`` the context tokens are
  memory too), their values the next tokens read from the row itself; with a
  stream memory (``--long-memory-size``, ``--memory-reset``,
  :mod:`trime_fairseq.memory.stream`) also the N earlier stream entries, and
  limited to the position's document;
* ``DATASTORE``: the K nearest entries of the external memory
  (:mod:`trime_fairseq.memory.external`), searched once per scored position;
* ``NEIGHBOURS``: the precomputed neighbours the batch carries (SPALM's
  ``--neighbours``): the k a SPALM model used (its output's ``extra``), else all
  of the batch's ``net_input`` -- read, never searched.

Per-forward state lives in :class:`ForwardState`, an explicit object owned by
the EvalMemory (recognised by the identity of the forward's ``extra`` dict,
nothing is written into fairseq's output): the chunk offset, raw local scores
(computed once per forward and key kind, for the scored positions only), the
datastore hits and the memoised target summaries. The stream state belongs to
the EvalMemory: :meth:`EvalMemory.reset` starts a new stream; the full driver
adds a batch to it after the batch's last chunk; callers of the target driver
call :meth:`EvalMemory.advance` once per batch.
"""

import types
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from trime_fairseq.memory.blockwise import target_sums
from trime_fairseq.memory.compose import (
    DATASTORE,
    LOCAL_KEYS,
    NEIGHBOURS,
    RETRIEVED,
    Composition,
    Term,
    composition,
    full_log_probs,
    target_log_prob,
)
from trime_fairseq.memory.datastore import DatastoreError
from trime_fairseq.memory.external import ExternalMemory
from trime_fairseq.memory.keys import NEIGHBOUR_TOKENS, TRIME_FEATURE, TRIME_KEY, get_keys, get_neighbours
from trime_fairseq.memory.mixing import fp32
from trime_fairseq.memory.options import MODES, MemoryOptions  # noqa: F401  (re-exported)
from trime_fairseq.memory.sources import MemoryBatch, concat_memory, scaled_dot
from trime_fairseq.memory.stream import EvalStream, StreamBatch
from trime_fairseq.memory.token_scores import all_token_log_probs, target_token_scores


def local_key_names(options: MemoryOptions) -> Tuple[str, ...]:
    """The key kinds (g / f) of the local parts ``options`` uses."""
    names = []
    if options.mode in ("trime", "trime_ext"):
        names.append(TRIME_KEY)
    if options.uses_cache:
        names.append(TRIME_FEATURE)
    return tuple(names)


def next_tokens(src_tokens: Tensor, pad: int) -> Tensor:
    """Memory value of every input position: the token that follows it in the row, (B, T);
    ``pad`` for the last column (no position of the row sees it)."""
    return torch.cat([src_tokens[:, 1:], src_tokens.new_full((src_tokens.size(0), 1), pad)], 1)


class ForwardState:
    """What the ``get_normalized_probs`` calls of one forward pass share.

    Created by :class:`EvalMemory` for a new forward (a new ``extra`` dict), it
    tracks the ``--softmax-batch`` chunk offset and the targets seen, and gathers
    memory parts for flat positions of the (B, T) output, computing each raw
    score matrix once.
    """

    def __init__(self, memory: "EvalMemory", net_output, sample):
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
            self.stream_batch = memory.stream.place(sample, self._src_tokens())
        self._local_rows: Optional[Tuple[Tensor, Tensor]] = None
        self._raw: Dict[tuple, Tensor] = {}
        self._pieces: Dict[tuple, List[MemoryBatch]] = {}
        self._hits: Optional[MemoryBatch] = None
        self._neighbours: Optional[MemoryBatch] = None
        self._hit_row = torch.full((self.total,), -1, dtype=torch.long, device=self.device)
        self._sums: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        self._sum_positions: Optional[Tensor] = None
        self._target_scores: Optional[Tuple[Tensor, Tensor]] = None

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

    # -- the local memory: the scored row, the stream ---------------------------------------------
    def _src_tokens(self) -> Tensor:
        src = self.sample["net_input"].get("src_tokens")
        if src is None or tuple(src.shape) != (self.bsz, self.tsz):
            raise ValueError("the local memory reads the scored sequence from net_input['src_tokens'] (B, T), "
                             "aligned with the decoder's positions (a language model)")
        return src

    def local_rows(self) -> Tuple[Tensor, Tensor]:
        """(flat positions (k,) that can be scored -- not context, not padding --, index (B·T,)
        of each flat position among them or -1)."""
        if self._local_rows is None:
            src = self._src_tokens()
            context = self.sample.get("start_indices")
            context = torch.as_tensor(context if context is not None else [0] * self.bsz, device=self.device)
            cols = torch.arange(self.tsz, device=self.device)
            scorable = (cols.unsqueeze(0) >= context.view(-1, 1)) & src.ne(self.memory.pad)
            flat = scorable.reshape(-1).nonzero().squeeze(1)
            index = torch.full((self.total,), -1, dtype=torch.long, device=self.device)
            index[flat] = torch.arange(flat.numel(), device=self.device)
            self._local_rows = (flat, index)
        return self._local_rows

    def keys(self, name: str) -> Tensor:
        return get_keys((None, self.extra), name)  # (B, T, d)

    def _row_raw(self, name: str) -> Tensor:
        """(k, T) raw q·k of every scorable position against the positions of its row."""
        key = ("row", name)
        if key not in self._raw:
            flat, _ = self.local_rows()
            keys = self.keys(name)
            rows = flat // self.tsz
            out = fp32(keys).new_empty(flat.numel(), self.tsz)
            for b in rows.unique().tolist():  # one (n_b, d) x (d, T) product per row
                sel = (rows == b).nonzero().squeeze(1)
                out[sel] = scaled_dot(keys[b, flat[sel] % self.tsz], keys[b], 1.0)
            self._raw[key] = out
        return self._raw[key]

    def _long_raw(self, name: str) -> Tuple[Tensor, Tensor]:
        """Raw scores of the scorable positions against the ring buffer (k, N) and the batch's own
        stream entries (k, S)."""
        key = ("long", name)
        if key not in self._raw:
            flat, _ = self.local_rows()
            keys = self.keys(name)
            queries = keys.reshape(-1, keys.size(-1))[flat]
            buffer = self.memory.stream.buffer(name)
            batch = self.stream_batch
            self._raw[key] = (buffer.scores(queries), scaled_dot(queries, keys.reshape(-1, keys.size(-1))[batch.flat],
                                                                 1.0))
        return self._raw[key]

    def local_pieces(self, name: str, options: MemoryOptions) -> List[MemoryBatch]:
        """The local memory on key kind ``name`` of every scorable position, as raw pieces
        (k, M_i): the row (k, T), then with a long-term memory the ring buffer (k, N) and
        the batch's earlier entries (k, S)."""
        reset = options.memory_reset == "document"
        size = options.long_memory_size
        key = (name, options.window, size, reset)
        if key in self._pieces:
            return self._pieces[key]
        flat, _ = self.local_rows()
        src = self._src_tokens()
        rows, cols = flat // self.tsz, flat % self.tsz
        values = next_tokens(src, self.memory.pad)  # (B, T)
        j = torch.arange(self.tsz, device=self.device).unsqueeze(0)  # (1, T)
        offset = cols.unsqueeze(1) - j  # (k, T) i - j
        mask = (offset > 0) & values[rows].ne(self.memory.pad)
        if options.window is not None:
            mask &= offset <= options.window
        batch = self.stream_batch
        if batch is not None:
            entries = batch.entry_of_flat[flat]
            if (entries < 0).any():
                raise RuntimeError("a scorable position is no entry of the evaluation stream")
            doc_lo, lo, hi = batch.query_bounds(entries, size, self.memory.documents if reset else None)
            if reset:
                mask &= batch.row_start[rows].unsqueeze(1) + j >= doc_lo.unsqueeze(1)
        pieces = [MemoryBatch(self._row_raw(name), values[rows], mask)]
        if size > 0:
            ring_raw, batch_raw = self._long_raw(name)
            buffer = self.memory.stream.buffer(name)
            pos = batch.positions.unsqueeze(0)
            pieces.append(MemoryBatch(ring_raw, buffer.slot_values(self.device), buffer.window(lo, hi)))
            pieces.append(MemoryBatch(batch_raw, batch.values().unsqueeze(0),
                                      (pos >= lo.unsqueeze(1)) & (pos < hi.unsqueeze(1))))
        self._pieces[key] = pieces
        return pieces

    def local_part(self, name: str, options: MemoryOptions, positions: Tensor) -> MemoryBatch:
        """The local memory (n, M) of flat ``positions`` (n,), raw scores."""
        _, index = self.local_rows()
        rows = index[positions]
        if (rows < 0).any():
            raise RuntimeError("a scored position lies in the context or padding of its row")
        return concat_memory([piece.rows(rows) for piece in self.local_pieces(name, options)])

    # -- the external memory ----------------------------------------------------------------------
    def hits(self, positions: Tensor) -> MemoryBatch:
        """Raw datastore hits (n, K) of flat ``positions``; each position is searched once."""
        missing = positions[self._hit_row[positions] < 0].unique()
        if missing.numel():
            keys = self.keys(self.memory.external.key_type)
            found = self.memory.external.search(keys.reshape(-1, keys.size(-1))[missing])
            start = 0 if self._hits is None else self._hits.mask.size(0)
            self._hits = found if self._hits is None else MemoryBatch(
                torch.cat([self._hits.scores, found.scores]), torch.cat([self._hits.values, found.values]),
                torch.cat([self._hits.mask, found.mask]))
            self._hit_row[missing] = torch.arange(start, start + missing.numel(), device=self.device)
        return self._hits.rows(self._hit_row[positions])

    def target_scores(self, decoder, net_output, target: Tensor) -> Tuple[Tensor, Tensor]:
        """(token score of the target, token log-partition), each (B·T,): once per forward, whatever
        the options (tuning asks for them at every grid point)."""
        if self._target_scores is None:
            self._target_scores = target_token_scores(decoder, net_output, target)
        return self._target_scores

    # -- the precomputed neighbours -----------------------------------------------------------------
    def neighbours(self, positions: Tensor) -> MemoryBatch:
        """Raw neighbour entries (n, k) of flat ``positions``: those a SPALM model used, else the batch's."""
        if self._neighbours is None:
            source = self.extra if self.extra.get(NEIGHBOUR_TOKENS) is not None else self.sample["net_input"]
            found = get_neighbours(source, self.memory.pad)
            if tuple(found.mask.shape[:2]) != (self.bsz, self.tsz):
                raise ValueError(f"the batch's neighbours {tuple(found.mask.shape)} do not match the scored "
                                 f"positions ({self.bsz}, {self.tsz})")
            self._neighbours = found.flatten()  # (B·T, k)
        return self._neighbours.rows(positions)

    # -- gathering for a composition --------------------------------------------------------------
    def retrieved(self, part: str, positions: Tensor, options: MemoryOptions) -> MemoryBatch:
        """The raw entries of a part that is not the sequence's own positions: the first ``knn_k``
        datastore hits (DATASTORE), or the precomputed neighbours (NEIGHBOURS)."""
        return self.hits(positions).first(options.knn_k) if part == DATASTORE else self.neighbours(positions)

    def parts(self, comp: Composition, options: MemoryOptions, positions: Tensor) -> Dict[str, MemoryBatch]:
        """Raw memory batches (n, M) of every part of ``comp`` for flat ``positions`` (n,)."""
        parts = {}
        for part in comp.parts:
            if part in RETRIEVED:
                parts[part] = self.retrieved(part, positions, options)
            else:
                parts[part] = self.local_part(LOCAL_KEYS[part], options, positions)
        return parts

    def summarizer(self, options: MemoryOptions, positions: Tensor, target: Tensor):
        """``summarize(term)`` for :func:`~trime_fairseq.memory.compose.target_log_prob` at flat
        ``positions`` (the forward's scored positions), memoised per (term, local visibility)."""
        if self._sum_positions is None:
            self._sum_positions = positions
        elif not torch.equal(self._sum_positions, positions):
            raise RuntimeError("target summaries of one forward pass are for one set of scored positions")
        visibility = (options.window, options.long_memory_size, options.memory_reset)

        def summarize(term: Term):
            retrieved = {DATASTORE: options.knn_k, NEIGHBOURS: None}  # what a retrieved part's entries depend on
            key = (term, retrieved[term.part] if term.part in RETRIEVED else visibility)
            if key not in self._sums:
                if term.part in RETRIEVED:
                    pieces = [self.retrieved(term.part, positions, options)]
                else:
                    _, index = self.local_rows()
                    rows = index[positions]
                    if (rows < 0).any():
                        raise RuntimeError("a scored position lies in the context or padding of its row")
                    pieces = [p.rows(rows) for p in self.local_pieces(LOCAL_KEYS[term.part], options)]
                self._sums[key] = target_sums(pieces, target, term.scale)
            return self._sums[key]

        return summarize


class EvalMemory:
    """Evaluation distributions with memory for one model (see the module docstring)."""

    def __init__(self, options: MemoryOptions, pad: int, documents=None, stream_keys=None,
                 external: Optional[ExternalMemory] = None, local: bool = True):
        """``documents``: a :class:`~trime_fairseq.memory.documents.DocumentBoundaries`
        (needed for ``memory_reset="document"``); ``stream_keys``: the key kinds the
        stream memory keeps (default: those of ``options``; name both TRIME_KEY and
        TRIME_FEATURE to score trime and cache options on one stream). The stream
        memory holds ``options.long_memory_size`` entries; other options passed to
        :meth:`target_log_probs` may use fewer. ``external``: the datastore of
        ``knn`` / ``trime_ext`` (see :func:`build_eval_memory`). ``local``: whether
        the task's sequences have a local memory (language models; translation: no)."""
        self.options = options
        self.pad = pad
        self.documents = documents
        self.local = local
        if options.memory_reset == "document" and documents is None:
            raise ValueError("--memory-reset document needs the dictionary's document boundaries")
        self.stream: Optional[EvalStream] = None
        if options.uses_stream:
            names = tuple(stream_keys) if stream_keys else local_key_names(options)
            self.stream = EvalStream(options.long_memory_size, names, documents, pad)
        self.external = external
        if options.uses_datastore:
            self._check_external(options)
        composition(options, 1, local)  # refuses modes this task cannot apply, now
        self._state: Optional[ForwardState] = None

    def key_names(self) -> Tuple[str, ...]:
        """Every key kind (g / f) this memory reads from the model."""
        names = set(local_key_names(self.options))
        if self.external is not None:
            names.add(self.external.key_type)
        return tuple(sorted(names))

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new evaluation stream (forget the long-term memory and the forward in flight)."""
        if self.stream is not None:
            self.stream.reset()
        self._state = None

    def _forward(self, net_output, sample) -> ForwardState:
        extra = net_output[1] if len(net_output) > 1 else None
        if not isinstance(extra, dict):
            raise ValueError("the decoder output carries no extra dict with memory keys")
        if self._state is None or self._state.extra is not extra:
            self._state = ForwardState(self, net_output, sample)
        return self._state

    def advance(self, net_output, sample) -> None:
        """Add a scored batch to the stream memory (after :meth:`target_log_probs`;
        :meth:`log_probs` does it by itself). No-op without a stream memory."""
        if self.stream is None:
            return
        state = self._forward(net_output, sample)
        state.record_targets(0, sample["target"])
        self._commit(state)

    def _commit(self, state: ForwardState) -> None:
        if state.stream_batch is not None:
            self.stream.commit(state.stream_batch, {name: state.keys(name) for name in self.stream.buffers})

    def _check_stream(self, opt: MemoryOptions) -> None:
        if not opt.uses_stream:
            return
        if self.stream is None:
            raise ValueError(
                "these options need a stream memory: build the EvalMemory with long_memory_size >= "
                f"{opt.long_memory_size} (and the same memory_reset)"
            )
        if opt.long_memory_size > self.stream.capacity:
            raise ValueError(
                f"long-term memory of {opt.long_memory_size} asked, the stream memory holds {self.stream.capacity}"
            )
        if opt.memory_reset == "document" and self.documents is None:
            raise ValueError("--memory-reset document needs the dictionary's document boundaries")
        missing = set(local_key_names(opt)) - set(self.stream.buffers) if opt.long_memory_size > 0 else set()
        if missing:
            raise ValueError(f"the stream memory keeps no {sorted(missing)} keys (it keeps {sorted(self.stream.buffers)})"
                             "; build the EvalMemory with stream_keys naming every key kind it is asked to score with")

    def _check_external(self, opt: MemoryOptions) -> None:
        if not opt.uses_datastore:
            return
        if self.external is None:
            raise ValueError(f"--eval-memory {opt.mode} needs its datastore: build the EvalMemory with an "
                             "ExternalMemory (build_eval_memory does)")
        mine = self.options
        if (opt.datastore, opt.knn_nprobe, opt.knn_rescore) != (mine.datastore, mine.knn_nprobe, mine.knn_rescore) \
                or opt.knn_k > self.external.k:
            raise ValueError("these options search another datastore / nprobe, or more neighbours, than this "
                             f"EvalMemory's datastore search (K = {self.external.k}); only K <= {self.external.k}, "
                             "the temperatures, λ and the cache options may differ")
        if opt.mode == "trime_ext" and (self.external.metric != "ip" or self.external.key_type != TRIME_KEY):
            raise DatastoreError(
                f"--eval-memory trime_ext joins datastore entries to Eq. 6, whose similarity is g(c)·g(c_j)/√d: "
                f"it needs a datastore of trime_key (g) keys with metric ip; {self.options.datastore} holds "
                f"{self.external.key_type} keys with metric {self.external.metric} (rebuild with "
                "trime-build-datastore --key-type trime_key --metric ip)"
            )

    def composition(self, options: MemoryOptions, extra) -> Composition:
        g = extra.get(TRIME_KEY) if options.mode in ("trime", "trime_ext") else None
        if options.mode in ("trime", "trime_ext") and g is None:
            get_keys((None, extra), TRIME_KEY)  # raises the key-capture error
        return composition(options, None if g is None else g.size(-1), self.local)

    # -- driver 1: the full vocabulary (get_normalized_probs with a sample) --------------------------
    def log_probs(self, decoder, net_output, sample) -> Tensor:
        """Log-probabilities (…, V) for ``net_output[0]``: the whole (B, T) output or a
        flattened chunk (1, n) of it, as fairseq's SequenceScorer passes (it sets
        ``sample["target"]`` to the chunk's targets). Without a sample: :meth:`step_log_probs`."""
        if sample is None:
            return self.step_log_probs(decoder, net_output)
        x = net_output[0]
        state = self._forward(net_output, sample)
        start = state.claim(x)
        target = sample.get("target")
        if target is None or target.numel() != x.shape[0] * x.shape[1]:
            raise ValueError("the evaluation memory scores the positions of a sample with targets (the chunk's)")
        flat_target = target.reshape(-1)
        scored = flat_target.ne(self.pad).nonzero().squeeze(1)  # (k,) the rest is not scored by fairseq
        out, lse = all_token_log_probs(decoder, x, flat_target, rows=scored)  # (n, V) the model's own, (k,)
        if scored.numel():
            comp = self.composition(self.options, state.extra)
            parts = state.parts(comp, self.options, start + scored)
            # mix in place, on views of out: the scored rows form a few runs (one per input row)
            for a, b in _runs(scored):
                full_log_probs(comp, out[int(scored[a]): int(scored[b - 1]) + 1], lse[a:b],
                               {name: part.span(a, b) for name, part in parts.items()})
        state.record_targets(start, flat_target)
        if state.done:
            self._commit(state)
        return out.view(*x.shape[:-1], -1)

    # -- driver 2: the target only (tuning) ------------------------------------------------------------
    def target_log_probs(self, decoder, net_output, sample, options: MemoryOptions) -> Tensor:
        """log P(target) of every position, (B, T), under ``options``: the distribution
        :meth:`log_probs` gives, without materialising (B·T, V). Positions whose target is
        padding get the model's own log-probability."""
        self._check_stream(options)
        self._check_external(options)
        target = sample["target"]
        state = self._forward(net_output, sample)
        score, lse = state.target_scores(decoder, net_output, target)  # (B·T,)
        out = fp32(score) - fp32(lse)
        flat_target = target.reshape(-1)
        scored = flat_target.ne(self.pad).nonzero().squeeze(1)
        comp = self.composition(options, state.extra)
        if scored.numel() and comp.terms:
            summarize = state.summarizer(options, scored, flat_target[scored])
            out = out.index_copy(0, scored, target_log_prob(comp, score[scored], lse[scored], flat_target[scored],
                                                            summarize))
        return out.view_as(target)

    # -- driver 3: one decoding step (generation) -------------------------------------------------------
    def step_log_probs(self, decoder, net_output) -> Tensor:
        """(B', 1, V) log-probabilities of the next token of every live hypothesis: the last
        position's query searches the datastore (one batched search, nothing else kept)."""
        extra = net_output[1] if len(net_output) > 1 else None
        if not isinstance(extra, dict):
            raise ValueError(
                f"--eval-memory {self.options.mode} at generation needs the decoder's memory keys, but the decoder "
                "output carries no extra dict"
            )
        comp = self.composition(self.options, extra)
        if NEIGHBOURS in comp.parts:
            raise ValueError("--eval-memory neighbour_knn reads the neighbours precomputed for the positions of a "
                             "split (trime-neighbours); generated hypotheses have none")
        local = comp.parts - {DATASTORE}
        if local:
            raise ValueError(
                f"--eval-memory {self.options.mode} uses the local memory of the scored sequence, which a decoding "
                "step does not have: evaluate it with fairseq-eval-lm (or use --eval-memory knn without a cache)"
            )
        x = net_output[0][:, -1:]  # (B', 1, ·): EnsembleModel passes the last step already
        log_probs, lse = all_token_log_probs(decoder, x)  # (B', V), (B',)
        parts = {}
        if DATASTORE in comp.parts:
            keys = get_keys((None, extra), self.external.key_type)[:, -1]  # (B', d) the live queries
            parts[DATASTORE] = self.external.search(keys).first(self.options.knn_k)
        return full_log_probs(comp, log_probs, lse, parts).view(x.shape[0], 1, -1)


def _runs(index: Tensor):
    """Maximal runs of consecutive values of a sorted index (k,): [(a, b), ...] positions in ``index``."""
    breaks = (index[1:] != index[:-1] + 1).nonzero().squeeze(1) + 1
    bounds = [0] + breaks.tolist() + [index.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def build_eval_memory(options: MemoryOptions, dictionary, documents=None, stream_keys=None,
                      local: bool = True) -> EvalMemory:
    """An EvalMemory for ``options``, opening the datastore of knn / trime_ext
    (checked against ``dictionary`` now, against the model on its first search)."""
    external = None
    if options.uses_datastore:
        external = ExternalMemory(options.datastore, options.knn_k, nprobe=options.knn_nprobe,
                                  rescore=options.knn_rescore, use_gpu=options.knn_gpu, dictionary=dictionary)
    return EvalMemory(options, dictionary.pad(), documents=documents, stream_keys=stream_keys, external=external,
                      local=local)


def route_normalized_probs(model, memory: EvalMemory) -> None:
    """Route ``model.get_normalized_probs`` through ``memory`` (this instance only): the full
    driver with a sample, the per-step driver without one."""

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        out = memory.log_probs(self.decoder, net_output, sample)
        return out if log_probs else out.exp()

    model.get_normalized_probs = types.MethodType(get_normalized_probs, model)
    model.trime_eval_memory = memory


def attach_eval_memory(model, memory: EvalMemory) -> None:
    """:func:`route_normalized_probs`, and the datastore checks its searches against ``model``."""
    route_normalized_probs(model, memory)
    if memory.external is not None:
        memory.external.bind(model)
