"""MLflow logging and model-registry registration with a champion/challenger alias decision."""

from __future__ import annotations

import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.artifacts import CheckpointRef, ReportRef, fingerprint
from tasks.config import PipelineConfig, flatten

log = logging.getLogger("llmpipe")

FP_TAG = "llmpipe.fingerprint"
TEST_SET_TAG = "llmpipe.test_set"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"


class ModelVersionRef(BaseModel):
    name: str
    version: int
    uri: str
    alias_uri: str | None = None
    created: bool
    aliases: list[str] = []
    run_id: str | None = None
    decision: str = ""


def _pip_requirements() -> list[str]:
    """Exact versions of what loading the model needs, so logging never resolves environments over the network."""
    reqs = []
    for dist in ("mlflow", "transformers", "torch", "tokenizers", "safetensors"):
        version = metadata.version(dist).split("+")[0]
        reqs.append(f"{dist}=={version}")
    return reqs


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def ensure_experiment(name: str) -> str:
    """The experiment id; a new local experiment stores artifacts in ``./mlartifacts``."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = Path(DEFAULT_ARTIFACT_DIR).resolve().as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # another run created it between our lookup and create
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Text classifier trained by llmpipe.")
        except MlflowException:
            client.get_registered_model(name)


def find_version(client, name: str, fp: str):
    """The registered version carrying this model fingerprint, if any."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(FP_TAG) == fp:
            return mv
    return None


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metrics(cls_report: dict[str, Any], lm_report: dict[str, Any] | None) -> dict[str, float]:
    out = {f"test_{k}": v for k, v in cls_report["model"].items() if isinstance(v, float)}
    for base, m in cls_report["baselines"].items():
        out[f"baseline_{base}_accuracy"] = m["accuracy"]
        out[f"baseline_{base}_macro_f1"] = m["macro_f1"]
    for k in ("val_loss", "val_ppl", "val_bits_per_byte", "unigram_ppl"):
        if lm_report:
            out[f"lm_{k}"] = lm_report[k]
    return out


def decide_alias(client, name: str, version: int, metric: str, score: float, test_set: str,
                 champion_alias: str, challenger_alias: str) -> tuple[str, str]:
    """Give ``version`` the champion alias if there is none or it scores higher on the same test set."""
    current = _alias_version(client, name, champion_alias)
    if current is None:
        client.set_registered_model_alias(name, champion_alias, str(version))
        return champion_alias, f"no {champion_alias} yet: version {version} becomes {champion_alias}"
    if int(current.version) == version:
        return champion_alias, f"version {version} is already {champion_alias}"
    cur_score = current.tags.get(f"llmpipe.test_{metric}")
    if current.tags.get(TEST_SET_TAG) != test_set or cur_score is None:
        client.set_registered_model_alias(name, challenger_alias, str(version))
        return challenger_alias, (f"{champion_alias} v{current.version} was scored on another test set; "
                                  f"version {version} becomes {challenger_alias}")
    if score > float(cur_score):
        client.set_registered_model_alias(name, champion_alias, str(version))
        return champion_alias, (f"version {version} {metric}={score:.4f} beats {champion_alias} v{current.version} "
                                f"({float(cur_score):.4f}): promoted")
    client.set_registered_model_alias(name, challenger_alias, str(version))
    return challenger_alias, (f"version {version} {metric}={score:.4f} does not beat {champion_alias} "
                              f"v{current.version} ({float(cur_score):.4f}): {challenger_alias}")


