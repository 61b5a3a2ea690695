"""End-to-end: the whole pipeline on real Prefect and MLflow, tiny config (marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_llm_pipeline_registers_a_loadable_champion(harness, tmp_path: Path, monkeypatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import llm_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "e2e-sentiment"
    cfg = tiny_config(tmp_path / "ws", f"registry.model_name={name}")

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
    changed = llm_pipeline(tiny_config(tmp_path / "ws", f"registry.model_name={name}", "finetune.max_steps=27"))
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
    """What a new user does: `llmpipe run` with embedded defaults (Prefect's local API, ./mlflow.db)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", "tiny"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "models:/llmpipe-sentiment/1 registered" in run.stdout
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / ".llmpipe" / "prefect").is_dir()

    from mlflow import MlflowClient

    mv = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version_by_alias("llmpipe-sentiment", "champion")
    assert int(mv.version) == 1

    pred = subprocess.run([sys.executable, "-m", "flows.cli", "predict", "--model", "models:/llmpipe-sentiment@champion",
                           "a wonderful, moving film"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert pred.returncode == 0, pred.stderr[-3000:]
    label, score, text = pred.stdout.strip().splitlines()[-1].split("\t")
    assert label in {"negative", "positive"} and 0 < float(score) <= 1 and text == "a wonderful, moving film"
