"""Every command shown in README.md and docs/*.md parses with today's code.

Extraction (:func:`doc_commands`), in document order per file:

* code blocks -- fenced (```bash, ```sh or bare ```) and indented by 4 spaces -- line by line: a line ending
  in ``\\`` continues; ``NAME=value`` / ``NAME="..."`` / ``export NAME=value`` lines define shell variables
  for the rest of the file, and so do inline spans that are only an assignment (``R=runs/x``) and the
  ``NAME=value`` prefixes of a command; ``$NAME`` / ``${NAME}`` are expanded (a variable the docs use
  without defining it must be in :data:`LOOP_DEFAULTS`, else the command fails); ``for X in a b; do``
  sets X to its first value; ``&&`` / ``;`` outside quotes separate commands; a trailing ``&``, ``/usr/bin/time -v`` and
  ``nice -n N`` are dropped; ``# comments`` are dropped, except ``#   = PROGRAM ...`` lines (an equivalent
  command line, checked as a fragment);
* inline code spans (prose and table cells, joined across line breaks, ``\\|`` = ``|``) that start with a
  program below and hold at least one argument. Such a span may only refer to a command: it is checked with
  dummies for the required options it omits (argparse CLIs; a last option named without its value gets one),
  and a fairseq-style span without its data argument is checked as a fragment (below); the CLIs' own extra
  checks (``checked``, ``check_args``) and the criterion need a full command;
* inline spans of evaluation-memory flags (``--eval-memory MODE ...``, e.g. the tables' "evaluation
  memory" column): checked on top of :data:`FLAG_BASE` (per file), with ``--datastore`` / ``--neighbours``
  added when the mode needs one and the span has none (the docs give it next to the table).

Shell and placeholder conventions of the docs, handled explicitly: ``[--flag value]`` optional groups are
included; ``{a,b}`` brace expansions and ``a|b`` alternatives take their first choice; the tokens of
:data:`PLACEHOLDERS` (``<model>``, ``N``, ``λ``, ...) are replaced by a stand-in value; ``$( ... )`` is not
supported (fails loudly). A ``...`` token elides arguments: the command is a *fragment* (required arguments
it lacks are filled in with dummies; no criterion is built), and a line *starting* with ``...`` repeats the
last full command of the block up to its ``--eval-memory`` (the docs' "same command, other memory").

Checks (:func:`check`), none of which loads data, a checkpoint or a datastore; paths need not exist:

* ``fairseq-train`` / ``fairseq-eval-lm`` / ``fairseq-generate``: fairseq's own parser
  (``options.get_*_parser`` + ``options.parse_args_and_arch``, which imports ``--user-dir``), the config
  conversion, then the task built from the config with empty dictionaries (``trime_lm`` /
  ``trime_translation`` check their memory options there: ``MemoryOptions.from_flags`` refuses a flag the
  mode does not use, batchings check their options), and for training the criterion
  (``task.build_criterion``, which checks its options against the task); ``fairseq-generate`` also the
  asserts ``fairseq_cli.generate`` makes before loading;
* ``fairseq-hydra-train``: hydra's composition of ``--config-dir`` / ``--config-name`` with the overrides,
  as fairseq composes it (struct config: an unknown key is refused), fairseq's defaults, then the task and
  criterion as above;
* ``trime-tune``, ``trime-sweep-memory``, ``trime-tune-mt``, ``python -m trime_fairseq.cli.spalm_gates``:
  their fairseq parser plus their own options, the task, and the CLI's ``checked(cfg, args)``;
* ``trime-recall COMMAND``: ``score`` as ``trime-tune`` (its fairseq parser, the task); ``make`` / ``report`` /
  ``plot`` their argparse parsers;
* ``trime-build-datastore`` (+ its ``check_args``), ``trime-bm25-batches``, ``trime-neighbours``, ``python
  benchmarks/*.py``, ``python scripts/*.py``: the module's ``get_parser()``;
* ``scripts/*.sh``, ``benchmarks/*.sh``: the script exists and is executable.
"""

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FAIRSEQ = ("fairseq-train", "fairseq-eval-lm", "fairseq-generate", "fairseq-hydra-train")
CONSOLE = {  # console script -> module (setup.py)
    "trime-tune": "tune", "trime-tune-mt": "tune_mt", "trime-build-datastore": "build_datastore",
    "trime-bm25-batches": "bm25_batches", "trime-sweep-memory": "sweep_memory", "trime-neighbours": "neighbours",
    "trime-train-adaptive-knn": "train_adaptive_knn", "trime-train-skip-predictor": "train_skip_predictor",
    "trime-retrieve-pairs": "retrieve_pairs", "trime-retrieval-accuracy": "retrieval_accuracy",
}
MODULE_PROGRAM = {f"trime_fairseq.cli.{module}": name for name, module in CONSOLE.items()}
MODULE_PROGRAM["trime_fairseq.cli.spalm_gates"] = "spalm-gates"
MODULE_PROGRAM["trime_fairseq.cli.recall"] = "trime-recall"

