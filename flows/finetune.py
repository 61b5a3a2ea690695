"""The ``finetune`` flow: labeled data + a pretrained LM -> classifier -> evaluation -> MLflow registry."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows import steps
from flows.deploy import gpu_slot
from flows.tracking import tracked_flow
from tasks.artifacts import CheckpointRef, LabeledRef, ReportRef
from tasks.config import PipelineConfig
from tasks.registry import ModelVersionRef


class FinetuneResult(BaseModel):
    labeled: LabeledRef
    classifier: CheckpointRef
    report: ReportRef
    model_version: ModelVersionRef


@flow(name="finetune", log_prints=True)
@tracked_flow
def finetune(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - the UI form's defaults
    lm: CheckpointRef | None = None,
    lm_report: ReportRef | None = None,
) -> FinetuneResult:
    """Fine-tune a classifier from the pretrained LM ``lm`` (pretrained first when not given), evaluate, register."""
    if lm is None:
        from flows.pretrain import pretrain

        pre = pretrain(config)
        lm, lm_report = pre.lm, pre.lm_report
    labeled = steps.ingest_labeled(config)
    with gpu_slot():
        classifier = steps.finetune_classifier(config, lm, labeled)
    report = steps.evaluate_classifier(config, classifier, labeled)
    version = steps.register_classifier(config, lm, lm_report, classifier, report, labeled)
    return FinetuneResult(labeled=labeled, classifier=classifier, report=report, model_version=version)
