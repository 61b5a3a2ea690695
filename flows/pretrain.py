"""The ``pretrain`` flow: corpus -> tokenizer -> tokens -> causal LM -> LM evaluation."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows import steps
from flows.deploy import announce_checkpoint, gpu_slot
from flows.tracking import tracked_flow
from tasks.artifacts import CheckpointRef, CorpusRef, ReportRef, TokenizerRef, TokensRef
from tasks.config import PipelineConfig


class PretrainResult(BaseModel):
    corpus: CorpusRef
    tokenizer: TokenizerRef
    tokens: TokensRef
    lm: CheckpointRef
    lm_report: ReportRef


@flow(name="pretrain", log_prints=True)
@tracked_flow
def pretrain(config: PipelineConfig = PipelineConfig()) -> PretrainResult:  # noqa: B008 - the UI form's defaults
    """Ingest the corpus, train the tokenizer, tokenize, pretrain the language model and evaluate it."""
    corpus = steps.ingest_corpus(config)
    tokenizer = steps.train_tokenizer(config, corpus)
    tokens = steps.tokenize_corpus(config, corpus, tokenizer)
    with gpu_slot():
        lm = steps.pretrain_lm(config, tokens, tokenizer)
    report = steps.evaluate_lm(config, lm, tokens)
    steps.register_lm(config, lm, report)
    announce_checkpoint(config, lm, report)
    return PretrainResult(corpus=corpus, tokenizer=tokenizer, tokens=tokens, lm=lm, lm_report=report)
