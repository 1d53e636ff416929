"""The README's set-up commands are the ones CI runs, and its quickstart script exists."""

import re

from conftest import ROOT


def fenced_bash(text):
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_setup_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    install, test = fenced_bash(setup)[:2]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines and test in ci_lines
    assert ci_lines.index(install) < ci_lines.index(test)


def test_quickstart_command_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = fenced_bash(readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0])[0]
    script = ROOT / quick.split()[0]
    assert script.exists() and script.stat().st_mode & 0o111
