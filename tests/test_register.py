"""The model registry: the gate's statistics, idempotent registration under retries and races, the gate on real
models, lineage, promote/rollback, all against a real ``mlflow server`` on loopback (slow tests)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import mini_config

from flows.cli import main as cli
from tasks import gate, metrics, predict, registry
from tasks.artifacts import CheckpointRef, LabeledRef, ReportRef, Workspace, fingerprint
from tasks.config import LabeledConfig, LabeledFiles, PipelineConfig
from tasks.distributed import die_with_parent
from tasks.errors import LlmpipeError

# ================================================================ helpers shared with test_serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def process(cmd: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None):
    """Start ``cmd`` in its own process group, wait for ``ready_url``, and stop the whole group afterwards.

    The process is also sent SIGTERM if this test process dies first, even by ``kill -9``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent, env={**os.environ, **(env or {})})
    try:
        wait_http(ready_url, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@contextmanager
def mlflow_server(root: Path):
    """``mlflow server`` with a SQLite backend and a local artifact root (proxied over HTTP), on a free port."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with process(cmd, root / "server.log", f"{url}/health"):
        yield url


@dataclass
class Models:
    """A tiny LM and classifier built once from the stage functions, plus head-swapped twins of the classifier."""

    cfg: PipelineConfig
    ws: Workspace
    lm: CheckpointRef
    lm_report: ReportRef
    labeled: LabeledRef
    classifier: CheckpointRef
    report: ReportRef

    def variant(self, tag: str, swap: bool) -> CheckpointRef:
        """A copy of the classifier under its own fingerprint; ``swap`` exchanges the two label rows of the
        head, so on every row exactly one of the classifier and its swapped twin is right."""
        from safetensors.torch import load_file, save_file

        src = self.classifier

        def build(out: Path) -> dict:
            for f in src.dir.iterdir():
                if f.name != "manifest.json":
                    shutil.copy2(f, out / f.name)
            if swap:
                weights = load_file(str(out / "model.safetensors"))
                weights["score.weight"] = weights["score.weight"].flip(0).contiguous()
                save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
            return {**src.meta, "variant": tag, "swapped": swap}

        return self.ws.materialize(CheckpointRef, fingerprint("variant", src.fingerprint, tag, swap), build,
                                   stage="variant", inputs={"lm": self.lm.fingerprint,
                                                            "labeled": self.labeled.fingerprint})

    def report_for(self, clf: CheckpointRef, labeled: LabeledRef) -> ReportRef:
        from tasks import evaluate

        return evaluate.evaluate_classifier(clf, labeled, self.cfg.evaluate, self.ws, self.cfg.finetune.max_length,
                                            self.cfg.seed)

    def predictions(self, clf: CheckpointRef, texts: list[str]) -> np.ndarray:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tasks.classifier import encode_texts, predict_proba

        tok = AutoTokenizer.from_pretrained(str(clf.dir))
        model = AutoModelForSequenceClassification.from_pretrained(str(clf.dir))
        seqs = encode_texts(tok, texts, self.cfg.finetune.max_length)
        return predict_proba(model, seqs, tok.pad_token_id).argmax(-1)


def build_models(root: Path, *overrides: str) -> Models:
    from tasks import evaluate, finetune, ingest, pretrain, tokenize
    from tasks.training import set_threads

    set_threads(1)
    cfg = mini_config(root / "ws", *overrides)
    ws = Workspace(cfg.workspace)
    corpus = ingest.ingest_corpus(cfg.corpus, ws, cfg.seed)
    tok = tokenize.train_tokenizer(corpus, cfg.tokenizer, ws)
    tokens = tokenize.tokenize_corpus(corpus, tok, ws)
    lm = pretrain.pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    lm_report = evaluate.evaluate_lm(lm, tokens, cfg.evaluate, ws, cfg.pretrain.block_size, cfg.seed)
    labeled = ingest.ingest_labeled(cfg.labeled, ws, cfg.seed)
    clf = finetune.finetune(lm, labeled, cfg.finetune, ws, cfg.seed)
    report = evaluate.evaluate_classifier(clf, labeled, cfg.evaluate, ws, cfg.finetune.max_length, cfg.seed)
    return Models(cfg, ws, lm, lm_report, labeled, clf, report)


def with_registry(cfg: PipelineConfig, **fields) -> PipelineConfig:
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update=fields)})


# ================================================================ the gate's statistics (fast)


def test_mcnemar_is_the_exact_one_sided_binomial_test() -> None:
    # 10 rows only the candidate gets right, 2 only the champion: P(X >= 10 | n=12, p=1/2).
    cand = np.array([True] * 10 + [False] * 2 + [True] * 30)
    champ = np.array([False] * 10 + [True] * 2 + [True] * 30)
    p, counts = gate.mcnemar_p(cand, champ)
    assert counts == {"only_candidate_right": 10, "only_champion_right": 2}
    assert p == pytest.approx(sum(math.comb(12, k) for k in range(10, 13)) / 2**12)
    assert gate.mcnemar_p(champ, champ)[0] == 1.0


def _paired(n_both: int, only_cand: int, only_champ: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary labels and two prediction vectors with the given agreement pattern."""
    n = n_both + only_cand + only_champ
    y = np.arange(n) % 2
    cand, champ = y.copy(), y.copy()
    champ[n_both : n_both + only_cand] ^= 1
    cand[n_both + only_cand :] ^= 1
    return y, cand, champ


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_gate_promotes_clear_improvements_only(test: str) -> None:
    kw = dict(metric="accuracy", n_labels=2, test=test, alpha=0.05, margin=0.0, samples=500, seed=0)
    clear = gate.compare(*_paired(30, 12, 1), **kw)
    assert clear.promote and clear.p_value < 0.05 and clear.delta == pytest.approx(11 / 43)
    worse = gate.compare(*_paired(30, 1, 12), **kw)
    assert not worse.promote and worse.reason.startswith("not better")
    slight = gate.compare(*_paired(30, 3, 2), **kw)  # better by one row in 35
    assert not slight.promote and slight.delta > 0 and slight.p_value >= 0.05
    assert slight.reason.startswith("improvement not significant")
    tie = gate.compare(*_paired(30, 0, 0), **kw)
    assert not tie.promote and tie.delta == 0
    # Significant but below the margin: refused.
    margin = gate.compare(*_paired(30, 12, 1), **{**kw, "margin": 0.3})
    assert not margin.promote and "margin" in margin.reason


def test_bootstrap_is_deterministic_under_a_seed_and_tests_macro_f1() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    cand = np.where(rng.random(200) < 0.8, y, rng.integers(0, 3, 200))
    champ = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
    a = gate.bootstrap_p(y, cand, champ, "macro_f1", 3, 300, seed=7)
    assert a == gate.bootstrap_p(y, cand, champ, "macro_f1", 3, 300, seed=7)
    assert a < 0.01
    assert gate.bootstrap_p(y, champ, cand, "macro_f1", 3, 300, seed=7) > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_macro_f1_matches_the_evaluation_report(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, pred = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    pred[pred == 3] = 2  # one class never predicted
    expected = metrics.classification_metrics(y, pred, ["a", "b", "c", "d"])["macro_f1"]
    assert metrics.macro_f1(y, pred, 4) == expected  # scikit-learn's number, to the last bit


def test_gate_refuses_unknown_labels_by_name() -> None:
    with pytest.raises(ValueError, match=r"version 3 predicts labels \['spam'\]"):
        gate.label_ids(["ham", "spam"], {"ham": 0, "eggs": 1}, "version 3")


def test_registry_config_validates_the_gate_settings() -> None:
    from tasks.config import load_config
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=r"registry.alpha") as err:
        load_config(None, ["registry.alpha=0", "registry.significance_test=ttest", "registry.margin=-0.1"])
    assert "registry.significance_test" in str(err.value) and "registry.margin" in str(err.value)
    with pytest.raises(ConfigError, match="champion_alias and challenger_alias must differ"):
        load_config(None, ["registry.challenger_alias=champion"])
    assert load_config(None, ["registry.model_name=m"]).registry.lm_name == "m-lm"


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_the_quality_floor_needs_a_significant_win_over_the_baselines(tmp_path: Path, test: str) -> None:
    """The floor a version must clear before it can be champion: the majority class always, TF-IDF + LR on
    request; the gate's test at a fixed alpha that no run parameter changes (registry.alpha=0.9 here)."""
    from tasks import ingest
    from tasks.config import RegistryConfig
    from tasks.sample_data import sentiment_dataset

    data = sentiment_dataset(seed=3, n_train=200, n_validation=40, n_test=60)
    paths = {}
    for split, rows in data.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    labeled = ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(paths["train"]),
                                                                      validation=str(paths["validation"]),
                                                                      test=str(paths["test"]))), Workspace(tmp_path / "ws"))
    _, y_true, label2id = gate.held_out_split(labeled)
    y_true = np.array(y_true)
    reg = RegistryConfig(significance_test=test, alpha=0.9)
    majority_like = np.zeros_like(y_true)  # one class for every row, as the majority baseline predicts
    result, baseline = gate.quality_floor(reg, labeled, majority_like)
    assert not result.promote and baseline == "majority" and result.alpha == gate.FLOOR_ALPHA
    assert "the majority baseline" in result.reason
    near_perfect = y_true.copy()
    near_perfect[:3] = 1 - near_perfect[:3]
    result, baseline = gate.quality_floor(reg, labeled, near_perfect)
    assert result.promote and baseline == "majority" and result.p_value < gate.FLOOR_ALPHA

    # Asked for, TF-IDF + LR is a second, higher floor: a model right on 70% of the rows clears the majority
    # class but not TF-IDF + LR, which gets most of these reviews right.
    tfidf = reg.model_copy(update={"baseline_floor": "tfidf_logreg"})
    fair = y_true.copy()
    fair[: int(0.3 * len(fair))] = 1 - fair[: int(0.3 * len(fair))]
    assert gate.quality_floor(reg, labeled, fair)[0].promote
    result, baseline = gate.quality_floor(tfidf, labeled, fair)
    assert not result.promote and baseline == "tfidf_logreg" and "the tfidf_logreg baseline" in result.reason
    assert gate.quality_floor(tfidf, labeled, y_true)[0].promote


