"""A stop asked for by a signal (Ctrl-C, SIGTERM) stays asked for until the campaign ends.

The signal handler raises KeyboardInterrupt in the main thread at its next bytecode, which may
be inside a finalizer or a callback whose exceptions Python or Ray ignore; the campaign then
ran on as if never interrupted. The runner checks this flag at every Tune step and around each
wave, so the interrupt is raised again where it cannot be lost.
"""
from __future__ import annotations

import threading

_REQUESTED = threading.Event()


def request() -> None:
    """Called by the CLI's signal handler."""
    _REQUESTED.set()


def clear() -> None:
    """A new campaign starts with no stop requested."""
    _REQUESTED.clear()


def requested() -> bool:
    return _REQUESTED.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested."""
    if _REQUESTED.is_set():
        raise KeyboardInterrupt
