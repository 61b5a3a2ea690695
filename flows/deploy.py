"""Deployments on worker pools: ``llmpipe deploy``, ``llmpipe serve`` and the per-GPU training slot.

``deployments/prefect.yaml`` is the one description of the deployments. ``deploy`` creates the work
pools it names and hands the file to Prefect's own ``prefect deploy``; ``serve`` builds the same
deployments in this process and runs them with Prefect's ``serve``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from tasks.artifacts import file_lock
from tasks.config import PipelineConfig
from tasks.errors import ConfigError, LlmpipeError
from tasks.redact import redact_value

log = logging.getLogger("llmpipe")

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deployments"
PREFECT_YAML = DEPLOY_DIR / "prefect.yaml"
WORK_POOL_TYPE = "process"
GPU_SLOT_ENV = "LLMPIPE_GPU_SLOT"
SLOT_LEASE_S = 300  # Prefect's lease on a held concurrency slot, renewed while held
OUTAGE_S = 120.0  # how long taking or creating a GPU slot waits out an unreachable Prefect API
PRETRAIN_COMPLETED = "llmpipe.pretrain.completed"
# A run whose process is gone (its worker or machine killed) stops sending Prefect's flow-run heartbeats (every
# PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, 180 by default, 30 at least); after HEARTBEATS_MISSED periods without
# one it is marked crashed, and a crashed deployment run is scheduled again, at most MAX_RUNS runs in all (the flow
# refuses a further one: ``flows.tracking.admit_rerun``).
HEARTBEATS_MISSED = 2
MAX_RUNS = 3
CRASH_ZOMBIES = "llmpipe: crash runs whose heartbeats stopped"
FLOW_NAMES = ("llm_pipeline", "pretrain", "finetune")  # every llmpipe flow: deployment runs and stage subflows
RERUN_CRASHED = "llmpipe: re-run crashed deployment runs"


def load_spec(path: Path = PREFECT_YAML) -> dict[str, Any]:
    """The parsed prefect.yaml; every deployment must name a flow entrypoint and a work pool."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read deployments: {exc}") from exc
    deployments = spec.get("deployments") if isinstance(spec, dict) else None
    if not deployments:
        raise ConfigError(f"{path}: no 'deployments' list")
    for i, dep in enumerate(deployments):
        for key in ("name", "entrypoint", "work_pool"):
            if not dep.get(key):
                raise ConfigError(f"{path}: deployments[{i}] has no '{key}'")
    return spec


def with_config(spec: dict[str, Any], cfg: PipelineConfig | None) -> dict[str, Any]:
    """A copy of ``spec`` whose deployments default to ``cfg`` (``None``: the flows' own defaults)."""
    spec = copy.deepcopy(spec)
    if cfg is not None:
        for dep in spec["deployments"]:
            dep["parameters"] = {**(dep.get("parameters") or {}), "config": cfg.model_dump(mode="json")}
    return spec


def deployment_names(spec: dict[str, Any]) -> list[str]:
    """``flow/deployment`` names, as Prefect shows them."""
    from prefect.flows import load_flow_from_entrypoint

    return [f"{load_flow_from_entrypoint(d['entrypoint']).name}/{d['name']}" for d in spec["deployments"]]


def require_api() -> str:
    """The configured Prefect API URL, checked to answer; deployments on a temporary API would vanish."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError("no Prefect API configured: start one with `prefect server start`, then "
                          "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` (or export PREFECT_API_URL)")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise LlmpipeError(f"Prefect API at {url} does not answer: {error}")
    return url


# What a run may not choose on a process worker: the command it starts, its environment, its working directory.
FIXED_BY_OPERATOR = ("command", "env", "working_dir")


def process_job_template() -> dict[str, Any]:
    """Prefect's process-worker base job template without the variables a run could use to take over the worker.

    The worker's own command, environment and (through the deployments' pull step) working directory are used;
    the variables schema accepts no other key, so the server refuses a run that asks for one.
    """
    from prefect.workers.process import ProcessWorker

    template = copy.deepcopy(ProcessWorker.get_default_base_job_template())
    for key in FIXED_BY_OPERATOR:
        template["job_configuration"].pop(key, None)
        template["variables"]["properties"].pop(key, None)
    template["variables"]["additionalProperties"] = False
    return template


def overridable(template: dict[str, Any]) -> list[str]:
    """Variables of a base job template that let a run change what starts or its environment."""
    variables = template.get("variables") or {}
    keys = set(variables.get("properties") or {})
    if variables.get("additionalProperties", True) is not False:
        keys |= set(FIXED_BY_OPERATOR)  # any key is accepted, and Prefect merges a run's `env` into the job's
    return sorted(keys & set(FIXED_BY_OPERATOR))


def ensure_work_pools(spec: dict[str, Any], update: bool = False) -> dict[str, str]:
    """Create each work pool the deployments name, as a process pool with ``process_job_template()``.

    An existing process pool whose template lets runs override the command, environment or working directory
    gets llmpipe's template when ``update`` is set, else a warning. Returns ``{pool: "created" | "updated" |
    "exists" | "open"}`` ("open": it still lets runs override them).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    pools = dict.fromkeys(d["work_pool"]["name"] for d in spec["deployments"])
    status = {}
    with get_client(sync_client=True) as client:
        for name in pools:
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=WORK_POOL_TYPE,
                                                       base_job_template=process_job_template()))
                status[name] = "created"
                continue
            open_keys = overridable(pool.base_job_template) if pool.type == WORK_POOL_TYPE else []
            if open_keys and update:
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=process_job_template()))
                status[name] = "updated"
            elif open_keys:
                log.warning("work pool %s lets a run override %s; `llmpipe deploy --update-pools` gives it "
                            "llmpipe's template", name, ", ".join(open_keys))
                status[name] = "open"
            else:
                status[name] = "exists"
    return status


