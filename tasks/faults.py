"""Fault injection, to prove that retries and resume work: make a chosen stage fail once.

``LLMPIPE_FAULT`` holds comma-separated rules ``STAGE:KIND[@STEP]``:

- ``STAGE`` is a task name (``pretrain``, ``tokenize``, ``register``, ...);
- ``KIND`` is ``oserror`` (a transient I/O failure, retried), ``oom`` (out of memory: training
  halves its micro-batch and doubles accumulation), ``dataerror`` (a user error, never retried) or
  ``kill`` (SIGKILL of the whole process, as a preempted machine would);
- ``@STEP`` fires at that training step instead of at the start of the stage.

Each rule fires at most once per process, so a retry in the same process succeeds.
"""

from __future__ import annotations

import os
import signal
import threading

from tasks.errors import DataError

ENV = "LLMPIPE_FAULT"
_fired: set[str] = set()
_lock = threading.Lock()


def _rules() -> list[tuple[str, str, int | None, str]]:
    out = []
    for raw in filter(None, (r.strip() for r in os.environ.get(ENV, "").split(","))):
        stage, _, rest = raw.partition(":")
        kind, _, step = rest.partition("@")
        out.append((stage, kind or "oserror", int(step) if step else None, raw))
    return out


def check(stage: str, step: int | None = None) -> None:
    """Raise (or die) if a rule names this stage at this point and has not fired yet."""
    for rule_stage, kind, rule_step, raw in _rules():
        if rule_stage != stage or rule_step != step:
            continue
        with _lock:
            if raw in _fired:
                continue
            _fired.add(raw)
        where = f"{stage}" + (f" at step {step}" if step is not None else "")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "oom":
            import torch

            raise torch.OutOfMemoryError(f"injected out-of-memory in {where} ({ENV}={raw})")
        if kind == "dataerror":
            raise DataError(f"injected data error in {where} ({ENV}={raw})")
        raise OSError(f"injected transient I/O failure in {where} ({ENV}={raw})")
