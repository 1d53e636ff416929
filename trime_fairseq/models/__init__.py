from trime_fairseq.models import trime_transformer_lm  # noqa: F401
