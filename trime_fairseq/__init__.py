"""trime_fairseq: memory-augmented language models as a fairseq plugin.

Load with ``--user-dir trime_fairseq`` (or ``import trime_fairseq``): importing
the package registers its tasks, criteria and model architectures.
"""

import argparse
import logging
import os
import sys

import torch

__version__ = "0.1.0"

# Importing fairseq runs logging.basicConfig(level=DEBUG) (fairseq/models/wav2vec/
# wav2vec2_classification.py), after which every library's debug lines reach the console
# (faiss's CPU-feature probing first of all). Configure the root logger first, as fairseq's
# own CLIs do, unless the program already did; and keep faiss's loader quiet.
if not logging.getLogger().handlers:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stderr)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

# torch >= 2.6 loads checkpoints with weights_only=True; fairseq stores the config of legacy (argparse)
# architectures -- transformer, transformer_iwslt_de_en, lstm -- as an argparse.Namespace, which the
# stock CLIs (fairseq-generate, fairseq-interactive, fairseq-eval-lm) then refuse to load.
torch.serialization.add_safe_globals([argparse.Namespace])

from trime_fairseq import criterions, data, models, tasks  # noqa: F401,E402  (registration)
# joins fairseq's data prefetch threads at exit (a thread left fetching aborts the process as it ends)
from trime_fairseq.data import prefetch_shutdown  # noqa: F401,E402
