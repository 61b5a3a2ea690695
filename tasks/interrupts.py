"""Termination signals that cannot land in the middle of a database write.

A SIGTERM or Ctrl-C raises its exception wherever the main thread happens to be. Inside an MLflow call on a
SQLite store that can be half-way through a transaction: the connection is dropped with its write lock held,
the cleanup that marks the run FAILED then meets ``database is locked``, and that error replaces the signal,
so the stage looks like a transient failure and is retried instead of stopping. ``shielded()`` defers the
signal to the end of such a call; ``install()`` wraps the process's SIGTERM and SIGINT handlers so they
honour it. Once a termination signal has arrived, ``terminating()`` is true and nothing should be retried.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

_TERMINATING = threading.Event()
_depth = 0  # shielded() nesting in the main thread, where Python runs signal handlers
_pending: list[tuple[Callable[..., Any], int]] = []


def terminating() -> bool:
    """True once this process has received SIGTERM or SIGINT (through an installed handler)."""
    return _TERMINATING.is_set()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Run the block whole: a termination signal arriving inside it takes effect when the block ends."""
    global _depth
    if not _main_thread():  # signal handlers only ever interrupt the main thread
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            handler, signum = _pending.pop(0)
            _pending.clear()
            handler(signum, None)  # raises the signal's exception (SystemExit, KeyboardInterrupt, ...)


def _deferring(previous: Callable[..., Any]) -> Callable[..., Any]:
    def handler(signum: int, frame: Any) -> None:
        _TERMINATING.set()
        if _depth:
            _pending.append((previous, signum))
            return
        previous(signum, frame)

    handler.llmpipe_wraps = previous  # type: ignore[attr-defined]
    return handler


@contextlib.contextmanager
def installed(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """``install()`` for the duration of the block; the handlers found are back afterwards."""
    before = {signum: signal.getsignal(signum) for signum in signums} if _main_thread() else {}
    install(signums)
    try:
        yield
    finally:
        for signum, handler in before.items():
            if handler is not None:
                signal.signal(signum, handler)


def install(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Wrap the current Python handlers of ``signums`` so that they mark the process as terminating and wait
    for the end of a ``shielded()`` block. Idempotent; a no-op outside the main thread and for signals with
    no Python handler (default or ignored)."""
    if not _main_thread():
        return
    for signum in signums:
        current = signal.getsignal(signum)
        if callable(current) and not hasattr(current, "llmpipe_wraps"):
            signal.signal(signum, _deferring(current))
