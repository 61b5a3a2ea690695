"""The model registry: versions registered once per artifact fingerprint, the champion and challenger aliases,
promote and rollback.

- **Registration.** The classifier (transformers flavor, text-classification) and the language model
  (text-generation) are registered once per artifact fingerprint: the fingerprint tag is looked up before a
  version is created. Runs sharing a workspace register (and gate) a fingerprint one at a time, under a lock in
  the workspace's ``registrations`` folder; writers from different workspaces may still race: then the lowest
  version wins and the other deletes its own.
- **Aliases.** A new classifier version gets no alias unless it beats the baselines (the quality floor); then it
  becomes champion only if it beats the current champion on the same held-out rows (``tasks.gate`` decides),
  otherwise challenger. ``promote`` and ``rollback`` are for people; the previous champions are remembered.
  Every move of the champion alias is recorded on the registered model (``MOVES_TAG``), before it happens; the
  challenger alias is never a champion alias, nor moved off a champion.

Nothing here imports Prefect: Prefect identifiers arrive as a plain ``lineage`` dict of tags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import faults, gate
from tasks.artifacts import (
    MANIFEST,
    ArtifactRef,
    CheckpointRef,
    LabeledRef,
    ReportRef,
    Workspace,
    fingerprint,
)
from tasks.config import PipelineConfig, RegistryConfig
from tasks.errors import DataError, LlmpipeError
from tasks.gate import TEST_SET_TAG
from tasks.predict import resolve_version
from tasks.serving import COMPILE_MIN_TEXTS, MODEL_WORK
from tasks.tracking import (
    FP_TAG,
    artifact_lineage,
    clean,
    code_version,
    dataset_inputs,
    log_inputs,
    mlflow_client,
    quote,
    shielded,
    standalone_run,
    tracking_uri,
)

log = logging.getLogger("llmpipe")

DECISION_TAG = "llmpipe.gate.decision"
HISTORY_TAG = "llmpipe.champion_history"
# Every move of the champion alias, oldest first: {"alias", "from", "to", "at", "by", "run_id"}. The last
# MAX_MOVES, fewer if they would not fit the 5000 characters database stores keep of a registered model's tag.
MOVES_TAG = "llmpipe.champion_moves"
MAX_MOVES = 100
MAX_TAG_CHARS = 5000
BELOW_FLOOR = "below-floor"
EXAMPLE_TEXTS = ["a wonderful, moving film", "a dull and tedious mess"]


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


# ---------------------------------------------------------------------------------------------- versions, once per fingerprint


def _pip_requirements(classifier: bool) -> list[str]:
    """Exact versions of what loading the model needs, so logging never resolves environments over the network; a
    classifier's pyfunc loader is llmpipe's (``tasks.serving``)."""
    reqs = []
    for dist in ("mlflow", "transformers", "torch", "tokenizers", "safetensors", *(["llmpipe"] if classifier else [])):
        version = metadata.version(dist).split("+")[0]
        reqs.append(f"{dist}=={version}")
    return reqs


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
    found = client.search_model_versions(f"name = '{quote(name)}' and tags.`{FP_TAG}` = '{quote(fp)}'")
    return sorted(found, key=lambda mv: int(mv.version))


def find_version(client, name: str, fp: str):
    """The registered version carrying this model fingerprint, if any."""
    found = find_versions(client, name, fp)
    return found[0] if found else None


def _wait_ready(client, name: str, version: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.time() > deadline:
            raise RuntimeError(f"model version {name}/{version} is {mv.status}: {mv.status_message or ''}")
        time.sleep(0.5)


@contextlib.contextmanager
def one_registrant(checkpoint: CheckpointRef) -> Iterator[None]:
    """Hold the workspace's registration lock for ``checkpoint``'s fingerprint: runs sharing a workspace register
    and gate a model one at a time, so the second finds the first's version, decided, instead of racing it."""
    with Workspace(checkpoint.dir.parent.parent).lock("registrations", checkpoint.fingerprint, "registered"):
        yield


