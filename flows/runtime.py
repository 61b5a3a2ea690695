"""Embedded defaults for running without any server: Prefect's local API and MLflow on SQLite.

Must run before ``prefect`` or ``mlflow`` is imported; anything already set in the environment wins.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def configure(workspace: str | Path) -> dict[str, str]:
    """Point Prefect's home into the workspace, switch analytics off, default MLflow to ``./mlflow.db``."""
    ws = Path(workspace).resolve()
    defaults = {
        "PREFECT_HOME": str(ws / "prefect"),
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
