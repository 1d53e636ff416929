from trime_fairseq.tasks import trime_lm  # noqa: F401
