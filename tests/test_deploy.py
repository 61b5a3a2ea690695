"""Deployments without a server: prefect.yaml, the parameter form built from the config models, the work pools' job
templates, and `llmpipe deploy`/`serve` refusing what they cannot do (a real server and worker: e2e/test_workers.py)."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from flows import deploy
from flows.cli import main
from tasks.config import PipelineConfig
from tests.support import tiny_config

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


def test_the_automations_crash_lost_runs_of_llmpipe_flows_and_rerun_crashed_deployment_runs() -> None:
    from prefect.events.schemas.events import RelatedResource, Resource
    from prefect.flows import load_flow_from_entrypoint
    from prefect.server.events.schemas.automations import EventTrigger as ServerTrigger

    flows = {load_flow_from_entrypoint(d["entrypoint"]).name for d in deploy.load_spec()["deployments"]}
    assert set(deploy.FLOW_NAMES) == flows  # every flow a deployment runs (and, as subflows, the stages)
    assert all("llmpipe" in d["tags"] for d in deploy.load_spec()["deployments"])
    crash, rerun = deploy.automations(30)
    assert crash.trigger.within.total_seconds() == deploy.HEARTBEATS_MISSED * 30
    assert [a.type for a in crash.actions] == ["change-flow-run-state"] and crash.actions[0].state == "CRASHED"
    assert rerun.actions[0].state == "SCHEDULED" and rerun.actions[0].name == "AwaitingRetry"

    # What the server's trigger matches (Prefect's own code): which runs each automation covers.
    def run(flow: str, *, deployment: bool, tags: tuple[str, ...] = ()) -> tuple[Resource, list[RelatedResource]]:
        related = [{"prefect.resource.id": "prefect.flow.1", "prefect.resource.role": "flow",
                    "prefect.resource.name": flow}]
        related += [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in tags]
        if deployment:
            related.append({"prefect.resource.id": "prefect.deployment.1", "prefect.resource.role": "deployment"})
        return (Resource({"prefect.resource.id": "prefect.flow-run.1"}),
                [RelatedResource(r) for r in related])

    covers_crash = ServerTrigger.model_validate(crash.trigger.model_dump()).covers_resources
    covers_rerun = ServerTrigger.model_validate(rerun.trigger.model_dump()).covers_resources
    assert covers_crash(*run("llm_pipeline", deployment=True, tags=("llmpipe",)))
    assert covers_crash(*run("finetune", deployment=False))  # a stage subflow of a lost run
    assert not covers_crash(*run("someone_elses_flow", deployment=True, tags=("llmpipe",)))
    assert covers_rerun(*run("llm_pipeline", deployment=True, tags=("llmpipe", "retrain")))
    assert not covers_rerun(*run("finetune", deployment=False, tags=("llmpipe",)))  # subflows are not scheduled
    assert not covers_rerun(*run("llm_pipeline", deployment=True))  # not llmpipe's deployment


def test_a_run_that_crashed_and_was_rerun_too_often_is_refused() -> None:
    from flows.tracking import admit_rerun
    from tasks.errors import LlmpipeError

    for count in range(1, deploy.MAX_RUNS + 1):
        admit_rerun(count)
    with pytest.raises(LlmpipeError, match=f"started {deploy.MAX_RUNS + 1} times"):
        admit_rerun(deploy.MAX_RUNS + 1)


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


def test_llmpipe_process_pools_accept_no_command_env_or_working_dir() -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = deploy.process_job_template()
    assert not {"command", "env", "working_dir"} & set(template["variables"]["properties"])
    assert not {"command", "env", "working_dir"} & set(template["job_configuration"])
    assert template["variables"]["additionalProperties"] is False
    WorkPoolCreate(name="cpu", type="process", base_job_template=template)  # Prefect's own template checks
    assert deploy.overridable(ProcessWorker.get_default_base_job_template()) == ["command", "env", "working_dir"]
    assert deploy.overridable(template) == []


def test_kubernetes_template_fixes_what_starts_where_and_with_which_credentials() -> None:
    template = json.loads((deploy.DEPLOY_DIR / "kubernetes-gpu-job-template.json").read_text())
    variables = template["variables"]
    fixed = {"image", "command", "env", "namespace", "service_account_name", "cluster_config", "workspace_claim"}
    assert not fixed & set(variables["properties"]) and variables["additionalProperties"] is False
    job = template["job_configuration"]
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/llmpipe:latest"
    assert job["namespace"] == job["job_manifest"]["metadata"]["namespace"] == "llmpipe"
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert job["command"] is None and job["cluster_config"] is None
    assert "{{" not in json.dumps([job["env"], pod["volumes"], pod["containers"][0]["image"]])


def test_taking_a_gpu_slot_waits_out_an_unreachable_prefect_api_and_nothing_else(monkeypatch) -> None:
    import logging

    import httpx

    monkeypatch.setattr(deploy.time, "sleep", lambda s: None)
    logger = logging.getLogger("test")
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:  # a fresh Prefect client fails at once while the server restarts
            raise httpx.ConnectError("All connection attempts failed")
        return "held"

    assert deploy._through_outages(flaky, "GPU slot x", logger) == "held" and len(calls) == 3

    def refused() -> None:
        calls.append(1)
        raise ValueError("not an outage")

    calls.clear()
    with pytest.raises(ValueError):
        deploy._through_outages(refused, "GPU slot x", logger)
    assert len(calls) == 1
