"""MLflow tracking and the model registry: runs per flow and stage, registration, the gate, consumers.

- **Runs.** One MLflow run per flow run (keyed by the Prefect root flow-run id) with a child run per
  stage (keyed by the Prefect task-run id), so a retried task or a re-run flow writes into the run
  it already has.
- **Registration.** The classifier (transformers flavor, text-classification) and the language model
  (text-generation) are registered once per artifact fingerprint: the fingerprint tag is looked up
  before a version is created, and when two writers race, the lowest version wins and the other
  deletes its own.
- **Gate.** A new classifier version becomes champion only if it beats the current champion on the
  same held-out rows, both loaded from the registry and scored in this process (``tasks.gate``);
  otherwise it becomes challenger.
- **Consumers.** ``predict`` for texts and CSV/JSONL files; ``promote`` and ``rollback`` for people.

Nothing here imports Prefect: Prefect identifiers arrive as a plain ``lineage`` dict of tags.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import re
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import faults, interrupts
from tasks.artifacts import (
    MANIFEST,
    ArtifactRef,
    CheckpointRef,
    LabeledRef,
    ReportRef,
    fingerprint,
    write_atomic,
)
from tasks.config import PipelineConfig, RegistryConfig, flatten, to_yaml
from tasks.errors import DataError, LlmpipeError
from tasks.redact import redact

log = logging.getLogger("llmpipe")

FP_TAG = "llmpipe.fingerprint"  # the idempotency key of a model version: its artifact's fingerprint
TEST_SET_TAG = "llmpipe.test_set"
FLOW_RUN_TAG = "prefect.flow_run_id"
TASK_RUN_TAG = "prefect.task_run_id"
RUN_KIND_TAG = "llmpipe.run_kind"
STAGE_TAG = "llmpipe.stage"
DECISION_TAG = "llmpipe.gate.decision"
HISTORY_TAG = "llmpipe.champion_history"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
DEFAULT_UI = "http://127.0.0.1:5000"
SMALL_FILES = ("manifest.json", "report.json", "data_report.json", "labels.json", "training.json")
EXAMPLE_TEXTS = ["a wonderful, moving film", "a dull and tedious mess"]
# transformers builds models on the meta device through process-wide hooks, so two threads loading models
# at once (two registrations in one worker's thread pool) can corrupt each other: model work takes turns.
_MODEL_WORK = threading.Lock()


class ModelVersionRef(BaseModel):
    name: str
    version: int
    uri: str
    alias_uri: str | None = None
    created: bool
    aliases: list[str] = []
    run_id: str | None = None
    experiment_id: str | None = None
    decision: str = ""
    gate: dict[str, Any] | None = None
    floor: dict[str, Any] | None = None  # the quality floor's comparison with the baselines
    below_floor: bool = False  # registered for inspection, without an alias
    lm_uri: str | None = None


# ---------------------------------------------------------------------------------------------- basics


def _store_in_process() -> bool:
    """Whether tracking writes run in this process (a SQLite or other database URI, a file store), where a
    signal landing mid-write can leave the store locked; a tracking server is not affected."""
    import mlflow

    return not mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks"))


class _ShieldedClient:
    """An ``MlflowClient`` whose calls finish before a SIGTERM or Ctrl-C takes effect (``tasks.interrupts``)."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with interrupts.shielded():
                return attr(*args, **kwargs)

        return call


def _shielded() -> contextlib.AbstractContextManager:
    return interrupts.shielded() if _store_in_process() else contextlib.nullcontext()


def _client():
    from mlflow import MlflowClient

    client = MlflowClient()
    return _ShieldedClient(client) if _store_in_process() else client


def tracking_uri() -> str:
    """The tracking URI as it may be shown to people (a password in it is masked)."""
    import mlflow

    return redact(mlflow.get_tracking_uri())


def check_tracking_server(timeout_s: float = 5.0) -> None:
    """Fail at once, with a clear error, when the tracking URI is an MLflow server that does not answer; MLflow's
    own client would retry each call for minutes first. Stores in this process (SQLite, files) are not checked."""
    import mlflow
    import requests

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
        problem = None if answer.status_code == 200 else f"HTTP {answer.status_code}"
    except requests.RequestException as exc:
        problem = type(exc).__name__
    if problem:
        raise LlmpipeError(f"the MLflow tracking server {tracking_uri()} does not answer ({problem}); start it, or "
                           "set MLFLOW_TRACKING_URI to one that runs")


def ui_base(reg: RegistryConfig) -> str:
    if reg.ui_url:
        return reg.ui_url.rstrip("/")
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def run_url(reg: RegistryConfig, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(reg)}/#/experiments/{experiment_id}/runs/{run_id}"


def version_url(reg: RegistryConfig, name: str, version: int | str) -> str:
    return f"{ui_base(reg)}/#/models/{name}/versions/{version}"


