"""Evaluation: the LM's perplexity and bits per byte beside a unigram baseline (on its validation split and
on external held-out text); the classifier's accuracy, macro-F1, per-class scores, confusion matrix and
calibration beside a majority-class and a TF-IDF + logistic-regression baseline trained on the same split."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import (
    CheckpointRef,
    LabeledRef,
    ReportRef,
    TokensRef,
    Workspace,
    fingerprint,
    write_json,
)
from tasks.classifier import encode_texts, predict_proba
from tasks.config import EvaluateConfig
from tasks.confine import may_quote, open_file
from tasks.errors import DataError
from tasks.ingest import load_id2label, load_split
from tasks.metrics import calibration, classification_metrics
from tasks.redact import NOT_SHOWN
from tasks.tokenize import open_tokens

log = logging.getLogger("llmpipe")

STAGE_VERSION = "evaluate-2"
HELDOUT = "evaluate.lm_heldout_paths"
SAMPLE_PROMPTS = ("The", "I thought the film", "In the morning")
CONFUSION_PNG = "confusion_matrix.png"
MODEL = "model"


# ---------------------------------------------------------------------------------------------- language model


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``val`` under add-one-smoothed unigram frequencies of ``train``."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())


def _heldout_files(cfg: EvaluateConfig) -> dict[Path, str]:
    """Each held-out file and the SHA-256 of its bytes, read through ``open_file``."""
    digests = {}
    for p in (Path(p).expanduser() for p in cfg.lm_heldout_paths):
        with open_file(p, HELDOUT) as f:
            digests[p] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def heldout_name(path: Path) -> str:
    """The report key of a held-out file: its folder and name (``wikitext2/valid.txt``)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def score_text_file(model, tokenizer, path: Path, block_size: int, batch_size: int,
                    max_tokens: int | None) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of the LM on a text file (at most its first ``max_tokens`` tokens).

    Bits per byte is the loss in bits over the bytes per token of the lines read."""
    from tasks.pretrain import lm_eval_loss

    with open_file(path, HELDOUT) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})") from None
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    n_bytes = 0
    limit = math.inf if max_tokens is None else max_tokens
    for start in range(0, len(lines), 1024):
        if len(ids) > limit:
            break
        chunk = lines[start : start + 1024]
        for line, line_ids in zip(chunk, tokenizer(chunk, add_special_tokens=False)["input_ids"], strict=True):
            if len(ids) > limit:
                break
            ids.extend(line_ids)
            n_bytes += len(line.encode("utf-8"))
    if len(ids) < block_size + 1:
        raise DataError(f"{path}: {len(ids)} tokens, fewer than one block of {block_size} to score")
    bytes_per_token = n_bytes / len(ids)  # over the whole lines read
    scored = ids if max_tokens is None else ids[: max_tokens + 1]
    loss, n_scored = lm_eval_loss(model, np.asarray(scored, dtype=np.int64), block_size, batch_size)
    return {"loss": loss, "ppl": math.exp(loss), "bits_per_byte": loss / math.log(2) / bytes_per_token,
            "tokens_scored": n_scored, "bytes_per_token": bytes_per_token, "path": str(path)}


def evaluate_lm(lm: CheckpointRef, tokens: TokensRef, cfg: EvaluateConfig, workspace: Workspace,
                block_size: int, seed: int = 0, threads: int | None = None) -> ReportRef:
    """Loss, perplexity and bits per byte on the whole validation split beside a unigram baseline, and on
    each of ``cfg.lm_heldout_paths``. ``threads``: torch's intra-op threads while scoring (0: one per core). Samples
    are generated only where the run may quote its data (``confine.may_quote``): a model can repeat what it read."""
    heldout = _heldout_files(cfg)
    settings = cfg.model_dump(include={"samples", "sample_tokens", "batch_size", "lm_heldout_max_tokens"})
    fp = fingerprint(STAGE_VERSION, "lm", lm.fingerprint, tokens.fingerprint, settings,
                     [(str(p), digest) for p, digest in heldout.items()], block_size, seed)

    def build(out: Path) -> dict[str, Any]:
        import torch  # here, as transformers: a reused report needs neither
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tasks.pretrain import lm_eval_loss
        from tasks.training import set_threads

        set_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(str(lm.dir))
        tokenizer = AutoTokenizer.from_pretrained(str(lm.dir))
        val = open_tokens(tokens, "validation", verify=True)
        loss, n_scored = lm_eval_loss(model, val, block_size, cfg.batch_size)
        unigram = unigram_cross_entropy(open_tokens(tokens, "train"), val, tokens.meta["vocab_size"])
        split = tokens.meta["splits"]["validation"]
        bytes_per_token = split["bytes_text"] / split["tokens"]
        scored = {heldout_name(p): score_text_file(model, tokenizer, p, block_size, cfg.batch_size,
                                                   cfg.lm_heldout_max_tokens) for p in heldout}
        torch.manual_seed(seed)
        samples = []
        for prompt in SAMPLE_PROMPTS[: cfg.samples if may_quote() else 0]:
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
            "heldout": scored,
            "samples": samples,
        }
        write_json(out / "report.json", report)
        log.info("LM: val loss %.3f, perplexity %.1f (unigram baseline %.1f), %.3f bits/byte",
                 loss, report["val_ppl"], report["unigram_ppl"], report["val_bits_per_byte"])
        for name, r in scored.items():
            log.info("LM on %s: perplexity %.1f, %.3f bits/byte over %d tokens", name, r["ppl"], r["bits_per_byte"],
                     r["tokens_scored"])
        for s in samples:
            log.info("sample: %s", s.replace("\n", " "))
        return {k: v for k, v in report.items() if k != "samples"}

    return workspace.materialize(ReportRef, fp, build, stage="evaluate_lm",
                                 inputs={"lm": lm.fingerprint, "tokens": tokens.fingerprint})


# ---------------------------------------------------------------------------------------------- classifier metrics


def confident_mistakes(texts: list[str], y_true: np.ndarray, proba: np.ndarray, labels: list[str],
                       n: int) -> list[dict[str, Any]]:
    """The ``n`` wrong predictions made with the highest confidence, most confident first; each text ``NOT_SHOWN``
    where the run may not quote its data (``confine.may_quote``)."""
    pred, conf = proba.argmax(axis=1), proba.max(axis=1)
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
    quote = may_quote()
    return [{"row": int(i), "text": texts[i][:500] if quote else NOT_SHOWN, "label": labels[int(y_true[i])], "predicted": labels[int(pred[i])],
             "confidence": float(conf[i])} for i in wrong]


def baseline_predictions(train_texts: list[str], train_y: np.ndarray, test_texts: list[str], n_labels: int,
                         seed: int) -> dict[str, np.ndarray]:
    """Class probabilities on the test texts of a majority-class model (the training class frequencies for
    every row) and of TF-IDF (word 1-2 grams) + logistic regression, both fit on the training split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    prior = np.bincount(train_y, minlength=n_labels) / len(train_y)
    majority = np.tile(prior, (len(test_texts), 1))  # argmax: the most frequent class (the first, on a tie)
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed)
    clf.fit(vec.fit_transform(train_texts), train_y)
    tfidf = np.zeros((len(test_texts), n_labels))
    tfidf[:, clf.classes_] = clf.predict_proba(vec.transform(test_texts))
    return {"majority": majority, "tfidf_logreg": tfidf}