#: placeholders of the docs -> a stand-in value (an empty string drops the token)
PLACEHOLDERS = {
    "<model>": "transformer", "<memory flags>": "", "<binarized wikitext-2>": "data-bin/wikitext-2",
    "[tuned flags]": "", "N": "2", "D": "16", "R": "0", "HOST:PORT": "127.0.0.1:29500", "T": "1", "λ": "0.25",
}
#: variables the docs use inside a loop they describe in words ("split S in {valid, test}", "LR = ...")
LOOP_DEFAULTS = {"S": "valid", "M": "4096", "LR": "0.0002", "i": "0"}
#: the command an inline span of evaluation-memory flags completes, per file
FLAG_BASE = {
    "results_mt.md": ["fairseq-generate", "data-bin/multi30k", "--user-dir", "trime_fairseq", "--task",
                      "trime_translation", "--path", "ckpt.pt"],
}
DEFAULT_FLAG_BASE = ["fairseq-eval-lm", "data-bin/wikitext-2", "--user-dir", "trime_fairseq", "--task", "trime_lm",
                     "--path", "ckpt.pt"]
NEEDS = {"knn": ["--datastore", "dstore"], "trime_ext": ["--datastore", "dstore"],
         "neighbour_knn": ["--neighbours", "neighbours"], "sk_mt": ["--sk-pairs", "pairs.npz"]}

PROGRAM = re.compile(
    r"(fairseq-(?:train|eval-lm|generate|hydra-train)|trime-[a-z0-9-]+|python3? -m trime_fairseq\.cli\.\w+"
    r"|python3? (?:benchmarks|scripts)/\S+\.py|(?:\./)?(?:scripts|benchmarks)/\S+\.sh)(?=\s|$)"
)
ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$")
ENV_PREFIX = re.compile(r"^([A-Za-z_]\w*)=(\"[^\"]*\"|'[^']*'|\S*)\s+")
WRAPPERS = re.compile(r"^(?:/usr/bin/time -v\s+|nice -n \d+\s+)+")


def split_commands(text: str):
    """The commands of a shell line separated by ``&&`` or ``;`` outside quotes (a quoted ``;``, e.g. a
    ';'-separated list of FAISS factories, stays inside its argument), each stripped."""
    parts, current, quote, i = [], [], None, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == ";" or text.startswith("&&", i):
            parts.append("".join(current).strip())
            current = []
            i += 1 if c == ";" else 2
            continue
        current.append(c)
        i += 1
    parts.append("".join(current).strip())
    return parts


LOOP = re.compile(r"^for (\w+) in ([^;]+); do\b\s*(.*)$")


@dataclass
class DocCommand:
    file: str
    line: int
    text: str  # the command as the docs show it (continuations joined)
    argv: List[str] = field(default_factory=list)  # program first (normalised), then the arguments
    fragment: bool = False  # arguments elided with "..."
    inline: bool = False  # an inline span: a reference to a command may leave out its required arguments
    flags_only: bool = False  # an inline span of evaluation-memory flags
    error: Optional[str] = None  # an extraction error (e.g. an undefined variable)

    def __str__(self):
        return f"{self.file}:{self.line}: {self.text}"


# -- extraction --------------------------------------------------------------------------------------


