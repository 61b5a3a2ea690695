"""The model registry against a real ``mlflow server`` on loopback: runs, lineage and links of the finetune flow,
idempotent registration under retries and races, the gate on real models, promote and rollback."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from benchmarks.servers import MlflowServer
from flows.cli import main as cli
from tasks import registry
from tasks.artifacts import LabeledRef, fingerprint
from tasks.config import LabeledConfig, LabeledFiles, PipelineConfig
from tests.support import Models, build_models, with_registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", url)
        yield url


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("models") / "ws")


def _versions(name: str) -> list:
    from mlflow import MlflowClient

    return sorted(MlflowClient().search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))


def test_finetune_flow_on_mlflow_server_records_runs_lineage_and_links(server, models, harness) -> None:
    """The finetune flow against `mlflow server`: parent and child runs, datasets, lineage tags, Prefect links."""
    from mlflow import MlflowClient
    from prefect import get_client

    from flows.finetune import finetune

    name = "lineage-model"
    cfg = with_registry(models.cfg, model_name=name)
    result = finetune(cfg, lm=models.lm, lm_report=models.lm_report)
    mv_ref = result.model_version
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, "champion")
    assert int(mv.version) == mv_ref.version == 1 and mv_ref.created

    # Lineage on the version.
    tags = mv.tags
    flow_run_id = tags["prefect.flow_run_id"]
    assert tags["llmpipe.fingerprint"] == result.classifier.fingerprint
    assert tags["llmpipe.lm_fingerprint"] == models.lm.fingerprint
    assert tags["llmpipe.labeled_fingerprint"] == tags["llmpipe.test_set"] == models.labeled.fingerprint
    assert tags["llmpipe.tokenizer_fingerprint"] and tags["llmpipe.corpus_fingerprint"]
    assert tags["llmpipe.config_hash"] == fingerprint(cfg)
    assert tags["llmpipe.version"] == "0.1.0" and len(tags.get("llmpipe.git_commit", "x" * 40)) == 40
    assert tags["llmpipe.source_lm_version"] == f"models:/{name}-lm/1"
    assert tags["llmpipe.gate.decision"] == "champion"
    lm_mv = client.get_model_version(f"{name}-lm", "1")
    assert lm_mv.tags["llmpipe.fingerprint"] == models.lm.fingerprint
    assert lm_mv.tags["prefect.flow_run_id"] == flow_run_id

    # One parent run for the flow run, a child run per stage, datasets carried by fingerprint.
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    parents = [r for r in runs if r.data.tags["llmpipe.run_kind"] == "flow"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["finetune.max_steps"] == str(cfg.finetune.max_steps)
    assert parent.data.metrics["test_accuracy"] == result.report.load()["model"]["accuracy"]
    children = {r.data.tags["llmpipe.stage"]: r for r in runs if r.data.tags["llmpipe.run_kind"] == "stage"}
    assert set(children) == {"ingest-labeled", "finetune", "evaluate-classifier", "register"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert children["finetune"].data.params["finetune.lr"] == str(cfg.finetune.lr)
    assert "train/loss" in children["finetune"].data.metrics
    inputs = {(d.dataset.name, d.dataset.digest) for d in children["finetune"].inputs.dataset_inputs}
    assert inputs == {("labeled-train", models.labeled.fingerprint), ("labeled-validation", models.labeled.fingerprint)}
    parent_inputs = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    assert parent_inputs["labeled-test"] == models.labeled.fingerprint
    assert parent_inputs["corpus-train"] == tags["llmpipe.corpus_fingerprint"]
    assert mv.run_id == children["register"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(children["evaluate-classifier"].info.run_id, "artifact")}
    assert {"artifact/manifest.json", "artifact/report.json"} <= artifacts

    # The Prefect run links to the MLflow run and the version.
    async def links():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as pc:
            found = await pc.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return {a.key: a.data for a in found}

    import asyncio

    linked = asyncio.run(links())
    assert f"{server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}" in linked["mlflow-run"]
    assert f"{server}/#/models/{name}/versions/1" in linked["mlflow-model-version"]

    # The same flow again: every artifact reused, no second version, the gate is not re-run.
    again = finetune(cfg, lm=models.lm, lm_report=models.lm_report)
    assert not again.model_version.created and again.model_version.version == 1
    assert len(_versions(name)) == 1 and len(_versions(f"{name}-lm")) == 1


class Flaky:
    """Wraps a function so that its first call with ``when(args)`` true raises a transient error after (or
    instead of) doing its work."""

    def __init__(self, fn, after: bool, when=lambda args: True):
        self.fn, self.after, self.when, self.failed = fn, after, when, False

    def __call__(self, *args, **kwargs):
        if self.failed or not self.when(args):
            return self.fn(*args, **kwargs)
        self.failed = True
        if self.after:
            self.fn(*args, **kwargs)
        raise ConnectionError(f"injected failure in {self.fn.__name__}")


def test_registration_retried_three_times_yields_one_version(server, models, harness, monkeypatch) -> None:
    """The register task fails three times at three different points (after the version exists, after the
    alias moved, after the registry is done) and Prefect retries it: one version, one child run, one decision."""
    from mlflow import MlflowClient
    from prefect import flow

    from flows import reports, steps
    from flows.tracking import tracked_flow

    name = "retry-model"
    cfg = with_registry(models.cfg, model_name=name)
    clf = models.variant("retry", swap=False)
    report = models.report_for(clf, models.labeled)
    faults = {
        "after-version-created": Flaky(registry._wait_ready, after=True, when=lambda args: args[1] == name),
        "after-alias-moved": Flaky(registry._gate_metrics, after=True),
        "after-registry": Flaky(reports.model_version_link, after=False),
    }
    monkeypatch.setattr(registry, "_wait_ready", faults["after-version-created"])
    monkeypatch.setattr(registry, "_gate_metrics", faults["after-alias-moved"])
    monkeypatch.setattr(reports, "model_version_link", faults["after-registry"])

    @flow(name="register-with-retries")
    @tracked_flow
    def register_flow(config: PipelineConfig):
        task = steps.register_classifier.with_options(retries=3, retry_delay_seconds=0)
        state = task(config, models.lm, models.lm_report, clf, report, models.labeled, return_state=True)
        return state.result(), state.state_details.task_run_id

    ref, task_run_id = register_flow(cfg)
    assert all(f.failed for f in faults.values())
    versions = _versions(name)
    assert [int(v.version) for v in versions] == [ref.version] == [1]
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert versions[0].tags["llmpipe.gate.decision"] == "champion"
    # Every attempt wrote into the same child run of the same parent.
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    register_runs = client.search_runs([exp.experiment_id], f"tags.`llmpipe.stage` = 'register' and "
                                       f"tags.`prefect.flow_run_id` = '{versions[0].tags['prefect.flow_run_id']}'")
    assert len(register_runs) == 1 and register_runs[0].info.status == "FINISHED"
    assert versions[0].run_id == register_runs[0].info.run_id

    from prefect import get_client

    async def task_run_count() -> int:
        async with get_client() as pc:
            return (await pc.read_task_run(task_run_id)).run_count

    import asyncio

    assert asyncio.run(task_run_count()) == 4


def test_concurrent_registrations(server, models, monkeypatch, tmp_path) -> None:
    """Two different models at once: two versions. The same model from two writers in different workspaces (runs
    sharing one register a fingerprint one at a time) that both pass the lookup before either creates: one version
    (the later writer deletes its own)."""
    different = [models.variant("concurrent-a", swap=False), models.variant("concurrent-b", swap=True)]
    reports = {clf.fingerprint: models.report_for(clf, models.labeled) for clf in different}
    cfg = with_registry(models.cfg, model_name="concurrent-model")
    with ThreadPoolExecutor(2) as pool:
        refs = list(pool.map(lambda clf: registry.register_classifier(
            cfg, models.lm, models.lm_report, clf, reports[clf.fingerprint], models.labeled), different))
    assert sorted(r.version for r in refs) == [1, 2] and all(r.created for r in refs)
    assert {v.tags["llmpipe.fingerprint"] for v in _versions("concurrent-model")} == {c.fingerprint for c in different}

    # Force the race: both writers look the fingerprint up before either registers it.
    barrier = threading.Barrier(2, timeout=120)
    real_find = registry.find_version

    def find_then_wait(client, name, fp):
        found = real_find(client, name, fp)
        if name == "race-model":
            barrier.wait()
        return found

    monkeypatch.setattr(registry, "find_version", find_then_wait)
    same = models.variant("race", swap=False)
    twin_dir = tmp_path / "other-workspace" / same.dir.parent.name / same.fingerprint  # the same model, elsewhere
    shutil.copytree(same.dir, twin_dir)
    twin = same.model_copy(update={"path": str(twin_dir)})
    cfg = with_registry(models.cfg, model_name="race-model")
    same_report = models.report_for(same, models.labeled)
    with ThreadPoolExecutor(2) as pool:
        raced = list(pool.map(lambda clf: registry.register_classifier(
            cfg, models.lm, models.lm_report, clf, same_report, models.labeled), [same, twin]))
    versions = _versions("race-model")
    assert len(versions) == 1
    assert {r.version for r in raced} == {int(versions[0].version)}
    assert sorted(r.created for r in raced) == [False, True]
    assert versions[0].tags["llmpipe.gate.decision"] == "champion"


def _labeled_set(models: Models, root: Path, name: str, test_rows: list[dict]) -> LabeledRef:
    from tasks import ingest

    folder = root / name
    folder.mkdir(parents=True)
    paths = {}
    for split in ("train", "validation"):
        rows = [{"text": r["text"], "label": r["label"]} for r in _rows(models, split)]
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["test"] = folder / "test.jsonl"
    paths["test"].write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    cfg = LabeledConfig(source=LabeledFiles(train=str(paths["train"]), validation=str(paths["validation"]),
                                            test=str(paths["test"])))
    return ingest.ingest_labeled(cfg, models.ws, models.cfg.seed)


def _rows(models: Models, split: str) -> list[dict]:
    """Rows of the tiny labeled set with string labels."""
    from tasks.ingest import load_id2label, load_split

    id2label = load_id2label(models.labeled)
    return [{"text": r["text"], "label": id2label[r["label"]]} for r in load_split(models.labeled, split)]


def test_gate_on_two_test_sets_refuses_worse_and_insignificant_then_promote_and_rollback(
        server, models, tmp_path, capsys) -> None:
    """Real models scored from the registry: the classifier A and its head-swapped twin S disagree on every row.
    Held-out sets of real rows, all of the class the majority baseline does not predict (so it scores 0), make A
    clearly better (20 vs 2 rows) or S better by one row (10 vs 9). The quality floor comes first: S with 2 right
    rows does not beat the majority baseline significantly, and gets no alias. A candidate tested on another set
    than the champion must win on both: A, clearly better on its own set, is worse on the champion's."""
    from mlflow import MlflowClient

    name = "gate-model"
    client = MlflowClient()
    train = _rows(models, "train")
    labels = sorted({r["label"] for r in train})
    majority = labels[int(np.argmax(np.bincount([labels.index(r["label"]) for r in train])))]
    pool = [r for split in ("train", "validation", "test") for r in _rows(models, split) if r["label"] != majority]
    a_right = models.predictions(models.classifier, [r["text"] for r in pool]) == \
        np.array([labels.index(r["label"]) for r in pool])
    right = [r for r, ok in zip(pool, a_right, strict=True) if ok]
    wrong = [r for r, ok in zip(pool, a_right, strict=True) if not ok]
    assert len(right) >= 20 and len(wrong) >= 10, "the mini classifier should be neither always right nor wrong"
    clear = _labeled_set(models, tmp_path, "clear", right[:20] + wrong[:2])  # A: 20/22, S: 2/22, majority 0/22
    close = _labeled_set(models, tmp_path, "close", right[:9] + wrong[:10])  # A: 9/19, S: 10/19, majority 0/19

    cfg = with_registry(models.cfg, model_name=name, significance_test="mcnemar")

    def submit(tag: str, swap: bool, labeled: LabeledRef) -> registry.ModelVersionRef:
        clf = models.variant(tag, swap)
        return registry.register_classifier(cfg, models.lm, models.lm_report, clf, models.report_for(clf, labeled),
                                         labeled)

    def champion() -> int:
        return int(client.get_model_version_by_alias(name, "champion").version)

    first = submit("gate-s1", True, close)  # 10 of 19 right where the majority baseline gets none: above the floor
    assert first.version == 1 and champion() == 1 and first.decision.endswith("no champion yet")
    assert first.floor["candidate_score"] == pytest.approx(10 / 19) and first.floor["champion_score"] == 0
    assert first.floor["p_value"] < 0.05

    # A wins clearly on its own set, but version 1 was tested on the close set, where A is worse by a row.
    better = submit("gate-a", False, clear)
    assert better.version == 2 and champion() == 1 and better.aliases == ["challenger"]
    g = better.gate
    assert g["champion_version"] == 1 and g["candidate_score"] == pytest.approx(9 / 19)
    assert g["champion_score"] == pytest.approx(10 / 19) and g["test_sets"] == f"{clear.fingerprint},{close.fingerprint}"
    assert f"on its own test set labeled/{clear.fingerprint}: significantly better" in better.decision
    assert f"; on version 1's labeled/{close.fingerprint}: not better" in better.decision
    tags = client.get_model_version(name, "2").tags
    assert tags["llmpipe.gate.decision"] == "challenger" and tags["llmpipe.gate.test_sets"] == g["test_sets"]
    assert cli(["promote", name, "2"]) == 0  # people overrule the gate
    assert champion() == 2 and "version 2 is now champion (was version 1)" in capsys.readouterr().out

    # 2 right rows against the majority baseline's none is no significant improvement: below the floor.
    worse = submit("gate-s2", True, clear)
    assert worse.version == 3 and champion() == 2 and worse.below_floor and worse.aliases == []
    assert "below the quality floor" in worse.decision and "majority baseline" in worse.decision
    below = client.get_model_version(name, "3")
    assert below.tags["llmpipe.gate.decision"] == "below-floor" and not below.aliases
    assert float(below.tags["llmpipe.floor.p_value"]) >= 0.05 and "llmpipe.gate.p_value" not in below.tags
    assert "below the quality floor" in below.description

    slight = submit("gate-s3", True, close)
    assert slight.version == 4 and champion() == 2
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 4
    assert slight.gate["delta"] == pytest.approx(1 / 19) and slight.gate["p_value"] >= 0.05
    assert "improvement not significant" in slight.decision
    assert client.get_model_version(name, "4").tags["llmpipe.gate.decision"] == "challenger"

    # People overrule the gate, then undo it.
    assert cli(["promote", name, "4"]) == 0
    assert champion() == 4 and "version 4 is now champion (was version 2)" in capsys.readouterr().out
    assert "challenger" not in (client.get_model_version(name, "4").aliases or [])
    assert cli(["rollback", name]) == 0
    assert champion() == 2 and "version 2 is champion again (was version 4)" in capsys.readouterr().out
    assert cli(["rollback", name]) == 0 and champion() == 1
    assert cli(["rollback", name]) == 1
    assert f"{name}: no earlier champion recorded" in capsys.readouterr().err
    assert cli(["promote", name, "9"]) == 1
    assert "has no version 9" in capsys.readouterr().err
    moves = registry.champion_moves(client, name)
    assert [(m["from"], m["to"], m["by"]) for m in moves] == [
        (None, 1, "gate"), (1, 2, "promote"), (2, 4, "promote"), (4, 2, "rollback"), (2, 1, "rollback")]
    assert moves[0]["run_id"] == first.run_id
