"""``trime_lm``: fairseq's language_modeling plus TRIME's memory options.

Training: unchanged data pipeline; tells the criterion the update number (for
the cross-entropy warm-up) and makes every model expose its memory keys.

Evaluation: ``fairseq-eval-lm --task trime_lm --eval-memory {none,trime,cache,knn,trime_ext}``
routes the model's ``get_normalized_probs`` through
:class:`~trime_fairseq.memory.eval_memory.EvalMemory` (knn / trime_ext: with the
``--datastore`` of trime-build-datastore).

SPALM: ``--neighbours DIR`` (written by trime-neighbours) adds every split's
precomputed neighbours to its items and batches (:mod:`trime_fairseq.data.neighbours`),
in training and in ``fairseq-eval-lm`` (stream order or ``--context-window``). Models
that read them (``spalm``) need the option; other models accept it only for
``--eval-memory neighbour_knn`` (kNN-LM over the same neighbours), and are then called
without the neighbour fields.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II

from trime_fairseq.data.batching import batch_iterator, batching_names
from trime_fairseq.data.bm25_batching import validate_options as validate_bm25_options
from trime_fairseq.data.consecutive import validate_options as validate_consecutive_options
from trime_fairseq.memory.documents import DocumentBoundaries
from trime_fairseq.data.eval_order import StreamOrderDataset
from trime_fairseq.data.neighbours import (
    NeighbourContextWindowDataset,
    NeighbourDataset,
    NeighbourFolder,
    carries_neighbours,
    token_blocks,
)
from trime_fairseq.data.stream import enable_stream_memory, reset_stream_memory
from trime_fairseq.memory.eval_memory import attach_eval_memory, build_eval_memory
from trime_fairseq.memory.keys import NEIGHBOUR_SCORES, NEIGHBOUR_TOKENS, ensure_key_capture, require_keys
from trime_fairseq.memory.modes import mode_help
from trime_fairseq.memory.options import MODES
from trime_fairseq.tasks.memory_config import LocalMemoryConfig, RetrievalMemoryConfig, memory_options  # noqa: F401
from trime_fairseq.tasks.training_memory import TrainingMemoryTask



@dataclass
class TrimeLMConfig(LanguageModelingConfig, LocalMemoryConfig, RetrievalMemoryConfig):
    batching: str = field(
        default="shuffled",
        metadata={"help": "order of training segments in batches: shuffled (fairseq's default) or a "
        "registered batching of trime_fairseq.data"},
    )
    eval_memory: ChoiceEnum(list(MODES)) = field(
        default="none",
        metadata={"help": "evaluation memory: " + mode_help(MODES)},
    )
    consecutive_segments: int = field(
        default=1,
        metadata={"help": "--batching consecutive: m, consecutive segments of one document per run "
        "(TRIMELM_long; a batch holds --batch-size // m runs)"},
    )
    cross_documents: bool = field(
        default=False,
        metadata={"help": "--batching consecutive: cut runs from the whole split, across document ends "
        "(default: runs stay inside WikiText ' = Title = ' documents)"},
    )
    neighbours: Optional[str] = field(
        default=None,
        metadata={"help": "SPALM: folder of precomputed neighbours written by trime-neighbours (one sub-folder "
        "per split); every batch carries the neighbours of its positions"},
    )
    bm25_order: Optional[str] = field(
        default=None,
        metadata={"help": "--batching bm25: chain of the training segments written by trime-bm25-batches "
        "(TRIMELM_ext, §4.3)"},
    )
    # read by --batching bm25 (one update = update_freq x world size consecutive batches); not an option
    update_freq: List[int] = II("optimization.update_freq")
    # the training split (the only one batched with --required-batch-size-multiple); not an option
    train_subset: str = II("dataset.train_subset")


def _withhold_neighbours(model) -> None:
    """Call this model instance without the batch's neighbour fields (a decoder that reads none may refuse
    unknown arguments); the batch keeps them for the evaluation memory."""
    forward = model.forward

    def without_neighbours(*args, **kwargs):
        kwargs.pop(NEIGHBOUR_TOKENS, None)
        kwargs.pop(NEIGHBOUR_SCORES, None)
        return forward(*args, **kwargs)

    model.forward = without_neighbours


@register_task("trime_lm", dataclass=TrimeLMConfig)
class TrimeLMTask(TrainingMemoryTask, LanguageModelingTask):
    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        self.trime_memory_options = memory_options(args)
        if args.batching not in batching_names():
            raise ValueError(f"unknown --batching '{args.batching}', choose one of {batching_names()}")
        validate_consecutive_options(args)
        validate_bm25_options(args)
        neighbours = getattr(args, "neighbours", None)
        self.neighbour_folder = NeighbourFolder(neighbours, dictionary) if neighbours else None
        if self.trime_memory_options.uses_neighbours and self.neighbour_folder is None:
            raise ValueError("--eval-memory neighbour_knn interpolates with the precomputed neighbours of every "
                             "position: pass --neighbours DIR (written by trime-neighbours)")

    def get_batch_iterator(self, dataset, *args, **kwargs):
        return batch_iterator(self, self.args.batching, dataset, super().get_batch_iterator, args, kwargs)

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        """fairseq's split, refused with the file named when it holds no tokens (fairseq would
        fail inside numpy's mmap of an empty file, or train on nothing)."""
        paths = utils.split_paths(self.args.data)
        if not paths:
            raise ValueError("--data / task.data is empty")
        prefix = os.path.join(paths[(epoch - 1) % len(paths)], split)
        if os.path.isfile(prefix + ".bin") and os.path.getsize(prefix + ".bin") == 0:
            raise ValueError(f"split '{split}' is empty: {prefix}.bin holds no tokens (binarize a non-empty text)")
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        sizes = getattr(self.datasets[split], "sizes", None)
        if sizes is not None and int(np.sum(sizes)) == 0:
            raise ValueError(f"split '{split}' is empty: {prefix}.bin holds no tokens")
        if self.neighbour_folder is not None:  # SPALM: every target's precomputed neighbours join its item
            dataset = self.datasets[split]
            found = self.neighbour_folder.open(split, int(token_blocks(dataset).sizes.sum()))
            self.datasets[split] = NeighbourDataset(dataset, found, self.source_dictionary.pad())

    def eval_lm_dataloader(self, dataset, *args, context_window: int = 0, **kwargs):
        options = self.trime_memory_options
        if options.long_memory_size > 0:
            tokens = int(np.sum(dataset.sizes))
            if options.long_memory_size > tokens:
                raise ValueError(
                    f"--long-memory-size {options.long_memory_size} exceeds the {tokens} tokens of the evaluated "
                    f"split: the memory could never hold more; use --long-memory-size <= {tokens}"
                )
        if self.trime_memory_options.uses_stream and context_window == 0:
            dataset = StreamOrderDataset(dataset)  # the stream memory needs the blocks in order
        if context_window > 0 and carries_neighbours(dataset):
            # fairseq's context rows, with the neighbours moved along with their targets
            dataset = NeighbourContextWindowDataset(
                dataset, self.args.tokens_per_sample, context_window, self.source_dictionary.pad()
            )
            context_window = 0
        return super().eval_lm_dataloader(dataset, *args, context_window=context_window, **kwargs)

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        reads_neighbours = getattr(model, "reads_neighbours", False)
        if reads_neighbours and self.neighbour_folder is None:
            raise ValueError(f"{type(model).__name__} reads precomputed neighbours: pass --neighbours DIR "
                             "(written by trime-neighbours)")
        uses_neighbours = self.trime_memory_options.uses_neighbours
        if self.neighbour_folder is not None and not reads_neighbours and not uses_neighbours:
            raise ValueError(f"--neighbours feeds SPALM models (--arch spalm_*) and --eval-memory neighbour_knn; "
                             f"{type(model).__name__} reads no neighbours and the evaluation memory uses none")
        if self.neighbour_folder is not None and not reads_neighbours:
            _withhold_neighbours(model)  # the evaluation memory reads them from the sample
        ensure_key_capture(model)  # g where the decoder has one, f always
        # recurrent-memory models carry memory across batches only in stream order
        enable_stream_memory(model, self.args.batching == "stream")
        if not self.trime_memory_options.plain:
            options, dictionary = self.trime_memory_options, self.target_dictionary
            documents = DocumentBoundaries.from_dictionary(dictionary) if options.memory_reset == "document" else None
            memory = build_eval_memory(options, dictionary, documents=documents)
            require_keys(model, memory.key_names(), f"--eval-memory {options.mode}")
            attach_eval_memory(model, memory)
        return model

    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        reset_stream_memory(model)  # a new pass over the streams

    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        reset_stream_memory(model)
