"""The log bridge: what a stage logs to the ``llmpipe`` logger goes to the Prefect run logger of its task (and so
to the console and the UI), redacted."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect.logging import get_run_logger

from tasks.redact import redact


class ToRunLogger(logging.Handler):
    """Sends the stage's ``llmpipe`` log records, from this task's thread only, to the Prefect run logger."""

    def __init__(self, run_logger: Any):
        super().__init__(logging.INFO)
        self.run_logger, self.thread = run_logger, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.run_logger.log(record.levelno, redact(record.getMessage()))


_STAGE_LOGGING = threading.Lock()
_stages_logging: list[tuple[int, bool]] = []  # the llmpipe logger's (level, propagate) before the first running stage


@contextlib.contextmanager
def _stage_logging() -> Iterator[logging.Logger]:
    """The ``llmpipe`` logger at INFO and not propagating while any stage runs, as it was once none does. Stages
    run in several threads at once (the tokenize shards), so the first to start saves the logger's settings and
    the last to end puts them back."""
    stage_logger = logging.getLogger("llmpipe")
    with _STAGE_LOGGING:
        if not _stages_logging:
            saved = (stage_logger.level, stage_logger.propagate)
            if stage_logger.level == logging.NOTSET or stage_logger.level > logging.INFO:
                stage_logger.setLevel(logging.INFO)
            stage_logger.propagate = False  # the run logger shows each record; the root logger would repeat it
        else:
            saved = _stages_logging[0]
        _stages_logging.append(saved)
    try:
        yield stage_logger
    finally:
        with _STAGE_LOGGING:
            _stages_logging.pop()
            if not _stages_logging:
                stage_logger.setLevel(saved[0])
                stage_logger.propagate = saved[1]


def with_run_logs(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        handler = ToRunLogger(get_run_logger())
        with _stage_logging() as stage_logger:
            stage_logger.addHandler(handler)
            try:
                return fn(*args, **kwargs)
            finally:
                stage_logger.removeHandler(handler)

    return wrapper
