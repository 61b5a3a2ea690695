"""Test environment: offline hub, throwaway Prefect home and MLflow store, one torch thread, and the chain of stages
as layered session fixtures (``chain`` -> ``lm`` -> ``labeled`` -> ``classifier``), each built once per test
process on the tiny preset. The leak guard and the shuffled order are ``tests/guard.py``."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="llmpipe-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as flows.runtime sets it for the CLI
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"

import pytest  # noqa: E402

from tasks import finetune  # noqa: E402
from tasks.artifacts import CheckpointRef, LabeledRef, Workspace  # noqa: E402
from tasks.config import PipelineConfig  # noqa: E402

# One torch thread in every test process: pytest-xdist runs a worker per core, and a serial run (-n 0) then
# computes exactly what a worker does.
from tasks.training import set_threads  # noqa: E402
from tests.support import SHARED_DATA, Chain, build_chain, tiny_config  # noqa: E402

set_threads(1)

pytest_plugins = ["tests.guard"]


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> PipelineConfig:
    return tiny_config(tmp_path / "ws")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """An empty workspace."""
    return Workspace(tmp_path / "ws")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (set LLMPIPE_SHARED_DATA)")
    return SHARED_DATA


# ---------------------------------------------------------------------------------------------- the chain, once
# Built once per test process and shared by every test file it runs: a test may add artifacts to the chain's
# workspace, never change or remove one (copy it first).


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> Chain:
    """The tiny corpus, its trained tokenizer and its token files."""
    return build_chain(tmp_path_factory.mktemp("chain") / "ws")


@pytest.fixture(scope="session")
def lm(chain: Chain) -> CheckpointRef:
    """The tiny LM pretrained on ``chain`` (20 steps: it learns little)."""
    return chain.pretrain()


@pytest.fixture(scope="session")
def labeled(chain: Chain) -> LabeledRef:
    """The built-in sentiment set at the tiny size: 200 training rows, 40 validation, 40 test."""
    return chain.labeled()


@pytest.fixture(scope="session")
def classifier(chain: Chain, lm: CheckpointRef, labeled: LabeledRef) -> CheckpointRef:
    """A classifier fine-tuned from ``lm`` on ``labeled`` (20 steps)."""
    cfg = chain.cfg
    return finetune.finetune(lm, labeled, cfg.finetune, chain.ws, cfg.seed)


@pytest.fixture(scope="module")
def harness():
    """Prefect's test server for the flows of one test module. Not for the session: while it is up, every Prefect
    call in the process goes to it, and tests elsewhere check what happens without a Prefect API."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ---------------------------------------------------------------------------------------------- process state


@pytest.fixture(autouse=True)
def _no_global_tracking_uri():
    """A test that calls mlflow.set_tracking_uri would redirect every later test's MLflow calls; undo it."""
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None


@pytest.fixture
def restore_environ():
    """For a test whose library changes ``os.environ`` on its own (Dask's nanny sets thread and malloc variables
    for the workers it spawns): the environment is put back exactly afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
