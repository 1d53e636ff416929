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
  of the batch's ``net_input`` -- read, never searched;
* ``SENTENCE_PAIRS`` (SK-MT, translation): the K nearest forced-decoded target
  positions of the training pairs retrieved for the row's own sentence, searched
  exactly in the bank the task's ``inference_step`` prepared for the batch; the
  row's sentence travels with the decoder's rows
  (:mod:`trime_fairseq.memory.sentence_pairs`), in both the full and the per-step
  driver.

Per-forward state lives in a
:class:`~trime_fairseq.memory.eval_parts.ForwardState` owned by the EvalMemory
(recognised by the identity of the forward's ``extra`` dict, nothing is written
into fairseq's output): the chunk offset, one source per memory part that gathers
its entries and keeps what it computed (raw local scores once per forward and key
kind, for the scored positions only; the datastore hits, each position searched
once), and the target summaries memoised per (term, the part's cache key)
(:mod:`trime_fairseq.memory.eval_parts`). The stream state belongs to the
EvalMemory: :meth:`EvalMemory.reset` starts a new stream; the full driver adds a
batch to it after the batch's last chunk; callers of the target driver call
:meth:`EvalMemory.advance` once per batch. What a mode needs -- key kinds, the
datastore's keys, the dimension of g, a local memory -- is read from its record
(:mod:`trime_fairseq.memory.modes`), never from its name.
"""

import logging
import types
from typing import Optional, Tuple

from torch import Tensor

from trime_fairseq.memory.composition import DATASTORE, LOCAL, NEIGHBOURS, SENTENCE_PAIRS
from trime_fairseq.memory.compose import Composition, composition, full_log_probs, target_log_prob
from trime_fairseq.memory.datastore import DatastoreError
from trime_fairseq.memory.eval_parts import ForwardState
from trime_fairseq.memory.external import ExternalMemory
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY, get_keys
from trime_fairseq.memory.mixing import fp32
from trime_fairseq.memory.options import MODES, MemoryOptions  # noqa: F401  (re-exported)
from trime_fairseq.memory.sentence_pairs import SentencePairMemory, attach_sentence_rows, sentence_rows
from trime_fairseq.memory.skip import SkipPredictor, skip_features
from trime_fairseq.memory.sources import concat_memory
from trime_fairseq.memory.stream import EvalStream
from trime_fairseq.memory.token_scores import all_token_log_probs, fills_every_token

logger = logging.getLogger(__name__)

KEY_SYMBOLS = {TRIME_KEY: "g", TRIME_FEATURE: "f"}


def local_key_names(options: MemoryOptions) -> Tuple[str, ...]:
    """The key kinds (g / f) of the local parts ``options`` uses (its mode's record)."""
    return options.record.local_keys(options)


class EvalMemory:
    """Evaluation distributions with memory for one model (see the module docstring)."""

    def __init__(self, options: MemoryOptions, pad: int, documents=None, stream_keys=None,
                 external: Optional[ExternalMemory] = None, local: bool = True,
                 sentence_pairs: Optional[SentencePairMemory] = None):
        """``documents``: a :class:`~trime_fairseq.memory.documents.DocumentBoundaries`
        (needed for ``memory_reset="document"``); ``stream_keys``: the key kinds the
        stream memory keeps (default: those of ``options``; name both TRIME_KEY and
        TRIME_FEATURE to score trime and cache options on one stream). The stream
        memory holds ``options.long_memory_size`` entries; other options passed to
        :meth:`target_log_probs` may use fewer. ``external``: the datastore of
        ``knn`` / ``trime_ext`` (see :func:`build_eval_memory`). ``local``: whether
        the task's sequences have a local memory (language models; translation: no).
        ``sentence_pairs``: the per-sentence memory of ``sk_mt`` (translation)."""
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
        self.sentence_pairs = sentence_pairs
        if options.uses_sentence_pairs and (sentence_pairs is None or local):
            raise ValueError(f"--eval-memory {options.mode} retrieves training sentence pairs for each source "
                             "sentence: it is for translation (--task trime_translation, which opens --sk-pairs)")
        composition(options, 1, local)  # refuses modes this task cannot apply, now
        self._state: Optional[ForwardState] = None

    def key_names(self) -> Tuple[str, ...]:
        """Every key kind (g / f) this memory reads from the model."""
        names = set(local_key_names(self.options))
        if self.external is not None:
            names.add(self.external.key_type)
        if self.sentence_pairs is not None:
            names.add(self.sentence_pairs.key_type)
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
        search = ("datastore", "knn_nprobe", "knn_rescore", "knn_skip_predictor", "knn_skip_threshold")
        if any(getattr(opt, name) != getattr(mine, name) for name in search) or opt.knn_k > self.external.k:
            raise ValueError("these options search another datastore / nprobe / skip predictor, or more neighbours, "
                             f"than this EvalMemory's datastore search (K = {self.external.k}); only "
                             f"K <= {self.external.k}, the temperatures, λ and the cache options may differ")
        wanted = opt.record.datastore_keys  # (key kind, metric) of a mode whose hits join Eq. 6
        if wanted is not None and (self.external.key_type, self.external.metric) != wanted:
            kind, metric = wanted
            raise DatastoreError(
                f"--eval-memory {opt.mode} joins datastore entries to Eq. 6, whose similarity is g(c)·g(c_j)/√d: "
                f"it needs a datastore of {kind} ({KEY_SYMBOLS.get(kind, kind)}) keys with metric {metric}; "
                f"{self.options.datastore} holds {self.external.key_type} keys with metric {self.external.metric} "
                f"(rebuild with trime-build-datastore --key-type {kind} --metric {metric})"
            )

    def composition(self, options: MemoryOptions, extra) -> Composition:
        """The composition of ``options`` for a forward whose decoder output has ``extra`` (g's dimension)."""
        dim = None
        if options.record.needs_dim(options):
            dim = get_keys((None, extra), TRIME_KEY).size(-1)  # raises the key-capture error without g
        return composition(options, dim, self.local)

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
        comp = self.composition(self.options, state.extra) if scored.numel() else None
        # (n, V) the model's own; (k,) its log-partition, for joint (Eq. 5/6) compositions only
        out, lse = all_token_log_probs(decoder, x, flat_target, rows=scored,
                                       partition=comp is not None and bool(comp.joint))
        state.offer_outputs(decoder, start, x, out if fills_every_token(decoder) else None)  # before mixing
        if comp is not None:
            parts = {part: concat_memory(state.gather(part, self.options, start + scored)) for part in comp.parts}
            # mix in place, on views of out: the scored rows form a few runs (one per input row)
            for a, b in _runs(scored):
                full_log_probs(comp, out[int(scored[a]): int(scored[b - 1]) + 1], None if lse is None else lse[a:b],
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
        state.offer_outputs(decoder, 0, net_output[0])
        score, lse = state.target_scores(decoder, net_output, target)  # (B·T,)
        out = fp32(score) - fp32(lse)
        flat_target = target.reshape(-1)
        scored = flat_target.ne(self.pad).nonzero().squeeze(1)
        comp = self.composition(options, state.extra)
        if scored.numel() and comp.terms:
            summarize = state.summarizer(options, scored, flat_target[scored])
            out = out.index_copy(0, scored, target_log_prob(comp, score[scored], lse[scored], flat_target[scored],
                                                            summarize, state.entries(options, scored)))
        return out.view_as(target)

    def skip_features(self, decoder, net_output, sample, positions: Tensor) -> Tensor:
        """(n, 3) skip features (:mod:`trime_fairseq.memory.skip`) of flat ``positions`` of a forward pass, as
        the drivers compute them (``trime-train-skip-predictor``)."""
        if self.external is None:
            raise ValueError("skip features belong to a datastore search: this EvalMemory has no datastore")
        state = self._forward(net_output, sample)
        state.offer_outputs(decoder, 0, net_output[0])
        return state.skip_features(positions)

    def datastore_hits(self, decoder, net_output, sample, positions: Tensor):
        """The raw datastore hits (n, K) of flat ``positions`` of a forward pass, as the drivers gather them (a
        :class:`~trime_fairseq.memory.sources.MemoryBatch`; ``trime-train-adaptive-knn``)."""
        if self.external is None:
            raise ValueError("datastore hits belong to a datastore search: this EvalMemory has no datastore")
        state = self._forward(net_output, sample)
        state.offer_outputs(decoder, 0, net_output[0])
        return concat_memory(state.gather(DATASTORE, self.options, positions))

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
            raise ValueError(f"--eval-memory {self.options.mode} reads the neighbours precomputed for the positions "
                             "of a split (trime-neighbours); generated hypotheses have none")
        if comp.parts & LOCAL:
            raise ValueError(
                f"--eval-memory {self.options.mode} uses the local memory of the scored sequence, which a decoding "
                "step does not have: evaluate it with fairseq-eval-lm (or use --eval-memory knn without a cache)"
            )
        x = net_output[0][:, -1:]  # (B', 1, ·): EnsembleModel passes the last step already
        log_probs, lse = all_token_log_probs(decoder, x, partition=bool(comp.joint))  # (B', V), (B',) or None
        parts = {}
        if DATASTORE in comp.parts:
            keys = get_keys((None, extra), self.external.key_type)[:, -1]  # (B', d) the live queries
            features = skip_features(log_probs, keys) if self.external.skips else None  # (B', 3), before mixing
            parts[DATASTORE] = self.external.search(keys, features).first(self.options.knn_k)
        if SENTENCE_PAIRS in comp.parts:  # each live row searches its own sentence's entries
            keys = get_keys((None, extra), self.sentence_pairs.key_type)[:, -1]  # (B', d)
            parts[SENTENCE_PAIRS] = self.sentence_pairs.search(keys, sentence_rows(extra), self.options.knn_k)
        return full_log_probs(comp, log_probs, lse, parts).view(x.shape[0], 1, -1)


def _runs(index: Tensor):
    """Maximal runs of consecutive values of a sorted index (k,): [(a, b), ...] positions in ``index``."""
    breaks = (index[1:] != index[:-1] + 1).nonzero().squeeze(1) + 1
    bounds = [0] + breaks.tolist() + [index.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def build_eval_memory(options: MemoryOptions, dictionary, documents=None, stream_keys=None,
                      local: bool = True, sentence_pairs: Optional[SentencePairMemory] = None) -> EvalMemory:
    """An EvalMemory for ``options``, opening the datastore of a mode that reads one (knn / trime_ext;
    checked against ``dictionary`` now, against the model on its first search); ``sentence_pairs``:
    sk_mt's per-sentence memory (the translation task opens it)."""
    logger.info(f"--eval-memory {options.mode}: {options.record.describe()}")
    external = None
    if options.uses_datastore:
        skip = SkipPredictor.load(options.knn_skip_predictor) if options.skips else None
        external = ExternalMemory(options.datastore, options.knn_k, nprobe=options.knn_nprobe,
                                  rescore=options.knn_rescore, use_gpu=options.knn_gpu, dictionary=dictionary,
                                  skip=skip, skip_threshold=options.knn_skip_threshold)
    if options.knn_adaptive_network is not None:  # adaptive_knn: its network, trained on this datastore's model
        from trime_fairseq.memory.modes.adaptive_knn import load_network

        load_network(options.knn_adaptive_network).check(
            dictionary=dictionary, model=external.store.meta.get("model_sha256") if external is not None else None,
            where=f"{options.knn_adaptive_network} ")
    return EvalMemory(options, dictionary.pad(), documents=documents, stream_keys=stream_keys, external=external,
                      local=local, sentence_pairs=sentence_pairs)


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
    if memory.sentence_pairs is not None:
        attach_sentence_rows(model)