def _wait_ready(client, name: str, version: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        time.sleep(0.5)
    raise TimeoutError(f"model version {name}/{version} not READY after {timeout}s")


def log_and_register(
    cfg: PipelineConfig,
    lm: CheckpointRef,
    lm_report: ReportRef | None,
    classifier: CheckpointRef,
    cls_report: ReportRef,
    lineage: dict[str, str] | None = None,
) -> ModelVersionRef:
    """Log the run (params, metrics, both models) and register the classifier once per model fingerprint."""
    import mlflow
    from mlflow import MlflowClient

    reg = cfg.registry
    lineage = {k: v for k, v in (lineage or {}).items() if v}
    client = MlflowClient()
    experiment_id = ensure_experiment(reg.experiment)
    cls, lmr = cls_report.load(), (lm_report.load() if lm_report else None)
    metrics = _metrics(cls, lmr)
    test_set = cls["test_fingerprint"]
    model_fp = classifier.fingerprint
    tags = {
        FP_TAG: model_fp,
        TEST_SET_TAG: test_set,
        "llmpipe.config_hash": fingerprint(cfg),
        "llmpipe.lm_fingerprint": lm.fingerprint,
        "llmpipe.version": metadata.version("llmpipe"),
        **{f"llmpipe.test_{k}": str(cls["model"][k]) for k in ("accuracy", "macro_f1")},
        **lineage,
    }
    _ensure_registered_model(client, reg.model_name)
    existing = find_version(client, reg.model_name, model_fp)

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{reg.model_name}-{model_fp[:8]}",
                          tags={**lineage, FP_TAG: model_fp}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg).items()})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(cls, "reports/classifier.json")
        if lmr:
            mlflow.log_dict(lmr, "reports/language_model.json")
        if existing is not None:
            mlflow.set_tag("llmpipe.registered_version", existing.version)
            aliases = [a for a in (existing.aliases or [])]
            log.info("register: model %s is already version %s of %s; not registering a duplicate",
                     model_fp, existing.version, reg.model_name)
            return ModelVersionRef(name=reg.model_name, version=int(existing.version),
                                   uri=f"models:/{reg.model_name}/{existing.version}",
                                   alias_uri=f"models:/{reg.model_name}@{aliases[0]}" if aliases else None,
                                   created=False, aliases=aliases, run_id=run.info.run_id,
                                   decision=f"identical model already registered as version {existing.version}")
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        # The flavor looks for a hub model card under the local path; quiet that expected miss.
        logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
        tokenizer = AutoTokenizer.from_pretrained(str(classifier.dir))
        pip_reqs = _pip_requirements()
        lm_model = AutoModelForCausalLM.from_pretrained(str(lm.dir))
        mlflow.transformers.log_model(
            transformers_model={"model": lm_model, "tokenizer": tokenizer}, name="language_model",
            task="text-generation", pip_requirements=pip_reqs,
        )
        cls_model = AutoModelForSequenceClassification.from_pretrained(str(classifier.dir))
        info = mlflow.transformers.log_model(
            transformers_model={"model": cls_model, "tokenizer": tokenizer}, name="classifier",
            task="text-classification", pip_requirements=pip_reqs,
            input_example=["a wonderful, moving film", "a dull and tedious mess"],
        )
        mlflow.set_tags({k: v for k, v in tags.items() if k.startswith("llmpipe.")})
        mv = client.create_model_version(reg.model_name, info.model_uri, run_id=run.info.run_id, tags=tags,
                                         description=f"llmpipe classifier, fingerprint {model_fp}")
        _wait_ready(client, reg.model_name, mv.version)
        alias, decision = decide_alias(client, reg.model_name, int(mv.version), reg.metric,
                                       float(cls["model"][reg.metric]), test_set, reg.champion_alias,
                                       reg.challenger_alias)
        client.set_model_version_tag(reg.model_name, mv.version, "llmpipe.alias_decision", decision)
        mlflow.set_tag("llmpipe.registered_version", mv.version)
        log.info("register: %s version %s; %s", reg.model_name, mv.version, decision)
        return ModelVersionRef(name=reg.model_name, version=int(mv.version),
                               uri=f"models:/{reg.model_name}/{mv.version}",
                               alias_uri=f"models:/{reg.model_name}@{alias}", created=True, aliases=[alias],
                               run_id=run.info.run_id, decision=decision)


def predict(model_uri: str, texts: list[str]) -> list[dict[str, Any]]:
    """Load a registered classifier (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) and score texts."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(texts)
    records = out.to_dict("records") if hasattr(out, "to_dict") else list(out)
    return [{"text": t, "label": r["label"], "score": float(r["score"])} for t, r in zip(texts, records, strict=True)]
