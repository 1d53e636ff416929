"""Stream order for ``fairseq-eval-lm`` without ``--context-window``.

fairseq's ``MonolingualDataset.ordered_indices`` sorts blocks by length (ties
broken at random with ``shuffle=True``, the language_modeling default), so
without ``--context-window`` the last, shorter block is scored first and the
others in a random order. A long-term memory that follows the stream needs the
blocks in order: :class:`StreamOrderDataset` keeps everything of the wrapped
dataset but its order (``--context-window`` already orders by index).
"""

import numpy as np
from fairseq.data import BaseWrapperDataset


class StreamOrderDataset(BaseWrapperDataset):
    def ordered_indices(self):
        return np.arange(len(self.dataset))
