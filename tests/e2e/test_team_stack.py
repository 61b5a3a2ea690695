"""A team's stack: a Prefect server and an MLflow tracking server both on PostgreSQL (a throwaway cluster), MLflow
proxying artifacts, two workers sharing one workspace, and several runs created at once through the API; then the
drills: PostgreSQL, the Prefect server and the MLflow server restarted under a run, and a worker killed with its
run (marked crashed by llmpipe's automation when its heartbeats stop, scheduled again, resumed)."""

from __future__ import annotations

import collections
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.servers import MlflowServer, Postgres, PrefectServer
from tasks.resume import STATE_FILE
from tests.e2e.test_workers import Stack, _final
from tests.support import mini_config, wait_until

pytestmark = pytest.mark.slow

MODEL = "team-model"
TEAM_SERVER = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}


@dataclass
class Team:
    stack: Stack
    pg: Postgres
    mlflow: MlflowServer
    artifacts: Path  # where MLflow's proxy keeps the model files


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[Team]:
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("team-stack")
    with Postgres(root / "postgres") as pg:
        mlflow = MlflowServer(root / "mlflow", backend_uri=pg.url("mlflow"))
        # Heartbeats every 30 s (Prefect's least): llmpipe's automation marks a run crashed after two missed. The
        # server answers 500 while its database restarts: clients retry that too; it keeps concurrency leases on
        # disk, so the GPU slots a run holds survive its restart (docs/deployment.md).
        with mlflow as tracking_uri, \
                PrefectServer(root / "prefect", database_url=pg.url("prefect", "postgresql+asyncpg"),
                              server_settings=TEAM_SERVER, MLFLOW_TRACKING_URI=tracking_uri, PREFECT_RUNNER_POLL_FREQUENCY="2",
                              PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30", PREFECT_CLIENT_RETRY_EXTRA_CODES="500") as server:
            try:
                with temporary_settings({PREFECT_API_URL: server.url}):
                    yield Team(Stack(server, tracking_uri), pg, mlflow, root / "mlflow" / "artifacts")
            finally:
                EventsWorker.drain_all(timeout=30)


_workers: dict[str, list[Path]] = {}


def _deployed(stack: Stack) -> list[Path]:
    """The deployments (the mini preset, this module's model name) and two workers on the gpu pool sharing one
    workspace, once per module; their logs."""
    if "logs" not in _workers:
        done = stack.llmpipe("deploy", "--config", "mini", "--set", f"workspace={stack.root / 'ws'}",
                             "--set", f"registry.model_name={MODEL}")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        _workers["logs"] = [_worker(stack, i) for i in range(2)]
    return _workers["logs"]


def _worker(stack: Stack, i: int, attempt: int = 0) -> Path:
    """Start gpu worker ``i`` (again: ``attempt``), as the team's supervisor would; its log."""
    return stack.start(f"worker-{i}" + (f"-{attempt}" if attempt else ""), sys.executable, "-m", "prefect", "worker",
                       "start", "--pool", "gpu", "--name", f"team-worker-{i}", LLMPIPE_GPU_SLOT=f"team-gpu-{i}",
                       LLMPIPE_WORKSPACE_DIRS=str(stack.root / "ws"))


def _log_text(stack: Stack) -> str:
    return "".join(log.read_text(errors="replace") for log in sorted(stack.root.glob("worker-*.log")))


def _create(client, stack: Stack, *overrides: str):
    nightly = client.read_deployment_by_name("llm_pipeline/nightly")
    return client.create_flow_run_from_deployment(nightly.id, parameters={"config": _config(stack, *overrides)})


def _running_task(client, stage: str):
    """A running task run of ``stage`` (names are ``<stage>-xyz``), if any: one run at a time in the drills."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType

    running = client.read_task_runs(task_run_filter=TaskRunFilter(
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=["RUNNING"]))))
    return next((t for t in running if re.fullmatch(rf"{re.escape(stage)}-\w{{3}}", t.name)), None)


def _flow_runs(client, state: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))))


def _versions_of(team: Team, run_id) -> list:
    """The classifier versions a flow run registered, checked against PostgreSQL (deleted ones included)."""
    from mlflow import MlflowClient

    versions = MlflowClient(team.stack.tracking_uri).search_model_versions(
        f"name = '{MODEL}' and tags.`prefect.flow_run_id` = '{run_id}'")
    for v in versions:
        rows = team.pg.psql("mlflow", "SELECT count(*) FROM model_version_tags WHERE name = '{}' AND "
                            "key = 'llmpipe.fingerprint' AND value = '{}'".format(MODEL, v.tags["llmpipe.fingerprint"]))
        assert int(rows) == 1, f"fingerprint {v.tags['llmpipe.fingerprint']} has {rows} versions in the store"
    return versions


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

    stack, pg, artifacts = team.stack, team.pg, team.artifacts
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
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    stack, pg = team.stack, team.pg
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


def test_a_run_survives_the_prefect_server_restarting(team) -> None:
    """The Prefect server stops while a run pretrains and starts again on the same database: the workers and the
    run's process reconnect, and the run completes (its task states reach the server once it is back)."""
    from prefect.client.orchestration import get_client

    stack = team.stack
    logs = _deployed(stack)
    with get_client(sync_client=True) as client:
        run = _create(client, stack, "seed=11")
        wait_until(lambda: _running_task(client, "pretrain"), "pretraining to start", timeout=300, every=0.5)
    stack.server.stop_server()
    time.sleep(5)
    stack.server.start_server()
    with get_client(sync_client=True) as client:
        done = _final(client, run.id, logs[0], timeout=900)
    assert done.run_count == 1  # finished in its first process, not re-run
    assert len(_versions_of(team, run.id)) == 1


def test_mlflow_down_during_registration_still_registers_one_version(team) -> None:
    """The MLflow server stops while the register stage runs and starts again 10 s later: MLflow's client retries
    (the stage itself is retried past that), and the run registers exactly one version."""
    from prefect.client.orchestration import get_client

    stack = team.stack
    logs = _deployed(stack)
    with get_client(sync_client=True) as client:
        run = _create(client, stack, "finetune.max_steps=150")  # the LM is reused: straight to fine-tuning
        register = wait_until(lambda: _running_task(client, "register"), "the register stage", timeout=600,
                              every=0.2)
        team.mlflow.stop()
        stopped = time.time()
        time.sleep(10)
        team.mlflow.start()
        _final(client, run.id, logs[0], timeout=900)
        ended = client.read_task_run(register.id)
    assert ended.flow_run_id == register.flow_run_id
    assert ended.end_time.timestamp() > stopped, "the register stage had ended before MLflow went down"
    assert len(_versions_of(team, run.id)) == 1


def test_a_worker_killed_mid_training_is_crashed_rerun_and_resumed(team) -> None:
    """A worker and its run are killed (SIGKILL: a machine lost) while fine-tuning, past a checkpoint. The run's
    heartbeats stop, so llmpipe's automation marks it crashed and the other schedules it again; the surviving
    worker takes it, fine-tuning resumes from the checkpoint (no half-written file is read), and it completes."""
    from prefect.client.orchestration import get_client

    stack = team.stack
    logs = _deployed(stack)
    checkpoints = stack.root / "ws" / "checkpoints"
    before = set(checkpoints.glob(f"*.work/step-*/{STATE_FILE}"))
    with get_client(sync_client=True) as client:
        run = _create(client, stack, "finetune.max_steps=1000", "finetune.lr=0.0009")
        wait_until(lambda: _running_task(client, "finetune"), "fine-tuning to start", timeout=600, every=0.5)
        wait_until(lambda: set(checkpoints.glob(f"*.work/step-*/{STATE_FILE}")) - before, "a fine-tuning checkpoint",
                   timeout=300, every=0.5)
        pid = int(client.read_flow_run(run.id).infrastructure_pid.rsplit(":", 1)[-1])
        worker = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the run's parent
        killed = next(i for i in range(2) if f"team-worker-{i}" in Path(f"/proc/{worker}/cmdline").read_text())
        for process in (worker, pid):  # each in a session of its own
            os.killpg(os.getpgid(process), signal.SIGKILL)

        # Crashed, then scheduled again within a second or two: read from the run's state history.
        wait_until(lambda: client.read_flow_run(run.id).run_count >= 2, "the run to be crashed and run again",
                   timeout=300, every=1)
        names = [(st.name, st.message or "") for st in client.read_flow_run_states(run.id)]
        crashed = next(i for i, (name, _) in enumerate(names) if name == "Crashed")
        assert "heartbeats stopped" in names[crashed][1] and names[crashed + 1][0] == "AwaitingRetry", names
        done = _final(client, run.id, logs[1 - killed], timeout=900)
        # The lost attempt's stage subflows are marked crashed too, not left running.
        wait_until(lambda: not _flow_runs(client, "RUNNING"), "no flow run left running", timeout=120, every=2)
    # Started again only now: its GPU slot stays taken until the killed run's lease expires (Prefect's 300 s).
    _workers["logs"][killed] = _worker(stack, killed, attempt=1)
    assert done.run_count == 2
    text = _log_text(stack)
    assert re.search(r"resum\w* .*from .*step \d+", text, re.IGNORECASE), text[-3000:]
    assert len(_versions_of(team, run.id)) == 1
