"""Thin Prefect tasks over the stage functions: retries for what retrying can fix, small refs in and out."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect import task
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

from tasks import evaluate, faults, finetune, ingest, interrupts, pretrain, register, tokenize
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
from tasks.redact import redact
from tasks.training import set_threads


def retry_transient(task, task_run, state) -> bool:
    """Retry I/O and connection failures; a configuration or data error fails at once, and nothing is retried
    once the process has been told to stop (SIGTERM, Ctrl-C)."""
    if interrupts.terminating():
        return False
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, LlmpipeError | TypeError | KeyError | AttributeError)


class _ToRunLogger(logging.Handler):
    """Sends the stage's ``llmpipe`` log records, from this task's thread only, to the Prefect run logger."""

    def __init__(self, run_logger: Any):
        super().__init__(logging.INFO)
        self.run_logger, self.thread = run_logger, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.run_logger.log(record.levelno, redact(record.getMessage()))


def _with_run_logs(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stage_logger = logging.getLogger("llmpipe")
        handler = _ToRunLogger(get_run_logger())
        stage_logger.addHandler(handler)
        if stage_logger.level == logging.NOTSET or stage_logger.level > logging.INFO:
            stage_logger.setLevel(logging.INFO)
        propagate, stage_logger.propagate = stage_logger.propagate, False
        try:
            return fn(*args, **kwargs)
        finally:
            stage_logger.removeHandler(handler)
            stage_logger.propagate = propagate

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
        with stage_run(cfg, name) as (_, run_id), register.system_metrics(run_id, enabled=name in TRAINING_STAGES):
            token = _STAGE_RUN.set(run_id)
            try:
                ref = fn(*args, **kwargs)
            finally:
                _STAGE_RUN.reset(token)
            params = {f"{section}.{key}": value for section in sections if getattr(cfg, section, None) is not None
                      for key, value in flatten(getattr(cfg, section)).items()}
            register.log_stage(run_id, ref, params, [v for v in values if isinstance(v, ArtifactRef)], splits)
        return ref

    return wrapper


def _task(name: str, retries: int = 2, **kw: Any) -> Callable:
    # The workspace is the cache (content-addressed, shared across runs), so Prefect's own is off.
    def decorate(fn: Callable) -> Any:
        body = _tracked(name, fn) if name in TRACKED else fn

        @functools.wraps(body)
        def with_faults(*args: Any, **kwargs: Any) -> Any:
            faults.check(name)  # LLMPIPE_FAULT: fail this stage once, on purpose
            return body(*args, **kwargs)

        return task(name=name, retries=retries, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient,
                    cache_policy=NONE, **kw)(_with_run_logs(with_faults))

    return decorate


def _workspace(cfg: PipelineConfig) -> Workspace:
    return Workspace(cfg.workspace)


def _progress(title: str) -> Callable[[int, int, dict[str, float]], None]:
    """A Prefect progress artifact updated as training advances, and live metrics in the stage's MLflow run."""
    artifact_id = create_progress_artifact(progress=0.0, description=title)
    logger = get_run_logger()
    run_id = _STAGE_RUN.get()

    def update(step: int, total: int, row: dict[str, float]) -> None:
        try:
            if run_id:
                register.log_live_metrics(run_id, step, row)
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
def tokenize_shard(shard: tokenize.ShardSpec) -> tokenize.ShardResult:
    return tokenize.encode_shard(shard)


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
    return pack_tokens(cfg, corpus, tokenizer, plan, tokenize_shard.map(plan.shards))


@_task("pretrain", tags=["training"])
def pretrain_lm(cfg: PipelineConfig, tokens: TokensRef, tokenizer: TokenizerRef) -> CheckpointRef:
    set_threads(cfg.runtime.threads)
    ref = pretrain.pretrain(tokens, tokenizer, cfg.model, cfg.pretrain, _workspace(cfg), cfg.seed,
                            on_progress=_progress("pretraining"))
    curve = ref.dir / "loss_curve.png"
    if curve.is_file():
        m = ref.meta
        create_markdown_artifact(
            key="pretrain-loss-curve",
            markdown=(f"## Pretraining\n\n{m['parameters'] / 1e6:.2f}M parameters, {m['steps']} steps, "
                      f"{m['tokens_seen']:,} tokens, stopped by {m.get('stop_reason', 'max_steps')}\n\n"
                      f"![loss curve](data:image/png;base64,{base64.b64encode(curve.read_bytes()).decode()})"),
            description="Pretraining loss curve",
        )
    return ref


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
                            on_progress=_progress("fine-tuning"))
    create_markdown_artifact(key="finetune-summary", markdown=finetune.summary_markdown(ref.meta),
                             description="Fine-tuning: method, parameters trained, stop and the weights kept")
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
    with register.stage_run(cfg, ids, stage) as run:
        yield run


