"""scripts/sacrebleu_from_generate.py scores complete outputs only (a partial output is refused)."""

import subprocess
import sys

from conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "sacrebleu_from_generate.py")


def generate_output(path, ids):
    with open(path, "w", encoding="utf-8") as f:
        for i in ids:
            f.write(f"S-{i}\tein hund\nT-{i}\ta dog runs in the park\nH-{i}\t-0.5\ta dog runs in the park\nD-{i}\t-0.5\ta dog runs in the park\n")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def test_complete_output_is_scored(tmp_path):
    out = tmp_path / "gen.txt"
    generate_output(out, [2, 0, 1])
    refs = tmp_path / "refs.txt"
    refs.write_text("a dog runs in the park\na dog runs in the park\na dog runs in the park\n")
    for extra in ([], ["--refs", refs], ["--num-sentences", 3]):
        r = run(out, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("BLEU = 100.00") and "| 3 sentences" in r.stdout


def test_missing_sentences_are_refused(tmp_path):
    out = tmp_path / "gen.txt"
    generate_output(out, [0, 2])  # sentence 1 was not decoded
    r = run(out)
    assert r.returncode == 1 and "1 missing (ids 1" in r.stderr
    refs = tmp_path / "refs.txt"
    refs.write_text("a\nb\nc\nd\n")  # the split has 4 sentences; 1 and 3 are missing
    r = run(out, "--refs", refs)
    assert r.returncode == 1 and "2 missing" in r.stderr
    generate_output(out, [0, 1, 2])
    r = run(out, "--num-sentences", 4)  # the last sentence of the split is missing
    assert r.returncode == 1 and "expected 4" in r.stderr