def _pip_requirements() -> list[str]:
    """Exact versions of what loading the model needs, so logging never resolves environments over the network."""
    reqs = []
    for dist in ("mlflow", "transformers", "torch", "tokenizers", "safetensors"):
        version = metadata.version(dist).split("+")[0]
        reqs.append(f"{dist}=={version}")
    return reqs


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """The package version and, when the code is a git checkout, its commit and whether it has local changes."""
    tags = {"llmpipe.version": metadata.version("llmpipe")}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit:
        tags.update({"llmpipe.git_commit": commit, "llmpipe.git_dirty": str(bool(dirty)).lower(),
                     "mlflow.source.git.commit": commit})
    return tags


def artifact_lineage(*refs: ArtifactRef) -> dict[str, str]:
    """``llmpipe.<input>_fingerprint`` tags for every artifact upstream of ``refs``, read from their manifests."""
    out: dict[str, str] = {}
    pending = [(ref.dir, ref.kind) for ref in refs]
    seen: set[Path] = set()
    while pending:
        path, _kind = pending.pop()
        if path in seen or not (path / MANIFEST).is_file():
            continue
        seen.add(path)
        manifest = json.loads((path / MANIFEST).read_text())
        root = path.parent.parent
        for name, fp in sorted((manifest.get("inputs") or {}).items()):
            if not isinstance(fp, str):
                continue
            out.setdefault(f"llmpipe.{name}_fingerprint", fp)
            pending.extend((d, d.parent.name) for d in root.glob(f"*/{fp}") if d.is_dir())
    return out


def local_artifact_root(tracking_uri: str) -> Path | None:
    """``mlartifacts/`` beside a SQLite store (``sqlite:///mlflow.db`` -> ``./mlartifacts``); None for a server."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / DEFAULT_ARTIFACT_DIR
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return Path(DEFAULT_ARTIFACT_DIR).resolve()
    return None


def ensure_experiment(name: str) -> str:
    """The experiment id; a new experiment on a SQLite store keeps its artifacts in ``mlartifacts/`` beside it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = local_artifact_root(mlflow.get_tracking_uri())
    location = root.as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another run created it between our lookup and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _metric_key(key: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", key)


# ---------------------------------------------------------------------------------------------- runs


def _find_runs(client, experiment_id: str, key: dict[str, str]) -> list:
    query = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in key.items())
    return client.search_runs([experiment_id], query, max_results=50, order_by=["attributes.start_time ASC"])


def _get_or_create_run(client, experiment_id: str, key: dict[str, str], tags: dict[str, str],
                       run_name: str) -> tuple[str, bool]:
    """The one run carrying the ``key`` tags: found, or created. Two racing creators keep the earliest run."""
    found = _find_runs(client, experiment_id, key)
    if found:
        return found[0].info.run_id, False
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **key})
    found = _find_runs(client, experiment_id, key)
    winner = min(found, key=lambda r: (r.info.start_time, r.info.run_id)) if found else run
    if winner.info.run_id != run.info.run_id:
        client.delete_run(run.info.run_id)
        return winner.info.run_id, False
    return run.info.run_id, True


def parent_run(cfg: PipelineConfig, lineage: dict[str, str], name: str = "llmpipe") -> tuple[str, str, bool]:
    """The MLflow parent run of the Prefect flow run ``lineage['prefect.flow_run_id']``: ``(experiment, run, created)``.

    A new one gets the flattened config as params, the config as YAML, the code version and lineage tags.
    """
    client = _client()
    experiment_id = ensure_experiment(cfg.registry.experiment)
    root = lineage.get(FLOW_RUN_TAG) or ""
    if not root:
        raise ValueError("parent_run needs lineage['prefect.flow_run_id']")
    tags = {**_clean(lineage), **code_version(), "llmpipe.config_hash": fingerprint(cfg)}
    run_id, created = _get_or_create_run(client, experiment_id, {FLOW_RUN_TAG: root, RUN_KIND_TAG: "flow"}, tags,
                                         run_name=f"{name}-{root[:8]}")
    if created:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, redact(str(v))[:500]) for k, v in flatten(cfg).items()])
        client.log_text(run_id, redact(to_yaml(cfg)), "config.yaml")
    return experiment_id, run_id, created


def end_run(run_id: str, failed: bool = False) -> None:
    _client().set_terminated(run_id, "FAILED" if failed else "FINISHED")


def mark_failed(run_id: str) -> None:
    """Mark a run FAILED while an exception unwinds: a failure to do so is logged, never raised, so that it
    cannot replace the exception (a termination signal would otherwise turn into a retryable error)."""
    try:
        end_run(run_id, failed=True)
    except Exception as exc:
        log.warning("could not mark MLflow run %s FAILED: %s: %s", run_id, type(exc).__name__, redact(str(exc))[:300])