def automations(heartbeat_seconds: int) -> list[Any]:
    """The two automations that take a run lost with its process to a re-run: marked crashed once its heartbeats
    stop, then scheduled again (Prefect's "Retry"; a worker of its pool takes it up, and its stages reuse what is
    built and resume training from the last checkpoint). The first acts on runs of llmpipe's flows (a lost
    deployment run and its stage subflows), the second on deployment runs tagged ``llmpipe``."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    ours = {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.llmpipe"}
    crash = AutomationCore(
        name=CRASH_ZOMBIES,
        description=f"A run of an llmpipe flow that sent no heartbeat for {HEARTBEATS_MISSED} periods of "
                    f"{heartbeat_seconds} s is marked crashed (its process is gone).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(FLOW_NAMES)},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=HEARTBEATS_MISSED * heartbeat_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="Marked crashed by llmpipe: the run's heartbeats stopped.")],
    )
    rerun = AutomationCore(
        name=RERUN_CRASHED,
        description=f"A crashed llmpipe deployment run is scheduled again (at most {MAX_RUNS} runs in all).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"}, match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[ours, {"prefect.resource.role": "deployment"}],
            for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry",
                                    message="Scheduled again by llmpipe after a crash.")],
    )
    return [crash, rerun]


def ensure_automations() -> list[str]:
    """Create or update ``automations()`` on the configured Prefect API (by name); their names."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    wanted = automations(get_current_settings().flows.heartbeat_frequency or 180)
    with get_client(sync_client=True) as client:
        for automation in wanted:
            found = client.read_automations_by_name(automation.name)
            if found:
                client.update_automation(found[0].id, automation)
            else:
                client.create_automation(automation)
    return [a.name for a in wanted]


class Deployed(NamedTuple):
    api_url: str
    pools: dict[str, str]  # name -> created, updated, exists, open
    deployments: list[str]  # flow/deployment
    automations: list[str]


