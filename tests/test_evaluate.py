"""Evaluation: the classifier report beside the baselines (its markdown too), and the language model on its
validation split and on external held-out text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from flows import reports
from tasks import evaluate, ingest, metrics
from tasks.artifacts import CheckpointRef, LabeledRef, Workspace
from tasks.errors import DataError
from tests.support import (
    Chain,
    chinese_reviews,
    constant_classifier,
    imbalanced_labeled,
    tiny_config,
    write_labeled_csvs,
)

# ================================================================ metrics


def test_confident_mistakes_are_the_wrong_rows_most_confident_first() -> None:
    y = np.array([0, 1, 0, 1, 0])
    proba = np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.95, 0.05], [0.4, 0.6]])
    got = evaluate.confident_mistakes(["t0", "t1", "t2", "t3", "t4"], y, proba, ["neg", "pos"], n=3)
    assert [m["row"] for m in got] == [3, 0, 1]
    assert got[0] == {"row": 3, "text": "t3", "label": "pos", "predicted": "neg", "confidence": pytest.approx(0.95)}


def test_baselines_predict_the_majority_class_and_fit_tfidf_on_train_only() -> None:
    train = ["good fine day", "good fine night", "bad awful day", "good fine dawn", "bad awful dusk"]
    proba = evaluate.baseline_predictions(train, np.array([1, 1, 0, 1, 0]), ["awful bad", "fine good", "zzz"], 2, 0)
    np.testing.assert_allclose(proba["majority"], [[0.4, 0.6]] * 3)  # the training class frequencies
    assert proba["tfidf_logreg"][:2].argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(proba["tfidf_logreg"].sum(1), 1.0)


def _split(rows: list[dict]) -> tuple[list[str], np.ndarray]:
    return [r["text"] for r in rows], np.array([int(r["label"] == "positive") for r in rows])


def test_on_chinese_text_the_tfidf_baseline_chooses_character_ngrams() -> None:
    """Chinese has no spaces: word n-grams see each clause as one token and learn nothing that generalises."""
    train, val, test = (_split(chinese_reviews(n, seed)) for n, seed in ((300, 0), (60, 1), (100, 2)))
    proba, info = evaluate.fit_baselines(*train, test[0], 2, 0, validation=val)
    assert info["chosen"] == "char" and info["features"] == "char_wb 1-3-grams" and info["validation_rows"] == 60
    scores = info["validation_macro_f1"]
    assert list(scores) == list(evaluate.TFIDF_FEATURES)
    assert scores["char"] > 0.95 > 0.6 > scores["word"]
    assert metrics.macro_f1(test[1], proba["tfidf_logreg"].argmax(1), 2) > 0.95
    again = evaluate.fit_baselines(*train, test[0], 2, 0, validation=val)
    assert again[1] == info and np.array_equal(again[0]["tfidf_logreg"], proba["tfidf_logreg"])  # deterministic


def test_on_english_text_the_tfidf_baseline_keeps_word_ngrams_or_the_union() -> None:
    rng = np.random.default_rng(0)
    filler = ["the", "rice", "delivery", "driver", "order", "box", "soup", "today", "was", "and", "it", "with", "our"]
    cue = {1: ["good", "great", "tasty"], 0: ["bad", "awful", "cold"]}

    def rows(n: int) -> tuple[list[str], np.ndarray]:
        y = (rng.random(n) < 0.5).astype(np.int64)
        return [" ".join([*rng.choice(filler, 4), str(rng.choice(cue[int(k)])), *rng.choice(filler, 3)])
                for k in y], y

    train, val, test = rows(200), rows(50), rows(50)
    proba, info = evaluate.fit_baselines(*train, test[0], 2, 0, validation=val)
    scores = info["validation_macro_f1"]
    assert info["chosen"] in ("word", "word+char") and scores["word"] == 1.0
    # Ties go to the earlier candidate: here every candidate is perfect, and word n-grams (first) are kept.
    assert info["chosen"] == "word" and max(scores.values()) == scores["word"]
    assert metrics.accuracy(test[1], proba["tfidf_logreg"].argmax(1), 2) == 1.0


def test_character_ngrams_are_scikit_learns_char_wb_matrix() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    train = [r["text"] for r in chinese_reviews(40, 0)] + ["Hello  World\tagain, Straße", "ﬁne ÀB a", " ", "x\u3000y"]
    test = [r["text"] for r in chinese_reviews(10, 1)] + ["unseen words: hello zzz", ""]
    ours, theirs = evaluate.CharNgramTfidf(), TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    a, b = ours.fit_transform(train), theirs.fit_transform(train)
    assert ours.ngrams == theirs.vocabulary_ and a.shape == b.shape
    assert abs(a - b).max() < 1e-12 and abs(ours.transform(test) - theirs.transform(test)).max() < 1e-12


def test_without_validation_rows_the_tfidf_baseline_uses_the_union() -> None:
    train = ["good fine day", "good fine night", "bad awful day", "good fine dawn", "bad awful dusk"]
    proba, info = evaluate.fit_baselines(train, np.array([1, 1, 0, 1, 0]), ["awful bad", "fine good"], 2, 0)
    assert info["chosen"] == "word+char" and info["validation_macro_f1"] == {}
    assert proba["tfidf_logreg"].argmax(1).tolist() == [0, 1]


# ================================================================ the classifier report


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> tuple[Workspace, LabeledRef]:
    return imbalanced_labeled(tmp_path_factory.mktemp("evaluate"))


def test_a_constant_model_scores_exactly_the_majority_baseline(imbalanced, tmp_path: Path) -> None:
    ws, labeled = imbalanced
    clf = constant_classifier(ws, labeled, tmp_path)
    ref = evaluate.evaluate_classifier(clf, labeled, tiny_config(ws.root).evaluate, ws, 32, 0)
    report = ref.load()
    model, majority = report["model"], report["baselines"]["majority"]
    assert set(report["predictions"]) == {report["labels"].index("meh")}
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert model[key] == majority[key], key
    assert model["accuracy"] == 18 / 30
    assert report["calibration"]["model"]["ece"] == pytest.approx(report["calibration"]["majority"]["ece"], abs=1e-6)


def test_the_report_holds_every_metric_table_and_the_confusion_png(imbalanced, tmp_path: Path) -> None:
    ws, labeled = imbalanced
    clf = constant_classifier(ws, labeled, tmp_path)
    cfg = tiny_config(ws.root, "evaluate.confident_mistakes=4", "evaluate.calibration_bins=5").evaluate
    ref = evaluate.evaluate_classifier(clf, labeled, cfg, ws, 32, 0)
    report = ref.load()
    assert report["labels"] == ["bad", "good", "meh"] and report["test_rows"] == 30
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"}
    assert set(report["calibration"]) == {"model", "majority", "tfidf_logreg"}
    assert sum(b["rows"] for b in report["calibration"]["model"]["bins"]) == 30
    assert [r["model"] for r in report["comparison"]] == ["model", "majority", "tfidf_logreg"]
    assert set(report["comparison"][0]) == {"model", "accuracy", "macro_f1", "ece", "f1_bad", "f1_good", "f1_meh"}
    tfidf = report["baselines"]["tfidf_logreg"]
    assert report["vs_tfidf"] == {k: pytest.approx(100 * (report["model"][k] - tfidf[k]), abs=0.01)
                                  for k in ("accuracy", "macro_f1")}
    mistakes = report["confident_mistakes"]
    assert len(mistakes) == 4 and all(m["predicted"] == "meh" != m["label"] for m in mistakes)
    png = ref.dir / report["confusion_matrix_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    features = report["tfidf_features"]
    assert features["chosen"] in evaluate.TFIDF_FEATURES and features["validation_rows"] == 10
    markdown = reports.classifier_markdown(report)
    assert "| tfidf_logreg |" in markdown and "| **meh** | 0 | 0 | 18 |" in markdown
    assert f"TF-IDF + LR used **{features['features']}** (chosen by macro-F1 on the 10 validation rows: word " \
        in markdown
    assert "### Most confident mistakes" in markdown


def test_the_quality_floor_uses_the_reports_tfidf_baseline(imbalanced, tmp_path: Path) -> None:
    """The gate's floor fits the same baseline on the same splits: the same features, the same test score."""
    from tasks import gate
    from tasks.config import RegistryConfig

    ws, labeled = imbalanced
    report = evaluate.evaluate_classifier(constant_classifier(ws, labeled, tmp_path), labeled,
                                          tiny_config(ws.root).evaluate, ws, 32, 0).load()
    _, y_true, _ = gate.held_out_split(labeled)
    reg = RegistryConfig(baseline_floor="tfidf_logreg", metric="accuracy")
    result, baseline = gate.quality_floor(reg, labeled, np.array(y_true), seed=0)
    assert baseline == "tfidf_logreg"
    assert result.champion_score == report["baselines"]["tfidf_logreg"]["accuracy"]
    assert f"the tfidf_logreg baseline ({report['tfidf_features']['features']})" in result.reason


