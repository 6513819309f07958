"""Ctrl-C handling: one mechanism that notes a SIGINT and either passes it on at once or holds it for a moment.

A run watches for SIGINT so that it can tell an interrupted run (resumable)
from one that failed; a DataLoader iterator holds a first SIGINT until the
batch being received has arrived, because an interrupt in the middle of that
socket handshake leaves a worker's resource-sharer thread broken.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class SigintState:
    """What :func:`catch_sigint` saw: ``received`` is set by any SIGINT; ``held`` while one waits for the block's end."""

    received: threading.Event = field(default_factory=threading.Event)
    held: bool = False


@contextlib.contextmanager
def catch_sigint(hold: bool = False) -> Iterator[SigintState]:
    """Note every SIGINT in the block; hand it to the previous handler at once, or with ``hold`` when the block ends.

    With ``hold`` a second SIGINT is not held: it goes to the previous handler
    at once, so a stuck worker can never make Ctrl-C useless. Outside the main
    thread (where Python cannot install handlers) nothing is installed and the
    state stays empty.
    """
    state = SigintState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        state.received.set()
        if hold and not state.held:
            state.held = True
            return
        _deliver(previous, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
        if state.held:  # also when the block raised (the epoch's last batch ends in StopIteration)
            _deliver(previous, None)


def _deliver(handler, frame) -> None:
    """Act on SIGINT as ``handler`` (a Python handler, SIG_DFL or SIG_IGN) would."""
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt


def ignore_sigint(worker_id: int = 0) -> None:
    """Ignore SIGINT in this process for good (DataLoader workers leave Ctrl-C to the main process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