def _register_once(client, name: str, fp: str, logged: Callable[[], Any], run_id: str, tags: dict[str, str],
                   description: str) -> tuple[Any, bool]:
    """The version of ``name`` for fingerprint ``fp``: the existing one, or one made from ``logged()``.

    Idempotent under retries (the fingerprint tag is looked up first) and under two racing writers (each
    creates, then the lowest version carrying the fingerprint wins and the other writer deletes its own).
    Returns ``(version, how)``: ``how`` is "created", "existing" (found before logging) or "lost-race".
    """
    existing = find_version(client, name, fp)
    if existing is not None:
        return existing, "existing"
    info = logged()
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


def _signature(outputs: list[tuple[str, str]] | None, classifier: bool):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    out = Schema([ColSpec(t, n) for n, t in outputs]) if outputs else Schema([ColSpec("string")])
    # batch_size 0: the device's default (tasks.serving.BATCH_SIZE)
    params = ParamSchema([ParamSpec("batch_size", "long", 0)]) if classifier else None
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=out, params=params)


def log_model(run_id: str, experiment_id: str, path: Path, name: str, task: str, model_config: dict[str, Any],
               input_example: list[str], outputs: list[tuple[str, str]] | None, max_length: int | None, threads: int):
    """Log checkpoint ``path`` as a model of run ``run_id``, in the run's experiment, through ``tasks.serving``'s
    flavor: MLflow's transformers flavor with a ``model`` folder that loads and batches on its own, and for a
    classifier llmpipe's pyfunc loader (length-sorted batches). Label names, max length and truncation side are its
    metadata."""
    from mlflow.models import Model

    from tasks import serving
    from tasks.training import set_threads

    set_threads(threads)  # logging runs the model on the input example
    # The flavor looks for a hub model card under the local path; quiet that expected miss.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    classifier = task == "text-classification"
    model, tokenizer, metadata = serving.prepare(path, task, max_length)
    logged = mlflow_client().create_logged_model(experiment_id, name=name, source_run_id=run_id)
    with MODEL_WORK, shielded():
        return Model.log(
            artifact_path=None, name=name, flavor=serving, flavor_name="transformers",
            transformers_model={"model": model, "tokenizer": tokenizer}, task=task, run_id=run_id,
            model_id=logged.model_id, pip_requirements=_pip_requirements(classifier),
            signature=_signature(outputs, classifier), input_example=input_example, model_config=model_config,
            metadata=metadata,
        )


def _ref(mv, created: bool, run_id: str | None, experiment_id: str | None, **extra: Any) -> ModelVersionRef:
    aliases = list(mv.aliases or [])
    return ModelVersionRef(name=mv.name, version=int(mv.version), uri=f"models:/{mv.name}/{mv.version}",
                           alias_uri=f"models:/{mv.name}@{aliases[0]}" if aliases else None, created=created,
                           aliases=aliases, run_id=run_id, experiment_id=experiment_id, **extra)


# ---------------------------------------------------------------------------------------------- aliases


def alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_history(client, name: str) -> list[int]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    try:
        return [int(v) for v in json.loads(raw)]
    except (ValueError, TypeError):
        return []


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def champion_moves(client, name: str) -> list[dict[str, Any]]:
    """The recorded moves of ``name``'s champion alias, oldest first."""
    try:
        moves = json.loads(client.get_registered_model(name).tags.get(MOVES_TAG, "[]"))
    except ValueError:
        return []
    return [m for m in moves if isinstance(m, dict)] if isinstance(moves, list) else []


def _record_move(client, name: str, alias: str, old, new: int, by: str, run_id: str | None) -> None:
    move = {"alias": alias, "from": None if old is None else int(old), "to": new, "at": _now(), "by": by,
            "run_id": run_id}
    moves = (champion_moves(client, name) + [move])[-MAX_MOVES:]
    while len(json.dumps(moves, separators=(",", ":"))) > MAX_TAG_CHARS:
        moves.pop(0)
    client.set_registered_model_tag(name, MOVES_TAG, json.dumps(moves, separators=(",", ":")))


