from trime_fairseq.criterions import trime_loss  # noqa: F401
from trime_fairseq.criterions import trime_long_loss  # noqa: F401
from trime_fairseq.criterions import trime_ext_loss  # noqa: F401
from trime_fairseq.criterions import trime_mt_loss  # noqa: F401
