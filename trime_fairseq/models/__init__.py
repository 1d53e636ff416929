from trime_fairseq.models import trime_transformer_lm  # noqa: F401
from trime_fairseq.models import lamemo, transformer_xl  # noqa: F401
from trime_fairseq.models import spalm  # noqa: F401
from trime_fairseq.models import alibi_lm, longmem  # noqa: F401
