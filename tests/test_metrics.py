"""Classification metrics: scikit-learn's numbers to the last bit (a class never predicted or absent), the
calibration error by hand, a constant prediction scoring the majority baseline."""

from __future__ import annotations

import numpy as np
import pytest

from tasks import evaluate, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed: int) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    k = 4
    y_true = rng.integers(0, k, size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, k, size=200))
    y_pred[y_pred == 3] = 2  # class 3 is never predicted: its precision is 0 by convention
    labels = ["a", "b", "c", "d"]
    m = metrics.classification_metrics(y_true, y_pred, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=range(k),
                                                   zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(k)).tolist()
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(k), zero_division=0)
    for i, lab in enumerate(labels):
        assert m["per_class"][lab] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})


def test_constant_prediction_scores_the_majority_baseline() -> None:
    train_y = np.array([0] * 3 + [1] * 7 + [2] * 2)
    test_y = np.array([1, 1, 0, 2, 1, 0, 1, 2, 2, 1])
    words = ["red", "green", "blue"]
    train_texts = [f"{words[y]} thing number {i}" for i, y in enumerate(train_y)]
    test_texts = [f"{words[y]} item {i}" for i, y in enumerate(test_y)]
    labels = ["r", "g", "b"]
    proba = evaluate.baseline_predictions(train_texts, train_y, test_texts, len(labels), seed=0)
    base = {name: metrics.classification_metrics(test_y, p.argmax(axis=1), labels) for name, p in proba.items()}
    constant = metrics.classification_metrics(test_y, np.full_like(test_y, 1), labels)
    assert base["majority"] == constant
    assert constant["accuracy"] == base["majority"]["accuracy"] == 0.5
    assert base["tfidf_logreg"]["accuracy"] == 1.0  # the colour word gives the label away


def test_metrics_equal_scikit_learns_on_fixed_predictions() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = ["a", "b", "c", "d"]  # "c" is never predicted, "d" never occurs
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 1])
    y_pred = np.array([0, 1, 0, 1, 3, 0, 1, 1, 0, 0, 1, 3])
    ours = metrics.classification_metrics(y_true, y_pred, labels)
    ids = list(range(4))
    assert ours["accuracy"] == accuracy_score(y_true, y_pred)
    assert ours["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0),
                                             abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    for i, name in enumerate(labels):
        c = ours["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]), abs=1e-12)
    assert ours["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=ids).tolist()


def test_expected_calibration_error_by_hand() -> None:
    y = np.array([0, 1, 1, 0, 1])
    proba = np.array([[0.92, 0.08], [0.81, 0.19], [0.27, 0.73], [0.34, 0.66], [0.45, 0.55]])
    # Confidences 0.92, 0.81, 0.73, 0.66, 0.55: right, wrong, right, wrong, right. With 2 bins all five sit in
    # (0.5, 1]: accuracy 0.6 against mean confidence 0.734.
    assert metrics.calibration(y, proba, bins=2)["ece"] == pytest.approx(abs(0.6 - 0.734))
    # With 10 bins each row has a bin of its own.
    ten = metrics.calibration(y, proba, bins=10)
    assert ten["ece"] == pytest.approx((0.08 + 0.81 + 0.27 + 0.66 + 0.45) / 5)
    assert [(b["low"], b["rows"]) for b in ten["bins"]] == [(0.5, 1), (0.6, 1), (0.7, 1), (0.8, 1), (0.9, 1)]
    assert metrics.calibration(np.array([0, 0]), np.array([[1.0, 0.0], [1.0, 0.0]]))["ece"] == 0.0
