"""The champion/challenger gate: its paired tests (exact McNemar, paired bootstrap), its decision, and the
quality floor against the baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tasks import gate, metrics
from tasks.artifacts import Workspace
from tasks.config import LabeledConfig, LabeledFiles


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
