"""``trime_translation``: fairseq's ``translation`` plus kNN-MT and TRIME-MT memory options.

Training: ``--criterion trime_mt_loss`` (TRIME for translation, §5.4 / Appendix B; the
other sentences of the batch are the memory) with ``--batching bm25 --bm25-order FILE``
(target sentences of high BM25 similarity share a batch; ``trime-bm25-batches
--source-lang S --target-lang T``); the task tells the criterion the update number
(cross-entropy warm-up) and makes the decoder expose its memory keys.

Evaluation through unmodified ``fairseq-generate`` / ``fairseq-interactive``
(``--eval-memory`` with ``--datastore`` of ``trime-build-datastore`` over a translation
checkpoint):

* ``knn``: kNN-MT (Khandelwal et al. 2021), (1-λ) p_MT + λ p_kNN, p_kNN ∝ Σ exp(score/T)
  over the K nearest (decoder context, target token) entries;
* ``trime_ext``: TRIME-MT, Eq. 6 over vocabulary ∪ the K retrieved entries at τ, then
  Eq. 7-8 at τ′ -- the language model's ``trime_ext`` composition without a local memory
  (translation has none);
* ``sk_mt``: SK-MT (Dai et al. 2023) with ``--sk-pairs FILE`` of ``trime-retrieve-pairs``
  for the evaluated split (no datastore): each sentence's memory is its retrieved training
  pairs, forced-decoded by the model in :meth:`inference_step`, before the batch is
  translated (:mod:`trime_fairseq.memory.sentence_pairs`); the file is checked against the
  split when it is loaded and against the training split when the model is built.

Beam search calls ``get_normalized_probs`` once per step without a sample: the
per-step driver searches the live B×beam hypotheses' last decoder position in one
batched search (:meth:`~trime_fairseq.memory.eval_memory.EvalMemory.step_log_probs`);
``--score-reference`` scores the references with the full driver.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from trime_fairseq.data.batching import batch_iterator
from trime_fairseq.data.bm25_batching import BM25_FILLS, validate_options as validate_bm25_options
from trime_fairseq.memory.eval_memory import attach_eval_memory, build_eval_memory
from trime_fairseq.memory.keys import ensure_key_capture, require_keys
from trime_fairseq.memory.sentence_pairs import SentencePairMemory
from trime_fairseq.memory.modes import mode_help, modes_where
from trime_fairseq.tasks.memory_config import RETRIEVAL_FLAGS, RetrievalMemoryConfig, memory_options
from trime_fairseq.tasks.training_memory import TrainingMemoryTask

#: the modes whose record works without a local memory (none, knn, trime_ext)
MT_MODES = modes_where(lambda mode: mode.without_local)
MT_BATCHINGS = ("shuffled", "bm25")


@dataclass
class TrimeTranslationConfig(TranslationConfig, RetrievalMemoryConfig):
    eval_memory: ChoiceEnum(list(MT_MODES)) = field(
        default="none",
        metadata={"help": "evaluation memory: " + mode_help(MT_MODES)},
    )
    batching: ChoiceEnum(list(MT_BATCHINGS)) = field(
        default="shuffled",
        metadata={"help": "training batches: shuffled (fairseq's) or bm25 (consecutive pieces of --bm25-order, "
                  "filled up to --max-tokens)"},
    )
    bm25_order: Optional[str] = field(
        default=None,
        metadata={"help": "--batching bm25: chain of the training target sentences written by trime-bm25-batches "
                  "--source-lang S --target-lang T"},
    )
    bm25_fill: ChoiceEnum(list(BM25_FILLS)) = field(
        default="padded",
        metadata={"help": "--batching bm25: how a batch counts its tokens against --max-tokens: padded (items x the "
                  "longest, fairseq's rule: a BM25 chain mixes lengths, so about half of it is padding) or real (the "
                  "sum of the items' sizes: as many real tokens per update as fairseq's length-sorted batches)"},
    )
    # read by --batching bm25 (one update = update_freq x world size consecutive batches); not an option
    update_freq: List[int] = II("optimization.update_freq")


@register_task("trime_translation", dataclass=TrimeTranslationConfig)
class TrimeTranslationTask(TrainingMemoryTask, TranslationTask):
    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.args = cfg  # what the batchings read (task.args), as for trime_lm
        self.trime_memory_options = memory_options(cfg, RETRIEVAL_FLAGS)
        if str(cfg.batching) not in MT_BATCHINGS:
            raise ValueError(f"--batching {cfg.batching} is not for translation; choose one of {MT_BATCHINGS}")
        validate_bm25_options(cfg)
        self._sentence_pairs = None  # sk_mt: opened with the model (the retrieval file and the training pairs)
        self._sk_split = None  # sk_mt: the loaded split its retrieval file was checked against

    def get_batch_iterator(self, dataset, *args, **kwargs):
        return batch_iterator(self, str(self.cfg.batching), dataset, super().get_batch_iterator, args, kwargs)

    def sentence_pairs(self) -> SentencePairMemory:
        """sk_mt's per-sentence memory: the retrieval file (checked against the dictionaries and the training
        split its ids point into) and the training pairs, opened once."""
        if self._sentence_pairs is None:
            from fairseq import utils
            from fairseq.tasks.translation import load_langpair_dataset

            from trime_fairseq.data.retrieved_pairs import RetrievedPairs

            path = self.trime_memory_options.sk_pairs
            pairs = RetrievedPairs.read(path)
            pairs.check_dictionaries(self.source_dictionary, self.target_dictionary, path)
            cfg = self.cfg
            if (pairs.meta["source_lang"], pairs.meta["target_lang"]) != (cfg.source_lang, cfg.target_lang):
                raise ValueError(f"{path} holds {pairs.meta['source_lang']}-{pairs.meta['target_lang']} pairs, the task "
                                 f"translates {cfg.source_lang}-{cfg.target_lang}")
            train = load_langpair_dataset(
                utils.split_paths(cfg.data)[0], pairs.meta["train_split"], cfg.source_lang, self.src_dict,
                cfg.target_lang, self.tgt_dict, combine=False, dataset_impl=cfg.dataset_impl,
                upsample_primary=1, left_pad_source=cfg.left_pad_source, left_pad_target=cfg.left_pad_target,
                max_source_positions=cfg.max_source_positions, max_target_positions=cfg.max_target_positions,
                truncate_source=cfg.truncate_source, shuffle=False)
            self._sentence_pairs = SentencePairMemory(pairs, train, self.trime_memory_options.sk_m, path)
        return self._sentence_pairs

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if self.trime_memory_options.uses_sentence_pairs:  # the file must be this split's
            self.sentence_pairs().pairs.check_split(split, self.datasets[split].src, self.trime_memory_options.sk_pairs)
            self._sk_split = split

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        for model in models:  # sk_mt: each model's memory of this batch's sentences, before it is translated
            memory = getattr(model, "trime_eval_memory", None)
            if memory is not None and memory.sentence_pairs is not None:
                if self._sk_split is None:  # e.g. fairseq-interactive: its sentences are no split's
                    raise ValueError("--eval-memory sk_mt translates the sentences of the split its --sk-pairs file "
                                     "was built for (fairseq-generate --gen-subset SPLIT); these sentences have no "
                                     "retrieved pairs")
                memory.sentence_pairs.prepare(model, sample)
        return super().inference_step(generator, models, sample, prefix_tokens=prefix_tokens, constraints=constraints)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        ensure_key_capture(model)  # the decoder's g (input of its last feed-forward block) and f
        options = self.trime_memory_options
        if not options.plain:
            pairs = self.sentence_pairs().another() if options.uses_sentence_pairs else None
            memory = build_eval_memory(options, self.target_dictionary, local=False, sentence_pairs=pairs)
            require_keys(model, memory.key_names(), f"--eval-memory {options.mode}")
            attach_eval_memory(model, memory)
        return model
