"""The embedded defaults: the registry `llmpipe run` writes, found and never created; the watcher that stops
Prefect's temporary API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A parent (the CLI) that starts the guard and two look-alike servers, one carrying its owner mark (as the server
# Prefect starts copies the CLI's environment) and one not (another run's), then waits to be killed.
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from flows.runtime import SERVER_APP, TEMPORARY_API_OWNER_ENV, guard_temporary_api
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", SERVER_APP]
    other = subprocess.Popen(sleeper, env={**os.environ, TEMPORARY_API_OWNER_ENV: "1:1"})
    guard_temporary_api()
    ours = subprocess.Popen(sleeper)
    print(ours.pid, other.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard finds servers in /proc (Linux)")
def test_temporary_api_guard_stops_the_servers_its_parent_started_and_nothing_else() -> None:
    from flows.runtime import _alive  # a live process, not a zombie waiting to be reaped

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    ours, other = map(int, parent.stdout.readline().split())
    try:
        parent.kill()  # kill -9: no exit code of the parent runs
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(ours, None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(ours, None), "the parent's server outlived it"
        assert _alive(other, None), "another run's server was stopped"
    finally:
        for pid in (ours, other):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_find_registry_takes_the_store_llmpipe_run_writes(tmp_path: Path) -> None:
    from flows import runtime

    with pytest.raises(runtime.NoRegistry, match=r"\./mlflow\.db does not exist \(looked in "):
        runtime.find_registry({}, tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mlflow.db").write_bytes(b"")  # what `llmpipe run` leaves in its folder
    here = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runtime.find_registry({}, tmp_path) == here
    assert runtime.find_registry({"MLFLOW_TRACKING_URI": runtime.DEFAULT_TRACKING_URI}, tmp_path) == here
    assert runtime.find_registry({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, tmp_path) == "http://127.0.0.1:5000"
    with pytest.raises(runtime.NoRegistry, match="MLFLOW_REGISTRY_URI=sqlite:///elsewhere.db names no existing"):
        runtime.find_registry({"MLFLOW_REGISTRY_URI": "sqlite:///elsewhere.db"}, tmp_path)


def test_start_backends_creates_the_mlflow_store_and_hands_a_failed_api_start_to_the_caller(
        tmp_path: Path, monkeypatch) -> None:
    """With an API set, no temporary API starts and ready() creates the SQLite store; a failure starting
    Prefect's API in the background thread is raised by ready(), in the caller's thread."""
    import sqlite3
    import threading

    from flows import runtime

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    before = threading.active_count()
    ready = runtime.start_backends(tmp_path / "ws")
    assert threading.active_count() == before  # an API is set: nothing to start
    ready()
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("select count(*) from experiments").fetchone()[0] >= 1

    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setattr(runtime, "profile_api_url", lambda: None)
    monkeypatch.setattr(runtime, "guard_temporary_api", lambda: None)  # no server will start to guard

    def refuse(*args, **kwargs):
        raise RuntimeError("no server here")

    monkeypatch.setattr("prefect.client.orchestration.get_client", refuse)
    ready = runtime.start_backends(tmp_path / "ws")
    with pytest.raises(RuntimeError, match="no server here"):
        ready()