def deploy(cfg: PipelineConfig | None = None, spec_path: Path = PREFECT_YAML, update_pools: bool = False) -> Deployed:
    """Create the work pools and every deployment in prefect.yaml on the configured Prefect API.

    ``cfg`` becomes the deployments' default parameters; ``update_pools`` gives existing pools that let runs
    override the command or environment llmpipe's template.
    """
    spec = with_config(load_spec(spec_path), cfg)
    api_url = require_api()
    pools = ensure_work_pools(spec, update_pools)
    with tempfile.TemporaryDirectory(prefix="llmpipe-deploy-") as tmp:
        prefect_file = Path(tmp) / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        # Prefect's own command: the same templating, pull steps, schedules and triggers as
        # `prefect deploy --all` run by hand. It runs in the checkout the workers run flows in (the pull step), so
        # the form's default config has the workspace a run there gets (paths are made absolute when validated).
        done = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
            cwd=DEPLOY_DIR.parent, capture_output=True, text=True,
        )
    if done.returncode != 0:
        raise LlmpipeError(f"prefect deploy failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return Deployed(api_url, pools, deployment_names(spec), ensure_automations())


def runner_deployments(spec: dict[str, Any]) -> list[Any]:
    """The deployments of ``spec`` as Prefect ``RunnerDeployment`` objects for ``serve`` (no work pool)."""
    from prefect.events import DeploymentTriggerTypes
    from prefect.flows import EntrypointType, load_flow_from_entrypoint
    from prefect.schedules import Cron
    from pydantic import TypeAdapter

    trigger = TypeAdapter(DeploymentTriggerTypes)
    out = []
    for dep in spec["deployments"]:
        schedules = []
        for s in dep.get("schedules") or []:
            if "cron" not in s:
                raise ConfigError(f"deployment {dep['name']}: only cron schedules are served, got {s}")
            schedules.append(Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True)))
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        out.append(flow.to_deployment(
            name=dep["name"], description=dep.get("description"), tags=dep.get("tags"),
            parameters=dep.get("parameters") or {}, schedules=schedules,
            triggers=[trigger.validate_python({"name": f"{dep['name']}__automation_{i}", **t})
                      for i, t in enumerate(dep.get("triggers") or [], start=1)],
            enforce_parameter_schema=dep.get("enforce_parameter_schema", True),
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return out


def serve(cfg: PipelineConfig | None = None, spec_path: Path = PREFECT_YAML) -> None:
    """Run every deployment in prefect.yaml in this process (Prefect's ``serve``) until interrupted."""
    from prefect import serve as prefect_serve

    spec = with_config(load_spec(spec_path), cfg)
    require_api()
    ensure_automations()
    prefect_serve(*runner_deployments(spec))


def announce_checkpoint(config: PipelineConfig, lm: Any, lm_report: Any) -> None:
    """Emit ``llmpipe.pretrain.completed`` with the config and the checkpoint and report references.

    Only for a pretrain flow run of its own: inside llm_pipeline or finetune, fine-tuning follows
    anyway. The finetune/gpu deployment's trigger turns the payload into its parameters.
    """
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    if flow_run.parent_flow_run_id:
        return
    emit_event(
        PRETRAIN_COMPLETED,
        resource={"prefect.resource.id": f"llmpipe.checkpoint.{lm.fingerprint}",
                  "prefect.resource.name": f"language model {lm.fingerprint}"},
        # Events are readable by anyone with access to the server: secrets in the config are masked.
        payload=redact_value({"config": config.model_dump(mode="json"), "lm": lm.model_dump(mode="json"),
                              "lm_report": lm_report.model_dump(mode="json")}),
    )


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold this worker's GPU while a training task runs.

    ``LLMPIPE_GPU_SLOT`` (set where a GPU worker starts) names a Prefect global concurrency limit,
    created with limit 1 on first use; two training tasks holding the same name never overlap,
    while every other stage runs freely. Unset: nothing is held (CPU pools, ``llmpipe run``).
    """
    name = os.environ.get(GPU_SLOT_ENV, "").strip()
    if not name:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    def ensure_limit() -> None:
        # The worker's runs look the limit up and create it one at a time (a lock file on this host, where the
        # slot's runs are): two creating it at once made the server log a unique-key error for the loser.
        lock = Path(tempfile.gettempdir()) / f"llmpipe-gpu-slot-{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock"
        with file_lock(lock), get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):  # another host's run, with the same slot name
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))

    logger = _run_logger()
    _through_outages(ensure_limit, f"GPU slot {name}", logger)
    logger.info("waiting for GPU slot %s", name)
    trained = False
    try:
        with contextlib.ExitStack() as held:
            _through_outages(lambda: held.enter_context(concurrency(name, occupy=1, strict=True,
                                                                     lease_duration=SLOT_LEASE_S)),
                             f"GPU slot {name}", logger)
            logger.info("holding GPU slot %s", name)
            yield
            trained = True
    except Exception as exc:
        from flows.retries import is_transient

        if not trained or not is_transient(exc):
            raise
        # The stage is done; the slot's lease, which nobody renews now, frees it by itself.
        logger.warning("could not release GPU slot %s (%s: the Prefect API did not answer); its lease frees it "
                       "within %d s", name, type(exc).__name__, SLOT_LEASE_S)


def _through_outages(call: Callable[[], Any], what: str, logger: Any) -> Any:
    """``call()``, tried again while the Prefect API is unreachable or answers 5xx, for up to ``OUTAGE_S``: a fresh
    Prefect client fails at once on a refused connection (it retries those only once it has connected), and a
    server restart takes seconds."""
    from flows.retries import is_transient

    deadline, pause = time.monotonic() + OUTAGE_S, 1.0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + pause > deadline:
                raise
            logger.warning("%s: the Prefect API did not answer (%s); trying again in %.0f s", what,
                           type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 15.0)


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log
