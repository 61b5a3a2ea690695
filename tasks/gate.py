"""The champion/challenger gate: score two models on the same test rows and test the difference.

The statistics (``compare``) and the decision for a registered version: whether it beats the baselines on the
held-out rows (``quality_floor``), then the current champion (``against_champion``, which loads the champion from
the registry and scores it here). Moving the aliases is the registry's (``tasks.registry``).

A registered version is scored only through ``version_ids``: only llmpipe's own classifiers (its lineage tags, the
transformers flavor, safetensors weights, no pickle or code file, no ``auto_map``), loaded by transformers alone,
never by MLflow's pyfunc, which would unpickle and run whatever the version holds. A champion that fails a check
is not loaded, and the candidate is "not comparable". A champion registered with another test set must be beaten
on that one too.

A new version takes the champion alias only if, on the same held-out rows, its metric is higher than
the champion's by more than a margin *and* a paired significance test says the improvement is
unlikely to be chance (p < alpha). Two tests are offered:

- ``bootstrap``: resample the test rows with replacement (the same rows for both models) and count
  how often the candidate is not better; works for any metric (accuracy, macro-F1).
- ``mcnemar``: the exact (binomial) McNemar test on the rows exactly one of the two models gets
  right; a test of accuracy whatever the configured metric.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import LabeledRef
from tasks.config import RegistryConfig
from tasks.errors import DataError, LlmpipeError
from tasks.evaluate import fit_baselines, split_texts
from tasks.ingest import load_id2label, load_split
from tasks.metrics import SCORES
from tasks.serving import NoPadToken, TextClassifier
from tasks.tracking import FP_TAG, mlflow_client

# The significance level of the quality floor: a version must beat the baselines at least this clearly before it can
# become champion. Fixed here, not a run parameter, so that no run can loosen it.
FLOOR_ALPHA = 0.05

TEST_SET_TAG = "llmpipe.test_set"  # the fingerprint of the labeled data a version was tested on
# The tags llmpipe's registration sets and the gate requires before it loads a version.
LINEAGE_TAGS = (FP_TAG, TEST_SET_TAG, "llmpipe.version")
# Files that run code when loaded: pickles (torch's .bin/.pt/.pth/.ckpt, joblib, MLflow's python_model.pkl)
# and Python sources.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class Refused(LlmpipeError):
    """A registered version the gate does not load; the message names the check it failed."""


def mcnemar_p(candidate_correct: np.ndarray, champion_correct: np.ndarray) -> tuple[float, dict[str, int]]:
    """One-sided exact McNemar p-value for "the candidate is right more often than the champion"."""
    from scipy.stats import binomtest

    b = int((candidate_correct & ~champion_correct).sum())  # only the candidate is right
    c = int((~candidate_correct & champion_correct).sum())  # only the champion is right
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)
    return p, {"only_candidate_right": b, "only_champion_right": c}


def bootstrap_p(y_true: np.ndarray, candidate: np.ndarray, champion: np.ndarray, metric: str, n_labels: int,
                samples: int, seed: int) -> float:
    """One-sided paired-bootstrap p-value: the share of resamples where the candidate is not better.

    ``(1 + count) / (1 + samples)``, so it is never exactly zero.
    """
    fn = SCORES[metric]
    rng = np.random.default_rng(seed)
    n = len(y_true)
    not_better = 0
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        t = y_true[idx]
        if fn(t, candidate[idx], n_labels) <= fn(t, champion[idx], n_labels):
            not_better += 1
    return (1 + not_better) / (1 + samples)


@dataclass
class GateResult:
    """Both scores, the test and the decision, as recorded on the model version."""

    promote: bool
    reason: str
    metric: str
    candidate_score: float | None = None
    champion_score: float | None = None
    delta: float | None = None
    margin: float = 0.0
    test: str = ""
    p_value: float | None = None
    alpha: float = 0.05
    rows: int = 0
    champion_version: int | None = None
    details: dict[str, int] | None = None
    test_sets: str | None = None  # the fingerprints of the test sets the decision used, comma-separated

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(y_true: np.ndarray, candidate: np.ndarray, champion: np.ndarray, *, metric: str, n_labels: int,
            test: str, alpha: float, margin: float, samples: int = 2000, seed: int = 0,
            champion_version: int | None = None, versus: str | None = None) -> GateResult:
    """Decide whether ``candidate`` predictions beat ``champion`` predictions on the same rows ``y_true``.

    ``versus`` names what ``champion`` is in the reason (default: the champion's version)."""
    y_true, candidate, champion = (np.asarray(a, dtype=np.int64) for a in (y_true, candidate, champion))
    if not (len(y_true) == len(candidate) == len(champion)):
        raise ValueError(f"paired predictions differ in length: {len(y_true)}, {len(candidate)}, {len(champion)}")
    if len(y_true) == 0:
        raise ValueError("the gate needs at least one test row")
    if metric not in SCORES:
        raise ValueError(f"unknown gate metric {metric!r}; expected one of {sorted(SCORES)}")
    fn = SCORES[metric]
    cand, champ = fn(y_true, candidate, n_labels), fn(y_true, champion, n_labels)
    delta = cand - champ
    details = None
    if test == "mcnemar":
        p, details = mcnemar_p(candidate == y_true, champion == y_true)
        test_name = "exact McNemar"
    elif test == "bootstrap":
        p = bootstrap_p(y_true, candidate, champion, metric, n_labels, samples, seed)
        test_name = f"paired bootstrap ({samples} resamples)"
    else:
        raise ValueError(f"unknown significance test {test!r}; expected 'bootstrap' or 'mcnemar'")
    versus = versus or (f"v{champion_version}" if champion_version is not None else "the champion")
    numbers = (f"{metric} {cand:.4f} vs {versus} {champ:.4f} (delta {delta:+.4f}, margin {margin:g}; "
               f"{test_name} p={p:.4g}, alpha {alpha:g}; {len(y_true)} test rows)")
    if delta <= margin:
        promote, why = False, "not better by more than the margin"
    elif p >= alpha:
        promote, why = False, "improvement not significant"
    else:
        promote, why = True, "significantly better"
    return GateResult(promote=promote, reason=f"{why}: {numbers}", metric=metric, candidate_score=cand,
                      champion_score=champ, delta=delta, margin=margin, test=test, p_value=p, alpha=alpha,
                      rows=len(y_true), champion_version=champion_version, details=details)


def label_ids(predicted: list[str], label2id: dict[str, int], who: str) -> np.ndarray:
    """Map predicted label strings to the test set's ids; a label outside the set is a ValueError naming it."""
    unknown = sorted({p for p in predicted if p not in label2id})
    if unknown:
        raise ValueError(f"{who} predicts labels {unknown} that the test set does not have ({sorted(label2id)})")
    return np.array([label2id[p] for p in predicted], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- the decision


def held_out_split(labeled: LabeledRef) -> tuple[list[str], list[int], dict[str, int]]:
    """The held-out texts, their label ids and the label -> id map of a labeled artifact."""
    rows = load_split(labeled, "test")
    if not rows:
        raise DataError(f"{labeled.dir / 'test.jsonl'}: the test split is empty; the gate has nothing to score")
    label2id = {v: k for k, v in load_id2label(labeled).items()}
    return [r["text"] for r in rows], [int(r["label"]) for r in rows], label2id


def _names(paths: list[Path], root: Path) -> str:
    return ", ".join(sorted(str(p.relative_to(root)) for p in paths)[:5]) + (" ..." if len(paths) > 5 else "")


def vetted_files(mv, dst: Path) -> tuple[Path, Path, int | None]:
    """Download registered version ``mv``'s model files into ``dst`` and check them: llmpipe's lineage tags, the
    transformers flavor, safetensors weights, no pickle or code file anywhere, no ``auto_map`` (custom code) in the
    model's or the tokenizer's config. Returns the model and tokenizer folders and the max length the version was
    registered with (None if not recorded); ``Refused`` names the check that failed, never a file's content."""
    import yaml
    from mlflow.artifacts import download_artifacts

    who = f"version {mv.version} of {mv.name}"
    missing = [tag for tag in LINEAGE_TAGS if not (mv.tags or {}).get(tag)]
    if missing:
        raise Refused(f"{who} carries no llmpipe lineage ({', '.join(missing)})")
    root = Path(download_artifacts(artifact_uri=mv.source, dst_path=str(dst))).resolve()
    files = list(root.rglob("*"))
    if pickles := [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]:
        raise Refused(f"{who} has pickle files ({_names(pickles, root)})")
    if code := [p for p in files if p.suffix.lower() == ".py"]:
        raise Refused(f"{who} has code files ({_names(code, root)})")
    try:
        flavors = yaml.safe_load((root / "MLmodel").read_text())["flavors"]
        flavor = flavors["transformers"]
        model_dir = (root / str(flavor.get("model_binary"))).resolve()
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError, AttributeError):
        raise Refused(f"{who} is not a model of the transformers flavor") from None
    if not model_dir.is_relative_to(root) or not list(model_dir.glob("*.safetensors")):
        raise Refused(f"{who} has no safetensors weights")
    tokenizer_dir = root / "components" / "tokenizer"
    for config in (model_dir / "config.json", tokenizer_dir / "tokenizer_config.json"):
        try:
            custom = "auto_map" in json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, ValueError, TypeError):
            raise Refused(f"{who} has no readable {config.relative_to(root)}") from None
        if custom:
            raise Refused(f"{who} names custom code (auto_map in {config.relative_to(root)})")
    inference = (flavors.get("python_function") or {}).get("config") or {}
    max_length = inference.get("max_length") if isinstance(inference, dict) else None
    return model_dir, tokenizer_dir, max_length if type(max_length) is int and max_length > 0 else None


