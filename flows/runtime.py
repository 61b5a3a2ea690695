"""Embedded defaults for running without any server: Prefect's local API and MLflow on SQLite.

Must run before ``prefect`` or ``mlflow`` is imported; anything already set in the environment wins.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

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


def configure(workspace: str | Path) -> dict[str, str]:
    """Point Prefect's home into the workspace, switch analytics off, default MLflow to ``./mlflow.db``.

    A Prefect server the user chose, in the environment or the active profile, is kept: then
    Prefect's home stays where it is.
    """
    ws = Path(workspace).resolve()
    uses_server = bool(os.environ.get("PREFECT_API_URL") or profile_api_url())
    defaults = {
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect")) if uses_server
        else str(ws / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The temporary local API takes 15-40 s to start on a small, busy machine; 20 s is too tight.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_TRACKING_URI": DEFAULT_TRACKING_URI,
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in defaults}


def prepare_backends(workspace: str | Path) -> None:
    """Create the local MLflow store and start Prefect's local API under a lock.

    Both run database migrations on first use; two ``llmpipe run`` started together on one folder
    would otherwise race to migrate the same SQLite files.
    """
    import fcntl

    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    with open(ws / "backends.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            uri = os.environ.get("MLFLOW_TRACKING_URI", "")
            if uri.startswith("sqlite:"):
                from mlflow import MlflowClient

                MlflowClient(uri).search_experiments(max_results=1)
            if not (os.environ.get("PREFECT_API_URL") or profile_api_url()):
                from prefect.client.orchestration import get_client

                get_client(sync_client=True)  # starts the temporary local API for this process
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
