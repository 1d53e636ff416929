"""The shell pipelines' shared helpers (scripts/lib.sh): one parser of fairseq-eval-lm's perplexity for every script."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "scripts").glob("wikitext2_*.sh"))
EVAL_LM_LOG = """2026-12-06 03:00:00 | INFO | fairseq_cli.eval_lm | num. model params: 1,513,344
2026-12-06 03:01:00 | INFO | fairseq_cli.eval_lm | Evaluated 217,646 tokens in 60.0s (3627.43 tokens/s)
2026-12-06 03:01:00 | INFO | fairseq_cli.eval_lm | Loss (base 2): 8.1955, Perplexity: 293.18
"""


def helper(call: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source scripts/lib.sh; {call}"], cwd=ROOT,
                          input=stdin, capture_output=True, text=True)


def test_perplexity_reads_a_log_file_or_stdin(tmp_path):
    log = tmp_path / "eval.log"
    log.write_text(EVAL_LM_LOG)
    assert helper(f"perplexity {log}").stdout == "293.18\n"
    assert helper("perplexity", EVAL_LM_LOG).stdout == "293.18\n"
    # two evaluations in one log (a resumed run): the last one counts
    assert helper("perplexity", EVAL_LM_LOG + EVAL_LM_LOG.replace("293.18", "290.5")).stdout == "290.5\n"


def test_perplexity_fails_on_a_log_without_one():
    """Under the pipelines' ``set -o pipefail`` a crashed evaluation is an error, not an empty number."""
    done = helper("perplexity", "Traceback (most recent call last):\n")
    assert done.returncode != 0 and done.stdout == ""


@pytest.mark.parametrize("script", PIPELINES, ids=lambda p: p.name)
def test_pipelines_parse_and_share_the_perplexity_parser(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    if "fairseq-eval-lm" in text:
        assert 'grep -o "Perplexity' not in text, f"{script.name}: use perplexity from scripts/lib.sh"
