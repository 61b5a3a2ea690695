"""The embedded defaults: the registry `llmpipe run` writes, found and never created; the watcher that stops
Prefect's temporary API."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="start times come from /proc (Linux)")
def test_temporary_api_guard_stops_the_server_it_was_given_and_nothing_else() -> None:
    # `python -m flows.runtime guard PARENT SERVER START`: a PARENT that is not our parent counts as dead.
    from flows.runtime import _start_time

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        guard = [sys.executable, "-m", "flows.runtime", "guard", "0", str(victim.pid)]
        # A later process reusing the number (another start time) is left alone.
        subprocess.run([*guard, "1"], check=True, timeout=60)
        assert victim.poll() is None
        subprocess.run([*guard, _start_time(victim.pid)], check=True, timeout=60)
        assert victim.wait(timeout=5) == -signal.SIGTERM
    finally:
        victim.kill()
        victim.wait()


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

    def refuse(*args, **kwargs):
        raise RuntimeError("no server here")

    monkeypatch.setattr("prefect.client.orchestration.get_client", refuse)
    ready = runtime.start_backends(tmp_path / "ws")
    with pytest.raises(RuntimeError, match="no server here"):
        ready()
