"""Console scripts of trime_fairseq (``trime-*``); :func:`setup_logging` is their logging set-up."""

import logging
import sys

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"


def setup_logging(stdout: bool = False) -> None:
    """INFO logging in fairseq's format (to stdout when the CLI's log is its output, else stderr)."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO, **({"stream": sys.stdout} if stdout else {}))
