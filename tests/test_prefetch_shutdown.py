"""An abandoned fairseq prefetch thread must not abort the process at exit (CI saw fairseq-train end with -6
after its work was done: ``terminate called without an active exception``)."""

import subprocess
import sys

import torch
from fairseq.data.iterators import BufferedIterator

from trime_fairseq.data.prefetch_shutdown import stop_prefetch_threads

# a source whose items run torch code that releases the GIL, as collating a batch does
SCRIPT = """
import sys, torch
from fairseq.data.iterators import BufferedIterator
if sys.argv[1] == "plugin":
    import trime_fairseq
class Source:
    def __len__(self): return 1000
    def __iter__(self):
        for _ in range(1000):
            a = torch.randn(300, 300)
            for _ in range(20):
                a = torch.tanh(a @ a)
            yield a
it = BufferedIterator(100, Source())
next(it)  # abandoned here, as --max-valid-steps abandons validation; the thread goes on fetching
"""


class _Slow:
    def __len__(self):
        return 500

    def __iter__(self):
        for _ in range(500):
            yield torch.tanh(torch.randn(200, 200) @ torch.randn(200, 200))


def test_stop_prefetch_threads_joins_an_abandoned_consumer():
    it = BufferedIterator(3, _Slow())
    next(it)
    consumer = it._consumer
    assert consumer.is_alive()
    assert stop_prefetch_threads(timeout=30) >= 1
    assert not consumer.is_alive()
    assert consumer.count < 500  # stopped early, not run to the end of its source


def test_process_with_an_abandoned_prefetch_thread_exits_cleanly():
    def run(mode):
        return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    with_plugin = run("plugin")
    assert with_plugin.returncode == 0 and "terminate called" not in with_plugin.stderr, with_plugin.stderr[-2000:]
    # the control: without the plugin's exit hook the same program aborts (fairseq 0.12's behaviour); if a future
    # fairseq fixes it, this line says the hook may go
    without = run("bare")
    assert without.returncode != 0 and "terminate called" in without.stderr, (without.returncode, without.stderr[-500:])
