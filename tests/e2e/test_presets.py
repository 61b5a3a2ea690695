"""The real-data presets on local copies of their data sets: SST-2 (GLUE files), the SMS Spam Collection,
IMDB's reviews and waimai's Chinese reviews, at a smoke-test size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks import ingest
from tests.support import Models, build_models

pytestmark = pytest.mark.slow


def _run(models: Models) -> dict[str, Any]:
    return {"labeled": models.labeled, "report": models.report.load()}


SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "tokenizer.vocab_size=400", "pretrain.max_steps=3",
         "pretrain.warmup_steps=1", "finetune.max_steps=3", "finetune.warmup_steps=1", "finetune.eval_every=3",
         "evaluate.samples=0", "runtime.threads=1"]


def test_sst2_preset_on_local_glue_files(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "sst2"
    out = _run(build_models(tmp_path / "ws", *SMALL,
                            f"corpus.sources=[{{kind: files, paths: [{d / 'train.tsv'}], text_columns: [sentence]}}]",
                            f"labeled.source={{kind: files, train: {d / 'train.tsv'}, test: {d / 'dev.tsv'}}}",
                            preset="sst2"))
    assert out["report"]["test_rows"] == 872 and out["report"]["labels"] == ["negative", "positive"]
    # 10% of the 6,886 source sentences held out whole for validation; their phrases left training.
    rows = out["labeled"].meta["rows"]
    assert rows["validation"] == 689 and rows["train"] == 67349 - 689 - 5950
    assert out["report"]["baselines"]["tfidf_logreg"]["accuracy"] > 0.8


def test_sms_spam_preset_on_the_local_collection(shared_data: Path, tmp_path: Path) -> None:
    f = shared_data / "sms_spam" / "SMSSpamCollection"
    out = _run(build_models(tmp_path / "ws", *SMALL,
                            f"corpus.sources=[{{kind: files, paths: [{f}], format: tsv, has_header: false, "
                            "text_columns: ['1']}]",
                            f"labeled.source={{kind: files, train: {f}, has_header: false}}",
                            "labeled.text_column='1'", "labeled.label_column=0", preset="sms-spam"))
    rows = out["labeled"].meta["rows"]
    assert out["report"]["labels"] == ["ham", "spam"]
    # The stratified 20% of the 5,160 distinct messages held out; no test message is also a training message.
    assert rows["test"] == 1033 and out["labeled"].meta["rows"] == rows
    assert ingest.load_data_report(out["labeled"])["held_out_texts_in_train"] == {"validation": 0, "test": 0}
    assert out["report"]["model"]["per_class"]["spam"]["support"] == 129
    assert out["report"]["baselines"]["tfidf_logreg"]["macro_f1"] > 0.9


def test_imdb_preset_on_the_local_reviews_with_a_label_budget(shared_data: Path, tmp_path: Path) -> None:
    import json

    d = shared_data / "imdb"
    # Pretraining text: the first 2,000 unlabeled reviews (the preset reads all 75,000 unlabeled and training ones).
    corpus = tmp_path / "unsup-2000.jsonl"
    with open(d / "unsup.jsonl", encoding="utf-8") as f:
        corpus.write_text("".join(f.readline() for _ in range(2000)), encoding="utf-8")
    out = _run(build_models(tmp_path / "ws", *SMALL, "finetune.max_length=64", "finetune.eval_every=3",
                            f"corpus.sources=[{{kind: files, paths: [{corpus}], text_columns: [text]}}]",
                            f"labeled.source={{kind: files, train: {d / 'train.jsonl'}, test: {d / 'test.jsonl'}}}",
                            preset="imdb"))
    rows = out["labeled"].meta["rows"]
    balance = out["labeled"].meta["class_balance"]
    assert out["report"]["labels"] == ["negative", "positive"]
    # The budget: 1,000 of the 25,000 training reviews (100 for validation), a fixed 5,000 of the 25,000 test ones.
    assert rows == {"train": 900, "validation": 100, "test": 5000}
    assert balance["test"] == {"negative": 2500, "positive": 2500}
    assert balance["train"]["negative"] + balance["validation"]["negative"] == 500
    report = ingest.load_data_report(out["labeled"])
    assert report["budget"] == {"train": {"rows": 1000, "of": 25000}, "test": {"rows": 5000, "of": 25000}}
    with open(d / "test.jsonl", encoding="utf-8") as f:
        test_texts = {json.loads(line)["text"].strip() for line in f}  # as ingestion keeps them
    assert all(r["text"] in test_texts for r in ingest.load_split(out["labeled"], "test"))
    assert out["report"]["baselines"]["tfidf_logreg"]["accuracy"] > 0.75


def test_waimai_preset_on_the_local_chinese_reviews(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "waimai"
    out = _run(build_models(tmp_path / "ws", *SMALL,
                            f"corpus.sources=[{{kind: files, paths: [{d / 'train.jsonl'}], text_columns: [text]}}]",
                            f"labeled.source={{kind: files, train: {d / 'train.jsonl'}, test: {d / 'test.jsonl'}}}",
                            preset="waimai"))
    rows, report = out["labeled"].meta["rows"], out["report"]
    assert report["labels"] == ["negative", "positive"] and rows == {"train": 8625, "validation": 959, "test": 2396}
    # No spaces between words: the TF-IDF baseline picks character n-grams on the validation split, and scores
    # as char 1-3-gram TF-IDF + LR is known to (accuracy 0.903, macro-F1 0.888).
    assert report["tfidf_features"]["chosen"] == "char"
    assert report["baselines"]["tfidf_logreg"]["macro_f1"] > 0.88 and report["baselines"]["majority"]["accuracy"] > 0.66
