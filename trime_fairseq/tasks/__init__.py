from trime_fairseq.tasks import trime_lm  # noqa: F401
from trime_fairseq.tasks import trime_translation  # noqa: F401
