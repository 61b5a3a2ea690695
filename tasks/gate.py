"""The champion/challenger gate: score two models on the same test rows and test the difference.

A new version takes the champion alias only if, on the same held-out rows, its metric is higher than
the champion's by more than a margin *and* a paired significance test says the improvement is
unlikely to be chance (p < alpha). Two tests are offered:

- ``bootstrap``: resample the test rows with replacement (the same rows for both models) and count
  how often the candidate is not better; works for any metric (accuracy, macro-F1).
- ``mcnemar``: the exact (binomial) McNemar test on the rows exactly one of the two models gets
  right; a test of accuracy whatever the configured metric.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tasks.metrics import SCORES

# The significance level of the quality floor: a version must beat the baselines at least this clearly before it can
# become champion. Fixed here, not a run parameter, so that no run can loosen it.
FLOOR_ALPHA = 0.05


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
