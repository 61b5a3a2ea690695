"""End-to-end: the whole pipeline on real Prefect and MLflow, small configs (marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import mini_config, tiny_config

pytestmark = pytest.mark.slow


def test_llm_pipeline_registers_a_loadable_champion(harness, tmp_path: Path, monkeypatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import llm_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "e2e-sentiment"
    cfg = mini_config(tmp_path / "ws", f"registry.model_name={name}")

    first = llm_pipeline(cfg)
    client = MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) == 1
    assert first.finetune.model_version.created
    assert champion.tags["prefect.flow_run_id"]
    assert champion.tags["llmpipe.fingerprint"] == first.finetune.classifier.fingerprint
    assert (tmp_path / "mlartifacts").is_dir()

    # Training logged its curve live into the pretrain stage's child run, one point per log interval.
    pretrain_runs = client.search_runs([client.get_experiment_by_name("llmpipe").experiment_id],
                                       "tags.`llmpipe.stage` = 'pretrain'")
    assert len(pretrain_runs) == 1
    curve = client.get_metric_history(pretrain_runs[0].info.run_id, "train/loss")
    every = cfg.pretrain.log_every
    assert sorted(m.step for m in curve) == list(range(every, cfg.pretrain.max_steps + 1, every))

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(["a wonderful, moving film", "a dull and tedious mess"])
    assert set(out["label"]) <= {"negative", "positive"}
    assert ((out["score"] > 0) & (out["score"] <= 1)).all()

    # Nothing changed: every artifact reused, no duplicate version.
    again = llm_pipeline(cfg)
    refs = [again.pretrain.corpus, again.pretrain.tokenizer, again.pretrain.tokens, again.pretrain.lm,
            again.pretrain.lm_report, again.finetune.labeled, again.finetune.classifier, again.finetune.report]
    assert all(r.reused for r in refs)
    assert not again.finetune.model_version.created
    assert again.finetune.model_version.version == 1
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    # Only fine-tuning changed: upstream reused, version 2, champion moves only if it scores better.
    changed = llm_pipeline(mini_config(tmp_path / "ws", f"registry.model_name={name}", "finetune.max_steps=250"))
    assert changed.pretrain.lm.reused and changed.pretrain.tokens.reused
    assert not changed.finetune.classifier.reused
    assert changed.finetune.model_version.version == 2
    # The gate scored both versions from the registry on the same test rows: the numbers it recorded are the
    # evaluation reports' accuracies, and version 2 is champion only if the improvement was significant.
    v1_acc = first.finetune.report.load()["model"]["accuracy"]
    v2_acc = changed.finetune.report.load()["model"]["accuracy"]
    v2 = client.get_model_version(name, "2")
    assert float(v2.tags["llmpipe.gate.candidate_score"]) == pytest.approx(v2_acc, abs=1e-5)
    assert float(v2.tags["llmpipe.gate.champion_score"]) == pytest.approx(v1_acc, abs=1e-5)
    promoted = v2_acc > v1_acc and float(v2.tags["llmpipe.gate.p_value"]) < cfg.registry.alpha
    assert v2.tags["llmpipe.gate.decision"] == ("champion" if promoted else "challenger")
    assert int(client.get_model_version_by_alias(name, "champion").version) == (2 if promoted else 1)


def test_cli_run_then_predict_in_an_empty_folder(tmp_path: Path) -> None:
    """What a new user does: `llmpipe run` with embedded defaults (Prefect's local API, ./mlflow.db). The tiny
    preset's classifier learns nothing, so it is registered below the quality floor, without an alias."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", "tiny"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "models:/llmpipe-sentiment/1 registered; version 1 is below the quality floor" in run.stdout
    assert "WARNING" in run.stdout and "not champion" in run.stdout
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / ".llmpipe" / "prefect").is_dir()

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mv = client.get_model_version("llmpipe-sentiment", "1")
    assert not mv.aliases and mv.tags["llmpipe.gate.decision"] == "below-floor"
    assert "below the quality floor" in mv.description and float(mv.tags["llmpipe.floor.p_value"]) >= 0.05

    pred = subprocess.run([sys.executable, "-m", "flows.cli", "predict", "--model", "models:/llmpipe-sentiment/1",
                           "a wonderful, moving film"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert pred.returncode == 0, pred.stderr[-3000:]
    label, score, text = pred.stdout.strip().splitlines()[-1].split("\t")
    assert label in {"negative", "positive"} and 0 < float(score) <= 1 and text == "a wonderful, moving film"


def test_failures_reach_prefect_redacted_and_a_training_stage_past_its_limit_is_not_retried(
        harness, tmp_path: Path, monkeypatch) -> None:
    from prefect import flow, get_client
    from prefect.client.schemas.filters import FlowRunFilter

    from flows import steps
    from flows.tracking import tracked_flow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    @flow(name="stages-that-fail")
    @tracked_flow
    def stages(config):
        corpus = steps.ingest_corpus(config)
        tokenizer = steps.train_tokenizer(config, corpus)
        tokens = steps.tokenize_corpus(config, corpus, tokenizer)
        if config.labeled.source.kind == "files":
            return steps.ingest_labeled(config)
        return steps.pretrain_lm(config, tokens, tokenizer)

    def task_runs(state) -> dict:
        async def read():
            async with get_client() as client:
                return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id={"any_": [state.state_details.flow_run_id]}))

        import asyncio

        return {t.name.rsplit("-", 1)[0]: t for t in asyncio.run(read())}

    # A secret in a path: the task's and the flow's failure messages show it masked.
    secret = tmp_path / "api_key=s3cr3t-value-123" / "train.csv"
    state = stages(tiny_config(tmp_path / "ws", f"labeled.source={{kind: files, train: '{secret}'}}"),
                   return_state=True)
    assert state.is_failed() and "s3cr3t-value-123" not in state.message and "api_key=***" in state.message
    failed = task_runs(state)["ingest-labeled"]
    assert failed.state.is_failed() and "s3cr3t-value-123" not in failed.state.message
    assert failed.run_count == 1  # a DataError is not retried

    # Pretraining past its budget plus margin: timed out, and not retried (it would only run out of time again).
    state = stages(tiny_config(tmp_path / "ws", "pretrain.max_time_s=0.01", "runtime.timeout_margin_s=0",
                               "pretrain.max_steps=100000"), return_state=True)
    assert state.is_failed()
    timed_out = task_runs(state)["pretrain"]
    assert timed_out.state.name == "TimedOut" and timed_out.run_count == 1
    assert "pretrain.max_time_s + runtime.timeout_margin_s" in timed_out.state.message