@contextlib.contextmanager
def mlflow_parent_run(cfg: PipelineConfig) -> Iterator[str]:
    """The MLflow parent run of this flow run (one per root flow run; nested flows share it), linked from Prefect.

    The flow that owns the run (the root flow, or the first tracked one) marks it FINISHED or FAILED at the end.
    """
    ids = lineage()
    experiment_id, run_id, created = register.parent_run(cfg, ids, ids["prefect.flow_name"] or "llmpipe")
    owner = created or ids["prefect.flow_run_id"] == ids["prefect.stage_flow_run_id"]
    create_link_artifact(key="mlflow-run", link=register.run_url(cfg.registry, experiment_id, run_id),
                         link_text=f"MLflow run {run_id}",
                         description=f"MLflow parent run of this pipeline (tracking URI {register.tracking_uri()})")
    try:
        yield run_id
    except BaseException:
        if owner:
            register.mark_failed(run_id)
        raise
    if owner:
        register.end_run(run_id)


def tracked_flow(fn: Callable) -> Callable:
    """Decorator for a flow function taking a ``PipelineConfig``: its body runs inside ``mlflow_parent_run``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cfg = next((v for v in (*args, *kwargs.values()) if isinstance(v, PipelineConfig)), None)
        if cfg is None:
            cfg = PipelineConfig()  # the flow's own default
        interrupts.install()  # SIGTERM/Ctrl-C (from the CLI, a worker or Prefect) waits out MLflow writes
        with mlflow_parent_run(cfg):
            return fn(*args, **kwargs)

    return wrapper


def _registry_artifacts(cfg: PipelineConfig, ref: register.ModelVersionRef, key: str) -> None:
    create_link_artifact(key=key, link=register.version_url(cfg.registry, ref.name, ref.version),
                         link_text=ref.uri, description=f"MLflow model version ({register.tracking_uri()})")


@_task("register-lm", retries=3)
def register_lm(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None) -> register.ModelVersionRef:
    set_threads(cfg.runtime.threads)
    with stage_run(cfg, "register-lm") as run:
        ref = register.register_lm(cfg, lm, lm_report, lineage(), run)
    _registry_artifacts(cfg, ref, "mlflow-lm-version")
    return ref


def _gate_markdown(ref: register.ModelVersionRef) -> str:
    g = ref.gate or {}
    lines = [f"## Registered model\n\n- model: `{ref.uri}`" + (f" (`{ref.alias_uri}`)" if ref.alias_uri else ""),
             f"- decision: {ref.decision}", f"- source language model: `{ref.lm_uri}`",
             f"- MLflow run: `{ref.run_id}`", f"- tracking URI: `{register.tracking_uri()}`"]
    if g.get("candidate_score") not in (None, "None"):
        lines += ["", "### Gate", "", "| | value |", "|---|---|"]
        for key in ("metric", "candidate_score", "champion_score", "champion_version", "delta", "margin", "test",
                    "p_value", "alpha", "rows"):
            if g.get(key) is not None:
                value = g[key]
                lines.append(f"| {key.replace('_', ' ')} | {value:.4g} |" if isinstance(value, float)
                             else f"| {key.replace('_', ' ')} | {value} |")
    return "\n".join(lines) + "\n"


@_task("register", retries=3)
def register_classifier(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None,
                        classifier: CheckpointRef, cls_report: ReportRef,
                        labeled: LabeledRef | None = None) -> register.ModelVersionRef:
    set_threads(cfg.runtime.threads)
    with stage_run(cfg, "register") as run:
        ref = register.log_and_register(cfg, lm, lm_report, classifier, cls_report, labeled, lineage(), run)
    _registry_artifacts(cfg, ref, "mlflow-model-version")
    create_markdown_artifact(key="registered-model", markdown=_gate_markdown(ref),
                             description="MLflow model registry: version, alias and the gate's numbers")
    return ref
