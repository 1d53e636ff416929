"""Evaluation modes as records: ``@register_mode`` and what a record declares.

A mode (``--eval-memory NAME``) is a subclass of :class:`Mode` registered with
:func:`register_mode`; everything the project knows about it is that record:

* its **composition**, as a recipe over option names: ``joint`` terms (Eq. 5/6, one
  softmax with the tokens) and interpolation ``steps`` (Eq. 7-8, kNN-LM, cache), each
  term a memory part (:mod:`trime_fairseq.memory.composition`) times a :class:`Scale`
  of an option (θ, 1/T, 1/(√d·τ)); a step marked ``optional`` is left out while its
  weight is 0 (kNN-LM's cache);
* its **options** (:attr:`Mode.options`): the options its recipe reads -- scales,
  weights -- and those of its parts (K, the datastore, the cache size, the long-term
  memory), plus ``own_options`` the record applies itself (knn's retrieval skipping), so a
  flag outside them is an error; ``defaults`` gives an option left unset
  a value of the mode's own (λ_c: 0.1 for cache, 0 for knn), ``flag_defaults`` the value a flag
  left off the command line takes under this mode instead of the field's default (SK-MT's K = 2,
  T = 100; :meth:`~trime_fairseq.memory.options.MemoryOptions.from_flags` applies them); :meth:`Mode.check_flags`
  adds rules of its own on the flags given;
* the **key kinds** it needs: those of its local parts (g for ``LOCAL_G``, f for
  ``LOCAL_F``; :meth:`Mode.local_keys`), the dimension of g when a scale is 1/(√d·x)
  (:meth:`Mode.needs_dim`), and ``datastore_keys``: the (key kind, metric) its datastore
  must hold, when the datastore's entries join an Eq. 6 similarity;
* whether it works **without a local memory** (``without_local``: translation, where
  only retrieved parts exist; the local terms of a mixed step are then left out);
* its **tuning axes**: the options ``trime-tune`` grids over (``axes``, on the
  target-only driver) and those ``trime-tune-mt`` grids over by decoding
  (``decoding_axes``).

:meth:`Mode.compose` evaluates the recipe into a
:class:`~trime_fairseq.memory.composition.Composition` of numbers,
:meth:`Mode.describe` writes it for people (``--help``, logs), :meth:`Mode.flags` writes
the command-line flags of one grid point. A new mode is one record in a module of this
package (imported by its ``__init__``) and one test.
"""

from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple

from trime_fairseq.memory.composition import (
    DATASTORE,
    LOCAL,
    LOCAL_F,
    LOCAL_G,
    LOCAL_KEYS,
    NEIGHBOURS,
    PART_OPTIONS,
    SENTENCE_PAIRS,
    Composition,
    Interpolation,
    Term,
)
from trime_fairseq.memory.sources import dot_scale

#: how :meth:`Mode.describe` writes an option
SYMBOLS: Dict[str, str] = {
    "memory_temperature": "τ",
    "cache_lambda": "λ_c",
    "cache_theta": "θ",
    "knn_temperature": "T",
    "knn_lambda": "λ",
    "interpolation_temperature": "τ′",
    "interpolation_lambda": "λ",
    "sk_lambda_temperature": "τ_λ",
}
#: how :meth:`Mode.describe` writes a part's entries
PART_TEXT: Dict[str, str] = {
    LOCAL_G: "local g",
    LOCAL_F: "local f",
    DATASTORE: "datastore hits",
    NEIGHBOURS: "the batch's neighbours",
    SENTENCE_PAIRS: "the sentence's retrieved pairs",
}


