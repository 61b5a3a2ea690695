"""Thin Prefect tasks over the stage functions: retries for what retrying can fix, small refs in and out."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import errno
import functools
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect import task, unmapped
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run, task_run
from prefect.utilities.timeout import timeout as prefect_timeout

from flows import progress
from tasks import (
    evaluate,
    faults,
    finetune,
    ingest,
    interrupts,
    policy,
    pretrain,
    registry,
    tokenize,
    tracking,
)
from tasks.artifacts import (
    ArtifactRef,
    CheckpointRef,
    CorpusRef,
    LabeledRef,
    ReportRef,
    TokenizerRef,
    TokensRef,
    Workspace,
)
from tasks.config import PipelineConfig, flatten
from tasks.errors import LlmpipeError
from tasks.redact import redact, redact_exception
from tasks.training import set_threads

# OSError numbers worth a retry: the network, a busy or stale file (NFS), an interrupted or failed read. A full
# disk (ENOSPC, EDQUOT), a read-only file system, a missing file or a permission error fails the same way again.
TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET,
                    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH,
                    errno.ENETDOWN, errno.ESTALE}


def _library_transient(exc: BaseException) -> bool | None:
    """Transient error types of the libraries the stages call (HTTP clients, MLflow, SQLAlchemy); None: unknown."""
    modules = sys.modules
    if (httpx := modules.get("httpx")) and isinstance(exc, httpx.TransportError):
        return True
    if (httpx := modules.get("httpx")) and isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
    if (requests := modules.get("requests")) and isinstance(exc, requests.exceptions.ConnectionError
                                                            | requests.exceptions.Timeout):
        return True
    if (mlflow_exc := modules.get("mlflow.exceptions")) and isinstance(exc, mlflow_exc.MlflowException):
        # A server that answers 500, 503 or 429, or none at all (INTERNAL_ERROR after MLflow's own retries).
        return exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED") or None
    if (sa_exc := modules.get("sqlalchemy.exc")) and isinstance(exc, sa_exc.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)  # SQLite under a concurrent writer
    return None


def is_transient(exc: BaseException, training: bool = False) -> bool:
    """Whether a stage that failed with ``exc`` can succeed on a retry: connections, timeouts and transient OS
    errors, wherever they sit in the exception's chain; never a user error, out-of-memory (training stages
    shrink their own micro-batch), a full disk, a plain ``ValueError``, or a training stage past its time limit."""
    import torch

    if isinstance(exc, LlmpipeError | torch.OutOfMemoryError):
        return False
    if isinstance(exc, StageTimeout):
        return not training
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        verdict = _library_transient(exc)
        if verdict is not None:
            return verdict
        if isinstance(exc, TimeoutError | ConnectionError):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry what ``is_transient``; nothing once the process has been told to stop
    (SIGTERM, Ctrl-C)."""
    if interrupts.terminating():
        return False
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc, training="training" in (getattr(task, "tags", None)
                                                                                        or ()))


class StageTimeout(TimeoutError):
    """A stage ran past its time limit (``runtime.stage_timeout_s``, or a training stage's budget plus margin)."""


class _ToRunLogger(logging.Handler):
    """Sends the stage's ``llmpipe`` log records, from this task's thread only, to the Prefect run logger."""

    def __init__(self, run_logger: Any):
        super().__init__(logging.INFO)
        self.run_logger, self.thread = run_logger, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.run_logger.log(record.levelno, redact(record.getMessage()))


_STAGE_LOGGING = threading.Lock()
_stages_logging: list[tuple[int, bool]] = []  # the llmpipe logger's (level, propagate) before the first running stage