def test_a_classifier_for_other_labels_is_refused(imbalanced, tmp_path: Path) -> None:
    ws, labeled = imbalanced
    two = write_labeled_csvs(tmp_path / "two", {"train": {"x": 6, "y": 6}, "validation": {"x": 2, "y": 2},
                                                "test": {"x": 2, "y": 2}})
    clf = constant_classifier(ws, labeled, tmp_path)
    with pytest.raises(DataError, match="the classifier has 3 labels, the labeled data .* has 2"):
        evaluate.evaluate_classifier(clf, ingest.ingest_labeled(two, ws, 0), tiny_config(ws.root).evaluate, ws, 32, 0)


# ================================================================ language model


def test_lm_scores_external_held_out_text(chain: Chain, lm: CheckpointRef, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, ws, tokens, model_ref = chain.cfg, chain.ws, chain.tokens, lm
    text_file = tmp_path / "heldout" / "notes.txt"
    text_file.parent.mkdir()
    text_file.write_text("".join(f"The garden by the station opened on day {i}. Rain fell in the morning.\n"
                                 for i in range(60)), encoding="utf-8")
    ecfg = cfg.evaluate.model_copy(update={"lm_heldout_paths": [str(text_file)], "lm_heldout_max_tokens": 500})
    report = evaluate.evaluate_lm(model_ref, tokens, ecfg, ws, cfg.pretrain.block_size, cfg.seed).load()
    got = report["heldout"]["heldout/notes.txt"]
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]))
    assert got["bits_per_byte"] == pytest.approx(got["loss"] / math.log(2) / got["bytes_per_token"])
    assert got["tokens_scored"] <= 500 and got["tokens_scored"] % cfg.pretrain.block_size == 0

    # The same number as scoring the first whole lines directly.
    model = AutoModelForCausalLM.from_pretrained(str(model_ref.dir))
    tok = AutoTokenizer.from_pretrained(str(model_ref.dir))
    direct = evaluate.score_text_file(model, tok, text_file, cfg.pretrain.block_size, 4, 500)
    assert direct["loss"] == pytest.approx(got["loss"], rel=1e-5)
    assert report["val_ppl"] == pytest.approx(math.exp(report["val_loss"]))  # the validation split is still scored