# ================================================================ consumers' input checks (fast)


def test_model_uri_forms() -> None:
    assert predict.model_uri("models:/m@champion") == "models:/m@champion"
    assert predict.model_uri("m/3") == "models:/m/3"
    with pytest.raises(LlmpipeError, match="expected models:/NAME@ALIAS"):
        predict.model_uri("models:/m")


def test_predict_file_errors_name_the_file_row_and_column(tmp_path: Path, capsys) -> None:
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("sentence,id\nfine film,1\n")
    assert cli(["predict", "--model", "models:/m@champion", "--input", str(csv_path)]) == 1
    assert f"{csv_path}: no column 'text'; columns present: sentence, id" in capsys.readouterr().err
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "good"}\n{"text": ""}\n')
    assert cli(["predict", "--model", "m@champion", "--input", str(jsonl)]) == 1
    assert f"{jsonl}: row 2: column 'text' is empty" in capsys.readouterr().err
    jsonl.write_text('{"text": "good"}\n{"text": \n')
    assert cli(["predict", "--model", "m@champion", "--input", str(jsonl)]) == 1
    assert f"{jsonl}: line 2 is not valid JSON" in capsys.readouterr().err
    assert cli(["predict", "--model", "m@champion", "--input", str(jsonl), "also a text"]) == 2
    assert cli(["predict", "--model", "nonsense", "some text"]) == 2  # a usage error
    assert not list(tmp_path.glob("*.predictions.*"))


