"""When a stage is retried, and how long it may run.

Prefect retries a stage task only for what a retry can fix (``retry_transient``): connections, timeouts and
transient OS errors, wherever they sit in the exception's chain; never a user error, out-of-memory, a full disk,
or a training stage past its time limit, and nothing once the process has been told to stop. Each stage has a time
limit from the run's config (``time_limit``); past it the stage fails with ``StageTimeout``.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from tasks import interrupts
from tasks.config import PipelineConfig
from tasks.errors import LlmpipeError

# OSError numbers worth a retry: the network, a busy or stale file (NFS), an interrupted or failed read. A full
# disk (ENOSPC, EDQUOT), a read-only file system, a missing file or a permission error fails the same way again.
TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET,
                    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH,
                    errno.ENETDOWN, errno.ESTALE}


def _library_transient(exc: BaseException) -> bool | None:
    """Transient error types of the libraries the stages call (HTTP clients, MLflow, SQLAlchemy); None: unknown."""
    modules = sys.modules
    if (httpx := modules.get("httpx")) and isinstance(exc, httpx.TransportError):
        return True
    if (httpx := modules.get("httpx")) and isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
    if (requests := modules.get("requests")) and isinstance(exc, requests.exceptions.ConnectionError
                                                            | requests.exceptions.Timeout):
        return True
    if (mlflow_exc := modules.get("mlflow.exceptions")) and isinstance(exc, mlflow_exc.MlflowException):
        # A server that answers 500, 503 or 429, or none at all (INTERNAL_ERROR after MLflow's own retries).
        return exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED") or None
    if (sa_exc := modules.get("sqlalchemy.exc")) and isinstance(exc, sa_exc.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)  # SQLite under a concurrent writer
    return None


def is_transient(exc: BaseException, training: bool = False) -> bool:
    """Whether a stage that failed with ``exc`` can succeed on a retry: connections, timeouts and transient OS
    errors, wherever they sit in the exception's chain; never a user error, out-of-memory (training stages
    shrink their own micro-batch), a full disk, a plain ``ValueError``, or a training stage past its time limit."""
    import torch

    if isinstance(exc, LlmpipeError | torch.OutOfMemoryError):
        return False
    if isinstance(exc, StageTimeout):
        return not training
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        verdict = _library_transient(exc)
        if verdict is not None:
            return verdict
        if isinstance(exc, TimeoutError | ConnectionError):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry what ``is_transient``; nothing once the process has been told to stop
    (SIGTERM, Ctrl-C)."""
    if interrupts.terminating():
        return False
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc, training="training" in (getattr(task, "tags", None)
                                                                                        or ()))


class StageTimeout(TimeoutError):
    """A stage ran past its time limit (``runtime.stage_timeout_s``, or a training stage's budget plus margin)."""


def time_limit(name: str, cfg: PipelineConfig) -> tuple[float, str]:
    """The stage's time limit and the settings it comes from."""
    train = {"pretrain": cfg.pretrain, "finetune": cfg.finetune}.get(name)
    if train is None:
        return cfg.runtime.stage_timeout(name), "runtime.stage_timeout_s"
    setting = f"{name}.max_time_s + runtime.timeout_margin_s" if train.max_time_s else "runtime.training_timeout_s"
    return cfg.runtime.stage_timeout(name, train), setting