@contextlib.contextmanager
def _stage_logging() -> Iterator[logging.Logger]:
    """The ``llmpipe`` logger at INFO and not propagating while any stage runs, as it was once none does. Stages
    run in several threads at once (the tokenize shards), so the first to start saves the logger's settings and
    the last to end puts them back."""
    stage_logger = logging.getLogger("llmpipe")
    with _STAGE_LOGGING:
        if not _stages_logging:
            saved = (stage_logger.level, stage_logger.propagate)
            if stage_logger.level == logging.NOTSET or stage_logger.level > logging.INFO:
                stage_logger.setLevel(logging.INFO)
            stage_logger.propagate = False  # the run logger shows each record; the root logger would repeat it
        else:
            saved = _stages_logging[0]
        _stages_logging.append(saved)
    try:
        yield stage_logger
    finally:
        with _STAGE_LOGGING:
            _stages_logging.pop()
            if not _stages_logging:
                stage_logger.setLevel(saved[0])
                stage_logger.propagate = saved[1]


def _with_run_logs(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        handler = _ToRunLogger(get_run_logger())
        with _stage_logging() as stage_logger:
            stage_logger.addHandler(handler)
            try:
                return fn(*args, **kwargs)
            finally:
                stage_logger.removeHandler(handler)

    return wrapper


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


def _tracked(name: str, fn: Callable) -> Callable:
    """Run the stage inside its MLflow child run and log what it produced there."""
    sections, splits = TRACKED[name]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = [*args, *kwargs.values()]
        cfg = next((v for v in values if isinstance(v, PipelineConfig)), None)
        if cfg is None or not flow_run.id:  # called outside a flow: no parent run to attach to
            return fn(*args, **kwargs)
        with stage_run(cfg, name) as (_, run_id), tracking.system_metrics(run_id, enabled=name in TRAINING_STAGES):
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


def _time_limit(name: str, cfg: PipelineConfig) -> tuple[float, str]:
    """The stage's time limit and the settings it comes from."""
    train = {"pretrain": cfg.pretrain, "finetune": cfg.finetune}.get(name)
    if train is None:
        return cfg.runtime.stage_timeout(name), "runtime.stage_timeout_s"
    setting = f"{name}.max_time_s + runtime.timeout_margin_s" if train.max_time_s else "runtime.training_timeout_s"
    return cfg.runtime.stage_timeout(name, train), setting


def _shown(name: str, fn: Callable) -> Callable:
    """Report the stage to the live progress display of ``llmpipe run`` (``flows/progress.py``; nothing listens
    elsewhere): started, then finished, reused or failed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        progress.stage_started(name)
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            progress.stage_finished(name, ok=False)
            raise
        progress.stage_finished(name, ok=True, reused=bool(getattr(result, "reused", False)))
        return result

    return wrapper


def _task(name: str, retries: int = 2, **kw: Any) -> Callable:
    # The workspace is the cache (content-addressed, shared across runs), so Prefect's own is off.
    def decorate(fn: Callable) -> Any:
        body = _shown(name, _tracked(name, fn) if name in TRACKED else fn)

        @functools.wraps(body)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            cfg = next((v for v in (*args, *kwargs.values()) if isinstance(v, PipelineConfig)), None)
            limit, setting = _time_limit(name, cfg) if cfg is not None else (None, "")
            try:
                # The time limit comes from the run's config (Prefect's timeout_seconds is fixed per task); the
                # same cancel scope as Prefect's, so a hung read or call is interrupted.
                with prefect_timeout(limit, timeout_exc_type=StageTimeout):
                    faults.check(name)  # LLMPIPE_FAULT: fail this stage once, on purpose
                    return body(*args, **kwargs)
            except StageTimeout:
                raise StageTimeout(f"stage {name} ran past its time limit of {limit:g} s ({setting})") from None
            except Exception as exc:  # what Prefect records as the failure message must not carry a secret
                redact_exception(exc)
                raise

        return task(name=name, retries=retries, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient,
                    cache_policy=NONE, **kw)(_with_run_logs(guarded))

    return decorate


def _workspace(cfg: PipelineConfig) -> Workspace:
    return Workspace(cfg.workspace)


def _progress(title: str, stage: str) -> Callable[[int, int, dict[str, float]], None]:
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


def _data_report(ref: CorpusRef | LabeledRef, key: str, description: str) -> None:
    """The data report in the artifact (counts per step, class balance, lengths) as a Prefect markdown artifact."""
    if (ref.dir / ingest.DATA_REPORT).is_file():
        create_markdown_artifact(key=key, markdown=ingest.data_report_markdown(ingest.load_data_report(ref)),
                                 description=description)


@_task("ingest-corpus")
def ingest_corpus(cfg: PipelineConfig) -> CorpusRef:
    ref = ingest.ingest_corpus(cfg.corpus, _workspace(cfg), cfg.seed)
    _data_report(ref, "corpus-data-report", "Corpus: documents after each cleaning step, per source and split; lengths")
    return ref


@_task("ingest-labeled")
def ingest_labeled(cfg: PipelineConfig) -> LabeledRef:
    ref = ingest.ingest_labeled(cfg.labeled, _workspace(cfg), cfg.seed)
    _data_report(ref, "labeled-data-report", "Labeled data: rows and class balance per split")
    return ref


@_task("train-tokenizer")
def train_tokenizer(cfg: PipelineConfig, corpus: CorpusRef) -> TokenizerRef:
    return tokenize.train_tokenizer(corpus, cfg.tokenizer, _workspace(cfg))


@_task("tokenize-plan")
def plan_tokenize(cfg: PipelineConfig, corpus: CorpusRef, tokenizer: TokenizerRef) -> tokenize.TokenizePlan:
    return tokenize.plan_tokenize(corpus, tokenizer, _workspace(cfg), cfg.tokenizer.shard_mb)


@_task("tokenize-shard")
def tokenize_shard(cfg: PipelineConfig, shard: tokenize.ShardSpec) -> tokenize.ShardResult:
    return tokenize.encode_shard(shard)  # cfg: the run's settings, the stage time limit among them


@_task("tokenize")
def pack_tokens(cfg: PipelineConfig, corpus: CorpusRef, tokenizer: TokenizerRef, plan: tokenize.TokenizePlan,
                shards: list[tokenize.ShardResult]) -> TokensRef:
    return tokenize.pack_tokens(plan, shards, _workspace(cfg))


def tokenize_corpus(cfg: PipelineConfig, corpus: CorpusRef, tokenizer: TokenizerRef) -> TokensRef:
    """Tokenize inside a flow: plan the shards, encode them with one task each, pack.

    The shard tasks are a ``.map`` on the flow's task runner: threads by default; worker processes or a
    cluster with ``prefect_dask.DaskTaskRunner`` (the workspace must then be on storage every worker sees).
    """
    plan = plan_tokenize(cfg, corpus, tokenizer)
    shards = tokenize_shard.map(unmapped(cfg), plan.shards)
    return pack_tokens(cfg, corpus, tokenizer, plan, shards)


@_task("pretrain", tags=["training"])
def pretrain_lm(cfg: PipelineConfig, tokens: TokensRef, tokenizer: TokenizerRef) -> CheckpointRef:
    set_threads(cfg.runtime.threads)
    ref = pretrain.pretrain(tokens, tokenizer, cfg.model, cfg.pretrain, _workspace(cfg), cfg.seed,
                            on_progress=_progress("pretraining", "pretrain"))
    m = ref.meta
    _curve_artifact(ref, "loss_curve.png", "pretrain-loss-curve", "Pretraining loss curve",
                    f"## Pretraining\n\n{m['parameters'] / 1e6:.2f}M parameters, {m['steps']} steps, "
                    f"{m['tokens_seen']:,} tokens, stopped by {m.get('stop_reason', 'max_steps')}")
    return ref


def _curve_artifact(ref: CheckpointRef, image: str, key: str, description: str, heading: str) -> None:
    """A training curve of the artifact as a Prefect markdown artifact; none for an artifact built before the
    stage drew one."""
    curve = ref.dir / image
    if curve.is_file():
        create_markdown_artifact(
            key=key, description=description,
            markdown=f"{heading}\n\n![{description}](data:image/png;base64,"
                     f"{base64.b64encode(curve.read_bytes()).decode()})",
        )


@_task("evaluate-lm")
def evaluate_lm(cfg: PipelineConfig, lm: CheckpointRef, tokens: TokensRef) -> ReportRef:
    set_threads(cfg.runtime.threads)
    ref = evaluate.evaluate_lm(lm, tokens, cfg.evaluate, _workspace(cfg), cfg.pretrain.block_size, cfg.seed)
    r = ref.load()
    create_markdown_artifact(
        key="lm-report",
        markdown=(f"## Language model\n\n| metric | value |\n|---|---|\n| validation loss | {r['val_loss']:.4f} |\n"
                  f"| perplexity | {r['val_ppl']:.2f} |\n| unigram baseline perplexity | {r['unigram_ppl']:.2f} |\n"
                  f"| bits per byte | {r['val_bits_per_byte']:.4f} |\n\n### Samples\n\n"
                  + "\n".join(f"- {s!r}" for s in r["samples"])),
        description="Language-model evaluation",
    )
    return ref


@_task("finetune", tags=["training"])
def finetune_classifier(cfg: PipelineConfig, lm: CheckpointRef, labeled: LabeledRef) -> CheckpointRef:
    set_threads(cfg.runtime.threads)
    ref = finetune.finetune(lm, labeled, cfg.finetune, _workspace(cfg), cfg.seed,
                            on_progress=_progress("fine-tuning", "finetune"))
    create_markdown_artifact(key="finetune-summary", markdown=finetune.summary_markdown(ref.meta),
                             description="Fine-tuning: method, parameters trained, stop and the weights kept")
    m = ref.meta
    _curve_artifact(ref, finetune.CURVE_FILE, "finetune-training-curve",
                    "Fine-tuning curve: training loss and validation scores by step",
                    f"## Fine-tuning\n\n{m.get('steps')} steps, stopped by {m.get('stop_reason', 'max_steps')}; "
                    f"weights kept from step {m.get('kept_step')}")
    return ref


@_task("evaluate-classifier")
def evaluate_classifier(cfg: PipelineConfig, classifier: CheckpointRef, labeled: LabeledRef) -> ReportRef:
    set_threads(cfg.runtime.threads)
    ref = evaluate.evaluate_classifier(classifier, labeled, cfg.evaluate, _workspace(cfg),
                                       cfg.finetune.max_length, cfg.seed)
    r = ref.load()
    create_table_artifact(
        key="classifier-vs-baselines",
        table=[{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in r["comparison"]],
        description="Classifier beside the majority and TF-IDF + logistic-regression baselines on the test split",
    )
    create_markdown_artifact(key="classifier-report", markdown=evaluate.report_markdown(r),
                             description="Classifier evaluation beside baselines")
    return ref


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
def stage_run(cfg: PipelineConfig, stage: str) -> Iterator[tuple[str, str]]:
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
    create_link_artifact(key="mlflow-run", link=tracking.run_url(cfg.registry, experiment_id, run_id),
                         link_text=f"MLflow run {run_id}",
                         description=f"MLflow parent run of this pipeline (tracking URI {tracking.tracking_uri()})")
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


def admit(cfg: PipelineConfig, refs: dict[str, Any]) -> None:
    """Refuse, before anything runs, a run created through the Prefect API whose parameters reach beyond what
    the worker's operator allows (``tasks/policy.py``). Runs started in-process (``llmpipe run``, Python)
    belong to the operator and are not checked."""
    if _ADMITTED.get():
        return
    if deployment.id:  # the UI form, `prefect deployment run`, the API, a schedule or an event
        policy.check_config(cfg, policy.Policy.from_env(), refs, flow_run.job_variables)
    _ADMITTED.set(True)


def tracked_flow(fn: Callable) -> Callable:
    """Decorator for a flow function taking a ``PipelineConfig``: the run is admitted (``admit``), then its body
    runs inside ``mlflow_parent_run``."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        cfg = next((v for v in bound.arguments.values() if isinstance(v, PipelineConfig)), None)
        if cfg is None:
            cfg = PipelineConfig()  # the flow's own default
        token = _ADMITTED.set(_ADMITTED.get())  # nested flows see this run's admission; it ends with the flow
        try:
            admit(cfg, {k: v for k, v in bound.arguments.items() if isinstance(v, ArtifactRef)})
            # SIGTERM/Ctrl-C (from the CLI, a worker or Prefect) waits out MLflow writes while the flow runs.
            with interrupts.installed(), mlflow_parent_run(cfg):
                return fn(*args, **kwargs)
        except Exception as exc:  # the flow run's failure message must not carry a secret
            redact_exception(exc)
            raise
        finally:
            _ADMITTED.reset(token)

    return wrapper


def _registry_artifacts(cfg: PipelineConfig, ref: registry.ModelVersionRef, key: str) -> None:
    create_link_artifact(key=key, link=tracking.version_url(cfg.registry, ref.name, ref.version),
                         link_text=ref.uri, description=f"MLflow model version ({tracking.tracking_uri()})")


@_task("register-lm", retries=3)
def register_lm(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None) -> registry.ModelVersionRef:
    set_threads(cfg.runtime.threads)
    with stage_run(cfg, "register-lm") as run:
        ref = registry.register_lm(cfg, lm, lm_report, lineage(), run)
    _registry_artifacts(cfg, ref, "mlflow-lm-version")
    return ref


def _comparison_table(title: str, g: dict[str, Any], other: str) -> list[str]:
    lines = ["", f"### {title}", "", "| | value |", "|---|---|"]
    for key in ("metric", "candidate_score", "champion_score", "champion_version", "delta", "margin", "test",
                "p_value", "alpha", "rows"):
        if g.get(key) is not None:
            value, name = g[key], key.replace("_", " ").replace("champion", other)
            lines.append(f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |")
    return lines


def _gate_markdown(ref: registry.ModelVersionRef) -> str:
    g = ref.gate or {}
    head = "## Registered model"
    if ref.below_floor:
        head += "\n\n**Not champion: this version does not beat the baselines (the quality floor).** It is registered " \
                "for inspection, without an alias."
    lines = [f"{head}\n\n- model: `{ref.uri}`" + (f" (`{ref.alias_uri}`)" if ref.alias_uri else ""),
             f"- decision: {ref.decision}", f"- source language model: `{ref.lm_uri}`",
             f"- MLflow run: `{ref.run_id}`", f"- tracking URI: `{tracking.tracking_uri()}`"]
    if ref.floor:
        lines += _comparison_table("Quality floor (against the baselines)", ref.floor, "baseline")
    if g.get("candidate_score") not in (None, "None") and not ref.below_floor:
        lines += _comparison_table("Gate (against the champion)", g, "champion")
    return "\n".join(lines) + "\n"


@_task("register", retries=3)
def register_classifier(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None,
                        classifier: CheckpointRef, cls_report: ReportRef,
                        labeled: LabeledRef | None = None) -> registry.ModelVersionRef:
    set_threads(cfg.runtime.threads)
    with stage_run(cfg, "register") as run:
        ref = registry.register_classifier(cfg, lm, lm_report, classifier, cls_report, labeled, lineage(), run)
    _registry_artifacts(cfg, ref, "mlflow-model-version")
    create_markdown_artifact(key="registered-model", markdown=_gate_markdown(ref),
                             description="MLflow model registry: version, alias and the gate's numbers")
    return ref