def _segments(text: str):
    """(line, kind, content) of the file in order: kind 'block' (a list of (line, text)) or 'inline'."""
    lines = text.split("\n")
    out, prose, i = [], [], 0

    def flush_prose():
        if not prose:
            return
        start = prose[0][0]
        joined = "\n".join(t for _, t in prose)
        for m in re.finditer(r"`([^`]+)`", joined):
            out.append((start + joined.count("\n", 0, m.start()), "inline", m.group(1)))
        prose.clear()

    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            flush_prose()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if fence.group(1) in ("", "bash", "sh", "shell", "console"):
                out.append((i + 2, "block", [(k + 1, lines[k]) for k in range(i + 1, j)]))
            i = j + 1
            continue
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            flush_prose()
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            out.append((i + 1, "block", [(k + 1, lines[k][4:]) for k in range(i, j)]))
            i = j
            continue
        prose.append((i + 1, line))
        i += 1
    flush_prose()
    return out


def _logical_lines(block):
    """(line, text) with continuations joined."""
    out, current, start = [], [], None
    for number, text in block:
        if start is None:
            start = number
        stripped = text.rstrip()
        if current and current[0].startswith("#"):  # a continued comment line: "#   = cmd \\" then "#   args"
            stripped = stripped.lstrip().lstrip("#")
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped.strip())
        out.append((start, " ".join(p for p in current if p)))
        current, start = [], None
    if current:
        out.append((start, " ".join(current)))
    return out


def _expand(text: str, env: Dict[str, str]) -> str:
    if "$(" in text or "`" in text:
        raise ValueError("command substitution is not supported: give the command's value in the docs")

    def value(m):
        name = m.group(1) or m.group(2)
        if name in env:
            return env[name]
        if name in LOOP_DEFAULTS:
            return LOOP_DEFAULTS[name]
        raise ValueError(f"${name} is not defined in this file (nor in LOOP_DEFAULTS)")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _words(text: str) -> List[str]:
    """Shell words of an expanded command line, with the docs' conventions applied."""
    for placeholder, value in PLACEHOLDERS.items():
        if not re.fullmatch(r"\w+", placeholder):  # <model>, [tuned flags], ...: anywhere
            text = text.replace(placeholder, value)
    text = re.sub(r"\[(--[^\]\[]*)\]", r"\1", text)  # optional groups [--flag value]
    words = []
    split = shlex.split(text, comments=True)
    for i, word in enumerate(split):
        if re.fullmatch(r"[12&]?>>?", word) or (i and re.fullmatch(r"[12&]?>>?", split[i - 1])):
            continue  # output redirections: '> FILE', '2> FILE' (the redirection and its target)
        word = PLACEHOLDERS.get(word, word)
        brace = re.search(r"\{([^{}:']*,[^{}:']*)\}", word)
        if brace and not word.startswith("{"):  # shell brace expansion: the first choice
            word = word.replace(brace.group(0), brace.group(1).split(",")[0])
        elif re.fullmatch(r"\{[\w,]+\}", word):
            word = word[1:-1].split(",")[0]
        if "|" in word and not word.startswith("-") and "=" not in word:
            word = word.split("|")[0]  # alternatives a|b
        if word:
            words.append(word)
    return words


def _program(words: List[str]):
    """(normalised program, arguments) or None when the words do not start with a checked program."""
    if not words:
        return None
    head = words[0]
    if head in FAIRSEQ or head in CONSOLE or head == "trime-recall":
        return head, words[1:]
    if head in ("python", "python3") and len(words) > 1:
        if words[1] == "-m" and len(words) > 2 and words[2] in MODULE_PROGRAM:
            return MODULE_PROGRAM[words[2]], words[3:]
        if re.fullmatch(r"(benchmarks|scripts)/\S+\.py", words[1]):
            return words[1], words[2:]
    if re.fullmatch(r"(\./)?(scripts|benchmarks)/\S+\.sh", head):
        return head.lstrip("./"), words[1:]
    return None