def plot_confusion_matrix(cm: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(cm)
    size = max(3.5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    rates = m / np.maximum(1, m.sum(axis=1, keepdims=True))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model (the classifier, then each baseline): accuracy, macro-F1, ECE and per-class F1."""
    rows = []
    for name, m in [(MODEL, report["model"]), *report["baselines"].items()]:
        row = {"model": name, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
               "ece": report["calibration"][name]["ece"]}
        row.update({f"f1_{label}": c["f1"] for label, c in m["per_class"].items()})
        rows.append(row)
    return rows


def evaluate_classifier(clf: CheckpointRef, labeled: LabeledRef, cfg: EvaluateConfig, workspace: Workspace,
                        max_length: int, seed: int = 0, threads: int | None = None) -> ReportRef:
    """Score the fine-tuned classifier on the test split beside baselines fit on the train split.

    The report (``report.json``) holds, for the model and for each baseline, accuracy, macro-F1, per-class
    precision/recall/F1 and the confusion matrix (``model``, ``baselines``), their calibration
    (``calibration``: ECE and the reliability bins), the most confident mistakes, the test predictions, and a
    ``comparison`` table; ``confusion_matrix.png`` plots the model's confusion matrix.
    """
    settings = cfg.model_dump(include={"batch_size", "calibration_bins", "confident_mistakes"})
    fp = fingerprint(STAGE_VERSION, "cls", clf.fingerprint, labeled.fingerprint, settings, max_length, seed)

    def build(out: Path) -> dict[str, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # not for a reused report

        from tasks.training import set_threads

        set_threads(threads)
        id2label = load_id2label(labeled)
        labels = [id2label[i] for i in range(len(id2label))]
        train_rows, test_rows = load_split(labeled, "train"), load_split(labeled, "test")
        if not test_rows:
            raise DataError(f"{labeled.dir / 'test.jsonl'}: the test split is empty")
        model = AutoModelForSequenceClassification.from_pretrained(str(clf.dir))
        if model.config.num_labels != len(labels):
            raise DataError(f"{clf.dir}: the classifier has {model.config.num_labels} labels, the labeled data "
                            f"{labeled.dir} has {len(labels)} ({', '.join(labels)})")
        tokenizer = AutoTokenizer.from_pretrained(str(clf.dir))
        test_texts = [r["text"] for r in test_rows]
        y_test = np.array([r["label"] for r in test_rows], dtype=np.int64)
        proba = {MODEL: predict_proba(model, encode_texts(tokenizer, test_texts, max_length), tokenizer.pad_token_id,
                                      cfg.batch_size)}
        proba.update(baseline_predictions([r["text"] for r in train_rows],
                                          np.array([r["label"] for r in train_rows], dtype=np.int64),
                                          test_texts, len(labels), seed))
        metrics = {name: classification_metrics(y_test, p.argmax(axis=1), labels) for name, p in proba.items()}
        report = {
            "split": "test",
            "labels": labels,
            "test_rows": len(test_rows),
            "test_fingerprint": labeled.fingerprint,
            MODEL: metrics.pop(MODEL),
            "baselines": metrics,
            "calibration": {name: calibration(y_test, p, cfg.calibration_bins) for name, p in proba.items()},
            "confident_mistakes": confident_mistakes(test_texts, y_test, proba[MODEL], labels, cfg.confident_mistakes),
            "predictions": proba[MODEL].argmax(axis=1).tolist(),
            "confusion_matrix_png": CONFUSION_PNG,
        }
        report["comparison"] = comparison_rows(report)
        m = report[MODEL]
        plot_confusion_matrix(m["confusion_matrix"], labels, f"test accuracy {m['accuracy']:.3f}, macro-F1 "
                              f"{m['macro_f1']:.3f} ({len(test_rows)} rows)", out / CONFUSION_PNG)
        write_json(out / "report.json", report)
        b = report["baselines"]
        log.info("classifier: test accuracy %.4f, macro-F1 %.4f, ECE %.4f (TF-IDF+LR %.4f / %.4f, majority %.4f)",
                 m["accuracy"], m["macro_f1"], report["calibration"][MODEL]["ece"], b["tfidf_logreg"]["accuracy"],
                 b["tfidf_logreg"]["macro_f1"], b["majority"]["accuracy"])
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "tfidf_logreg_accuracy": b["tfidf_logreg"]["accuracy"], "majority_accuracy": b["majority"]["accuracy"]}

    return workspace.materialize(ReportRef, fp, build, stage="evaluate_classifier",
                                 inputs={"classifier": clf.fingerprint, "labeled": labeled.fingerprint})