def version_ids(name: str, version: int, sets: list[LabeledRef], who: str) -> list[np.ndarray]:
    """Registered version ``version``'s predictions on the held-out rows of each of ``sets``, as label ids.

    Loaded only once ``vetted_files`` passes it, and only by transformers (safetensors, no remote code, no
    download), scored as the evaluation scores a checkpoint, truncated as registered."""
    mv = mlflow_client().get_model_version(name, str(version))
    with tempfile.TemporaryDirectory(prefix="llmpipe-gate-") as tmp:
        model_dir, tokenizer_dir, max_length = vetted_files(mv, Path(tmp))
        try:
            classifier = TextClassifier(model_dir, tokenizer_dir, max_length)
        except NoPadToken:
            raise Refused(f"version {version} of {name} has no pad token") from None
        out = []
        for labeled in sets:
            texts, _, label2id = held_out_split(labeled)
            predicted = [label for label, _ in classifier.predict(texts)]
            out.append(label_ids(predicted, label2id, who))
    return out


def candidate_ids(name: str, version: int, labeled: LabeledRef) -> np.ndarray:
    """Registered version ``version``'s predictions on the held-out rows, as label ids (``Refused`` when it is not
    a version the gate loads)."""
    return version_ids(name, version, [labeled], f"version {version}")[0]


