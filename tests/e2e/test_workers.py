"""Deployments on a real Prefect server: runs on worker pools (schedule, the UI form, the fine-tune trigger),
`llmpipe serve`, and runs created through the API refused what the operator did not allow."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.servers import PrefectServer, stop
from tests.support import REPO, mini_config, tiny_config, wait_until
from tests.test_deploy import DEPLOYMENTS, form_problems

pytestmark = pytest.mark.slow


class Stack:
    """A real ``prefect server`` (``benchmarks/servers.py``), the processes a test started beside it, and the
    environment that points clients at it, with MLflow on a SQLite store."""

    def __init__(self, server: PrefectServer, tracking_uri: str):
        self.server, self.root, self.env, self.tracking_uri = server, server.root, server.env, tracking_uri
        self.procs = server.procs  # stopped with the server

    def start(self, name: str, *args: str, env: dict[str, str] | None = None, **extra_env: str) -> Path:
        return self.server.start(name, list(args), {**(env or self.env), **extra_env})

    def llmpipe(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; clients pointed at it."""
    from mlflow import MlflowClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("prefect-stack")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    with PrefectServer(root, MLFLOW_TRACKING_URI=tracking_uri, PREFECT_RUNNER_POLL_FREQUENCY="2") as server:
        # Artifacts of the experiment go under root: the worker runs flows in the checkout (the pull step).
        MlflowClient(tracking_uri).create_experiment("llmpipe", artifact_location=(root / "mlartifacts").as_uri())
        try:
            with temporary_settings({PREFECT_API_URL: server.url}):
                yield Stack(server, tracking_uri)
        finally:
            # The in-process `concurrency` block emitted events through Prefect's process-wide EventsWorker, which
            # stays bound to this server. Flush and retire it while the server is up: a later module's events
            # would otherwise queue behind reconnects to a dead port (about two minutes at the next harness's
            # teardown).
            EventsWorker.drain_all(timeout=30)


def _runs(client, deployment_id, **state) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    flow_run_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(**state))) if state else None
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment_id]}),
                                 flow_run_filter=flow_run_filter)


def _final(client, flow_run_id, log: Path, timeout: float = 600):
    run = wait_until(lambda: (r := client.read_flow_run(flow_run_id)).state.is_final() and r, f"flow run {flow_run_id}",
                     timeout=timeout, every=2, log=log)
    assert run.state.is_completed(), f"{run.name}: {run.state}\n" + log.read_text(errors="replace")[-4000:]
    return run


