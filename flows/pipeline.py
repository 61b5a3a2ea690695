"""``llm_pipeline``: the whole life of the model, from text to a registered classifier."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.finetune import FinetuneResult, finetune
from flows.pretrain import PretrainResult, pretrain
from flows.tracking import tracked_flow
from tasks.config import PipelineConfig


class PipelineResult(BaseModel):
    pretrain: PretrainResult
    finetune: FinetuneResult


@flow(name="llm_pipeline", log_prints=True)
@tracked_flow
def llm_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineResult:  # noqa: B008 - the UI form's defaults
    """Ingest -> tokenizer -> tokens -> pretrain -> evaluate LM -> fine-tune -> evaluate -> register."""
    pre = pretrain(config)
    fin = finetune(config, lm=pre.lm, lm_report=pre.lm_report)
    return PipelineResult(pretrain=pre, finetune=fin)
