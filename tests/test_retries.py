"""Which failures a stage task retries: what a retry can fix, wherever it sits in the exception's chain."""

from __future__ import annotations

import errno

import pytest

from flows.retries import StageTimeout, is_transient
from tasks.errors import DataError


@pytest.mark.parametrize(("exc", "training", "retried"), [
    (OSError(errno.EIO, "I/O error"), False, True),
    (OSError(errno.ESTALE, "stale file handle"), False, True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), False, True),
    (TimeoutError("read timed out"), False, True),
    (OSError(errno.ENOSPC, "No space left on device"), False, False),
    (OSError(errno.EROFS, "read-only file system"), False, False),
    (FileNotFoundError(errno.ENOENT, "missing"), False, False),
    (ValueError("bad value"), False, False),
    (RuntimeError("torchrun exited with code 1"), False, False),
    (DataError("bad row"), False, False),
    (StageTimeout("stage evaluate-lm ran past its time limit"), False, True),
    (StageTimeout("stage pretrain ran past its time limit"), True, False),
])
def test_only_what_can_succeed_is_retried(exc: BaseException, training: bool, retried: bool) -> None:
    assert is_transient(exc, training) is retried


def test_library_errors_are_classified_by_what_they_wrap() -> None:
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    assert is_transient(torch.OutOfMemoryError("CUDA out of memory")) is False
    assert is_transient(MlflowException("API request failed", error_code=INTERNAL_ERROR)) is True
    assert is_transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)) is False
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("the hub could not be reached") from inner
    except RuntimeError as outer:
        assert is_transient(outer) is True


def test_a_data_set_logged_by_another_run_at_the_same_moment_is_retried_and_linked() -> None:
    """MLflow looks a data set up, then inserts it: two runs at once on a server over PostgreSQL collide on its key
    (seen in tests/e2e/test_team_stack.py). ``log_inputs`` tries again, and only for that refusal."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import log_inputs

    class Store:  # answers like the tracking server: the first call loses the race
        def __init__(self, refusal: str):
            self.calls, self.refusal = 0, refusal

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:
                raise MlflowException(self.refusal)

    raced = Store('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                  '"dataset_pk"')
    log_inputs(raced, "run", [])
    assert raced.calls == 2
    other = Store("BAD_REQUEST: run 'run' is not active")
    with pytest.raises(MlflowException, match="not active"):
        log_inputs(other, "run", [])
    assert other.calls == 1