def test_missing_held_out_text_fails_before_scoring(chain: Chain, lm: CheckpointRef, tmp_path: Path) -> None:
    cfg, ws, tokens, model_ref = chain.cfg, chain.ws, chain.tokens, lm
    ecfg = cfg.evaluate.model_copy(update={"lm_heldout_paths": [str(tmp_path / "absent.txt")]})
    with pytest.raises(DataError, match=r"evaluate\.lm_heldout_paths: file not found: .*absent\.txt"):
        evaluate.evaluate_lm(model_ref, tokens, ecfg, ws, cfg.pretrain.block_size, cfg.seed)


def test_lm_on_wikitext2(chain: Chain, lm: CheckpointRef, shared_data: Path) -> None:
    cfg, ws, tokens, model_ref = chain.cfg, chain.ws, chain.tokens, lm
    paths = [str(shared_data / "wikitext2" / "valid.txt"), str(shared_data / "wikitext2" / "test.txt")]
    ecfg = cfg.evaluate.model_copy(update={"lm_heldout_paths": paths, "lm_heldout_max_tokens": 2000})
    report = evaluate.evaluate_lm(model_ref, tokens, ecfg, ws, cfg.pretrain.block_size, cfg.seed).load()
    assert set(report["heldout"]) == {"wikitext2/valid.txt", "wikitext2/test.txt"}
    for r in report["heldout"].values():
        assert r["tokens_scored"] > 1000 and math.isfinite(r["ppl"]) and r["bits_per_byte"] > 0


def test_finetune_and_evaluate_classifier_report(chain: Chain, labeled: LabeledRef, classifier: CheckpointRef) -> None:
    cfg, clf = chain.cfg, classifier
    assert clf.meta["steps"] == cfg.finetune.max_steps and clf.meta["task"] == "text-classification"
    assert clf.meta["id2label"] == {"0": "negative", "1": "positive"}
    ref = evaluate.evaluate_classifier(clf, labeled, cfg.evaluate, chain.ws, cfg.finetune.max_length, cfg.seed)
    report = ref.load()
    n_test = labeled.meta["rows"]["test"]
    assert report["labels"] == ["negative", "positive"]
    assert report["test_rows"] == len(report["predictions"]) == n_test == cfg.labeled.source.eval_rows
    model = report["model"]
    assert 0.0 <= model["accuracy"] <= 1.0 and 0.0 <= model["macro_f1"] <= 1.0
    assert sum(map(sum, model["confusion_matrix"])) == n_test
    y_test = np.array([r["label"] for r in ingest.load_split(labeled, "test")])
    assert metrics.classification_metrics(y_test, np.array(report["predictions"]), report["labels"]) == model
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"}
    assert report["baselines"]["majority"]["accuracy"] == pytest.approx(0.5)  # the sample test set is balanced
    assert report["baselines"]["tfidf_logreg"]["accuracy"] > 0.5
    assert ref.meta == {"accuracy": model["accuracy"], "macro_f1": model["macro_f1"],
                        "tfidf_logreg_accuracy": report["baselines"]["tfidf_logreg"]["accuracy"],
                        "majority_accuracy": report["baselines"]["majority"]["accuracy"]}
    # The classifier artifact loads as a transformers sequence classifier with the labels attached.
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(clf.path)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
