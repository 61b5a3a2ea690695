"""Evaluation: metrics against scikit-learn, calibration, baselines, the classifier report and its Prefect
artifacts, and language-model scoring of external held-out text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_finetune import build_tiny_bert, write_labeled_csvs

from flows import reports
from tasks import evaluate, ingest, metrics, pretrain, tokenize
from tasks.artifacts import CheckpointRef, Workspace
from tasks.errors import DataError
from tasks.training import set_threads


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    set_threads(1)


# ================================================================ metrics


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


# ================================================================ the classifier report


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """Three classes, the majority ('meh') not the first id, and a workspace."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = write_labeled_csvs(root / "data", {"train": {"bad": 10, "good": 14, "meh": 36},
                                             "validation": {"bad": 2, "good": 3, "meh": 5},
                                             "test": {"bad": 5, "good": 7, "meh": 18}})
    ws = Workspace(root / "ws")
    return ws, ingest.ingest_labeled(cfg, ws, 0)


def _constant_classifier(ws: Workspace, labeled, tmp: Path) -> CheckpointRef:
    """A BERT classifier whose head ignores its input: weights zero, bias the log of the training class
    frequencies, so every row gets exactly the majority baseline's probabilities."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [r["text"] for r in ingest.load_split(labeled, "train")]
    bert = build_tiny_bert(tmp / "bert", texts)
    id2label = ingest.load_id2label(labeled)
    prior = np.bincount([r["label"] for r in ingest.load_split(labeled, "train")], minlength=3) / len(texts)

    def build(out: Path) -> dict:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(bert), num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(bert)).save_pretrained(str(out))
        weights = load_file(str(out / "model.safetensors"))
        weights["classifier.weight"] = torch.zeros_like(weights["classifier.weight"])
        weights["classifier.bias"] = torch.tensor(np.log(prior), dtype=torch.float32)
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return {"task": "text-classification"}

    return ws.materialize(CheckpointRef, "constant-classifier", build, stage="test")


def test_a_constant_model_scores_exactly_the_majority_baseline(imbalanced, tmp_path: Path) -> None:
    ws, labeled = imbalanced
    clf = _constant_classifier(ws, labeled, tmp_path)
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
    clf = _constant_classifier(ws, labeled, tmp_path)
    cfg = tiny_config(ws.root, "evaluate.confident_mistakes=4", "evaluate.calibration_bins=5").evaluate
    ref = evaluate.evaluate_classifier(clf, labeled, cfg, ws, 32, 0)
    report = ref.load()
    assert report["labels"] == ["bad", "good", "meh"] and report["test_rows"] == 30
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"}
    assert set(report["calibration"]) == {"model", "majority", "tfidf_logreg"}
    assert sum(b["rows"] for b in report["calibration"]["model"]["bins"]) == 30
    assert [r["model"] for r in report["comparison"]] == ["model", "majority", "tfidf_logreg"]
    assert set(report["comparison"][0]) == {"model", "accuracy", "macro_f1", "ece", "f1_bad", "f1_good", "f1_meh"}
    mistakes = report["confident_mistakes"]
    assert len(mistakes) == 4 and all(m["predicted"] == "meh" != m["label"] for m in mistakes)
    png = ref.dir / report["confusion_matrix_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = reports.classifier_markdown(report)
    assert "| tfidf_logreg |" in markdown and "| **meh** | 0 | 0 | 18 |" in markdown
    assert "### Most confident mistakes" in markdown


def test_a_classifier_for_other_labels_is_refused(imbalanced, tmp_path: Path) -> None:
    ws, labeled = imbalanced
    two = write_labeled_csvs(tmp_path / "two", {"train": {"x": 6, "y": 6}, "validation": {"x": 2, "y": 2},
                                                "test": {"x": 2, "y": 2}})
    clf = _constant_classifier(ws, labeled, tmp_path)
    with pytest.raises(DataError, match="the classifier has 3 labels, the labeled data .* has 2"):
        evaluate.evaluate_classifier(clf, ingest.ingest_labeled(two, ws, 0), tiny_config(ws.root).evaluate, ws, 32, 0)


@pytest.mark.slow
def test_the_evaluate_task_publishes_model_and_baselines_as_a_prefect_table(imbalanced, tmp_path: Path) -> None:
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows import steps

    ws, labeled = imbalanced
    clf = _constant_classifier(ws, labeled, tmp_path)
    cfg = tiny_config(ws.root)

    @flow
    def evaluate_only():
        return steps.evaluate_classifier(cfg, clf, labeled)

    async def artifacts(key: str):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    with prefect_test_harness(server_startup_timeout=120):
        report = evaluate_only().load()
        (table,) = asyncio.run(artifacts("classifier-vs-baselines"))
        (markdown,) = asyncio.run(artifacts("classifier-report"))
    assert table.type == "table"
    rows = table.data if isinstance(table.data, list) else __import__("json").loads(table.data)
    assert [r["model"] for r in rows] == ["model", "majority", "tfidf_logreg"]
    assert rows[2]["macro_f1"] == round(report["baselines"]["tfidf_logreg"]["macro_f1"], 4)
    assert "Confusion matrix" in markdown.data


# ================================================================ language model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("lm") / "ws")
    ws = Workspace(cfg.workspace)
    corpus = ingest.ingest_corpus(cfg.corpus, ws, cfg.seed)
    tok = tokenize.train_tokenizer(corpus, cfg.tokenizer, ws)
    tokens = tokenize.tokenize_corpus(corpus, tok, ws)
    return cfg, ws, tokens, pretrain.pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)


def test_lm_scores_external_held_out_text(lm, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, ws, tokens, model_ref = lm
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


def test_missing_held_out_text_fails_before_scoring(lm, tmp_path: Path) -> None:
    cfg, ws, tokens, model_ref = lm
    ecfg = cfg.evaluate.model_copy(update={"lm_heldout_paths": [str(tmp_path / "absent.txt")]})
    with pytest.raises(DataError, match=r"evaluate\.lm_heldout_paths: .*absent\.txt is not a file"):
        evaluate.evaluate_lm(model_ref, tokens, ecfg, ws, cfg.pretrain.block_size, cfg.seed)


def test_lm_on_wikitext2(lm, shared_data: Path) -> None:
    cfg, ws, tokens, model_ref = lm
    paths = [str(shared_data / "wikitext2" / "valid.txt"), str(shared_data / "wikitext2" / "test.txt")]
    ecfg = cfg.evaluate.model_copy(update={"lm_heldout_paths": paths, "lm_heldout_max_tokens": 2000})
    report = evaluate.evaluate_lm(model_ref, tokens, ecfg, ws, cfg.pretrain.block_size, cfg.seed).load()
    assert set(report["heldout"]) == {"wikitext2/valid.txt", "wikitext2/test.txt"}
    for r in report["heldout"].values():
        assert r["tokens_scored"] > 1000 and math.isfinite(r["ppl"]) and r["bits_per_byte"] > 0
