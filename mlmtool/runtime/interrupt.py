"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (cloud preemption).

The first signal asks the training loop to finish the current step, save a checkpoint
and exit non-zero with a hint to resume; a second Ctrl-C stops at once (the last
complete checkpoint stays the resume point, since orbax writes atomically).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM outside the training loop (``prepare``, ``tokenizer``, a train still starting):
    raised in the main thread so that every ``finally`` runs (temporary folders are removed,
    DIR's lock is released) before the command exits 143 with one line."""


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` for the duration (``graceful`` overrides it inside)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def graceful(announce=None) -> Iterator[StopRequest]:
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    if announce is None:
        from mlmtool.runtime.progress import err_console

        def announce(text: str) -> None:
            err_console.print(text, soft_wrap=True)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.signal_name is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop.signal_name = name
        announce(f"{name}: finishing this step and saving a checkpoint "
                 f"({'press Ctrl-C again to stop at once' if signum == signal.SIGINT else 'please wait'})")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
