"""MLflow tracking: one run per flow run and a child run per stage, what a stage's run records, and links.

- **Runs.** One MLflow run per flow run (keyed by the Prefect root flow-run id) with a child run per stage (keyed
  by the Prefect task-run id), so a retried task or a re-run flow writes into the run it already has.
- **What a stage records.** Its config section as params, its artifact's numbers, small files and fingerprints,
  the data sets it read (``mlflow.data``, metadata only), live training metrics and system metrics.
- **The client.** On a store in this process (SQLite, files) every call finishes before a SIGTERM or Ctrl-C takes
  effect (``tasks.interrupts``); a tracking server that does not answer is an error at once.

Nothing here imports Prefect: Prefect identifiers arrive as a plain ``lineage`` dict of tags.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks import interrupts
from tasks.artifacts import MANIFEST, ArtifactRef, fingerprint
from tasks.config import PipelineConfig, RegistryConfig, flatten, to_yaml
from tasks.errors import LlmpipeError
from tasks.redact import redact

log = logging.getLogger("llmpipe")

FP_TAG = "llmpipe.fingerprint"  # an artifact's fingerprint; a model version's idempotency key
FLOW_RUN_TAG = "prefect.flow_run_id"
TASK_RUN_TAG = "prefect.task_run_id"
RUN_KIND_TAG = "llmpipe.run_kind"
STAGE_TAG = "llmpipe.stage"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
DEFAULT_UI = "http://127.0.0.1:5000"
SMALL_FILES = ("manifest.json", "report.json", "data_report.json", "labels.json", "training.json")


# ---------------------------------------------------------------------------------------------- the client


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


def shielded() -> contextlib.AbstractContextManager:
    return interrupts.shielded() if _store_in_process() else contextlib.nullcontext()


def mlflow_client():
    from mlflow import MlflowClient

    plain = MlflowClient()
    return _ShieldedClient(plain) if _store_in_process() else plain


def tracking_uri() -> str:
    """The tracking URI as it may be shown to people (a password in it is masked)."""
    import mlflow

    return redact(mlflow.get_tracking_uri())


def check_tracking_server(timeout_s: float = 5.0) -> None:
    """Fail at once, with a clear error, when the tracking URI is an MLflow server that does not answer; MLflow's
    own client would retry each call for minutes first. Stores in this process (SQLite, files) are not checked.
    Until MLflow is imported nothing can have set another URI, so ``MLFLOW_TRACKING_URI``, when set, is the one
    MLflow will use, and the check costs no import of MLflow (the CLI runs it before it starts anything)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") if "mlflow" not in sys.modules else None
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
        problem = None if answer.status_code == 200 else f"HTTP {answer.status_code}"
    except requests.RequestException as exc:
        problem = type(exc).__name__
    if problem:
        raise LlmpipeError(f"the MLflow tracking server {redact(uri)} does not answer ({problem}); start it, or "
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

    client = mlflow_client()
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


def quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def metric_key(key: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", key)


# ---------------------------------------------------------------------------------------------- runs


def _find_runs(client, experiment_id: str, key: dict[str, str]) -> list:
    query = " and ".join(f"tags.`{k}` = '{quote(v)}'" for k, v in key.items())
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
    client = mlflow_client()
    experiment_id = ensure_experiment(cfg.registry.experiment)
    root = lineage.get(FLOW_RUN_TAG) or ""
    if not root:
        raise ValueError("parent_run needs lineage['prefect.flow_run_id']")
    tags = {**clean(lineage), **code_version(), "llmpipe.config_hash": fingerprint(cfg)}
    run_id, created = _get_or_create_run(client, experiment_id, {FLOW_RUN_TAG: root, RUN_KIND_TAG: "flow"}, tags,
                                         run_name=f"{name}-{root[:8]}")
    if created:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, redact(str(v))[:500]) for k, v in flatten(cfg).items()])
        client.log_text(run_id, redact(to_yaml(cfg)), "config.yaml")
    return experiment_id, run_id, created


def end_run(run_id: str, failed: bool = False) -> None:
    mlflow_client().set_terminated(run_id, "FAILED" if failed else "FINISHED")


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
    client = mlflow_client()
    experiment_id, parent, _ = parent_run(cfg, lineage)
    key = {FLOW_RUN_TAG: lineage[FLOW_RUN_TAG], TASK_RUN_TAG: lineage.get(TASK_RUN_TAG) or stage,
           RUN_KIND_TAG: "stage"}
    tags = {**clean(lineage), **code_version(), "mlflow.parentRunId": parent, STAGE_TAG: stage}
    run_id, created = _get_or_create_run(client, experiment_id, key, tags, run_name=stage)
    if not created:
        client.update_run(run_id, status="RUNNING")
    try:
        yield experiment_id, run_id
    except BaseException:
        mark_failed(run_id)
        raise
    client.set_terminated(run_id, "FINISHED")


def clean(tags: dict[str, Any]) -> dict[str, str]:
    return {k: redact(str(v)) for k, v in tags.items() if v not in (None, "")}


def standalone_run(cfg: PipelineConfig, lineage: dict[str, str], name: str) -> tuple[str, str]:
    """A plain run for registrations made outside a Prefect flow (scripts, notebooks)."""
    client = mlflow_client()
    experiment_id = ensure_experiment(cfg.registry.experiment)
    run = client.create_run(experiment_id, run_name=name, tags={**clean(lineage), **code_version()})
    return experiment_id, run.info.run_id


# ---------------------------------------------------------------------------------------------- what a stage records


def _numbers(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[metric_key(f"{prefix}{key}")] = float(value)
    return out


def _splits(ref: ArtifactRef) -> list[str]:
    if ref.kind == "tokens":
        return list((ref.meta.get("splits") or {}).keys())
    return sorted(p.stem for p in ref.dir.glob("*.jsonl"))


def log_inputs(client, run_id: str, datasets: list, attempts: int = 3) -> None:
    """``client.log_inputs``, retried when the store refuses a data set that another run created at the same
    moment: MLflow looks a data set up, then inserts it, so two runs logging the same data set at once on a
    tracking server over PostgreSQL collide on its unique key (HTTP 400). The retry finds the data set and links
    it. Found by tests/e2e/test_team_stack.py; SQLite, one writer at a time, never collides."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as exc:
            text = str(exc)
            duplicate = "dataset" in text and any(
                marker in text for marker in ("UniqueViolation", "UNIQUE constraint", "IntegrityError", "Duplicate"))
            if not duplicate or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


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
    mlflow_client().log_batch(run_id, metrics=[Metric(metric_key(f"train/{k}"), float(v), now, step)
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

    client = mlflow_client()
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
                    metrics += [Metric(metric_key(f"{prefix}/{k}"), float(v), now, step) for k, v in row.items()
                                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)]
        for path in [ref.dir / name for name in SMALL_FILES] + sorted(ref.dir.glob("*.png")):
            if path.is_file():
                client.log_artifact(run_id, str(path), "artifact")
    client.log_batch(run_id, metrics=metrics, params=[Param(k, redact(str(v))[:500]) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in clean(tags).items()])
    data = [r for r in [*inputs, ref] if isinstance(r, ArtifactRef)]
    if datasets := dataset_inputs(data, splits):
        log_inputs(client, run_id, datasets)