def test_deployments_run_on_a_worker_pool(stack: Stack) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import PrefectHTTPStatusError

    cfg = mini_config(stack.root / "ws", "registry.model_name=deployed-model")
    with get_client(sync_client=True) as client:  # another test of this module may have deployed first
        existing = {pool.name for pool in client.read_work_pools()}
    done = stack.llmpipe("deploy", "--config", "mini", "--set", f"workspace={stack.root / 'ws'}",
                         "--set", "registry.model_name=deployed-model")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = ", ".join(f"{p} ({'exists' if p in existing else 'created'})" for p in ("gpu", "cpu"))
    assert f"work pools: {said}" in done.stdout
    slot = "gpu-e2e-0"
    # The operator lets runs keep their workspace under the test's folder (default: ./.llmpipe of the checkout).
    worker_log = stack.start("worker", sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu",
                             "--name", "e2e-gpu-worker", LLMPIPE_GPU_SLOT=slot,
                             LLMPIPE_WORKSPACE_DIRS=str(stack.root / "ws"))
    mlflow = MlflowClient(stack.tracking_uri)

    with get_client(sync_client=True) as client:
        assert {client.read_work_pool(p).type for p in ("cpu", "gpu")} == {"process"}
        deps = {name: client.read_deployment_by_name(name) for name in DEPLOYMENTS}
        nightly = deps["llm_pipeline/nightly"]
        assert nightly.enforce_parameter_schema and nightly.work_pool_name == "gpu"
        assert nightly.parameters == {"config": cfg.model_dump(mode="json")}
        assert form_problems(nightly.parameter_openapi_schema) == []
        assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

        # The nightly schedule has put runs on the calendar.
        scheduled = wait_until(lambda: _runs(client, nightly.id, any_=["SCHEDULED"]), "scheduled nightly runs", timeout=120,
                               every=1)
        assert all(r.auto_scheduled and r.expected_start_time.hour == 2 for r in scheduled)

        # The server refuses parameters that do not fit the form; no run exists for a worker to take.
        bad = cfg.model_dump(mode="json")
        bad["pretrain"]["lr"] = -1
        unknown = cfg.model_dump(mode="json")
        unknown["pretrain"]["epochs"] = 3
        for params, field in ((bad, "lr"), (unknown, "epochs")):
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(nightly.id, parameters={"config": params})
            assert refused.value.response.status_code == 409 and field in refused.value.response.text
        assert _runs(client, nightly.id, not_any_=["SCHEDULED"]) == []

        # A run as the UI's form creates it: the whole config, one field changed (not a registry setting: those are
        # the operator's, and the deployment's are kept).
        form = mini_config(stack.root / "ws", "registry.model_name=deployed-model",
                           "finetune.max_steps=250").model_dump(mode="json")
        run = client.create_flow_run_from_deployment(nightly.id, parameters={"config": form})
        assert run.parameters == {"config": form}
        _final(client, run.id, worker_log)
        version = mlflow.get_model_version_by_alias("deployed-model", "champion")
        assert version.tags["prefect.flow_run_id"] == str(run.id)
        lm_fingerprint = version.tags["llmpipe.lm_fingerprint"]
        # Its training tasks went through this worker's GPU slot, and gave it back.
        limit = client.read_global_concurrency_limit_by_name(slot)
        assert (limit.limit, limit.active_slots) == (1, 0)

        # GPU slot held elsewhere: pretrain's CPU stages run, its training task waits.
        with concurrency(slot, occupy=1, strict=True):
            pre = client.create_flow_run_from_deployment(deps["pretrain/gpu"].id)

            def stage_states() -> dict[str, str]:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [pre.id]}))
                return {t.name.rsplit("-", 1)[0]: t.state_type and t.state_type.value for t in runs}

            cpu_stages = {"ingest-corpus", "train-tokenizer", "tokenize"}
            wait_until(lambda: all(stage_states().get(s) == "COMPLETED" for s in cpu_stages),
                       "pretrain's CPU stages while the GPU slot is held", every=1, log=worker_log)
            time.sleep(5)  # room for a wrongly unguarded training task to start
            assert "pretrain" not in stage_states()
            assert client.read_flow_run(pre.id).state.is_running()
        _final(client, pre.id, worker_log)

        # Its completion starts finetune/gpu with the checkpoint it produced.
        chained = wait_until(lambda: _runs(client, deps["finetune/gpu"].id), "finetune/gpu run started by the trigger",
                             timeout=180, every=1, log=worker_log)[0]
        assert chained.parameters["lm"]["fingerprint"] == lm_fingerprint
        assert chained.parameters["lm_report"]["kind"] == "reports"
        assert chained.parameters["config"] == cfg.model_dump(mode="json")
        _final(client, chained.id, worker_log)
        deployed = [v for v in mlflow.search_model_versions("name = 'deployed-model'")
                    if v.tags.get("prefect.flow_run_id") == str(chained.id)]
        assert len(deployed) == 1 and deployed[0].tags["llmpipe.lm_fingerprint"] == lm_fingerprint
        assert deployed[0].tags["llmpipe.gate.decision"] in ("champion", "challenger")  # the gate decided
        # pretrain inside llm_pipeline announced nothing: the chained run is the only fine-tuning run.
        assert [r.id for r in _runs(client, deps["finetune/gpu"].id)] == [chained.id]


def test_serve_runs_the_deployments_in_process(stack: Stack) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    log = stack.start("serve", sys.executable, "-m", "flows.cli", "serve", "--config", "mini",
                      "--set", f"workspace={stack.root / 'ws'}", "--set", "registry.model_name=served-model",
                      LLMPIPE_WORKSPACE_DIRS=str(stack.root / "ws"))
    with get_client(sync_client=True) as client:

        def served():
            try:
                dep = client.read_deployment_by_name("llm_pipeline/cpu")
            except ObjectNotFound:
                return None
            return dep if dep.parameters.get("config", {}).get("registry", {}).get("model_name") == "served-model" else None

        dep = wait_until(served, "llmpipe serve to apply its deployments", timeout=240, every=2, log=log)
        run = client.create_flow_run_from_deployment(dep.id)
        _final(client, run.id, log)
    assert str(run.id) in log.read_text(errors="replace")  # run by the serve process (no worker serves cpu here)
    from mlflow import MlflowClient

    version = MlflowClient(stack.tracking_uri).get_model_version_by_alias("served-model", "champion")
    assert version.tags["prefect.flow_run_id"] == str(run.id)