def _strip_env(text: str, env: Dict[str, str], define: bool) -> str:
    """Drop (and with ``define`` record) NAME=value prefixes and the wrappers before the program."""
    while True:
        m = ENV_PREFIX.match(text)
        if not m:
            break
        if define:
            env[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
        text = text[m.end():]
    return WRAPPERS.sub("", text)


def _command(file, line, text, env, base, fragment=False) -> Optional[DocCommand]:
    """A DocCommand for one shell command (None when it is not one of the checked programs)."""
    shown = text
    text = _strip_env(text.strip(), env, define=True)
    if text.rstrip().endswith("&"):
        text = text.rstrip()[:-1]
    if not PROGRAM.match(text) and not text.startswith("..."):
        return None
    cmd = DocCommand(file, line, shown.strip())
    try:
        words = _words(_expand(text, env))
    except ValueError as e:
        cmd.error = str(e)
        return cmd
    if words and words[0] == "...":  # the last full command, up to its --eval-memory, + these arguments
        if not base:
            cmd.error = "a '...' line without a command before it in the block"
            return cmd
        previous = base[0]
        cut = previous.index("--eval-memory") if "--eval-memory" in previous else len(previous)
        words = previous[:cut] + words[1:]
    program = _program(words)
    if program is None:
        return None
    cmd.argv = [program[0], *[w for w in program[1] if w != "..."]]
    cmd.fragment = fragment or "..." in program[1]
    if not cmd.fragment and words[0] != "...":
        base[:] = [words]
    return cmd


def doc_commands(path: Path) -> List[DocCommand]:
    """Every checked command of one markdown file, in document order."""
    name = path.name
    env: Dict[str, str] = {}
    commands: List[DocCommand] = []
    for line, kind, content in _segments(path.read_text(encoding="utf-8")):
        if kind == "inline":
            span = re.sub(r"\s*\n\s*", " ", content).replace("\\|", "|").strip()
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(\"[^\"]*\"|'[^']*'|\S+)", span)
            if assignment:
                env[assignment.group(1)] = shlex.split(assignment.group(2))[0]
                continue
            flags = re.match(r"--eval-memory ([a-z_]+)(\s|$)", span)
            if flags:
                cmd = DocCommand(name, line, span, flags_only=True)
                try:
                    words = _words(_expand(span, env))
                except ValueError as e:
                    cmd.error = str(e)
                else:
                    base = FLAG_BASE.get(name, DEFAULT_FLAG_BASE)
                    extra = NEEDS.get(flags.group(1), [])
                    if extra and extra[0] in words:
                        extra = []
                    cmd.argv = [*base, *words, *extra]
                commands.append(cmd)
                continue
            words = _strip_env(span, {}, define=False).split()
            if words[0] == "...":
                continue  # "OMP_NUM_THREADS=2 ... --runs 5": the program is elided, nothing to check
            args = words[3:] if words[:2] in (["python", "-m"], ["python3", "-m"]) else \
                words[2:] if words[0] in ("python", "python3") else words[1:]
            if not args and not words[-1].endswith((".sh", ".py")):
                continue  # a program's or module's name, not a command
            cmd = _command(name, line, span, env, base=[])
            if cmd is not None:
                cmd.inline = True
                commands.append(cmd)
            continue
        base: List[List[str]] = []
        for number, text in _logical_lines(content):
            comment = re.match(r"^#\s*=\s*(.*)$", text)  # "#   = fairseq-train DATA ..." (equivalent command)
            if comment:
                cmd = _command(name, number, comment.group(1), dict(env), base=[], fragment=True)
                if cmd is not None:
                    commands.append(cmd)
                continue
            if text.startswith("#") or not text:
                continue
            loop = LOOP.match(text)
            if loop:  # the loop variable takes its first value
                env[loop.group(1)] = shlex.split(_expand(loop.group(2), env))[0]
                text = loop.group(3)
            for part in split_commands(text):
                if part.startswith("do "):
                    part = part[3:]
                if part in ("", "do", "done", "wait") or part.startswith("#"):
                    continue
                try:
                    words = shlex.split(_expand(part, env), comments=True)
                except ValueError:  # reported by _command below
                    words = []
                if words[:1] == ["export"]:
                    words = words[1:]
                assignment = ASSIGNMENT.match(words[0]) if len(words) == 1 else None
                if assignment:
                    env[assignment.group(1)] = assignment.group(2)
                    continue
                cmd = _command(name, number, part, env, base)
                if cmd is not None:
                    commands.append(cmd)
    return commands


def all_doc_commands() -> List[DocCommand]:
    return [cmd for path in DOCS for cmd in doc_commands(path)]


# -- checks ------------------------------------------------------------------------------------------


class CommandError(Exception):
    pass


@contextlib.contextmanager
def _argparse_errors():
    """argparse's exit (status 2 and its message) as a CommandError; --help (status 0) passes."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield
    except SystemExit as e:
        if e.code not in (0, None):
            raise CommandError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip()
                               else f"exit {e.code}") from None


def _fill_required(parser, argv: List[str]) -> List[str]:
    """A fragment's arguments plus a dummy for every required option and positional it lacks."""
    positionals = [a for a in parser._actions if not a.option_strings and a.required]
    argv = (["X"] * len(positionals) if not argv or argv[0].startswith("-") else []) + argv
    last = parser._option_string_actions.get(argv[-1]) if argv else None
    if last is not None and last.nargs is None:  # "trime-tune-mt --widen-edges": the option named, no value
        argv = argv + ["1"]
    for action in parser._actions:
        if action.required and action.option_strings and not set(action.option_strings) & set(argv):
            argv = argv + [action.option_strings[0], "X"]
    return argv


def _partial(cmd: DocCommand) -> bool:
    """A fragment, or an inline reference to a fairseq-style command without its data argument."""
    return cmd.fragment or (cmd.inline and (len(cmd.argv) < 2 or cmd.argv[1].startswith("-")))


def _fairseq_args(parser, argv: List[str], partial: bool, task: Optional[str] = None, arch: bool = False):
    from fairseq import options

    if partial:  # complete what a fragment elides
        if not argv or argv[0].startswith("-"):
            argv = ["data-bin/X", *argv]
        if "--user-dir" not in argv:
            argv += ["--user-dir", "trime_fairseq"]
        if task and "--task" not in argv:
            argv += ["--task", task]
        if arch and "--arch" not in argv:
            argv += ["--arch", "transformer_lm"]
        if "--eval-memory" in argv:
            needs = NEEDS.get(argv[argv.index("--eval-memory") + 1], [])
            if needs and needs[0] not in argv:
                argv += needs
    with _argparse_errors():
        return options.parse_args_and_arch(parser, input_args=argv)


def _build_task(cfg):
    """The task of the config, built with empty dictionaries (its __init__ checks its options)."""
    from fairseq.data import Dictionary
    from fairseq.tasks import TASK_REGISTRY
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from fairseq.tasks.translation import TranslationTask

    cls = TASK_REGISTRY[cfg.task._name]
    if issubclass(cls, LanguageModelingTask):
        return cls(cfg.task, Dictionary())
    if issubclass(cls, TranslationTask):
        return cls(cfg.task, Dictionary(), Dictionary())
    raise CommandError(f"no check for task {cfg.task._name}")


def _validated(args, criterion: bool):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(args)
    task = _build_task(cfg)
    if criterion:
        task.build_criterion(cfg.criterion)
    return cfg, task


def _check_fairseq(cmd: DocCommand):
    from fairseq import options

    program, argv, partial = cmd.argv[0], cmd.argv[1:], _partial(cmd)
    if program == "fairseq-train":
        args = _fairseq_args(options.get_training_parser(), argv, partial, "trime_lm", arch=True)
        _validated(args, criterion=not partial)
    elif program == "fairseq-eval-lm":
        args = _fairseq_args(options.get_eval_lm_parser(), argv, partial, "trime_lm")
        _validated(args, criterion=False)
        eval(args.model_overrides)  # a Python dict literal, as fairseq evaluates it
    elif program == "fairseq-generate":
        args = _fairseq_args(options.get_generation_parser(), argv, partial, "trime_translation")
        cfg, _ = _validated(args, criterion=False)
        # fairseq_cli.generate.main's asserts before it loads anything
        assert partial or cfg.common_eval.path is not None, "--path required for generation!"
        assert not cfg.generation.sampling or cfg.generation.nbest == cfg.generation.beam, \
            "--sampling requires --nbest to be equal to --beam"
        assert cfg.generation.replace_unk is None or cfg.dataset.dataset_impl == "raw", \
            "--replace-unk requires a raw text dataset (--dataset-impl=raw)"
        eval(args.model_overrides)
    elif program == "fairseq-hydra-train":
        _check_hydra(argv)
    else:
        raise CommandError(f"no check for {program}")


def _check_hydra(argv: List[str]):
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    config_dir = config_name = None
    overrides = []
    words = iter(argv)
    for word in words:
        if word in ("--config-dir", "-cd"):
            config_dir = next(words)
        elif word in ("--config-name", "-cn"):
            config_name = next(words)
        elif word.startswith("-"):
            raise CommandError(f"fairseq-hydra-train takes hydra overrides, not {word}")
        else:
            overrides.append(word)
    if config_dir is None or config_name is None:
        raise CommandError("--config-dir and --config-name are needed")
    folder = ROOT / config_dir
    if not (folder / f"{config_name}.yaml").is_file():
        raise CommandError(f"no config {config_dir}/{config_name}.yaml")
    GlobalHydra.instance().clear()
    hydra_init(config_name)
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.1"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as e:  # hydra's errors: unknown key in a struct config, bad override syntax
        raise CommandError(f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    for override in overrides:  # each plain override reached the config
        m = re.fullmatch(r"([\w.]+)=(.*)", override)
        if m and not m.group(1).startswith("hydra."):
            if OmegaConf.select(cfg, m.group(1), throw_on_missing=False) is None and m.group(2) not in ("null", ""):
                raise CommandError(f"override {override} did not reach the config")
    add_defaults(cfg)
    task = _build_task(cfg)
    task.build_criterion(cfg.criterion)


def _check_plugin_cli(cmd: DocCommand):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    program, argv = cmd.argv[0], cmd.argv[1:]
    if program in ("trime-tune", "trime-sweep-memory", "trime-tune-mt", "spalm-gates", "trime-train-adaptive-knn",
                   "trime-train-skip-predictor"):
        module = importlib.import_module(
            "trime_fairseq.cli." + CONSOLE.get(program, "spalm_gates"))
        parser = module.get_parser()
        partial = _partial(cmd)
        if partial:
            argv = _fill_required(parser, argv)
        args = _fairseq_args(parser, argv, partial, "trime_translation" if program in ("trime-tune-mt", "trime-train-adaptive-knn")
                             else "trime_lm")
        cfg = convert_namespace_to_omegaconf(args)
        _build_task(cfg)
        if hasattr(module, "checked") and not partial:
            module.checked(cfg, args)
        return
    module = importlib.import_module("trime_fairseq.cli." + CONSOLE[program])
    parser = module.get_parser()
    full = argv
    if cmd.fragment or cmd.inline:  # a reference to the CLI in prose or a table may omit its required options
        argv = _fill_required(parser, argv)
    with _argparse_errors():
        args = parser.parse_args(argv)
    if hasattr(module, "check_args") and not cmd.fragment and argv == full and "--help" not in argv:
        module.check_args(args)


def _check_recall(cmd: DocCommand):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from trime_fairseq.cli import recall

    if len(cmd.argv) < 2 or cmd.argv[1] not in recall.COMMANDS:
        raise CommandError(f"trime-recall needs a command among {recall.COMMANDS}")
    command, argv = cmd.argv[1], cmd.argv[2:]
    if command == "score":
        parser = recall.get_parser()
        partial = cmd.fragment or (cmd.inline and (not argv or argv[0].startswith("-")))
        if partial:
            argv = _fill_required(parser, argv)
        args = _fairseq_args(parser, argv, partial, "trime_lm")
        recall.parse_reach(args.reach)
        _build_task(convert_namespace_to_omegaconf(args))
        return
    parser = recall.PARSERS[command]()
    if cmd.fragment or cmd.inline:
        argv = _fill_required(parser, argv)
    with _argparse_errors():
        parser.parse_args(argv)


def _load_script(path: Path):
    """A benchmark / script module, imported from its file (its folder on sys.path, as when run)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


_SCRIPTS: Dict[Path, object] = {}


def check(cmd: DocCommand) -> None:
    """Raise CommandError (or the plugin's own ValueError) when the command would be refused."""
    if cmd.error:
        raise CommandError(cmd.error)
    program = cmd.argv[0]
    if program in FAIRSEQ:
        return _check_fairseq(cmd)
    if program in CONSOLE or program == "spalm-gates":
        return _check_plugin_cli(cmd)
    if program == "trime-recall":
        return _check_recall(cmd)
    path = ROOT / program
    if not path.is_file():
        raise CommandError(f"{program} does not exist")
    if program.endswith(".sh"):
        if not path.stat().st_mode & 0o111:
            raise CommandError(f"{program} is not executable")
        return
    if path not in _SCRIPTS:
        _SCRIPTS[path] = _load_script(path)
    module = _SCRIPTS[path]
    if not hasattr(module, "get_parser"):
        raise CommandError(f"{program} has no get_parser()")
    argv = cmd.argv[1:]
    parser = module.get_parser()
    if cmd.fragment or cmd.inline:
        argv = _fill_required(parser, argv)
    with _argparse_errors():
        parser.parse_args(argv)


def failure(cmd: DocCommand) -> Optional[str]:
    try:
        check(cmd)
    except Exception as e:  # noqa: BLE001 -- any refusal is the command's failure, reported with its type
        return f"{type(e).__name__}: {e}"
    return None


# -- tests -------------------------------------------------------------------------------------------


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # --user-dir trime_fairseq, --config-dir configs/... are relative to the root


#: at least this many commands per file (the extraction must keep finding them)
MINIMUM = {"README.md": 30, "results.md": 15, "results_long.md": 12, "results_longmem.md": 8,
           "results_models.md": 12, "results_datastore.md": 8, "results_spalm.md": 8, "results_mt.md": 8, "results_recall.md": 6,
           "scaling.md": 5}


def test_every_console_script_is_checked():
    """A console script missing from CONSOLE would go unchecked: its lines are not even taken for commands."""
    import ast

    setup = ast.parse((ROOT / "setup.py").read_text())
    scripts = {node.value.split("=")[0].strip() for node in ast.walk(setup)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and re.fullmatch(r"[\w-]+ = trime_fairseq\.cli\.\w+:cli_main", node.value)}
    assert len(scripts) >= 10
    assert scripts == set(CONSOLE) | {"trime-recall"}
    for name, module in CONSOLE.items():
        assert hasattr(importlib.import_module(f"trime_fairseq.cli.{module}"), "get_parser"), name


def test_the_docs_show_commands():
    counts = Counter(cmd.file for cmd in all_doc_commands())
    short = {name: (counts[name], n) for name, n in MINIMUM.items() if counts[name] < n}
    assert not short, f"fewer commands found than expected (found, expected): {short}"


def test_every_doc_command_parses_with_todays_code(in_root):
    commands = all_doc_commands()
    failures = [f"{cmd}\n    argv: {shlex.join(cmd.argv)}\n    {message}"
                for cmd in commands for message in [failure(cmd)] if message]
    counts = Counter(cmd.file for cmd in commands)
    print(f"{len(commands)} doc commands: {dict(counts)}")
    assert not failures, f"{len(failures)} of {len(commands)} doc commands fail:\n" + "\n".join(failures)


def _extract(tmp_path, text):
    path = tmp_path / "doc.md"
    path.write_text(text, encoding="utf-8")
    return doc_commands(path)


def test_extraction_conventions(tmp_path):
    commands = _extract(tmp_path, """
```bash
O=runs/x
GEN="--user-dir trime_fairseq --task trime_lm"
for s in valid test; do
  fairseq-eval-lm data-bin/wt2 $GEN --path $O/ckpt.pt --gen-subset $s \\
      --eval-memory knn --datastore d --knn-lambda 0.25 [--cache-lambda 0.1]   # comment
done
...  --eval-memory trime --memory-temperature 1
CUDA_VISIBLE_DEVICES=$s trime-build-datastore --path <model>.pt --output {a,b} &
#   = fairseq-train DATA --arch transformer_lm ...
```

Then `trime-neighbours --datastore d --output o --k 4` and `--eval-memory trime_ext --memory-temperature 2`.
""")
    argvs = [c.argv for c in commands]
    eval_lm = ["fairseq-eval-lm", "data-bin/wt2", "--user-dir", "trime_fairseq", "--task", "trime_lm", "--path",
               "runs/x/ckpt.pt", "--gen-subset", "valid"]
    assert argvs[0] == [*eval_lm, "--eval-memory", "knn", "--datastore", "d", "--knn-lambda", "0.25",
                        "--cache-lambda", "0.1"]
    assert argvs[1] == [*eval_lm, "--eval-memory", "trime", "--memory-temperature", "1"]
    assert argvs[2] == ["trime-build-datastore", "--path", "transformer.pt", "--output", "a"]
    assert argvs[3] == ["fairseq-train", "DATA", "--arch", "transformer_lm"] and commands[3].fragment
    assert argvs[4] == ["trime-neighbours", "--datastore", "d", "--output", "o", "--k", "4"]
    assert argvs[5][:2] == ["fairseq-eval-lm", "data-bin/wikitext-2"] and commands[5].flags_only
    assert argvs[5][-2:] == ["--datastore", "dstore"]
    assert [c.line for c in commands] == [6, 9, 10, 11, 14, 14]
    undefined = _extract(tmp_path, "```bash\ntrime-tune data --path $NOWHERE/c.pt\n```\n")
    assert "NOWHERE" in undefined[0].error


@pytest.mark.parametrize("text, expected", [
    ("fairseq-eval-lm data --user-dir trime_fairseq --task trime_lm --path c.pt --no-such-flag",
     "unrecognized arguments: --no-such-flag"),
    ("fairseq-eval-lm data --user-dir trime_fairseq --task trime_lm --path c.pt --eval-memory trime_ext "
     "--datastore d --memory-temperature 2 --knn-temperature 10 --knn-lambda 0.1",
     "--knn-lambda, --knn-temperature has no effect with --eval-memory trime_ext"),
    ("fairseq-train data --user-dir trime_fairseq --task trime_lm --arch transformer_lm --max-update 10 "
     "--criterion trime_long_loss",
     "trime_long_loss reads each batch as runs"),
    ("fairseq-generate data --user-dir trime_fairseq --task trime_translation --path c.pt --eval-memory cache",
     "invalid choice: 'cache'"),
    ("fairseq-hydra-train --config-dir configs/trime --config-name wikitext2_small task.data=d task.no_such_key=1",
     "no_such_key"),
    ("trime-tune data --user-dir trime_fairseq --task trime_lm --path c.pt --eval-memory none",
     "trime-tune needs --eval-memory"),
    ("trime-build-datastore --path c.pt --output d --num-shards 4 --shard-id 4", "--shard-id must lie in"),
    ("trime-bm25-batches --data d --output o --no-such-flag", "unrecognized arguments"),
    ("python benchmarks/bench_trime_loss.py --runs many", "invalid int value"),
    ("scripts/no_such_script.sh", "does not exist"),
])
def test_the_checker_rejects_wrong_commands(in_root, tmp_path, text, expected):
    commands = _extract(tmp_path, f"```bash\n{text}\n```\n")
    assert len(commands) == 1, commands
    message = failure(commands[0])
    assert message is not None and expected in message, message


def test_the_checker_rejects_a_wrong_table_row(in_root, tmp_path):
    """The old trime_ext flags of docs/results.md's 200-update table, as an inline span."""
    commands = _extract(tmp_path, "| TRIMELM_ext | `--eval-memory trime_ext --memory-temperature 2 "
                                  "--knn-temperature 10 --knn-lambda 0.1` | 365.65 |\n")
    message = failure(commands[0])
    assert message is not None and "has no effect with --eval-memory trime_ext" in message, message
    right = _extract(tmp_path, "`--eval-memory trime_ext --memory-temperature 2 --interpolation-temperature 10 "
                               "--interpolation-lambda 0.1`\n")
    assert failure(right[0]) is None


def test_the_small_wikitext2_model_has_the_size_the_docs_state():
    """docs/results*.md give trime_lm_wikitext2_small (configs/trime/wikitext2_small.yaml and its trime_long /
    trime_ext copies) as 1.51M parameters: the model built over WikiText-2's 33,280-entry dictionary."""
    import torch
    from fairseq.data import Dictionary
    from fairseq.models.transformer_lm import TransformerLanguageModel
    from test_configs import composed

    dictionary = Dictionary()
    for i in range(33_280 - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    task = type("Task", (), {"source_dictionary": dictionary, "target_dictionary": dictionary})()
    for config in ("trime", "trime_long", "trime_ext"):
        cfg = composed(ROOT / "configs" / config / "wikitext2_small.yaml")
        with torch.device("meta"):
            model = TransformerLanguageModel.build_model(cfg.model, task)
        assert sum(p.numel() for p in model.parameters()) == 1_513_344, config
    for path in (ROOT / "README.md", *(ROOT / "docs" / n for n in ("results.md", "results_long.md",
                                                                  "results_models.md", "results_spalm.md"))):
        assert "1.51M" in path.read_text(encoding="utf-8"), path.name
