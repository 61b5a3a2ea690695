"""Embedded defaults for running without any server: Prefect's local API and MLflow on SQLite; quiet libraries.

Must run before ``prefect`` or ``mlflow`` is imported; anything already set in the environment wins.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from tasks.errors import LlmpipeError
from tasks.redact import redact

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def profile_api_url() -> str | None:
    """The API URL of the user's active Prefect profile (``prefect config set PREFECT_API_URL=...``), if any."""
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


# Library output that is for developers, not for someone running the pipeline: off unless ``--verbose``.
QUIET = {
    "TRANSFORMERS_VERBOSITY": "error",  # load reports and advice on every from_pretrained
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Started monitoring system metrics", "Creating initial MLflow database ..."
}
# Progress bars of libraries: they would tear the live display, and write carriage returns into logs.
NO_PROGRESS_BARS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def library_output(verbose: bool = False, live: bool = False, terminal: bool = False) -> None:
    """Environment defaults for what libraries print: no progress bars of their own, no INFO chatter unless
    ``verbose``; on a live display (``live``) Prefect's console shows warnings and errors only (every record
    still reaches the Prefect API and UI); off a terminal no colours."""
    defaults = dict(NO_PROGRESS_BARS)
    if not verbose:
        defaults.update(QUIET)
        if live:
            defaults["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    if not terminal:
        defaults["PREFECT_LOGGING_COLORS"] = "false"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def configure(workspace: str | Path, verbose: bool = False, live: bool = False,
              terminal: bool = False) -> dict[str, str]:
    """Point Prefect's home into the workspace, switch analytics off, default MLflow to ``./mlflow.db``, and
    set what libraries print (``library_output``).

    A Prefect server the user chose, in the environment or the active profile, is kept: then
    Prefect's home stays where it is.
    """
    ws = Path(workspace).resolve()
    uses_server = bool(os.environ.get("PREFECT_API_URL") or profile_api_url())
    defaults = {
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect")) if uses_server
        else str(ws / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",  # Prefect's client-side analytics too (and its first-run notice on a terminal)
        # The temporary local API takes 15-40 s to start on a small, busy machine; 20 s is too tight.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_TRACKING_URI": DEFAULT_TRACKING_URI,
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    library_output(verbose, live, terminal)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in defaults}


class NoRegistry(LlmpipeError):
    """No MLflow store where ``llmpipe run`` would have written one; ``where`` says where it looked."""

    def __init__(self, where: str):
        self.where = where
        super().__init__(f"no MLflow registry found: {where}; run llmpipe run here first or set MLFLOW_TRACKING_URI")


def find_registry(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """The tracking URI of the MLflow store ``llmpipe run`` in ``cwd`` writes to: ``MLFLOW_TRACKING_URI``, else
    ``./mlflow.db`` (``DEFAULT_TRACKING_URI``), as an absolute URI; ``NoRegistry`` when that store, or the one
    ``MLFLOW_REGISTRY_URI`` names, does not exist. Nothing is created: MLflow's SQLite and file stores would
    create themselves, empty, on first use."""
    from tasks.gc import existing_store, find_tracking_uri

    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    uri = find_tracking_uri(dict(environ), cwd)
    registry = environ.get("MLFLOW_REGISTRY_URI", "").strip()
    if uri is not None and registry and not existing_store(registry):
        raise NoRegistry(f"MLFLOW_REGISTRY_URI={redact(registry)} names no existing store")
    if uri is not None:
        return uri
    env_uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        raise NoRegistry(f"MLFLOW_TRACKING_URI={redact(env_uri)} names no existing store (looked in {cwd.resolve()})")
    raise NoRegistry(f"MLFLOW_TRACKING_URI is not set and ./mlflow.db does not exist (looked in {cwd.resolve()})")


_MARKS: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """Note that a phase of ``llmpipe run`` just ended, when ``LLMPIPE_TIMINGS`` names a file to write the
    phases to (``benchmarks/overhead.py`` reads it)."""
    if os.environ.get("LLMPIPE_TIMINGS"):
        _MARKS.append((phase, time.time()))


def write_marks() -> None:
    """Write the phases noted by ``mark`` as JSON ``[[phase, unix time], ...]`` to ``LLMPIPE_TIMINGS``."""
    path = os.environ.get("LLMPIPE_TIMINGS")
    if path:
        import json

        Path(path).write_text(json.dumps(_MARKS))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created if missing) while the block runs."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_backends(workspace: str | Path) -> Callable[[], None]:
    """Start the local backends of a run, side by side with what the caller does next; returns ``ready()``,
    which creates the local MLflow store, waits for Prefect's API and raises what starting it raised.

    Prefect's temporary local API (when no API is set) starts in a thread at once: its server process needs
    seconds to come up, and the run's own imports fill them. Both backends run database migrations on first use,
    each under a lock file of the workspace, so two ``llmpipe run`` started together on one folder do not race to
    migrate the same SQLite files.

    ``prefect`` itself is imported here, before the thread starts: two threads importing the package at once can
    meet in its import-time plugin set-up and one of them fails with Python's "deadlock detected by _ModuleLock"
    (seen on ``llmpipe run``; the thread has to import it before it can start the server anyway).
    """
    import threading

    import prefect  # noqa: F401 - see above

    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    failed: list[BaseException] = []

    def start_api() -> None:
        try:
            with _locked(ws / "prefect-api.lock"):
                from prefect.client.orchestration import get_client

                get_client(sync_client=True)  # starts the temporary local API for this process
        except BaseException as exc:  # noqa: BLE001 - handed to ready(), which raises it in the caller's thread
            failed.append(exc)

    api = None
    if not (os.environ.get("PREFECT_API_URL") or profile_api_url()):
        guard_temporary_api()
        api = threading.Thread(target=start_api, name="llmpipe-prefect-api", daemon=True)
        api.start()

    def ready() -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith("sqlite:"):
            with _locked(ws / "mlflow-store.lock"):
                from mlflow import MlflowClient

                MlflowClient(uri).search_experiments(max_results=1)
        mark("mlflow store")
        if api is not None:
            api.join()
        mark("prefect api")
        if failed:
            raise failed[0]

    return ready


# Prefect's temporary API server: its command line names this app, and its environment, copied from the process that
# started it, holds that process's TEMPORARY_API_OWNER_ENV (pid and start time).
SERVER_APP = "prefect.server.api.server:create_app"
TEMPORARY_API_OWNER_ENV = "LLMPIPE_TEMPORARY_API_OWNER"


def guard_temporary_api() -> None:
    """Stop Prefect's temporary local API when this process dies without stopping it; call before it starts.

    Prefect stops the server at exit, but a process killed outright (``kill -9``, the kernel's OOM
    killer) runs no exit code, and the server would go on serving, orphaned, holding its memory and
    port night after night. A small watcher process outlives this one to take the server down. It tells
    this process's servers from any other by the owner mark in their environment, so a kill while the
    server is still starting is covered too, and another run's server is never touched.
    """
    owner = f"{os.getpid()}:{_start_time(os.getpid()) or '-'}"
    os.environ[TEMPORARY_API_OWNER_ENV] = owner  # the server Prefect starts copies this process's environment
    subprocess.Popen([sys.executable, "-m", "flows.runtime", "guard", str(os.getpid()), owner],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux); None where there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot, to tell it from a later process reusing the number."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (None: not known) and not a zombie."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the number now belongs to another user's process
        return False
    fields = _stat(pid)
    if fields is None:
        return started is None  # no /proc (not Linux): the signal check is all there is
    return fields[0] != "Z" and (started is None or fields[19] == started)


def _servers_of(owner: str) -> dict[int, str | None]:
    """Prefect temporary API servers whose environment carries ``owner``'s mark, with their start times."""
    mark = f"{TEMPORARY_API_OWNER_ENV}={owner}".encode()
    servers: dict[int, str | None] = {}
    if not Path("/proc").is_dir():  # not Linux: nothing to find them by
        return servers
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if SERVER_APP.encode() in (entry / "cmdline").read_bytes() and \
                    mark in (entry / "environ").read_bytes().split(b"\0"):
                servers[int(entry.name)] = _start_time(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return servers


def _guard(parent: int, owner: str, poll_s: float = 1.0) -> None:
    """Wait for ``parent`` to die, then stop the temporary API servers it owned (SIGTERM, then SIGKILL)."""
    # Signals meant for the run (Ctrl-C, a scheduler's SIGTERM to the group) must not end the watch early.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while os.getppid() == parent:  # re-parented once the parent is gone
        time.sleep(poll_s)
    servers = _servers_of(owner)
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        servers = {pid: started for pid, started in servers.items() if _alive(pid, started)}
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(_alive(pid, started) for pid, started in servers.items()) and time.monotonic() < deadline:
            time.sleep(0.1)


if __name__ == "__main__" and sys.argv[1:2] == ["guard"]:
    _guard(int(sys.argv[2]), sys.argv[3])