def test_deployment_runs_may_not_reach_beyond_what_the_operator_allows(stack: Stack) -> None:
    """Runs created through the API are refused, before any stage, what the worker's operator did not allow; the
    same config through `llmpipe run` (the operator) trains."""
    from mlflow import MlflowClient

    from tasks.sample_data import sentiment_dataset

    outside = stack.root / "outside"  # data the operator did not name in LLMPIPE_DATA_DIRS
    outside.mkdir(exist_ok=True)
    rows = sentiment_dataset(seed=0, n_train=200, n_validation=40, n_test=40)["train"]
    train_csv = outside / "train.csv"
    with open(train_csv, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *((r["text"], r["label"]) for r in rows)])
    # The operator's data folder holds a data set whose README points the datasets library at the outside file.
    data = stack.root / "data"
    (data / "set").mkdir(parents=True, exist_ok=True)
    (data / "set" / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n"
                                            f"  - split: train\n    path: {train_csv}\n---\n")
    # A model in the registry that runs code when it is loaded (what a run naming it would make the gate do).
    marker = stack.root / "pyfunc-loaded"
    _register_pyfunc(stack.tracking_uri, "pyfunc-evil", marker)
    def around() -> list[tuple[str, int]]:  # what the attacks aim at: the data folder and the outside folder
        return sorted((str(p), p.stat().st_size) for d in (data, outside) for p in d.rglob("*"))

    before = around()
    ws = stack.root / "ws-refusals"
    done = stack.llmpipe("deploy", "--config", "tiny", "--set", f"workspace={ws}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    worker_log = stack.start("worker-cpu", sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu",
                             "--name", "refusals-cpu-worker", LLMPIPE_WORKSPACE_DIRS=str(ws), LLMPIPE_DATA_DIRS=str(data))
    worker = stack.procs[-1]
    try:
        _refusals(stack, ws, train_csv, data / "set", worker_log)
    finally:
        stop(worker)  # a cpu worker left running would take the served deployments' runs in the next test
        stack.procs.remove(worker)
    assert not (ws / "corpora").exists() and not (ws / "labeled").exists() and not (stack.root / "elsewhere").exists()
    assert not marker.exists()  # the pyfunc model was never loaded
    assert [int(v.version) for v in MlflowClient(stack.tracking_uri).search_model_versions("name = 'pyfunc-evil'")] \
        == [1]
    assert around() == before  # nothing written where the attacks pointed

    # The operator's own command line keeps its freedom: the same data file trains and registers.
    run = stack.llmpipe("run", "--config", "tiny", "--set", f"workspace={stack.root / 'ws-operator'}",
                        "--set", "registry.model_name=operator-model",
                        "--set", f"labeled.source={{kind: files, train: {train_csv}}}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "models:/operator-model/1 registered" in run.stdout


def _register_pyfunc(tracking_uri: str, name: str, marker: Path) -> None:
    """Register ``name`` version 1 as a pyfunc model whose loading writes ``marker``, with the champion alias."""
    import mlflow
    from mlflow import MlflowClient

    class Loud(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            Path(context.model_config["marker"]).write_text("loaded")

        def predict(self, context, model_input):
            return ["pos"] * len(model_input)

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=Loud(), model_config={"marker": str(marker)},
                                    registered_model_name=name)
        MlflowClient(tracking_uri).set_registered_model_alias(name, "champion", "1")
    finally:
        mlflow.set_tracking_uri(previous)
    assert marker.exists()  # MLflow loaded it once while logging it: the marker works
    marker.unlink()


def _refusals(stack: Stack, ws: Path, train_csv: Path, readme_set: Path, worker_log: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.exceptions import PrefectHTTPStatusError

    base = tiny_config(ws).model_dump(mode="json")

    def with_changes(**sections: dict) -> dict:
        cfg = json.loads(json.dumps(base))
        for section, values in sections.items():
            cfg[section].update(values)
        return cfg

    cases = {
        "labeled.source.train": (with_changes(labeled={"source": {"kind": "files", "train": str(train_csv)}}),
                                 "LLMPIPE_DATA_DIRS"),
        "corpus.sources[0].data_files": (with_changes(corpus={"sources": [
            {"kind": "hub", "name": "csv", "data_files": ["https://203.0.113.9/corpus.csv"]}]}), "LLMPIPE_ALLOW=urls"),
        "model.trust_remote_code": (with_changes(model={"trust_remote_code": True}), "LLMPIPE_ALLOW=remote_code"),
        "workspace": ({**base, "workspace": str(stack.root / "elsewhere")}, "LLMPIPE_WORKSPACE_DIRS"),
        "registry.model_name": (with_changes(registry={"model_name": "pyfunc-evil"}), "LLMPIPE_REGISTRY"),
        "labeled.source.name": (with_changes(labeled={"source": {"kind": "hub", "name": str(readme_set)}}),
                                "README.md"),
    }
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("llm_pipeline/cpu")
        # The pool's template accepts no override of what the worker starts: the server refuses the run outright.
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(dep.id, job_variables={"command": "touch /tmp/llmpipe-pwned"})
        assert refused.value.response.status_code == 422 and "command" in refused.value.response.text
        runs = {field: client.create_flow_run_from_deployment(dep.id, parameters={"config": cfg})
                for field, (cfg, _) in cases.items()}
        for field, run in runs.items():
            final = wait_until(lambda r=run: (f := client.read_flow_run(r.id)).state.is_final() and f,
                               f"the refused run for {field}", timeout=300, every=2, log=worker_log)
            message = final.state.message or ""
            assert final.state.is_failed(), f"{field}: {final.state}"
            assert "refused before any stage ran" in message and field in message, message
            assert cases[field][1] in message, message
            assert not client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))  # no stage ran
