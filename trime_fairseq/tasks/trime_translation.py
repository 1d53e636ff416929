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
  (translation has none).

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

    def get_batch_iterator(self, dataset, *args, **kwargs):
        return batch_iterator(self, str(self.cfg.batching), dataset, super().get_batch_iterator, args, kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        ensure_key_capture(model)  # the decoder's g (input of its last feed-forward block) and f
        options = self.trime_memory_options
        if not options.plain:
            memory = build_eval_memory(options, self.target_dictionary, local=False)
            require_keys(model, memory.key_names(), f"--eval-memory {options.mode}")
            attach_eval_memory(model, memory)
        return model
