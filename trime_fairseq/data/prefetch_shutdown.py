"""Stop fairseq's prefetch threads before the interpreter finalizes.

fairseq's ``BufferedIterator`` (``--data-buffer-size`` > 0, the default 10) fills its queue from a daemon
``BackgroundConsumer`` thread. An iterator abandoned before its end -- training stopped by
``--max-update`` inside an epoch, validation cut by ``--max-valid-steps`` -- leaves that thread fetching
batches. If the program then exits while the thread is inside torch code that released the GIL, Python
ends the thread as it asks for the GIL back, inside a C++ destructor, and the process aborts with
``terminate called without an active exception`` (exit status -6 / 134) after its work is done, which
fails any script that checks the exit status.

:func:`stop_prefetch_threads` runs at exit (``atexit`` runs before finalization, while daemon threads
still run normally): each live consumer is told to stop after its current item, its queue is drained
so that the item's ``put`` returns, and the thread is joined.
"""

import atexit
import logging
import queue
import threading
import time

from fairseq.data.iterators import BackgroundConsumer

logger = logging.getLogger(__name__)


def stop_prefetch_threads(timeout: float = 60.0) -> int:
    """Stop and join every live ``BackgroundConsumer``; returns how many were stopped."""
    consumers = [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive()]
    deadline = time.monotonic() + timeout
    for consumer in consumers:
        consumer._max_len = 0  # its loop breaks after the put of the item it is fetching now
    for consumer in consumers:
        while consumer.is_alive() and time.monotonic() < deadline:
            try:  # make room for the consumer's pending put (its item, then the end-of-data sentinel)
                consumer._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        consumer.join(timeout=max(0.0, deadline - time.monotonic()))
        if consumer.is_alive():
            logger.warning("a data prefetch thread did not stop within %.0f s; the process may abort at exit",
                           timeout)
    return len(consumers)


atexit.register(stop_prefetch_threads)
