"""A team's stack: a Prefect server and an MLflow tracking server both on PostgreSQL (a throwaway cluster), MLflow
proxying artifacts, two workers sharing one workspace, and several runs created at once through the API."""

from __future__ import annotations

import collections
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.servers import MlflowServer, Postgres, PrefectServer
from tests.e2e.test_workers import Stack, _final
from tests.support import mini_config, wait_until

pytestmark = pytest.mark.slow

MODEL = "team-model"


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[tuple[Stack, Postgres, Path]]:
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("team-stack")
    with Postgres(root / "postgres") as pg:
        artifacts = root / "mlflow"
        with MlflowServer(artifacts, backend_uri=pg.url("mlflow")) as tracking_uri, \
                PrefectServer(root / "prefect", database_url=pg.url("prefect", "postgresql+asyncpg"),
                              MLFLOW_TRACKING_URI=tracking_uri, PREFECT_RUNNER_POLL_FREQUENCY="2") as server:
            try:
                with temporary_settings({PREFECT_API_URL: server.url}):
                    yield Stack(server, tracking_uri), pg, artifacts / "artifacts"
            finally:
                EventsWorker.drain_all(timeout=30)


_workers: dict[str, list[Path]] = {}


def _deployed(stack: Stack) -> list[Path]:
    """The deployments (the mini preset, this module's model name) and two workers on the gpu pool sharing one
    workspace, once per module; their logs."""
    if "logs" not in _workers:
        ws = stack.root / "ws"
        done = stack.llmpipe("deploy", "--config", "mini", "--set", f"workspace={ws}",
                             "--set", f"registry.model_name={MODEL}")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        _workers["logs"] = [
            stack.start(f"worker-{i}", sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu",
                        "--name", f"team-worker-{i}", LLMPIPE_GPU_SLOT=f"team-gpu-{i}", LLMPIPE_WORKSPACE_DIRS=str(ws))
            for i in range(2)]
    return _workers["logs"]


def _config(stack: Stack, *overrides: str) -> dict:
    # One torch thread a run: runs share two cores.
    return mini_config(stack.root / "ws", f"registry.model_name={MODEL}", "runtime.threads=1",
                       *overrides).model_dump(mode="json")


def test_runs_at_once_on_postgres_backed_servers_build_each_artifact_once(team) -> None:
    """Three runs created at once (two identical, one with another fine-tune) on two workers sharing a workspace:
    all complete; every artifact is built once (the other runs wait for it and reuse it); one registered version per
    classifier; Prefect's runs and MLflow's registry live in PostgreSQL and the model files behind MLflow's proxy."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    stack, pg, artifacts = team
    logs = _deployed(stack)
    same, other = _config(stack), _config(stack, "finetune.max_steps=250")
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("llm_pipeline/nightly")
        runs = [client.create_flow_run_from_deployment(nightly.id, parameters={"config": params})
                for params in (same, same, other)]
        for run in runs:
            _final(client, run.id, logs[0], timeout=900)

    text = "".join(log.read_text(errors="replace") for log in logs)
    built = collections.Counter(re.findall(r"built artifact (\w+) in", text))
    assert built and max(built.values()) == 1, built
    assert len(re.findall(r"reusing artifact (\w+)", text)) >= 6  # the identical run's stages, at least

    versions = MlflowClient(stack.tracking_uri).search_model_versions(f"name = '{MODEL}'")
    mine = {v.tags["llmpipe.fingerprint"] for v in versions if v.tags.get("prefect.flow_run_id") in
            {str(r.id) for r in runs}}
    assert len(mine) == 2 and len(versions) == len({v.tags["llmpipe.fingerprint"] for v in versions})

    assert int(pg.psql("mlflow", f"SELECT count(*) FROM model_versions WHERE name = '{MODEL}'")) == len(versions)
    assert int(pg.psql("prefect", "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED' "
                                   "AND parent_task_run_id IS NULL")) >= 3
    assert list(artifacts.rglob("model.safetensors")), "the model files are behind MLflow's artifact proxy"


def test_a_run_survives_postgresql_restarting_under_both_servers(team) -> None:
    """PostgreSQL stops (a clean, fast shutdown: every session cut) and starts again while a run trains; the Prefect
    and MLflow servers reconnect, and the run completes and registers its model once."""
    import time

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    stack, pg, _ = team
    logs = _deployed(stack)
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("llm_pipeline/nightly")
        run = client.create_flow_run_from_deployment(nightly.id, parameters={
            "config": _config(stack, "finetune.max_steps=300", "seed=7")})
        wait_until(lambda: client.read_flow_run(run.id).state.is_running(), "the run to start", timeout=300, every=1)
        time.sleep(15)  # into its first stages
        pg.stop("fast")
        time.sleep(5)
        pg.start()
        _final(client, run.id, logs[0], timeout=900)
    versions = MlflowClient(stack.tracking_uri).search_model_versions(
        f"name = '{MODEL}' and tags.`prefect.flow_run_id` = '{run.id}'")
    assert len(versions) == 1