def _check_aliases(client, name: str, champion_alias: str, challenger_alias: str) -> set[str]:
    """The champion aliases of ``name`` (this one and every one recorded); refuses a challenger alias among them."""
    if challenger_alias == champion_alias:
        raise LlmpipeError(f"{name}: the challenger alias must differ from the champion alias (both "
                           f"{champion_alias!r})")
    champions = {champion_alias} | {str(m.get("alias")) for m in champion_moves(client, name)}
    if challenger_alias in champions:
        raise LlmpipeError(f"{name}: {challenger_alias!r} is a champion alias of this model; it cannot be the "
                           "challenger alias")
    return champions


def _move_champion(client, name: str, version: int, current, champion_alias: str, challenger_alias: str, by: str,
                   run_id: str | None) -> None:
    """Record the move from ``current`` (a model version or None), then move the champion alias to ``version``,
    which loses the challenger alias if it has it."""
    _record_move(client, name, champion_alias, current and current.version, version, by, run_id)
    client.set_registered_model_alias(name, champion_alias, str(version))
    holder = alias_version(client, name, challenger_alias)
    if holder is not None and int(holder.version) == version:
        client.delete_registered_model_alias(name, challenger_alias)


def set_champion(client, name: str, version: int, champion_alias: str, challenger_alias: str, by: str,
                 run_id: str | None = None) -> None:
    """Move the champion alias to ``version``, recording the move (``by``: gate, promote) and remembering the
    previous champion for ``rollback``."""
    _check_aliases(client, name, champion_alias, challenger_alias)
    current = alias_version(client, name, champion_alias)
    if current is not None and int(current.version) == version:
        return
    if current is not None:
        history = (champion_history(client, name) + [int(current.version)])[-50:]
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    _move_champion(client, name, version, current, champion_alias, challenger_alias, by, run_id)


def set_challenger(client, name: str, version: int, champion_alias: str, challenger_alias: str) -> None:
    """Give ``version`` the challenger alias; refused when that alias is a champion alias or points at a champion."""
    champions = _check_aliases(client, name, champion_alias, challenger_alias)
    holder = alias_version(client, name, challenger_alias)
    if holder is not None and champions & set(holder.aliases or []):
        raise LlmpipeError(f"{name}: alias {challenger_alias!r} points at version {holder.version}, which is "
                           f"{' and '.join(sorted(champions & set(holder.aliases)))}; the gate does not move it")
    client.set_registered_model_alias(name, challenger_alias, str(version))


def _champion_test_set(champion, labeled: LabeledRef) -> LabeledRef | None:
    """The champion's test set in the candidate's workspace, when it has another one and it is there."""
    fp = (champion.tags or {}).get(TEST_SET_TAG) if champion is not None else None
    return None if fp == labeled.fingerprint else _labeled_in(labeled.dir.parent.parent, fp)


def decide_alias(client, reg: RegistryConfig, name: str, version: int, labeled: LabeledRef, seed: int = 0,
                 run_id: str | None = None):
    """The quality floor, then the gate: returns ``(alias or None, gate result, floor result)``.

    A version that does not beat the floor gets no alias. One that does is compared with the champion, and the
    alias moves (a move recorded with ``run_id``); if the champion changes while we score, it is scored again
    against the new one.
    """
    candidate = gate.candidate_ids(name, version, labeled)
    floor, _ = gate.quality_floor(reg, labeled, candidate, seed)
    if not floor.promote:
        return None, floor, floor
    for _ in range(3):
        champion = alias_version(client, name, reg.champion_alias)
        result = gate.against_champion(reg, name, version, champion, labeled, candidate, seed,
                                       _champion_test_set(champion, labeled))
        if not result.promote:
            set_challenger(client, name, version, reg.champion_alias, reg.challenger_alias)
            return reg.challenger_alias, result, floor
        now = alias_version(client, name, reg.champion_alias)
        if (now and now.version) == (champion and champion.version):
            set_champion(client, name, version, reg.champion_alias, reg.challenger_alias, "gate", run_id)
            return reg.champion_alias, result, floor
    result = gate.GateResult(promote=False, reason=f"the {reg.champion_alias} kept changing while this version was "
                             "scored", metric=reg.metric, test=reg.significance_test, alpha=reg.alpha, margin=reg.margin)
    set_challenger(client, name, version, reg.champion_alias, reg.challenger_alias)
    return reg.challenger_alias, result, floor


