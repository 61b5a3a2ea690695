"""The Prefect side of MLflow tracking (``tasks.tracking``): a flow's parent run, a stage's child run, live metrics.

``tracked_flow`` admits a run (``admit``: runs created through the Prefect API are checked against the worker
operator's policy) and runs its body inside the MLflow parent run of the root flow run; ``tracked`` runs a stage
inside its child run, keyed by the task-run id, and logs what the stage produced there. Prefect's identifiers go
onto every run and model version as ``lineage`` tags.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run, task_run

from flows import progress, reports
from tasks import confine, interrupts, policy, tracking
from tasks.artifacts import ArtifactRef
from tasks.config import PipelineConfig, flatten
from tasks.errors import LlmpipeError
from tasks.redact import redact_exception

# Stages with an MLflow child run: the config sections logged as its params, and which splits of its
# data inputs it reads (all of them when a kind is not listed).
TRACKED: dict[str, tuple[tuple[str, ...], dict[str, list[str]]]] = {
    "ingest-corpus": (("corpus",), {}),
    "ingest-labeled": (("labeled",), {}),
    "train-tokenizer": (("tokenizer",), {"corpora": ["train"]}),
    "tokenize": (("tokenizer",), {}),
    "pretrain": (("model", "pretrain"), {}),
    "evaluate-lm": (("evaluate",), {}),
    "finetune": (("finetune",), {"labeled": ["train", "validation"]}),
    "evaluate-classifier": (("evaluate",), {"labeled": ["train", "test"]}),
}


# The MLflow child run of the stage running in this context: training logs live metrics into it.
_STAGE_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmpipe_stage_run", default=None)
TRAINING_STAGES = {"pretrain", "finetune"}


def tracked(name: str, fn: Callable) -> Callable:
    """Run the stage inside its MLflow child run and log what it produced there."""
    sections, splits = TRACKED[name]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = [*args, *kwargs.values()]
        cfg = next((v for v in values if isinstance(v, PipelineConfig)), None)
        if cfg is None or not flow_run.id:  # called outside a flow: no parent run to attach to
            return fn(*args, **kwargs)
        with mlflow_stage_run(cfg, name) as (_, run_id), tracking.system_metrics(run_id, enabled=name in TRAINING_STAGES):
            token = _STAGE_RUN.set(run_id)
            try:
                ref = fn(*args, **kwargs)
            finally:
                _STAGE_RUN.reset(token)
            params = {f"{section}.{key}": value for section in sections if getattr(cfg, section, None) is not None
                      for key, value in flatten(getattr(cfg, section)).items()}
            tracking.log_stage(run_id, ref, params, [v for v in values if isinstance(v, ArtifactRef)], splits)
        return ref

    return wrapper


def training_progress(title: str, stage: str) -> Callable[[int, int, dict[str, float]], None]:
    """A Prefect progress artifact updated as training advances, live metrics in the stage's MLflow run, and the
    stage's row of the live progress display."""
    artifact_id = create_progress_artifact(progress=0.0, description=title)
    logger = get_run_logger()
    run_id = _STAGE_RUN.get()

    def update(step: int, total: int, row: dict[str, float]) -> None:
        progress.stage_advanced(stage, step, total, row)  # never raises
        try:
            if run_id:
                tracking.log_live_metrics(run_id, step, row)
        except Exception as exc:  # metrics are for people; never fail training over them
            logger.warning("live MLflow metrics failed at step %d: %s", step, exc)
        try:
            update_progress_artifact(artifact_id, progress=100.0 * step / total,
                                     description=f"{title}: step {step}/{total}, loss {row['loss']:.4f}")
        except Exception as exc:  # progress is for people; never fail training over it
            logger.debug("progress artifact update failed: %s", exc)

    return update


def lineage() -> dict[str, str]:
    """Prefect identifiers that go onto every MLflow run and model version."""
    return {
        "prefect.flow_run_id": str(flow_run.root_flow_run_id or flow_run.id or ""),
        "prefect.stage_flow_run_id": str(flow_run.id or ""),
        "prefect.flow_name": str(flow_run.flow_name or ""),
        "prefect.deployment_id": str(deployment.id or ""),
        "prefect.deployment_name": str(deployment.name or ""),
    }


@contextlib.contextmanager
def mlflow_stage_run(cfg: PipelineConfig, stage: str) -> Iterator[tuple[str, str]]:
    """This task run's MLflow child run ``(experiment_id, run_id)``; a retry of the task reuses it."""
    ids = {**lineage(), "prefect.task_run_id": str(task_run.id or ""), "prefect.task_name": str(task_run.task_name or "")}
    with tracking.stage_run(cfg, ids, stage) as run:
        yield run