def flag(name: str) -> str:
    """The command-line flag of a MemoryOptions field."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Scale:
    """The multiplier of a term's raw scores, from one option x: x (``times``), 1/x (``inverse``) or
    1/(√d·x) (``dot``, d the dimension of g: Eq. 6-7's similarity)."""

    option: str
    kind: str = "times"  # times | inverse | dot

    def value(self, x: float, dim: Optional[int]) -> float:
        if self.kind == "times":
            return x
        if self.kind == "inverse":
            return 1.0 / x
        return dot_scale(dim, x)

    def text(self) -> str:
        symbol = SYMBOLS.get(self.option, self.option)
        return {"times": symbol, "inverse": f"1/{symbol}", "dot": f"1/(√d·{symbol})"}[self.kind]


def times(option: str) -> Scale:
    return Scale(option, "times")


def inverse(option: str) -> Scale:
    return Scale(option, "inverse")


def dot(option: str) -> Scale:
    return Scale(option, "dot")


@dataclass(frozen=True)
class TermOf:
    """A term of the recipe: a memory part at a scale."""

    part: str
    scale: Scale


@dataclass(frozen=True)
class Step:
    """An interpolation of the recipe: log((1 − λ)·p + λ·q), q over its terms' entries, λ = option ``weight``;
    an ``adaptive`` step has no weight option: the record's :meth:`Mode.step_rule` gives q's entries and λ
    per row from the step's entries (SK-MT's distance rule, adaptive kNN-MT's network)."""

    terms: Tuple[TermOf, ...]
    weight: Optional[str] = None
    optional: bool = False  # left out while λ is 0
    adaptive: bool = False

    def __post_init__(self):
        if (self.weight is None) != self.adaptive:
            raise ValueError("a step has a weight option, or is adaptive (its record's step_rule), not both")
        if self.adaptive and self.optional:
            raise ValueError("an adaptive step cannot be optional (it has no weight option to be 0)")


class Mode:
    """The record of one evaluation mode (see the module docstring); subclass and :func:`register_mode`."""

    name: str = ""
    help: str = ""  # what the mode is, in a few words (--eval-memory's help)
    joint: Tuple[TermOf, ...] = ()
    steps: Tuple[Step, ...] = ()
    defaults: Mapping[str, object] = {}  # values of options left unset (None) that are the mode's own
    flag_defaults: Mapping[str, object] = {}  # values of flags not given, instead of the fields' defaults
    axes: Tuple[str, ...] = ()  # trime-tune grids over these options
    decoding_axes: Tuple[str, ...] = ()  # trime-tune-mt grids over these options
    without_local: bool = False  # works where the scored sequence has no local memory (translation)
    datastore_keys: Optional[Tuple[str, str]] = None  # (key kind, metric) its datastore must hold
    own_options: Tuple[str, ...] = ()  # options it reads beyond its recipe and parts (knn: retrieval skipping)
    rule_text: str = ""  # what an adaptive step's rule computes, for describe()

    # -- options ------------------------------------------------------------------------------
    @property
    def options(self) -> FrozenSet[str]:
        """The MemoryOptions fields this mode reads (the mode itself excluded)."""
        names = set(self.own_options)
        for terms, step in self._recipe():
            names.update(t.scale.option for t in terms)
            names.update(n for t in terms for n in PART_OPTIONS[t.part])
            if step is not None and step.weight is not None:
                names.add(step.weight)
        return frozenset(names)

    def check_flags(self, given: Mapping[str, object]) -> None:
        """Rules of this mode on the flags a user gave (beyond reading only :attr:`options`)."""

    def value(self, options, name: str):
        """The option ``name`` of ``options``, with this mode's default when it was left unset."""
        value = getattr(options, name)
        return self.defaults.get(name) if value is None else value

    # -- the recipe -----------------------------------------------------------------------------
    def _recipe(self, options=None) -> List[Tuple[Tuple[TermOf, ...], Optional[Step]]]:
        """(terms, step) of the joint softmax (step None) and of each step; with ``options``,
        the optional steps whose weight is 0 left out."""
        out = [(self.joint, None)] if self.joint else []
        for step in self.steps:
            if options is None or not step.optional or (self.value(options, step.weight) or 0) > 0:
                out.append((step.terms, step))
        return out

    def step_rule(self, options, dim: Optional[int]):
        """The :data:`~trime_fairseq.memory.composition.StepRule` of this record's adaptive step under
        ``options`` (a record with an adaptive step overrides it)."""
        raise NotImplementedError(f"mode '{self.name}' has an adaptive step but no step_rule")

    def parts(self, options) -> FrozenSet[str]:
        """The memory parts the composition of ``options`` reads (with a local memory)."""
        return frozenset(t.part for terms, _ in self._recipe(options) for t in terms)

    def local_keys(self, options) -> Tuple[str, ...]:
        """The key kinds (g, then f) of the local parts the composition of ``options`` reads."""
        parts = self.parts(options)
        return tuple(LOCAL_KEYS[p] for p in (LOCAL_G, LOCAL_F) if p in parts)

    def needs_dim(self, options) -> bool:
        """Whether a scale of ``options``' composition is 1/(√d·x): the dimension of g is needed."""
        return any(t.scale.kind == "dot" for terms, _ in self._recipe(options) for t in terms)

    def compose(self, options, dim: Optional[int] = None, local: bool = True) -> Composition:
        """The composition of ``options`` (numbers); ``dim``: the dimension of g; ``local``: whether the
        task's sequences have a local memory (language models; translation: no)."""
        if not local and not self.without_local:
            raise ValueError(self._no_local_error())
        if self.needs_dim(options) and dim is None:
            raise ValueError(f"--eval-memory {self.name} scales similarities by 1/√d: the key dimension is needed")

        def terms(recipe: Iterable[TermOf]) -> Tuple[Term, ...]:
            recipe = tuple(recipe)
            kept = tuple(Term(t.part, t.scale.value(getattr(options, t.scale.option), dim)) for t in recipe
                         if local or t.part not in LOCAL)
            if recipe and not kept:
                raise ValueError(self._no_local_error())
            return kept

        recipe = self._recipe(options)
        joint = terms(self.joint) if self.joint else ()
        steps = tuple(Interpolation(terms(t), None, self.step_rule(options, dim)) if step.adaptive
                      else Interpolation(terms(t), self.value(options, step.weight))
                      for t, step in recipe if step is not None)
        return Composition(joint=joint, interpolations=steps)

    def _no_local_error(self) -> str:
        if any(t.part in LOCAL for terms, _ in self._recipe() for t in terms):
            return (f"--eval-memory {self.name} needs a local memory (the scored sequence's own earlier "
                    "positions), which this task does not have")
        return f"--eval-memory {self.name} is for language models, not for a task without a local memory"

    # -- text -----------------------------------------------------------------------------------
    def describe(self) -> str:
        """The composition in words (--help, logs), from the recipe."""
        if not self.joint and not self.steps:
            return "the model's own token distribution"

        def entries(terms: Tuple[TermOf, ...]) -> str:
            return " + ".join(f"{PART_TEXT.get(t.part, t.part)} at {t.scale.text()}" for t in terms)

        out = []
        if self.joint:
            out.append(f"one softmax over tokens and [{entries(self.joint)}] (Eq. 6)")
        for step in self.steps:
            if step.adaptive:
                out.append(f"interpolate λ(x) with [{entries(step.terms)}], {self.rule_text or 'λ per row'}")
                continue
            weight = SYMBOLS.get(step.weight, step.weight)
            text = f"interpolate {weight} with [{entries(step.terms)}]"
            out.append(text + (f" when {weight} > 0" if step.optional else ""))
        return "; then ".join(out)

    def flags(self, options, axes: Iterable[str]) -> str:
        """The flags that select ``options``: ``--eval-memory NAME``, the ``axes``, then every other option
        the composition reads (a step's weight before its scales)."""
        names = list(axes)
        for terms, step in self._recipe(options):
            weight = [step.weight] if step is not None and step.weight is not None else []
            for name in weight + [t.scale.option for t in terms]:
                if name not in names:
                    names.append(name)
        out = [f"--eval-memory {self.name}"]
        for name in names:
            value = self.value(options, name)
            out.append(f"{flag(name)} {value if isinstance(value, int) else format(value, 'g')}")
        return " ".join(out)


#: name -> the record of every registered mode, in registration order
REGISTRY: Dict[str, Mode] = {}


def register_mode(cls):
    """Class decorator: register the :class:`Mode` subclass ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} names no mode")
    if cls.name in REGISTRY:
        raise ValueError(f"evaluation mode '{cls.name}' registered twice")
    mode = cls()
    unknown = set(mode.axes + mode.decoding_axes) - mode.options
    unknown |= set(mode.flag_defaults) - mode.options
    if unknown:
        raise ValueError(f"mode '{cls.name}' tunes options it does not read: {sorted(unknown)}")
    REGISTRY[cls.name] = mode
    return cls


def mode_names() -> Tuple[str, ...]:
    return tuple(REGISTRY)


def mode_of(name: str) -> Mode:
    """The record of mode ``name``; a clear error for an unknown one."""
    mode = REGISTRY.get(name)
    if mode is None:
        raise ValueError(f"unknown --eval-memory '{name}', choose one of {mode_names()}")
    return mode


def mode_help(names: Iterable[str]) -> str:
    """``--eval-memory``'s help: each mode's name, what it is and its composition (:meth:`Mode.describe`)."""
    return "; ".join(f"{name} ({REGISTRY[name].help}: {REGISTRY[name].describe()})" for name in names)


def modes_where(test) -> Tuple[str, ...]:
    """Names of the registered modes whose record passes ``test``."""
    return tuple(name for name, mode in REGISTRY.items() if test(mode))
