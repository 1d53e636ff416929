"""Shared fixtures: real data from ../shared/data (or $TRIME_DATA), tiny binarized slices, CLI runner.

A test that needs the shared data fails (never skips) when CI=true and the data is missing.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TRIME_DATA", ROOT.parent / "shared" / "data"))


def shared_data(*parts) -> Path:
    """Path to a file/folder of the shared real data; fail in CI, skip elsewhere, if absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data missing: {path} (set TRIME_DATA to the folder holding wikitext-2/)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_cli(args, cwd=ROOT, timeout=900, env=None):
    """Run a CLI (fairseq-train, fairseq-eval-lm, ...) and return its combined output; fail with it on error."""
    full_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n{output[-6000:]}")
    return output


def perplexity(output: str) -> float:
    """The perplexity fairseq-eval-lm printed."""
    match = re.search(r"Perplexity: ([0-9.]+)", output)
    assert match, output[-3000:]
    return float(match.group(1))


@pytest.fixture(scope="session")
def wikitext2_raw():
    return shared_data("wikitext-2")


SLICE_LINES = {"train": 3000, "valid": 400, "test": 400}


@pytest.fixture(scope="session")
def wikitext2_bin(tmp_path_factory, wikitext2_raw):
    """A WikiText-2 slice (first 3000 train / 400 valid / 400 test lines), binarized
    by scripts/prepare_wikitext.sh; the dictionary is the slice's own."""
    work = tmp_path_factory.mktemp("data")
    raw = work / "raw"
    raw.mkdir()
    for split, n in SLICE_LINES.items():
        with open(wikitext2_raw / f"wiki.{split}.tokens", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(n), f)]
        (raw / f"wiki.{split}.tokens").write_text("".join(lines), encoding="utf-8")
    dest = work / "wikitext-2-slice"
    run_cli(["bash", ROOT / "scripts" / "prepare_wikitext.sh", "wikitext-2", dest, raw])
    return dest


PYTHON = sys.executable


@pytest.fixture(scope="session")
def multi30k_bin(tmp_path_factory):
    """A Multi30k de-en slice (first 1500 train / 100 valid / 100 test pairs), prepared by
    scripts/prepare_multi30k.sh (lowercase, Moses tokenisation, a joint BPE of 1000 merges)."""
    raw_full = shared_data("multi30k")
    work = tmp_path_factory.mktemp("mt")
    raw = work / "raw"
    raw.mkdir()
    for name, n in (("train", 1500), ("val", 100), ("test_2016_flickr", 100)):
        for lang in ("de", "en"):
            with open(raw_full / f"{name}.{lang}", encoding="utf-8") as f:
                lines = [line for _, line in zip(range(n), f)]
            (raw / f"{name}.{lang}").write_text("".join(lines), encoding="utf-8")
    dest = work / "multi30k-slice"
    run_cli(["bash", ROOT / "scripts" / "prepare_multi30k.sh", dest, raw], env={"MERGES": "1000", "WORKERS": "1"})
    return dest
