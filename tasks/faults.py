"""Fault injection, to prove that retries, resume and the finite-loss check work: make a chosen stage fail once.

``LLMPIPE_FAULT`` holds comma-separated rules ``STAGE:KIND[@STEP]``:

- ``STAGE`` is a task name (``pretrain``, ``finetune``, ``tokenize``, ``register``, ...);
- ``KIND`` is one of

  - ``oserror`` (the default): ``OSError(EIO)``, a transient I/O failure, retried;
  - ``enospc``: ``OSError(ENOSPC)``, a full disk, which retrying does not fix (not retried);
  - ``oom``: ``torch.OutOfMemoryError``; training halves its micro-batch, doubles accumulation and resumes;
  - ``dataerror``: a user error (``DataError``), never retried;
  - ``kill``: SIGKILL of the whole process, as a preempted machine would;
  - ``nan``: the loss of training step ``STEP`` becomes NaN (its gradients too), so the engine's finite check
    skips the step or stops training (``max_skipped_steps``); needs ``@STEP``;

- ``@STEP`` fires at that training step instead of at the start of the stage; for ``register``, ``@1`` fires
  after the classifier's model version exists and before the gate gives it an alias.

Each rule fires at most once per process, so a retry in the same process succeeds (and a skipped step that
is tried again on the next batch is not poisoned twice). An unknown kind, or ``nan`` without a step, is a
``ConfigError`` wherever a rule is read.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

from tasks.errors import ConfigError, DataError

ENV = "LLMPIPE_FAULT"
KINDS = ("oserror", "enospc", "oom", "dataerror", "kill", "nan")
_fired: set[str] = set()
_lock = threading.Lock()


def _rules() -> list[tuple[str, str, int | None, str]]:
    out = []
    for raw in filter(None, (r.strip() for r in os.environ.get(ENV, "").split(","))):
        stage, _, rest = raw.partition(":")
        kind, _, step = rest.partition("@")
        kind = kind or "oserror"
        if kind not in KINDS:
            raise ConfigError(f"{ENV}={raw}: unknown fault kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "nan" and not step:
            raise ConfigError(f"{ENV}={raw}: a 'nan' fault needs the training step whose loss it poisons "
                              f"({stage}:nan@STEP)")
        out.append((stage, kind, int(step) if step else None, raw))
    return out


def _fire(stage: str, step: int | None, kinds: tuple[str, ...]) -> tuple[str, str] | None:
    """The first rule of one of ``kinds`` that names this stage at this point and has not fired yet, now fired."""
    for rule_stage, kind, rule_step, raw in _rules():
        if rule_stage != stage or rule_step != step or kind not in kinds:
            continue
        with _lock:
            if raw in _fired:
                continue
            _fired.add(raw)
        return kind, raw
    return None


def check(stage: str, step: int | None = None) -> None:
    """Raise (or die) if a rule names this stage at this point and has not fired yet (``nan`` rules are
    left to ``poison_loss``)."""
    fired = _fire(stage, step, tuple(k for k in KINDS if k != "nan"))
    if fired is None:
        return
    kind, raw = fired
    where = f"{stage}" + (f" at step {step}" if step is not None else "")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected out-of-memory in {where} ({ENV}={raw})")
    if kind == "dataerror":
        raise DataError(f"injected data error in {where} ({ENV}={raw})")
    if kind == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected in {where}, {ENV}={raw})")
    raise OSError(errno.EIO, f"injected transient I/O failure in {where} ({ENV}={raw})")


def poison_loss(stage: str, step: int) -> bool:
    """Whether training step ``step`` of ``stage`` must make its loss NaN (a ``nan`` rule, fired now)."""
    return _fire(stage, step, ("nan",)) is not None
