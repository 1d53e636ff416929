"""trime_fairseq: memory-augmented language models as a fairseq plugin.

Load with ``--user-dir trime_fairseq`` (or ``import trime_fairseq``): importing
the package registers its tasks, criteria and model architectures.
"""

__version__ = "0.1.0"

from trime_fairseq import criterions, data, models, tasks  # noqa: F401,E402  (registration)
