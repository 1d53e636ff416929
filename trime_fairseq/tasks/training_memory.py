"""The task side of the TRIME training criteria, shared by ``trime_lm`` and ``trime_translation``.

* The update number: fairseq tells the task, the task tells the criterion (cross-entropy warm-up).
* ``--memory-across-workers`` (a criterion option): ``build_criterion`` records it on the task, so that
  the batchings deal each step across the workers (``--batching consecutive``: runs span workers) and
  :func:`~trime_fairseq.data.batching.batch_iterator` marks fairseq's dummy batch (``first_batch``; also
  ``train_step``'s ``ignore_grad``) with :data:`~trime_fairseq.memory.gathered.DUMMY_BATCH`: a worker
  whose shard has run out still joins the step's all-gather, with entries no one sees.
"""

from trime_fairseq.memory.gathered import DUMMY_BATCH


class TrainingMemoryTask:
    """Mixin, before the fairseq task class: ``class TrimeLMTask(TrainingMemoryTask, LanguageModelingTask)``."""

    memory_across_workers = False  # the criterion's --memory-across-workers, set by build_criterion

    def build_criterion(self, cfg, *args, **kwargs):
        criterion = super().build_criterion(cfg, *args, **kwargs)
        self.memory_across_workers = bool(getattr(criterion, "memory_across_workers", False))
        return criterion

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        if ignore_grad and self.memory_across_workers:  # fairseq's dummy batch, also when first_batch was "DUMMY"
            sample = {**sample, DUMMY_BATCH: True}
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
