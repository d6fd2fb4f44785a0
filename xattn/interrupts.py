"""Ctrl-C and SIGTERM held back while native code that calls into Python runs.

torch's exporters run C++ that calls back into Python; a signal handler raising KeyboardInterrupt (or the CLI's
Terminated) inside such a callback can end in ``std::terminate``: one interrupted export in six died with SIGABRT
and a native stack trace instead of "interrupted". Inside :func:`deferred_interrupts` the first signal is only
recorded (and said); it is raised when the block ends, so the command stops cleanly a little later. A second
Ctrl-C stops at once, for a user who would rather not wait.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

from xattn.errors import SIGNALLED, Terminated


@contextlib.contextmanager
def deferred_interrupts(what: str = "the exporter") -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():   # only the main thread gets signals
        yield
        return
    received: list[int] = []

    def record(signum, frame):
        received.append(signum)
        if len(received) == 1:
            print(f"interrupt received: stopping when {what} returns (Ctrl-C again to stop now)", file=sys.stderr,
                  flush=True)
            return
        restore()
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in watched}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    for s in watched:
        signal.signal(s, record)
    try:
        yield
    finally:
        restore()
        if received:
            if received[0] == signal.SIGTERM:
                SIGNALLED["signum"] = signal.SIGTERM
                raise Terminated()   # noqa: B012 - the interruption is what happened, whatever the block raised
            raise KeyboardInterrupt()   # noqa: B012