def quality_floor(reg: RegistryConfig, labeled: LabeledRef, candidate: np.ndarray,
                  seed: int = 0) -> tuple[GateResult, str]:
    """Whether the candidate's test predictions beat each required baseline significantly; the first one it
    does not beat decides (``GateResult`` with ``promote`` False), else the last comparison.

    The majority class is always required, TF-IDF + logistic regression when ``registry.baseline_floor`` asks
    for it: ``evaluate.fit_baselines``, the evaluation's own, so it chooses the same features on the same
    validation split and predicts the same labels as the report's baseline. The test is the gate's own
    (``registry.significance_test``) at ``FLOOR_ALPHA``, which no run parameter can loosen.
    """
    texts, y_true, label2id = held_out_split(labeled)
    train = load_split(labeled, "train")
    train_y = np.array([int(r["label"]) for r in train], dtype=np.int64)
    baselines = {"majority": np.full(len(texts), int(np.argmax(np.bincount(train_y, minlength=len(label2id)))))}
    what = {"majority": "the majority baseline"}
    if reg.baseline_floor == "tfidf_logreg":
        proba, features = fit_baselines([r["text"] for r in train], train_y, texts, len(label2id), seed,
                                        split_texts(load_split(labeled, "validation")))
        baselines["tfidf_logreg"] = proba["tfidf_logreg"].argmax(axis=1)
        what["tfidf_logreg"] = f"the tfidf_logreg baseline ({features['features']})"
    result = None
    for name, predicted in baselines.items():
        result = compare(np.array(y_true), candidate, predicted, metric=reg.metric, n_labels=len(label2id),
                         test=reg.significance_test, alpha=FLOOR_ALPHA, margin=0.0, samples=reg.bootstrap_samples,
                         seed=seed, versus=what[name])
        if not result.promote:
            return result, name
    return result, name