@contextlib.contextmanager
def stage_run(cfg: PipelineConfig, lineage: dict[str, str], stage: str) -> Iterator[tuple[str, str]]:
    """A child run of the flow's parent run for one stage: ``(experiment_id, run_id)``; FAILED if the body raises.

    Keyed by ``lineage['prefect.task_run_id']``, so a retry of the same task run writes into the same child run.
    """
    client = _client()
    experiment_id, parent, _ = parent_run(cfg, lineage)
    key = {FLOW_RUN_TAG: lineage[FLOW_RUN_TAG], TASK_RUN_TAG: lineage.get(TASK_RUN_TAG) or stage,
           RUN_KIND_TAG: "stage"}
    tags = {**_clean(lineage), **code_version(), "mlflow.parentRunId": parent, STAGE_TAG: stage}
    run_id, created = _get_or_create_run(client, experiment_id, key, tags, run_name=stage)
    if not created:
        client.update_run(run_id, status="RUNNING")
    try:
        yield experiment_id, run_id
    except BaseException:
        mark_failed(run_id)
        raise
    client.set_terminated(run_id, "FINISHED")


def _clean(tags: dict[str, Any]) -> dict[str, str]:
    return {k: redact(str(v)) for k, v in tags.items() if v not in (None, "")}


def _numbers(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[_metric_key(f"{prefix}{key}")] = float(value)
    return out


def _splits(ref: ArtifactRef) -> list[str]:
    if ref.kind == "tokens":
        return list((ref.meta.get("splits") or {}).keys())
    return sorted(p.stem for p in ref.dir.glob("*.jsonl"))


def dataset_inputs(refs: list[ArtifactRef], splits: dict[str, list[str]] | None = None) -> list:
    """``mlflow.data`` entries for data artifacts (corpora, labeled sets, tokens): name, fingerprint, location.

    Only metadata is logged (the fingerprint is the digest), never the data itself.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    names = {"corpora": "corpus", "labeled": "labeled", "tokens": "tokens"}
    out = []
    for ref in refs:
        if ref.kind not in names:
            continue
        for split in (splits or {}).get(ref.kind) or _splits(ref):
            path = ref.dir / f"{split}.jsonl"
            with warnings.catch_warnings():  # the local source is registered twice by mlflow; either is right
                warnings.simplefilter("ignore")
                source = resolve_dataset_source((path if path.exists() else ref.dir).as_uri())
            ds = MetaDataset(source, name=f"{names[ref.kind]}-{split}", digest=ref.fingerprint)
            out.append(DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return out


def log_live_metrics(run_id: str, step: int, row: dict[str, float]) -> None:
    """One training log row (loss, lr, grad norm, tokens/s, MFU) as ``train/*`` metrics at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client().log_batch(run_id, metrics=[Metric(_metric_key(f"train/{k}"), float(v), now, step)
                                         for k, v in row.items() if k != "step" and isinstance(v, int | float)])


@contextlib.contextmanager
def system_metrics(run_id: str, enabled: bool = True) -> Iterator[None]:
    """MLflow system metrics (CPU, memory, GPU) sampled into ``run_id`` while the block runs."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1)
    monitor.start()
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # never replace the exception that is unwinding
            monitor.finish()
        raise
    monitor.finish()


def log_stage(run_id: str, ref: Any, params: dict[str, Any], inputs: list[ArtifactRef],
              splits: dict[str, list[str]] | None = None) -> None:
    """What a stage's child run records: its config section, numbers, small files, fingerprints and datasets."""
    from mlflow.entities import Metric, Param, RunTag

    client = _client()
    now = int(time.time() * 1000)
    tags = {}
    metrics: list = []
    if isinstance(ref, ArtifactRef):
        tags = {FP_TAG: ref.fingerprint, "llmpipe.kind": ref.kind, "llmpipe.reused": str(ref.reused).lower(),
                "llmpipe.artifact_path": ref.path, **artifact_lineage(ref)}
        metrics = [Metric(k, v, now, 0) for k, v in _numbers(ref.meta).items()]
        training = ref.dir / "training.json"
        if training.is_file():
            history = json.loads(training.read_text())
            logged_live = "train/loss" in client.get_run(run_id).data.metrics
            for prefix, rows in (("train", [] if logged_live else history.get("history", [])),
                                 ("eval", history.get("evals", []))):
                for row in rows:
                    step = int(row.get("step", 0))
                    metrics += [Metric(_metric_key(f"{prefix}/{k}"), float(v), now, step) for k, v in row.items()
                                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)]
        for path in [ref.dir / name for name in SMALL_FILES] + sorted(ref.dir.glob("*.png")):
            if path.is_file():
                client.log_artifact(run_id, str(path), "artifact")
    client.log_batch(run_id, metrics=metrics, params=[Param(k, redact(str(v))[:500]) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in _clean(tags).items()])
    data = [r for r in [*inputs, ref] if isinstance(r, ArtifactRef)]
    if datasets := dataset_inputs(data, splits):
        client.log_inputs(run_id, datasets=datasets)


# ---------------------------------------------------------------------------------------------- registry


def _ensure_registered_model(client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created by another writer in between
            client.get_registered_model(name)


def find_versions(client, name: str, fp: str) -> list:
    """Registered versions of ``name`` carrying this fingerprint, lowest version first."""
    found = client.search_model_versions(f"name = '{_quote(name)}' and tags.`{FP_TAG}` = '{_quote(fp)}'")
    return sorted(found, key=lambda mv: int(mv.version))


def find_version(client, name: str, fp: str):
    """The registered version carrying this model fingerprint, if any."""
    found = find_versions(client, name, fp)
    return found[0] if found else None


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _wait_ready(client, name: str, version: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.time() > deadline:
            raise RuntimeError(f"model version {name}/{version} is {mv.status}: {mv.status_message or ''}")
        time.sleep(0.5)


def _register_once(client, name: str, fp: str, log_model: Callable[[], Any], run_id: str, tags: dict[str, str],
                   description: str) -> tuple[Any, bool]:
    """The version of ``name`` for fingerprint ``fp``: the existing one, or one made from ``log_model()``.

    Idempotent under retries (the fingerprint tag is looked up first) and under two racing writers (each
    creates, then the lowest version carrying the fingerprint wins and the other writer deletes its own).
    Returns ``(version, how)``: ``how`` is "created", "existing" (found before logging) or "lost-race".
    """
    existing = find_version(client, name, fp)
    if existing is not None:
        return existing, "existing"
    info = log_model()
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, tags={**tags, FP_TAG: fp},
                                     description=description, model_id=info.model_id)
    _wait_ready(client, name, mv.version)
    winner = find_versions(client, name, fp)[0]
    if int(winner.version) != int(mv.version):
        log.info("register: %s version %s was registered concurrently for fingerprint %s; dropping version %s",
                 name, winner.version, fp, mv.version)
        client.delete_model_version(name, mv.version)
        return winner, "lost-race"
    return client.get_model_version(name, mv.version), "created"


def _signature(outputs: list[tuple[str, str]] | None):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    out = Schema([ColSpec(t, n) for n, t in outputs]) if outputs else Schema([ColSpec("string")])
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=out)


def _log_transformers(run_id: str, path: Path, name: str, task: str, model_config: dict[str, Any],
                      input_example: list[str], outputs: list[tuple[str, str]] | None):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    # The flavor looks for a hub model card under the local path; quiet that expected miss.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForCausalLM
    with _MODEL_WORK:
        components = {"model": auto.from_pretrained(str(path)), "tokenizer": AutoTokenizer.from_pretrained(str(path))}
        with _shielded():
            return mlflow.transformers.log_model(
                transformers_model=components, name=name, task=task, run_id=run_id,
                pip_requirements=_pip_requirements(), signature=_signature(outputs), input_example=input_example,
                model_config=model_config,
            )


def _standalone_run(cfg: PipelineConfig, lineage: dict[str, str], name: str) -> tuple[str, str]:
    """A plain run for registrations made outside a Prefect flow (scripts, notebooks)."""
    client = _client()
    experiment_id = ensure_experiment(cfg.registry.experiment)
    run = client.create_run(experiment_id, run_name=name, tags={**_clean(lineage), **code_version()})
    return experiment_id, run.info.run_id


def _ref(mv, created: bool, run_id: str | None, experiment_id: str | None, **extra: Any) -> ModelVersionRef:
    aliases = list(mv.aliases or [])
    return ModelVersionRef(name=mv.name, version=int(mv.version), uri=f"models:/{mv.name}/{mv.version}",
                           alias_uri=f"models:/{mv.name}@{aliases[0]}" if aliases else None, created=created,
                           aliases=aliases, run_id=run_id, experiment_id=experiment_id, **extra)


def register_lm(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None,
                lineage: dict[str, str] | None = None, run: tuple[str, str] | None = None) -> ModelVersionRef:
    """Log the language model (text-generation) and register it once per LM fingerprint as ``registry.lm_name``."""
    client = _client()
    reg = cfg.registry
    lineage = _clean(lineage or {})
    experiment_id, run_id = run or _standalone_run(cfg, lineage, f"register-{reg.lm_name}")
    report = lm_report.load() if lm_report else {}
    tags = {**lineage, **code_version(), **artifact_lineage(lm), "llmpipe.config_hash": fingerprint(cfg),
            "llmpipe.lm_fingerprint": lm.fingerprint,
            **{f"llmpipe.{k}": f"{report[k]:.6g}" for k in ("val_loss", "val_ppl", "val_bits_per_byte") if k in report}}
    _ensure_registered_model(client, reg.lm_name, "Causal language model pretrained by llmpipe.")
    ppl = f"; validation perplexity {report['val_ppl']:.2f}" if "val_ppl" in report else ""
    mv, how = _register_once(
        client, reg.lm_name, lm.fingerprint,
        lambda: _log_transformers(run_id, lm.dir, "language_model", "text-generation",
                                  {"max_new_tokens": 20, "do_sample": False}, ["The"], None),
        run_id, tags, f"llmpipe language model, fingerprint {lm.fingerprint}{ppl}.",
    )
    client.set_tag(run_id, "llmpipe.lm_version", str(mv.version))
    log.info("register: language model %s version %s (%s)", reg.lm_name, mv.version,
             "new" if how == "created" else "already registered")
    return _ref(mv, how == "created", run_id, experiment_id)


def held_out_split(labeled: LabeledRef) -> tuple[list[str], list[int], dict[str, int]]:
    """The held-out texts, their label ids and the label -> id map of a labeled artifact."""
    from tasks.ingest import load_id2label, load_split

    rows = load_split(labeled, "test")
    if not rows:
        raise DataError(f"{labeled.dir / 'test.jsonl'}: the test split is empty; the gate has nothing to score")
    label2id = {v: k for k, v in load_id2label(labeled).items()}
    return [r["text"] for r in rows], [int(r["label"]) for r in rows], label2id


def _predict(model_uri: str, texts: list[str]):
    """The pyfunc model's prediction: a DataFrame with ``label`` and ``score``."""
    import mlflow

    with _MODEL_WORK:
        return mlflow.pyfunc.load_model(model_uri).predict(texts)


def predict_labels(model_uri: str, texts: list[str]) -> list[str]:
    return [str(label) for label in _predict(model_uri, texts)["label"]]


def run_gate(client, reg: RegistryConfig, name: str, version: int, labeled: LabeledRef, candidate, seed: int = 0):
    """Compare ``version``'s test predictions ``candidate`` with the current champion's, loaded from the registry
    and scored here on the same rows; decide."""
    import numpy as np

    from tasks import gate

    champion = _alias_version(client, name, reg.champion_alias)
    common = {"metric": reg.metric, "test": reg.significance_test, "alpha": reg.alpha, "margin": reg.margin}
    if champion is None:
        return gate.GateResult(promote=True, reason=f"no {reg.champion_alias} yet", **common), None
    if int(champion.version) == version:
        return gate.GateResult(promote=True, reason=f"already {reg.champion_alias}", champion_version=version,
                               **common), champion
    texts, y_true, label2id = held_out_split(labeled)
    try:
        champ = gate.label_ids(predict_labels(f"models:/{name}/{champion.version}", texts), label2id,
                               f"{reg.champion_alias} version {champion.version}")
    except ValueError as exc:
        return gate.GateResult(promote=False, reason=f"not comparable: {exc}", rows=len(texts),
                               champion_version=int(champion.version), **common), champion
    result = gate.compare(np.array(y_true), candidate, champ, n_labels=len(label2id), samples=reg.bootstrap_samples,
                          seed=seed, champion_version=int(champion.version), **common)
    return result, champion


def quality_floor(reg: RegistryConfig, labeled: LabeledRef, candidate, seed: int = 0):
    """Whether the candidate's test predictions beat each required baseline significantly; the first one it
    does not beat decides (``GateResult`` with ``promote`` False), else the last comparison.

    The majority class is always required, TF-IDF + logistic regression when ``registry.baseline_floor`` asks
    for it. The test is the gate's own (``registry.significance_test``) at ``gate.FLOOR_ALPHA``, which no run
    parameter can loosen.
    """
    import numpy as np

    from tasks import gate
    from tasks.evaluate import baseline_predictions
    from tasks.ingest import load_split

    texts, y_true, label2id = held_out_split(labeled)
    train = load_split(labeled, "train")
    train_y = np.array([int(r["label"]) for r in train], dtype=np.int64)
    baselines = {"majority": np.full(len(texts), int(np.argmax(np.bincount(train_y, minlength=len(label2id)))))}
    if reg.baseline_floor == "tfidf_logreg":
        proba = baseline_predictions([r["text"] for r in train], train_y, texts, len(label2id), seed)
        baselines["tfidf_logreg"] = proba["tfidf_logreg"].argmax(axis=1)
    result = None
    for name, predicted in baselines.items():
        result = gate.compare(np.array(y_true), candidate, predicted, metric=reg.metric, n_labels=len(label2id),
                              test=reg.significance_test, alpha=gate.FLOOR_ALPHA, margin=0.0,
                              samples=reg.bootstrap_samples, seed=seed, versus=f"the {name} baseline")
        if not result.promote:
            return result, name
    return result, name


def _history(client, name: str) -> list[int]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    try:
        return [int(v) for v in json.loads(raw)]
    except (ValueError, TypeError):
        return []


def _set_champion(client, name: str, version: int, champion_alias: str, challenger_alias: str) -> None:
    """Move the champion alias to ``version``, remembering the previous champion for ``rollback``."""
    current = _alias_version(client, name, champion_alias)
    if current is not None and int(current.version) != version:
        history = (_history(client, name) + [int(current.version)])[-50:]
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, champion_alias, str(version))
    holder = _alias_version(client, name, challenger_alias)
    if holder is not None and int(holder.version) == version:
        client.delete_registered_model_alias(name, challenger_alias)


def decide_alias(client, reg: RegistryConfig, name: str, version: int, labeled: LabeledRef, seed: int = 0):
    """The quality floor, then the gate: returns ``(alias or None, gate result, floor result)``.

    A version that does not beat the floor gets no alias. One that does is compared with the champion, and the
    alias moves; if the champion changes while we score, it is scored again against the new one.
    """
    from tasks import gate

    texts, _, label2id = held_out_split(labeled)
    candidate = gate.label_ids(predict_labels(f"models:/{name}/{version}", texts), label2id, f"version {version}")
    floor, baseline = quality_floor(reg, labeled, candidate, seed)
    if not floor.promote:
        return None, floor, floor
    for _ in range(3):
        result, champion = run_gate(client, reg, name, version, labeled, candidate, seed)
        if not result.promote:
            client.set_registered_model_alias(name, reg.challenger_alias, str(version))
            return reg.challenger_alias, result, floor
        now = _alias_version(client, name, reg.champion_alias)
        if (now and now.version) == (champion and champion.version):
            _set_champion(client, name, version, reg.champion_alias, reg.challenger_alias)
            return reg.champion_alias, result, floor
    result = gate.GateResult(promote=False, reason=f"the {reg.champion_alias} kept changing while this version was "
                             "scored", metric=reg.metric, test=reg.significance_test, alpha=reg.alpha, margin=reg.margin)
    client.set_registered_model_alias(name, reg.challenger_alias, str(version))
    return reg.challenger_alias, result, floor


BELOW_FLOOR = "below-floor"


def _gate_tags(alias: str | None, result, floor) -> dict[str, str]:
    decision = alias or BELOW_FLOOR
    tags = {DECISION_TAG: decision, "llmpipe.alias_decision": f"{alias or 'no alias'}: {result.reason}"}
    for prefix, res in (("llmpipe.gate", None if alias is None else result), ("llmpipe.floor", floor)):
        for key, value in (res.as_dict() if res else {}).items():
            if value is not None and key not in ("promote", "reason", "details") and not (key == "rows" and not value):
                tags[f"{prefix}.{key}"] = f"{value:.6g}" if isinstance(value, float) else str(value)
        for key, value in ((res.details if res else None) or {}).items():
            tags[f"{prefix}.{key}"] = str(value)
    return tags


def log_and_register(
    cfg: PipelineConfig,
    lm: CheckpointRef,
    lm_report: ReportRef | None,
    classifier: CheckpointRef,
    cls_report: ReportRef,
    labeled: LabeledRef | None = None,
    lineage: dict[str, str] | None = None,
    run: tuple[str, str] | None = None,
) -> ModelVersionRef:
    """Register the classifier once per fingerprint, with lineage, and give it champion or challenger through the gate.

    ``run`` is the ``(experiment_id, run_id)`` to log into (the register stage's child run); without it a
    standalone run is created. ``labeled`` (the test split the gate scores on) defaults to the labeled
    artifact the classifier was fine-tuned on.
    """
    reg = cfg.registry
    client = _client()
    lineage = _clean(lineage or {})
    labeled = labeled or _labeled_of(classifier)
    experiment_id, run_id = run or _standalone_run(cfg, lineage, f"register-{reg.model_name}")
    cls, lmr = cls_report.load(), (lm_report.load() if lm_report else None)
    lm_version = register_lm(cfg, lm, lm_report, lineage, (experiment_id, run_id))
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    for target in dict.fromkeys([run_id, parent]):  # this run and, inside a flow, the flow's parent run
        if target:
            client.log_batch(target, metrics=_report_metrics(cls, lmr))
            client.log_dict(target, cls, "reports/classifier.json")
            if lmr:
                client.log_dict(target, lmr, "reports/language_model.json")
    client.log_inputs(run_id, datasets=dataset_inputs([labeled], {"labeled": ["test"]}))
    if parent:  # the flow's run lists every data set the model came from
        corpus_fp = artifact_lineage(lm).get("llmpipe.corpus_fingerprint")
        corpus = _artifact(classifier.dir.parent.parent, "corpora", corpus_fp)
        client.log_inputs(parent, datasets=dataset_inputs([r for r in (corpus, labeled) if r is not None]))
    tags = {
        **lineage, **code_version(), **artifact_lineage(classifier),
        TEST_SET_TAG: labeled.fingerprint,
        "llmpipe.config_hash": fingerprint(cfg),
        "llmpipe.lm_fingerprint": lm.fingerprint,
        "llmpipe.source_lm_version": lm_version.uri,
        **{f"llmpipe.test_{k}": str(cls["model"][k]) for k in ("accuracy", "macro_f1")},
    }
    _ensure_registered_model(client, reg.model_name, "Text classifier trained by llmpipe.")
    mv, how = _register_once(
        client, reg.model_name, classifier.fingerprint,
        lambda: _log_transformers(run_id, classifier.dir, "classifier", "text-classification",
                                  {"truncation": True, "max_length": cfg.finetune.max_length}, EXAMPLE_TEXTS,
                                  [("label", "string"), ("score", "double")]),
        run_id, tags, f"llmpipe classifier, fingerprint {classifier.fingerprint}.",
    )
    version = int(mv.version)
    client.set_tag(run_id, "llmpipe.registered_version", str(version))
    decided = mv.tags.get("llmpipe.alias_decision")
    if how == "lost-race" or (how == "existing" and decided):
        # Already decided, or registered by a concurrent writer that runs the gate itself.
        gate_info = {k[len("llmpipe.gate."):]: v for k, v in mv.tags.items() if k.startswith("llmpipe.gate.")}
        why = decided or "registered concurrently by another run"
        log.info("register: model %s is already version %s of %s (%s); not registering a duplicate",
                 classifier.fingerprint, version, reg.model_name, why)
        return _ref(mv, False, run_id, experiment_id, gate=gate_info or None, lm_uri=lm_version.uri,
                    below_floor=mv.tags.get(DECISION_TAG) == BELOW_FLOOR,
                    decision=f"identical model already registered as version {version} ({why})")
    faults.check("register", 1)  # LLMPIPE_FAULT=register:kill@1: the version exists, its alias is not decided
    alias, result, floor = decide_alias(client, reg, reg.model_name, version, labeled, cfg.seed)
    for key, value in _gate_tags(alias, result, floor).items():
        client.set_model_version_tag(reg.model_name, str(version), key, value)
    gate_line = f"Gate: {alias} ({result.reason})." if alias else \
        f"Not promoted: below the quality floor ({result.reason}); registered for inspection, without an alias."
    client.update_model_version(reg.model_name, str(version), description=(
        f"llmpipe classifier, fingerprint {classifier.fingerprint}; trained from {lm_version.uri} on labeled data "
        f"{labeled.fingerprint}.\n\n{gate_line}"))
    client.log_batch(run_id, metrics=_gate_metrics(result, floor))
    if alias:
        decision = f"version {version} becomes {alias}: {result.reason}"
        log.info("register: %s version %s; %s", reg.model_name, version, decision)
    else:
        decision = f"version {version} is below the quality floor, so it gets no alias: {result.reason}"
        log.warning("register: %s version %s; %s", reg.model_name, version, decision)
    mv = client.get_model_version(reg.model_name, str(version))
    return _ref(mv, how == "created", run_id, experiment_id, decision=decision, gate=result.as_dict(),
                floor=floor.as_dict(), below_floor=alias is None, lm_uri=lm_version.uri)


def _artifact(root: Path, kind: str, fp: str | None) -> ArtifactRef | None:
    """A reference to a complete artifact of the workspace ``root``, if there is one."""
    path = root / kind / str(fp)
    if not fp or not (path / MANIFEST).is_file():
        return None
    meta = json.loads((path / MANIFEST).read_text()).get("meta", {})
    return ArtifactRef(kind=kind, fingerprint=fp, path=str(path), reused=True, meta=meta)


def _labeled_of(classifier: CheckpointRef) -> LabeledRef:
    fp = (json.loads((classifier.dir / MANIFEST).read_text()).get("inputs") or {}).get("labeled")
    ref = _artifact(classifier.dir.parent.parent, "labeled", fp)
    if ref is None:
        raise DataError(f"{classifier.dir / MANIFEST}: cannot find the labeled data set this classifier was "
                        f"trained on (labeled/{fp}); pass it explicitly")
    return LabeledRef(**ref.model_dump(exclude={"kind"}))


def _report_metrics(cls_report: dict[str, Any], lm_report: dict[str, Any] | None) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = {f"test_{k}": v for k, v in cls_report["model"].items() if isinstance(v, float)}
    for base, m in cls_report["baselines"].items():
        out[f"baseline_{base}_accuracy"] = m["accuracy"]
        out[f"baseline_{base}_macro_f1"] = m["macro_f1"]
    for k in ("val_loss", "val_ppl", "val_bits_per_byte", "unigram_ppl"):
        if lm_report and k in lm_report:
            out[f"lm_{k}"] = lm_report[k]
    return [Metric(k, float(v), now, 0) for k, v in out.items()]


def _gate_metrics(result, floor) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {"floor_baseline": floor.champion_score, "floor_p_value": floor.p_value}
    if result is not floor:
        values.update({"gate_candidate": result.candidate_score, "gate_champion": result.champion_score,
                       "gate_delta": result.delta, "gate_p_value": result.p_value})
    return [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None]


# ---------------------------------------------------------------------------------------------- consumers


MODEL_SPEC = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:@(?P<alias>[\w\-]+)|/(?P<version>\d+))$")


def model_uri(spec: str) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the ``models:/`` prefix may be left out)."""
    m = MODEL_SPEC.match(spec.strip())
    if not m:
        raise LlmpipeError(f"--model: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {spec!r}")
    suffix = f"@{m['alias']}" if m["alias"] else f"/{m['version']}"
    return f"models:/{m['name']}{suffix}"


def resolve_version(uri: str):
    """The registered version behind a ``models:/`` URI; a clear error when there is none."""
    from mlflow.exceptions import MlflowException

    m = MODEL_SPEC.match(uri)
    assert m is not None
    client = _client()
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        what = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        raise LlmpipeError(f"{uri}: registered model {m['name']!r} has no {what} at {tracking_uri()} "
                           f"({exc.error_code})") from None


def predict(model_uri: str, texts: list[str]) -> list[dict[str, Any]]:
    """Load a registered classifier (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) and score texts."""
    empty = [i for i, t in enumerate(texts, 1) if not t.strip()]
    if empty:
        raise DataError(f"text {empty[0]} is empty; every text needs at least one character")
    out = _predict(model_uri, texts)
    records = out.to_dict("records") if hasattr(out, "to_dict") else list(out)
    return [{"text": t, "label": r["label"], "score": float(r["score"])} for t, r in zip(texts, records, strict=True)]


def read_texts(path: Path, column: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and texts of a CSV, TSV or JSONL file; errors name the file, line and column.

    Read by ``tasks.sources.table_rows``, with the labeled-data reader's strict rules and wording (a ragged or
    unbalanced CSV row, a JSONL row without the column); rows are numbered by their line in the file.
    """
    from tasks.sources import Utf8Policy, file_format, table_rows

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    fmt = file_format(path)
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson") or fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .tsv or .jsonl")
    rows: list[dict[str, Any]] = []
    texts = []
    for where, row in table_rows(path, fmt, [column], Utf8Policy("fail")):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
            line = where.rsplit(" ", 1)[-1]  # "row 7" (CSV, TSV) or "line 7" (JSONL): line 7 of the file
            raise DataError(f"{path}: row {line}: column {column!r} is {problem}; expected text")
        rows.append(dict(row))
        texts.append(value)
    if not texts:
        raise DataError(f"{path}: no rows to predict")
    return rows, texts


def predictions_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.predictions{path.suffix}")


def write_predictions(path: Path, rows: list[dict[str, Any]], preds: list[dict[str, Any]]) -> Path:
    """Write the input rows with ``label`` and ``score`` added, next to the input, in its format (atomically)."""
    out = predictions_path(path)
    merged = [{**row, "label": p["label"], "score": round(p["score"], 6)} for row, p in zip(rows, preds, strict=True)]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    else:
        import io

        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in merged for k in r))
        writer = csv.DictWriter(buf, fieldnames=fields, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(merged)
        write_atomic(out, buf.getvalue())
    return out


def promote(name: str, version: int, champion_alias: str = "champion", challenger_alias: str = "challenger",
            reason: str = "promoted by hand") -> str:
    """Give ``version`` the champion alias (the previous champion is remembered for ``rollback``)."""
    client = _client()
    mv = resolve_version(f"models:/{name}/{version}")
    previous = _alias_version(client, name, champion_alias)
    if previous is not None and int(previous.version) == version:
        return f"{name} version {version} is already {champion_alias}"
    _set_champion(client, name, version, champion_alias, challenger_alias)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, mv.version, DECISION_TAG, champion_alias)
    client.set_model_version_tag(name, mv.version, "llmpipe.alias_decision", f"{champion_alias}: {reason} at {stamp}")
    was = f" (was version {previous.version})" if previous is not None else ""
    return f"{name} version {version} is now {champion_alias}{was}"


def rollback(name: str, champion_alias: str = "champion", challenger_alias: str = "challenger") -> str:
    """Give the champion alias back to the previous champion."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise LlmpipeError(f"no registered model {name!r} at {tracking_uri()}") from None
    current = _alias_version(client, name, champion_alias)
    history = _history(client, name)
    while history:
        target = history.pop()
        if current is not None and target == int(current.version):
            continue
        try:
            client.get_model_version(name, str(target))
        except MlflowException:
            continue  # deleted since
        client.set_registered_model_alias(name, champion_alias, str(target))
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if current is not None:
            client.set_model_version_tag(name, current.version, DECISION_TAG, "rolled back")
            client.set_model_version_tag(name, current.version, "llmpipe.alias_decision",
                                         f"rolled back to version {target} at {stamp}")
        client.set_model_version_tag(name, str(target), DECISION_TAG, champion_alias)
        client.set_model_version_tag(name, str(target), "llmpipe.alias_decision",
                                     f"{champion_alias}: restored by rollback at {stamp}")
        was = f" (was version {current.version})" if current is not None else ""
        return f"{name} version {target} is {champion_alias} again{was}"
    raise LlmpipeError(f"{name}: no earlier {champion_alias} recorded to roll back to")
