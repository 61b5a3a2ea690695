"""Test environment: offline hub, throwaway Prefect home and MLflow store, tiny configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="llmpipe-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"

import pytest  # noqa: E402

from tasks.config import PipelineConfig, load_config  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # tests share the cores with another worker: one torch thread each
    from tasks.training import set_threads  # noqa: E402

    set_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LLMPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))

def tiny_config(workspace: Path, *overrides: str) -> PipelineConfig:
    """A config small enough that the whole chain runs in seconds."""
    return load_config("tiny", [f"workspace={workspace}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> PipelineConfig:
    return tiny_config(tmp_path / "ws")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (set LLMPIPE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_global_tracking_uri():
    """A test that calls mlflow.set_tracking_uri would redirect every later test's MLflow calls; undo it."""
    yield
    import sys

    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None
