"""The stage tasks: thin Prefect tasks over the stage functions, small refs in and out.

Every task is a stage function under ``_task``, which adds, from the inside out: the stage's MLflow child run
(``flows.tracking``), the live display (``flows.progress``), its time limit and fault injection, redacted failure
messages, the log bridge (``flows.logs``) and Prefect's retry policy (``flows.retries``). Reports become Prefect
artifacts through ``flows.reports``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NONE
from prefect.utilities.timeout import timeout as prefect_timeout

from flows import progress, reports
from flows.logs import with_run_logs
from flows.retries import StageTimeout, retry_transient, time_limit
from flows.tracking import TRACKED, confined_stage, lineage, mlflow_stage_run, tracked, training_progress
from tasks import evaluate, faults, finetune, ingest, pretrain, registry, tokenize
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
from tasks.redact import redact_exception


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
        body = _shown(name, tracked(name, fn) if name in TRACKED else fn)

        @functools.wraps(body)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            cfg = next((v for v in (*args, *kwargs.values()) if isinstance(v, PipelineConfig)), None)
            limit, setting = time_limit(name, cfg) if cfg is not None else (None, "")
            try:
                # The time limit comes from the run's config (Prefect's timeout_seconds is fixed per task); the
                # same cancel scope as Prefect's, so a hung read or call is interrupted.
                with prefect_timeout(limit, timeout_exc_type=StageTimeout), confined_stage(cfg):
                    faults.check(name)  # LLMPIPE_FAULT: fail this stage once, on purpose
                    return body(*args, **kwargs)
            except StageTimeout:
                raise StageTimeout(f"stage {name} ran past its time limit of {limit:g} s ({setting})") from None
            except Exception as exc:  # what Prefect records as the failure message must not carry a secret
                redact_exception(exc)
                raise

        return task(name=name, retries=retries, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient,
                    cache_policy=NONE, **kw)(with_run_logs(guarded))

    return decorate


def _workspace(cfg: PipelineConfig) -> Workspace:
    return Workspace(cfg.workspace)


@_task("ingest-corpus")
def ingest_corpus(cfg: PipelineConfig) -> CorpusRef:
    ref = ingest.ingest_corpus(cfg.corpus, _workspace(cfg), cfg.seed)
    reports.data_report(ref, "corpus-data-report",
                        "Corpus: documents after each cleaning step, per source and split; lengths")
    return ref


@_task("ingest-labeled")
def ingest_labeled(cfg: PipelineConfig) -> LabeledRef:
    ref = ingest.ingest_labeled(cfg.labeled, _workspace(cfg), cfg.seed)
    reports.data_report(ref, "labeled-data-report", "Labeled data: rows and class balance per split")
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
    ref = pretrain.pretrain(tokens, tokenizer, cfg.model, cfg.pretrain, _workspace(cfg), cfg.seed,
                            on_progress=training_progress("pretraining", "pretrain"), threads=cfg.runtime.threads)
    reports.pretrain_report(ref)
    return ref


@_task("evaluate-lm")
def evaluate_lm(cfg: PipelineConfig, lm: CheckpointRef, tokens: TokensRef) -> ReportRef:
    ref = evaluate.evaluate_lm(lm, tokens, cfg.evaluate, _workspace(cfg), cfg.pretrain.block_size, cfg.seed,
                               threads=cfg.runtime.threads)
    reports.lm_report(ref)
    return ref


@_task("finetune", tags=["training"])
def finetune_classifier(cfg: PipelineConfig, lm: CheckpointRef, labeled: LabeledRef) -> CheckpointRef:
    ref = finetune.finetune(lm, labeled, cfg.finetune, _workspace(cfg), cfg.seed,
                            on_progress=training_progress("fine-tuning", "finetune"), threads=cfg.runtime.threads)
    reports.finetune_report(ref)
    return ref


@_task("evaluate-classifier")
def evaluate_classifier(cfg: PipelineConfig, classifier: CheckpointRef, labeled: LabeledRef) -> ReportRef:
    ref = evaluate.evaluate_classifier(classifier, labeled, cfg.evaluate, _workspace(cfg),
                                       cfg.finetune.max_length, cfg.seed, threads=cfg.runtime.threads)
    reports.classifier_report(ref)
    return ref


@_task("register-lm", retries=3)
def register_lm(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None) -> registry.ModelVersionRef:
    with mlflow_stage_run(cfg, "register-lm") as run:
        ref = registry.register_lm(cfg, lm, lm_report, lineage(), run)
    reports.model_version_link(cfg.registry, ref, "mlflow-lm-version")
    return ref


@_task("register", retries=3)
def register_classifier(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None,
                        classifier: CheckpointRef, cls_report: ReportRef,
                        labeled: LabeledRef | None = None) -> registry.ModelVersionRef:
    with mlflow_stage_run(cfg, "register") as run:
        ref = registry.register_classifier(cfg, lm, lm_report, classifier, cls_report, labeled, lineage(), run)
    reports.model_version_link(cfg.registry, ref, "mlflow-model-version")
    reports.registered_model(ref)
    return ref