def against_champion(reg: RegistryConfig, name: str, version: int, champion: Any, labeled: LabeledRef,
                     candidate: np.ndarray, seed: int = 0, champion_set: LabeledRef | None = None) -> GateResult:
    """Compare ``version``'s test predictions ``candidate`` with those of ``champion`` (the model version holding
    the champion alias, or None), loaded from the registry and scored here on the same rows; decide.

    A champion registered with another test set must also be beaten on that set: ``champion_set``, found in the
    candidate's workspace (None when it is not there: the two are not comparable)."""
    common = {"metric": reg.metric, "test": reg.significance_test, "alpha": reg.alpha, "margin": reg.margin}
    if champion is None:
        return GateResult(promote=True, reason=f"no {reg.champion_alias} yet", test_sets=labeled.fingerprint,
                          **common)
    champion_version = int(champion.version)
    if champion_version == version:
        return GateResult(promote=True, reason=f"already {reg.champion_alias}", champion_version=version,
                          test_sets=labeled.fingerprint, **common)
    texts, _, label2id = held_out_split(labeled)

    def not_comparable(why: Any) -> GateResult:
        return GateResult(promote=False, reason=f"not comparable: {why}", rows=len(texts),
                          champion_version=champion_version, **common)

    sets = [labeled]
    theirs = (champion.tags or {}).get(TEST_SET_TAG)
    if theirs and theirs != labeled.fingerprint:
        if champion_set is None:
            return not_comparable(f"version {champion_version} was tested on labeled/{theirs}, which is not in the "
                                  f"workspace {labeled.dir.parent.parent}")
        if held_out_split(champion_set)[2] != label2id:
            return not_comparable(f"version {champion_version} was tested on labeled/{theirs}, whose labels differ "
                                  f"from those of labeled/{labeled.fingerprint}")
        sets.append(champion_set)
    try:
        champ = version_ids(name, champion_version, sets, f"{reg.champion_alias} version {champion_version}")
        cand = [candidate, *(version_ids(name, version, sets[1:], f"version {version}") if sets[1:] else [])]
    except (Refused, ValueError) as exc:
        return not_comparable(exc)
    results = [compare(np.array(held_out_split(s)[1]), c, ch, n_labels=len(label2id), samples=reg.bootstrap_samples,
                       seed=seed, champion_version=champion_version, **common)
               for s, c, ch in zip(sets, cand, champ, strict=True)]
    decided = next((r for r in results if not r.promote), results[-1])
    if len(results) > 1:
        decided.reason = "; ".join(f"on {what} labeled/{s.fingerprint}: {r.reason}" for what, s, r in
                                   zip(("its own test set", f"version {champion_version}'s"), sets, results,
                                       strict=True))
    decided.test_sets = ",".join(s.fingerprint for s in sets)
    return decided