@contextlib.contextmanager
def mlflow_parent_run(cfg: PipelineConfig) -> Iterator[str]:
    """The MLflow parent run of this flow run (one per root flow run; nested flows share it), linked from Prefect.

    The flow that owns the run (the root flow, or the first tracked one) marks it FINISHED or FAILED at the end.
    """
    ids = lineage()
    if ids["prefect.flow_run_id"] == ids["prefect.stage_flow_run_id"]:  # the root flow: is the server there?
        tracking.check_tracking_server()
    experiment_id, run_id, created = tracking.parent_run(cfg, ids, ids["prefect.flow_name"] or "llmpipe")
    owner = created or ids["prefect.flow_run_id"] == ids["prefect.stage_flow_run_id"]
    reports.mlflow_run_link(cfg.registry, experiment_id, run_id)
    try:
        yield run_id
    except BaseException:
        if owner:
            tracking.mark_failed(run_id)
        raise
    if owner:
        tracking.end_run(run_id)


# Set once the root flow of this run has passed the policy check; nested flows inherit it.
_ADMITTED: contextvars.ContextVar[bool] = contextvars.ContextVar("llmpipe_admitted", default=False)


@functools.cache
def _deployed(deployment_id: str) -> dict[str, Any] | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        config = (client.read_deployment(deployment_id).parameters or {}).get("config")
    return config if isinstance(config, dict) else None


def _deployed_config() -> dict[str, Any] | None:
    """The deployment's own ``config`` parameter, read from the server: what the operator deployed (``llmpipe
    deploy --config``), not this run's parameters (which ``prefect.runtime.deployment.parameters`` gives)."""
    return _deployed(str(deployment.id))


def admit(cfg: PipelineConfig, refs: dict[str, Any]) -> dict[str, Any]:
    """Refuse, before anything runs, a run created through the Prefect API whose parameters reach beyond what
    the worker's operator allows (``tasks/policy.py``); returns ``refs`` rebuilt from the run's workspace. Runs
    started in-process (``llmpipe run``, Python) belong to the operator and are not checked."""
    if _ADMITTED.get():
        return refs
    if deployment.id:  # the UI form, `prefect deployment run`, the API, a schedule or an event
        admit_rerun(flow_run.run_count)
        refs = policy.check_config(cfg, policy.Policy.from_env(), refs, flow_run.job_variables, _deployed_config())
    _ADMITTED.set(True)
    return refs


def admit_rerun(run_count: int) -> None:
    """Refuse a deployment run's attempt past ``MAX_RUNS``: a run that crashed that often (re-run each time by
    llmpipe's automation, ``flows.deploy.automations``, or by hand) fails instead, so a crash loop ends."""
    from flows.deploy import MAX_RUNS

    if run_count > MAX_RUNS:
        raise LlmpipeError(f"this flow run has started {run_count} times (it crashed and was run again); llmpipe "
                           f"runs one at most {MAX_RUNS} times: find why it crashes, then create a new run")


@contextlib.contextmanager
def confined_stage(cfg: PipelineConfig | None) -> Iterator[None]:
    """One attempt of a stage: for a run created through the Prefect API, the policy check again (files may have
    changed since admission or the last attempt), then every local read confined to the operator's data folders
    and the run's workspace, without following links (``tasks.confine``)."""
    if not deployment.id or cfg is None:
        yield
        return
    rules = policy.Policy.from_env()
    policy.check_config(cfg, rules, deployed=_deployed_config())
    with confine.confined(rules.confinement(cfg.workspace)):
        yield


def tracked_flow(fn: Callable) -> Callable:
    """Decorator for a flow function taking a ``PipelineConfig``: the run is admitted (``admit``), then its body
    runs inside ``mlflow_parent_run``.

    The wrapper carries ``fn``'s signature with its annotations resolved in ``fn``'s module, where Prefect, which
    resolves them in the wrapper's, would not find them."""
    signature = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        cfg = next((v for v in bound.arguments.values() if isinstance(v, PipelineConfig)), None)
        if cfg is None:
            cfg = PipelineConfig()  # the flow's own default
        token = _ADMITTED.set(_ADMITTED.get())  # nested flows see this run's admission; it ends with the flow
        try:
            refs = admit(cfg, {k: v for k, v in bound.arguments.items() if isinstance(v, ArtifactRef)})
            bound.arguments.update(refs)
            # SIGTERM/Ctrl-C (from the CLI, a worker or Prefect) waits out MLflow writes while the flow runs.
            with interrupts.installed(), mlflow_parent_run(cfg):
                return fn(*bound.args, **bound.kwargs)
        except Exception as exc:  # the flow run's failure message must not carry a secret
            redact_exception(exc)
            raise
        finally:
            _ADMITTED.reset(token)

    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper
