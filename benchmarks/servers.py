"""Real servers on loopback for end-to-end checks (the fault matrix here, ``tests/e2e``): a process in a session of
its own that Linux stops when the process that started it dies (even by ``kill -9``), waited for over HTTP, and
stopped with everything it started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tasks.distributed import die_with_parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    """This process's environment without Prefect's, MLflow's and llmpipe's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LLMPIPE_"))}


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """``cmd`` in a session of its own, output appended to ``log``; it gets SIGTERM when this process dies first."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen) -> None:
    """End a process started by ``start`` and everything it started (its session): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until ``url`` answers 200; an error with the log's tail if ``proc`` exits or time runs out first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def process(cmd: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``cmd`` started with this environment plus ``env``, ready once ``ready_url`` answers, stopped afterwards."""
    proc = start(cmd, {**os.environ, **(env or {})}, log)
    try:
        wait_http(ready_url, proc, log)
        yield proc
    finally:
        stop(proc)


class Postgres:
    """A throwaway PostgreSQL cluster: ``initdb`` into a folder of its own, ``pg_ctl`` serving it on a free loopback
    port (its unix socket in that folder), trust authentication for its one user; ``url`` creates a database and
    names it for a driver. PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` user
    (which the distribution's packages create) in a private temporary folder, removed on exit. Started and stopped
    at will (the data survives, as a restarted server's would). As a context manager: started, then stopped."""

    USER = "llmpipe"

    def __init__(self, root: Path):
        import pwd
        import tempfile

        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.owner = "postgres" if os.geteuid() == 0 else None
        if self.owner:
            try:
                account = pwd.getpwnam(self.owner)
            except KeyError:
                raise RuntimeError("PostgreSQL does not run as root and there is no 'postgres' user to run it as: "
                                   "run as another user, or create one (useradd postgres)") from None
            self.home = Path(tempfile.mkdtemp(prefix="llmpipe-postgres-"))
            os.chown(self.home, account.pw_uid, account.pw_gid)
        else:
            self.home = root
        self.data, self.log = self.home / "data", self.home / "postgres.log"
        self._run(["initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust", "--encoding=UTF8", "--no-sync"])

    def _run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner else []
        return subprocess.run(prefix + cmd, capture_output=True, text=True, env=base_env(), **kw)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.home} -c max_connections=200"
        done = self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                          "start"])
        if done.returncode:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (sessions ended, a clean shutdown) or ``immediate`` (as a crash)."""
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])

    def psql(self, database: str, query: str) -> str:
        """The result of ``query`` in ``database``, unaligned, without headers."""
        done = self._run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, "-d", database, "-tAc",
                          query], check=True)
        return done.stdout.strip()

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        """``database`` (created if missing) as a SQLAlchemy URL: ``postgresql+psycopg2`` (MLflow's) or
        ``postgresql+asyncpg`` (Prefect's)."""
        if not self.psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{database}'"):
            self.psql("postgres", f'CREATE DATABASE "{database}"')
        return f"{driver}://{self.USER}@127.0.0.1:{self.port}/{database}"

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        self.stop()
        if self.owner:
            shutil.rmtree(self.home, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on a store (a SQLite file in ``root`` unless ``backend_uri`` names another, e.g.
    PostgreSQL) with a local artifact root (proxied over HTTP), on a free port; started and stopped at will, the
    store survives. As a context manager: started, and its URL."""

    def __init__(self, root: Path, backend_uri: str | None = None):
        self.root, self.proc, self.port = root, None, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> str:
        """Serve on the port of the first start (clients keep their URL across a restart); the URL."""
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1"]
        self.proc = start(cmd, base_env(), self.root / "mlflow.log", self.root)
        wait_http(f"{self.url}/health", self.proc, self.root / "mlflow.log")
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PrefectServer:
    """``prefect server start`` on a free loopback port with a home of its own (its database a SQLite file there
    unless ``database_url`` names another, e.g. PostgreSQL; ``server_settings``: more of the server's environment);
    ``env`` (with ``settings``) points clients (the CLI, workers) at it, and ``start`` runs more processes (workers,
    ``llmpipe serve``) that stop with it."""

    def __init__(self, root: Path, database_url: str | None = None, server_settings: dict[str, str] | None = None,
                 **settings: str):
        self.root, self.database_url, self.server_settings = root, database_url, server_settings or {}
        root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}/api"
        self.env = {**base_env(), "PREFECT_API_URL": self.url, "PREFECT_HOME": str(root / "client-home"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **settings}
        self.procs: list[subprocess.Popen] = []  # started beside the server (workers, `llmpipe serve`)
        self.server: subprocess.Popen | None = None

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Path:
        """``cmd`` with ``env`` (default: the clients'), output in ``<root>/<name>.log``."""
        log = self.root / f"{name}.log"
        self.procs.append(start(cmd, env or self.env, log, cwd or self.root))
        return log

    def start_server(self) -> None:
        """``prefect server start`` on this server's port and database (again after ``stop_server``)."""
        port = self.url.split(":")[-1].split("/")[0]
        server_env = {**base_env(), "PREFECT_HOME": str(self.root / "server-home"),
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
                      **({"PREFECT_API_DATABASE_CONNECTION_URL": self.database_url} if self.database_url else {}),
                      **self.server_settings}
        log = self.root / "server.log"
        self.server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port,
                             "--no-ui"], server_env, log, self.root)
        wait_http(f"{self.url}/health", self.server, log)

    def stop_server(self) -> None:
        """Stop the server alone (SIGTERM, as a restart would); the processes started beside it go on."""
        stop(self.server)

    def __enter__(self) -> PrefectServer:
        try:
            self.start_server()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        if self.server is not None:
            stop(self.server)