def promote(name: str, version: int, champion_alias: str = "champion", challenger_alias: str = "challenger",
            reason: str = "promoted by hand") -> str:
    """Give ``version`` the champion alias (the previous champion is remembered for ``rollback``)."""
    client = mlflow_client()
    mv = resolve_version(f"models:/{name}/{version}")
    previous = alias_version(client, name, champion_alias)
    if previous is not None and int(previous.version) == version:
        return f"{name} version {version} is already {champion_alias}"
    set_champion(client, name, version, champion_alias, challenger_alias, "promote")
    client.set_model_version_tag(name, mv.version, DECISION_TAG, champion_alias)
    client.set_model_version_tag(name, mv.version, "llmpipe.alias_decision", f"{champion_alias}: {reason} at {_now()}")
    was = f" (was version {previous.version})" if previous is not None else ""
    return f"{name} version {version} is now {champion_alias}{was}"


def rollback(name: str, champion_alias: str = "champion", challenger_alias: str = "challenger") -> str:
    """Give the champion alias back to the previous champion (the move is recorded like any other)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise LlmpipeError(f"no registered model {name!r} at {tracking_uri()}") from None
    _check_aliases(client, name, champion_alias, challenger_alias)
    current = alias_version(client, name, champion_alias)
    history = champion_history(client, name)
    while history:
        target = history.pop()
        if current is not None and target == int(current.version):
            continue
        try:
            client.get_model_version(name, str(target))
        except MlflowException:
            continue  # deleted since
        _move_champion(client, name, target, current, champion_alias, challenger_alias, "rollback", None)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        stamp = _now()
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


# ---------------------------------------------------------------------------------------------- the two models


def register_lm(cfg: PipelineConfig, lm: CheckpointRef, lm_report: ReportRef | None,
                lineage: dict[str, str] | None = None, run: tuple[str, str] | None = None) -> ModelVersionRef:
    """Log the language model (text-generation) and register it once per LM fingerprint as ``registry.lm_name``."""
    client = mlflow_client()
    reg = cfg.registry
    lineage = clean(lineage or {})
    experiment_id, run_id = run or standalone_run(cfg, lineage, f"register-{reg.lm_name}")
    report = lm_report.load() if lm_report else {}
    tags = {**lineage, **code_version(), **artifact_lineage(lm), "llmpipe.config_hash": fingerprint(cfg),
            "llmpipe.lm_fingerprint": lm.fingerprint,
            **{f"llmpipe.{k}": f"{report[k]:.6g}" for k in ("val_loss", "val_ppl", "val_bits_per_byte") if k in report}}
    with one_registrant(lm):
        _ensure_registered_model(client, reg.lm_name, "Causal language model pretrained by llmpipe.")
        ppl = f"; validation perplexity {report['val_ppl']:.2f}" if "val_ppl" in report else ""
        mv, how = _register_once(
            client, reg.lm_name, lm.fingerprint,
            lambda: log_model(run_id, experiment_id, lm.dir, "language_model", "text-generation",
                               {"max_new_tokens": 20, "do_sample": False}, ["The"], None, None, cfg.runtime.threads),
            run_id, tags, f"llmpipe language model, fingerprint {lm.fingerprint}{ppl}.",
        )
    client.set_tag(run_id, "llmpipe.lm_version", str(mv.version))
    log.info("register: language model %s version %s (%s)", reg.lm_name, mv.version,
             "new" if how == "created" else "already registered")
    return _ref(mv, how == "created", run_id, experiment_id)


def register_classifier(
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
    client = mlflow_client()
    lineage = clean(lineage or {})
    labeled = labeled or _labeled_of(classifier)
    experiment_id, run_id = run or standalone_run(cfg, lineage, f"register-{reg.model_name}")
    cls, lmr = cls_report.load(), (lm_report.load() if lm_report else None)
    lm_version = register_lm(cfg, lm, lm_report, lineage, (experiment_id, run_id))
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    for target in dict.fromkeys([run_id, parent]):  # this run and, inside a flow, the flow's parent run
        if target:
            client.log_batch(target, metrics=_report_metrics(cls, lmr))
            client.log_text(target, readable_json(cls), "reports/classifier.json")
            if lmr:
                client.log_text(target, readable_json(lmr), "reports/language_model.json")
    log_inputs(client, run_id, dataset_inputs([labeled], {"labeled": ["test"]}))
    if parent:  # the flow's run lists every data set the model came from
        corpus_fp = artifact_lineage(lm).get("llmpipe.corpus_fingerprint")
        corpus = _artifact(classifier.dir.parent.parent, "corpora", corpus_fp)
        log_inputs(client, parent, dataset_inputs([r for r in (corpus, labeled) if r is not None]))
    tags = {
        **lineage, **code_version(), **artifact_lineage(classifier),
        TEST_SET_TAG: labeled.fingerprint,
        "llmpipe.config_hash": fingerprint(cfg),
        "llmpipe.lm_fingerprint": lm.fingerprint,
        "llmpipe.source_lm_version": lm_version.uri,
        **{f"llmpipe.test_{k}": str(cls["model"][k]) for k in ("accuracy", "macro_f1")},
    }
    with one_registrant(classifier):
        _ensure_registered_model(client, reg.model_name, "Text classifier trained by llmpipe.")
        mv, how = _register_once(
            client, reg.model_name, classifier.fingerprint,
            lambda: log_model(run_id, experiment_id, classifier.dir, "classifier", "text-classification",
                               {"truncation": True, "max_length": cfg.finetune.max_length,
                                "compile_min_texts": COMPILE_MIN_TEXTS},
                               EXAMPLE_TEXTS, [("label", "string"), ("score", "double")], cfg.finetune.max_length,
                               cfg.runtime.threads),
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
        alias, result, floor = decide_alias(client, reg, reg.model_name, version, labeled, cfg.seed, run_id)
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


def _artifact(root: Path, kind: str, fp: str | None) -> ArtifactRef | None:
    """A reference to a complete artifact of the workspace ``root``, if there is one (``fp`` a plain name, never a
    path out of ``root/kind``)."""
    if not fp or not re.fullmatch(r"[\w-]+", fp):
        return None
    path = root / kind / fp
    if not (path / MANIFEST).is_file():
        return None
    meta = json.loads((path / MANIFEST).read_text()).get("meta", {})
    return ArtifactRef(kind=kind, fingerprint=fp, path=str(path), reused=True, meta=meta)


def _labeled_in(root: Path, fp: str | None) -> LabeledRef | None:
    """The labeled artifact ``fp`` of the workspace ``root``, if it is there."""
    ref = _artifact(root, "labeled", fp)
    return None if ref is None else LabeledRef(**ref.model_dump(exclude={"kind"}))


def _labeled_of(classifier: CheckpointRef) -> LabeledRef:
    fp = (json.loads((classifier.dir / MANIFEST).read_text()).get("inputs") or {}).get("labeled")
    ref = _labeled_in(classifier.dir.parent.parent, fp)
    if ref is None:
        raise DataError(f"{classifier.dir / MANIFEST}: cannot find the labeled data set this classifier was "
                        f"trained on (labeled/{fp}); pass it explicitly")
    return ref


def readable_json(obj: Any) -> str:
    """JSON as ``log_dict`` writes it, but with every script as itself (Chinese text, not \\uXXXX escapes)."""
    return json.dumps(obj, indent=2, default=str, ensure_ascii=False)


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
