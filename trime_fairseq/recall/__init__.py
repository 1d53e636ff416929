"""The long-range recall benchmark (``trime-recall``): seeded recall streams made from WikiText text, their
index, and the per-gap statistics of a scored split.

``corpus`` writes the raw-text corpus and its index (no fairseq needed), ``index`` reads and checks an index,
``stats`` turns per-token log-probabilities into per-gap tables, ``report`` compares systems with their
controls and draws the plot. The evaluation itself (a model run over a split, every memory the CLIs support)
is ``trime_fairseq/cli/recall.py``'s.
"""
