"""Deployments: prefect.yaml, the parameter form, `llmpipe deploy`/`serve`, and a real server and worker (slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, mini_config, tiny_config
from pydantic import BaseModel

from flows import deploy
from flows.cli import main
from tasks.config import PipelineConfig
from tasks.distributed import die_with_parent

DEPLOYMENTS = {"llm_pipeline/nightly", "llm_pipeline/cpu", "pretrain/gpu", "finetune/gpu"}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes a field holds: a section, each kind of a union of kinds, a list's items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def config_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> Iterator[tuple[str, type, str]]:
    """(dotted path, model class, field name) for every field of the config, sections and each kind of a source
    (``corpus.sources[]``, ``labeled.source``) included."""
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", model, name
        for inner in _models_in(field.annotation):
            yield from config_fields(inner, f"{prefix}{name}.{inner.__name__ + '.' if inner is not field.annotation else ''}")


def form_problems(schema: dict[str, Any]) -> list[str]:
    """What the UI form would miss: a config field without type or description, or wrong defaults."""
    problems = []
    defs = schema.get("definitions") or schema.get("$defs") or {}
    for path, model, name in config_fields():
        prop = defs.get(model.__name__, {}).get("properties", {}).get(name)
        if prop is None:
            problems.append(f"{path}: not in the schema")
            continue
        if prop.get("description") != model.model_fields[name].description:
            problems.append(f"{path}: description {prop.get('description')!r}")
        if not {"type", "enum", "anyOf", "oneOf", "allOf", "$ref"} & prop.keys():
            problems.append(f"{path}: no type")
    if schema["properties"]["config"].get("default") != PipelineConfig().model_dump(mode="json"):
        problems.append("config: default is not the built-in config")
    return problems


# ---------------------------------------------------------------------------------------------
# Without a server


def test_prefect_yaml_deploys_the_three_flows_to_cpu_and_gpu_pools() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = deploy.load_spec()
    deps = {f"{load_flow_from_entrypoint(d['entrypoint']).name}/{d['name']}": d for d in spec["deployments"]}
    assert set(deps) == DEPLOYMENTS
    assert {d["work_pool"]["name"] for d in deps.values()} == {"cpu", "gpu"}
    assert all(d["enforce_parameter_schema"] is True for d in deps.values())
    # Work from the checkout prefect deploy ran in.
    assert spec["build"][0]["prefect.deployments.steps.run_shell_script"]["script"] == "git rev-parse --show-toplevel"
    assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ checkout.stdout }}"

    (nightly,) = deps["llm_pipeline/nightly"]["schedules"]
    cron = CronSchedule(cron=nightly["cron"], timezone=nightly["timezone"])
    assert cron.cron == "0 2 * * *" and nightly["active"]
    assert not any(d.get("schedules") for name, d in deps.items() if name != "llm_pipeline/nightly")

    # The trigger fills exactly finetune's parameters from what pretrain announces.
    (trigger,) = deps["finetune/gpu"]["triggers"]
    assert trigger["expect"] == [deploy.PRETRAIN_COMPLETED]
    finetune = load_flow_from_entrypoint(deps["finetune/gpu"]["entrypoint"])
    assert set(trigger["parameters"]) == set(finetune.parameters.properties) == {"config", "lm", "lm_report"}
    assert all(v == f"{{{{ event.payload.{k} }}}}" for k, v in trigger["parameters"].items())


def test_parameter_form_shows_every_config_field_with_type_default_and_description() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune
    from flows.pipeline import llm_pipeline
    from flows.pretrain import pretrain

    for flow in (llm_pipeline, pretrain, finetune):
        schema = parameter_schema(flow).model_dump()
        assert form_problems(schema) == [], flow.name
        # Unknown keys are refused by the schema too, not only by pydantic on the worker.
        assert schema["definitions"]["PipelineConfig"]["additionalProperties"] is False


def test_served_deployments_carry_schedule_trigger_and_preset(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "ws")
    served = deploy.runner_deployments(deploy.with_config(deploy.load_spec(), cfg))
    by_name = {f"{d.flow_name}/{d.name}": d for d in served}
    assert set(by_name) == DEPLOYMENTS
    assert all(d.parameters == {"config": cfg.model_dump(mode="json")} for d in served)
    assert all(d.enforce_parameter_schema and d.work_pool_name is None for d in served)
    assert [s.schedule.cron for s in by_name["llm_pipeline/nightly"].schedules] == ["0 2 * * *"]
    (trigger,) = by_name["finetune/gpu"].triggers
    assert trigger.expect == {deploy.PRETRAIN_COMPLETED}
    assert by_name["pretrain/gpu"].entrypoint == "flows.pretrain.pretrain"


def test_kubernetes_base_job_template_declares_every_variable_it_uses() -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((deploy.DEPLOY_DIR / "kubernetes-gpu-job-template.json").read_text())
    pool = WorkPoolCreate(name="k8s-gpu", type="kubernetes", base_job_template=template)  # validates placeholders
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_deploy_and_serve_need_a_prefect_api(monkeypatch, capsys) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for command in ("deploy", "serve"):
        assert main([command]) == 2
        assert "no Prefect API configured" in capsys.readouterr().err


def test_deploy_refuses_a_bad_config_before_contacting_anything(capsys) -> None:
    assert main(["deploy", "--config", "tiny", "--set", "pretrain.lr=-1", "--set", "model.n_layer=two"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.lr" in err and "model.n_layer" in err


# ---------------------------------------------------------------------------------------------
# A real Prefect server, worker and `llmpipe serve` (slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session; Linux sends it SIGTERM if this test process dies first (even kill -9)."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)


def _stop(proc: subprocess.Popen) -> None:
    """End a process started by _start and everything it started (its own session)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _until(check: Callable[[], Any], what: str, timeout: float = 300, every: float = 1.0, log: Path | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` (and a log tail) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}\n{tail}")


class Stack:
    """The processes a test started, and the environment that points clients at its server."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.tracking_uri = env["MLFLOW_TRACKING_URI"]
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None, **extra_env: str) -> Path:
        log = self.root / f"{name}.log"
        self.procs.append(_start(list(args), {**(env or self.env), **extra_env}, log, cwd=self.root))
        return log

    def llmpipe(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; clients pointed at it."""
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("prefect-stack")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    server_env = {**base, "PREFECT_HOME": str(root / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**base, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(root / "client-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": tracking_uri,
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    s = Stack(root, env)
    try:
        server_log = s.start("server", sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui", env=server_env)
        (server,) = s.procs
        # Artifacts of the experiment go under root: the worker runs flows in the checkout (the pull step).
        MlflowClient(tracking_uri).create_experiment("llmpipe", artifact_location=(root / "mlartifacts").as_uri())
        import httpx

        def healthy() -> bool:
            assert server.poll() is None, "prefect server exited:\n" + server_log.read_text(errors="replace")[-4000:]
            try:
                return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _until(healthy, "prefect server start", timeout=240, log=server_log)
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield s
    finally:
        # The in-process `concurrency` block emitted events through Prefect's process-wide EventsWorker, which
        # stays bound to this server. Flush and retire it while the server is up: a later module's events would
        # otherwise queue behind reconnects to a dead port (about two minutes at the next harness's teardown).
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)
        for proc in reversed(s.procs):
            _stop(proc)


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
    run = _until(lambda: (r := client.read_flow_run(flow_run_id)).state.is_final() and r, f"flow run {flow_run_id}",
                 timeout=timeout, every=2, log=log)
    assert run.state.is_completed(), f"{run.name}: {run.state}\n" + log.read_text(errors="replace")[-4000:]
    return run


@pytest.mark.slow
def test_deployments_run_on_a_worker_pool(stack: Stack) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import PrefectHTTPStatusError

    cfg = mini_config(stack.root / "ws", "registry.model_name=deployed-model")
    done = stack.llmpipe("deploy", "--config", "mini", "--set", f"workspace={stack.root / 'ws'}",
                         "--set", "registry.model_name=deployed-model")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "work pools: gpu (created), cpu (created)" in done.stdout
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
        scheduled = _until(lambda: _runs(client, nightly.id, any_=["SCHEDULED"]), "scheduled nightly runs", timeout=120)
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

        # A run as the UI's form creates it: the whole config, one field changed.
        form = mini_config(stack.root / "ws", "registry.model_name=ui-form-model").model_dump(mode="json")
        run = client.create_flow_run_from_deployment(nightly.id, parameters={"config": form})
        assert run.parameters == {"config": form}
        _final(client, run.id, worker_log)
        version = mlflow.get_model_version_by_alias("ui-form-model", "champion")
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
            _until(lambda: all(stage_states().get(s) == "COMPLETED" for s in cpu_stages),
                   "pretrain's CPU stages while the GPU slot is held", log=worker_log)
            time.sleep(5)  # room for a wrongly unguarded training task to start
            assert "pretrain" not in stage_states()
            assert client.read_flow_run(pre.id).state.is_running()
        _final(client, pre.id, worker_log)

        # Its completion starts finetune/gpu with the checkpoint it produced.
        chained = _until(lambda: _runs(client, deps["finetune/gpu"].id), "finetune/gpu run started by the trigger",
                         timeout=180, log=worker_log)[0]
        assert chained.parameters["lm"]["fingerprint"] == lm_fingerprint
        assert chained.parameters["lm_report"]["kind"] == "reports"
        assert chained.parameters["config"] == cfg.model_dump(mode="json")
        _final(client, chained.id, worker_log)
        deployed = mlflow.get_model_version_by_alias("deployed-model", "champion")
        assert deployed.tags["prefect.flow_run_id"] == str(chained.id)
        assert deployed.tags["llmpipe.lm_fingerprint"] == lm_fingerprint
        # pretrain inside llm_pipeline announced nothing: the chained run is the only fine-tuning run.
        assert [r.id for r in _runs(client, deps["finetune/gpu"].id)] == [chained.id]


@pytest.mark.slow
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

        dep = _until(served, "llmpipe serve to apply its deployments", timeout=240, every=2, log=log)
        run = client.create_flow_run_from_deployment(dep.id)
        _final(client, run.id, log)
    assert str(run.id) in log.read_text(errors="replace")  # run by the serve process (no worker serves cpu here)
    from mlflow import MlflowClient

    version = MlflowClient(stack.tracking_uri).get_model_version_by_alias("served-model", "champion")
    assert version.tags["prefect.flow_run_id"] == str(run.id)


@pytest.mark.slow
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
    ws = stack.root / "ws-refusals"
    done = stack.llmpipe("deploy", "--config", "tiny", "--set", f"workspace={ws}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    worker_log = stack.start("worker-cpu", sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu",
                             "--name", "refusals-cpu-worker", LLMPIPE_WORKSPACE_DIRS=str(ws))
    worker = stack.procs[-1]
    try:
        _refusals(stack, ws, train_csv, worker_log)
    finally:
        _stop(worker)  # a cpu worker left running would take the served deployments' runs in the next test
        stack.procs.remove(worker)
    assert not (ws / "corpora").exists() and not (stack.root / "elsewhere").exists()
    assert MlflowClient(stack.tracking_uri).search_registered_models(filter_string="name = 'refused-model'") == []

    # The operator's own command line keeps its freedom: the same data file trains and registers.
    run = stack.llmpipe("run", "--config", "tiny", "--set", f"workspace={stack.root / 'ws-operator'}",
                        "--set", "registry.model_name=operator-model",
                        "--set", f"labeled.source={{kind: files, train: {train_csv}}}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "models:/operator-model/1 registered" in run.stdout


def _refusals(stack: Stack, ws: Path, train_csv: Path, worker_log: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.exceptions import PrefectHTTPStatusError

    base = tiny_config(ws, "registry.model_name=refused-model").model_dump(mode="json")

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
            final = _until(lambda r=run: (f := client.read_flow_run(r.id)).state.is_final() and f,
                           f"the refused run for {field}", timeout=300, every=2, log=worker_log)
            message = final.state.message or ""
            assert final.state.is_failed(), f"{field}: {final.state}"
            assert "refused before any stage ran" in message and field in message, message
            assert cases[field][1] in message, message
            assert not client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))  # no stage ran
