"""Thin Prefect tasks over the stage functions: retries for what retrying can fix, small refs in and out."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run

from tasks import evaluate, finetune, ingest, pretrain, register, tokenize
from tasks.artifacts import (
    CheckpointRef,
    CorpusRef,
    LabeledRef,
    ReportRef,
    TokenizerRef,
    TokensRef,
    Workspace,
)
from tasks.config import PipelineConfig
from tasks.errors import LlmpipeError
from tasks.training import set_threads


def retry_transient(task, task_run, state) -> bool:
    """Retry I/O and connection failures; a configuration or data error fails at once."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, LlmpipeError | TypeError | KeyError | AttributeError)


class _ToRunLogger(logging.Handler):
    """Sends the stage's ``llmpipe`` log records, from this task's thread only, to the Prefect run logger."""

    def __init__(self, run_logger: Any):
        super().__init__(logging.INFO)
        self.run_logger, self.thread = run_logger, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.run_logger.log(record.levelno, record.getMessage())


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


def _task(name: str, retries: int = 2, **kw: Any) -> Callable:
    # The workspace is the cache (content-addressed, shared across runs), so Prefect's own is off.
    def decorate(fn: Callable) -> Any:
        return task(name=name, retries=retries, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient,
                    cache_policy=NONE, **kw)(_with_run_logs(fn))

    return decorate


def _workspace(cfg: PipelineConfig) -> Workspace:
    return Workspace(cfg.workspace)


def _progress(title: str) -> Callable[[int, int, dict[str, float]], None]:
    """A Prefect progress artifact updated as training advances."""
    artifact_id = create_progress_artifact(progress=0.0, description=title)
    logger = get_run_logger()

    def update(step: int, total: int, row: dict[str, float]) -> None:
        try:
            update_progress_artifact(artifact_id, progress=100.0 * step / total,
                                     description=f"{title}: step {step}/{total}, loss {row['loss']:.4f}")
        except Exception as exc:  # progress is for people; never fail training over it
            logger.debug("progress artifact update failed: %s", exc)

    return update


@_task("ingest-corpus")
def ingest_corpus(cfg: PipelineConfig) -> CorpusRef:
    return ingest.ingest_corpus(cfg.corpus, _workspace(cfg), cfg.seed)


@_task("ingest-labeled")
def ingest_labeled(cfg: PipelineConfig) -> LabeledRef:
    return ingest.ingest_labeled(cfg.labeled, _workspace(cfg), cfg.seed)


@_task("train-tokenizer")
def train_tokenizer(cfg: PipelineConfig, corpus: CorpusRef) -> TokenizerRef:
    return tokenize.train_tokenizer(corpus, cfg.tokenizer, _workspace(cfg))


@_task("tokenize")
def tokenize_corpus(cfg: PipelineConfig, corpus: CorpusRef, tokenizer: TokenizerRef) -> TokensRef:
    return tokenize.tokenize_corpus(corpus, tokenizer, _workspace(cfg))


@_task("pretrain", tags=["training"])
def pretrain_lm(cfg: PipelineConfig, tokens: TokensRef, tokenizer: TokenizerRef) -> CheckpointRef:
    set_threads(cfg.runtime.threads)
    return pretrain.pretrain(tokens, tokenizer, cfg.model, cfg.pretrain, _workspace(cfg), cfg.seed,
                             on_progress=_progress("pretraining"))


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
    return finetune.finetune(lm, labeled, cfg.finetune, _workspace(cfg), cfg.seed,
                             on_progress=_progress("fine-tuning"))


@_task("evaluate-classifier")
def evaluate_classifier(cfg: PipelineConfig, classifier: CheckpointRef, labeled: LabeledRef) -> ReportRef:
    set_threads(cfg.runtime.threads)
    ref = evaluate.evaluate_classifier(classifier, labeled, cfg.evaluate, _workspace(cfg),
                                       cfg.finetune.max_length, cfg.seed)
    r = ref.load()
    rows = [("llmpipe classifier", r["model"])] + [(name, m) for name, m in r["baselines"].items()]
    create_markdown_artifact(
        key="classifier-report",
        markdown="## Classifier on the test split\n\n| model | accuracy | macro-F1 |\n|---|---|---|\n"
        + "\n".join(f"| {n} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |" for n, m in rows),
        description="Classifier evaluation beside baselines",
    )
    return ref


def lineage() -> dict[str, str]:
    """Prefect identifiers that go onto every MLflow run and model version."""
    return {
        "prefect.flow_run_id": str(flow_run.root_flow_run_id or flow_run.id or ""),
        "prefect.stage_flow_run_id": str(flow_run.id or ""),
        "prefect.deployment_id": str(deployment.id or ""),
    }


@_task("register", retries=3)
def register_classifier(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None,
                        classifier: CheckpointRef, cls_report: ReportRef) -> register.ModelVersionRef:
    ref = register.log_and_register(cfg, lm, lm_report, classifier, cls_report, lineage())
    create_markdown_artifact(
        key="registered-model",
        markdown=(f"## Registered model\n\n- model: `{ref.uri}`" + (f" (`{ref.alias_uri}`)" if ref.alias_uri else "")
                  + f"\n- decision: {ref.decision}\n- MLflow run: `{ref.run_id}`\n"
                  f"- tracking URI: `{register.tracking_uri()}`\n"),
        description="MLflow model registry",
    )
    return ref