# ================================================================ against a real mlflow server (slow)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", url)
        yield url


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _versions(name: str) -> list:
    from mlflow import MlflowClient

    return sorted(MlflowClient().search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_concurrent_registrations(server, models, monkeypatch) -> None:
    """Two different models at once: two versions. The same model from two writers that both pass the lookup
    before either creates: one version (the later writer deletes its own)."""
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
    cfg = with_registry(models.cfg, model_name="race-model")
    same_report = models.report_for(same, models.labeled)
    with ThreadPoolExecutor(2) as pool:
        raced = list(pool.map(lambda _: registry.register_classifier(
            cfg, models.lm, models.lm_report, same, same_report, models.labeled), range(2)))
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


@pytest.mark.slow
def test_gate_promotes_better_refuses_worse_and_insignificant_then_promote_and_rollback(
        server, models, tmp_path, capsys) -> None:
    """Real models scored from the registry: the classifier A and its head-swapped twin S disagree on every row.
    Held-out sets of real rows, all of the class the majority baseline does not predict (so it scores 0), make A
    clearly better (20 vs 2 rows) or S better by one row (10 vs 9). The quality floor comes first: S with 2 right
    rows does not beat the majority baseline significantly, and gets no alias."""
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

    better = submit("gate-a", False, clear)
    assert better.version == 2 and champion() == 2 and better.aliases == ["champion"]
    g = better.gate
    assert g["champion_version"] == 1 and g["candidate_score"] == pytest.approx(20 / 22)
    assert g["champion_score"] == pytest.approx(2 / 22) and g["p_value"] < 0.05
    tags = client.get_model_version(name, "2").tags
    assert tags["llmpipe.gate.decision"] == "champion" and float(tags["llmpipe.gate.p_value"]) < 0.05
    assert "significantly better" in client.get_model_version(name, "2").description

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
