"""``--eval-memory none``: the model's own token distribution (the plain point of every grid)."""

from trime_fairseq.memory.modes.registry import Mode, register_mode


@register_mode
class NoMemory(Mode):
    name = "none"
    help = "plain LM"
    without_local = True
