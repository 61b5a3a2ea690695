"""Evaluation: LM perplexity against a unigram baseline; classifier metrics against baselines."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.artifacts import (
    CheckpointRef,
    LabeledRef,
    ReportRef,
    TokensRef,
    Workspace,
    fingerprint,
    write_json,
)
from tasks.config import EvaluateConfig
from tasks.ingest import load_id2label, load_split
from tasks.tokenize import open_tokens

log = logging.getLogger("llmpipe")

STAGE_VERSION = "evaluate-1"
SAMPLE_PROMPTS = ("The", "I thought the film", "In the morning")


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``val`` under add-one-smoothed unigram frequencies of ``train``."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())


def evaluate_lm(lm: CheckpointRef, tokens: TokensRef, cfg: EvaluateConfig, workspace: Workspace,
                block_size: int, seed: int = 0) -> ReportRef:
    """Validation loss, perplexity and bits per byte on the whole validation split, beside a unigram baseline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.pretrain import lm_eval_loss

    fp = fingerprint(STAGE_VERSION, "lm", lm.fingerprint, tokens.fingerprint, cfg, block_size, seed)

    def build(out: Path) -> dict[str, Any]:
        model = AutoModelForCausalLM.from_pretrained(str(lm.dir))
        tokenizer = AutoTokenizer.from_pretrained(str(lm.dir))
        val = open_tokens(tokens, "validation", verify=True)
        loss, n_scored = lm_eval_loss(model, val, block_size, cfg.batch_size)
        unigram = unigram_cross_entropy(open_tokens(tokens, "train"), val, tokens.meta["vocab_size"])
        split = tokens.meta["splits"]["validation"]
        bytes_per_token = split["bytes_text"] / split["tokens"]
        torch.manual_seed(seed)
        samples = []
        for prompt in SAMPLE_PROMPTS[: cfg.samples]:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=cfg.sample_tokens, do_sample=True, top_k=40,
                                 pad_token_id=tokenizer.pad_token_id)
            samples.append(tokenizer.decode(gen[0], skip_special_tokens=True))
        report = {
            "val_loss": loss,
            "val_ppl": math.exp(loss),
            "val_bits_per_byte": loss / math.log(2) / bytes_per_token,
            "val_tokens_scored": n_scored,
            "unigram_loss": unigram,
            "unigram_ppl": math.exp(unigram),
            "samples": samples,
        }
        write_json(out / "report.json", report)
        log.info("LM: val loss %.3f, perplexity %.1f (unigram baseline %.1f), %.3f bits/byte",
                 loss, report["val_ppl"], report["unigram_ppl"], report["val_bits_per_byte"])
        for s in samples:
            log.info("sample: %s", s.replace("\n", " "))
        return {k: v for k, v in report.items() if k != "samples"}

    return workspace.materialize(ReportRef, fp, build, stage="evaluate_lm",
                                 inputs={"lm": lm.fingerprint, "tokens": tokens.fingerprint})


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return {
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "macro_f1": float(f1.mean()),
        "per_class": {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                  "support": int(cm[i].sum())} for i in range(k)},
        "confusion_matrix": cm.tolist(),
    }


def baselines(train_texts: list[str], train_y: np.ndarray, test_texts: list[str], test_y: np.ndarray,
              labels: list[str], seed: int) -> dict[str, dict[str, Any]]:
    """Majority class and TF-IDF + logistic regression, trained on train and scored on the same test set."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    majority = int(np.bincount(train_y, minlength=len(labels)).argmax())
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed)
    clf.fit(vec.fit_transform(train_texts), train_y)
    return {
        "majority": classification_metrics(test_y, np.full_like(test_y, majority), labels),
        "tfidf_logreg": classification_metrics(test_y, clf.predict(vec.transform(test_texts)), labels),
    }


def evaluate_classifier(clf: CheckpointRef, labeled: LabeledRef, cfg: EvaluateConfig, workspace: Workspace,
                        max_length: int, seed: int = 0) -> ReportRef:
    """Score the fine-tuned classifier on the test split beside the baselines."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.finetune import encode_texts, predict_proba

    fp = fingerprint(STAGE_VERSION, "cls", clf.fingerprint, labeled.fingerprint, cfg, max_length, seed)

    def build(out: Path) -> dict[str, Any]:
        model = AutoModelForSequenceClassification.from_pretrained(str(clf.dir))
        tokenizer = AutoTokenizer.from_pretrained(str(clf.dir))
        id2label = load_id2label(labeled)
        labels = [id2label[i] for i in range(len(id2label))]
        train_rows, test_rows = load_split(labeled, "train"), load_split(labeled, "test")
        test_texts = [r["text"] for r in test_rows]
        y_test = np.array([r["label"] for r in test_rows], dtype=np.int64)
        proba = predict_proba(model, encode_texts(tokenizer, test_texts, max_length), tokenizer.pad_token_id,
                              cfg.batch_size)
        y_pred = proba.argmax(-1)
        report = {
            "model": classification_metrics(y_test, y_pred, labels),
            "baselines": baselines([r["text"] for r in train_rows], np.array([r["label"] for r in train_rows]),
                                   test_texts, y_test, labels, seed),
            "labels": labels,
            "test_rows": len(test_rows),
            "test_fingerprint": labeled.fingerprint,
            "predictions": y_pred.tolist(),
        }
        write_json(out / "report.json", report)
        b = report["baselines"]
        log.info("classifier: test accuracy %.4f, macro-F1 %.4f (TF-IDF+LR %.4f / %.4f, majority %.4f)",
                 report["model"]["accuracy"], report["model"]["macro_f1"], b["tfidf_logreg"]["accuracy"],
                 b["tfidf_logreg"]["macro_f1"], b["majority"]["accuracy"])
        return {"accuracy": report["model"]["accuracy"], "macro_f1": report["model"]["macro_f1"],
                "tfidf_logreg_accuracy": b["tfidf_logreg"]["accuracy"], "majority_accuracy": b["majority"]["accuracy"]}

    return workspace.materialize(ReportRef, fp, build, stage="evaluate_classifier",
                                 inputs={"classifier": clf.fingerprint, "labeled": labeled.fingerprint})
