"""Evaluation: the LM's perplexity and bits per byte beside a unigram baseline (on its validation split and
on external held-out text); the classifier's accuracy, macro-F1, per-class scores, confusion matrix and
calibration beside a majority-class and a TF-IDF + logistic-regression baseline trained on the same split (its
features, word or character n-grams or both, chosen on the validation split: fair in any script)."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
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
BASELINES_VERSION = "baselines-2"  # the classifier report's: TF-IDF + LR chooses its features on validation
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
    if cfg.sample_prompts is not None:  # only when set: the default prompts' reports keep their fingerprints
        settings["sample_prompts"] = cfg.sample_prompts
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
        prompts = SAMPLE_PROMPTS if cfg.sample_prompts is None else tuple(cfg.sample_prompts)
        for prompt in prompts[: cfg.samples if may_quote() else 0]:
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


# The TF-IDF + LR baseline's candidate feature sets, in the order that breaks ties in its validation score:
# word 1-2-grams (fit for languages written with spaces), character 1-3-grams within word boundaries (fit for
# any script, and the only usable ones for Chinese, Japanese or Thai, written without spaces), and both side by
# side (sklearn's FeatureUnion of the two: their matrices stacked column-wise).
TFIDF_FEATURES = ("word", "char", "word+char")
TFIDF_DESCRIPTION = {"word": "word 1-2-grams", "char": "char_wb 1-3-grams", "word+char": "word 1-2-grams + char_wb 1-3-grams"}


class CharNgramTfidf:
    """The matrix of ``TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)`` (the same
    vocabulary, column order and values), computed per distinct word rather than per occurrence.

    ``char_wb`` cuts the lower-cased text at whitespace and counts the 1-3-grams of each word padded with a space,
    so a document's counts are its word counts times each word's n-gram counts: a sparse product. scikit-learn's
    analyzer builds every n-gram of every occurrence in Python, about 40 s for 25,000 IMDB reviews; this builds
    those of each distinct word once. Words first seen in ``transform`` add their n-grams of the training
    vocabulary, as scikit-learn's transform does."""

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfTransformer

        self.tfidf = TfidfTransformer(sublinear_tf=True)
        self.words: dict[str, int] = {}
        self.ngrams: dict[str, int] = {}
        self.rows: list[list[int]] = []  # per word: the columns of its n-grams (a repeated one repeated)

    @staticmethod
    def word_ngrams(word: str) -> list[str]:
        padded = f" {word} "
        return [padded[i : i + n] for n in (1, 2, 3) for i in range(len(padded) - n + 1)]

    def _counts(self, texts: list[str], fit: bool) -> Any:
        import scipy.sparse as sp

        indptr, indices, values = [0], [], []
        first_new = len(self.words)
        for text in texts:
            for word, k in Counter(text.lower().split()).items():
                indices.append(self.words.setdefault(word, len(self.words)))
                values.append(k)
            indptr.append(len(indices))
        grams_of = [self.word_ngrams(w) for w in list(self.words)[first_new:]]
        if fit:
            self.ngrams = {g: i for i, g in enumerate(sorted(set().union(*grams_of)))}
        vocab = self.ngrams
        self.rows.extend([vocab[g] for g in grams if g in vocab] for grams in grams_of)
        words = sp.csr_matrix((np.asarray(values, dtype=np.float64), np.asarray(indices, dtype=np.int64), indptr),
                              shape=(len(texts), len(self.words)))
        cols = np.fromiter((c for row in self.rows for c in row), dtype=np.int64)
        rows = np.repeat(np.arange(len(self.rows)), [len(row) for row in self.rows])
        grams = sp.coo_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(self.words), len(vocab))).tocsr()
        counts = words @ grams  # a word's repeated n-grams are summed by tocsr
        counts.sort_indices()
        return counts

    def fit_transform(self, texts: list[str]) -> Any:
        return self.tfidf.fit_transform(self._counts(texts, fit=True))

    def transform(self, texts: list[str]) -> Any:
        return self.tfidf.transform(self._counts(texts, fit=False))


def _tfidf_vectorizers() -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return {"word": TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True), "char": CharNgramTfidf()}


def _features(matrices: dict[str, Any], name: str) -> Any:
    """The candidate ``name``'s matrix from the fitted vectorisers' outputs (the union: both side by side)."""
    import scipy.sparse as sp

    return sp.hstack([matrices["word"], matrices["char"]], format="csr") if name == "word+char" else matrices[name]


def fit_baselines(train_texts: list[str], train_y: np.ndarray, test_texts: list[str], n_labels: int, seed: int,
                  validation: tuple[list[str], np.ndarray] | None = None) -> tuple[dict[str, np.ndarray],
                                                                                   dict[str, Any]]:
    """Class probabilities on the test texts of a majority-class model and of TF-IDF + logistic regression, both
    fit on the training split, and which features the TF-IDF baseline used (``tfidf_features``).

    TF-IDF + LR is fit on each candidate of ``TFIDF_FEATURES`` (word n-grams, character n-grams, both) and the one
    with the highest macro-F1 on ``validation`` (texts and label ids; the labeled artifact's validation split)
    predicts the test texts; an exact tie goes to the earlier candidate. Without validation rows the union is used
    (it holds both). Each vectoriser is fit once and its matrices shared by the candidates; everything is
    deterministic for a seed, so evaluation and the gate's floor make the same choice.
    """
    from sklearn.linear_model import LogisticRegression

    from tasks.metrics import macro_f1

    prior = np.bincount(train_y, minlength=n_labels) / len(train_y)
    majority = np.tile(prior, (len(test_texts), 1))  # argmax: the most frequent class (the first, on a tie)
    val_texts, val_y = validation if validation is not None else ([], np.zeros(0, dtype=np.int64))
    val_y = np.asarray(val_y, dtype=np.int64)
    candidates = TFIDF_FEATURES if len(val_texts) else ("word+char",)
    vectorizers = _tfidf_vectorizers()
    fitted: dict[str, dict[str, Any]] = {"train": {}, "validation": {}}
    for name, vec in vectorizers.items():
        if any(name in c.split("+") for c in candidates):
            fitted["train"][name] = vec.fit_transform(train_texts)
            if len(val_texts):
                fitted["validation"][name] = vec.transform(val_texts)
    models, scores = {}, {}
    for name in candidates:
        clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed)
        models[name] = clf.fit(_features(fitted["train"], name), train_y)
        if len(val_texts):
            scores[name] = macro_f1(val_y, clf.predict(_features(fitted["validation"], name)), n_labels)
    chosen = max(candidates, key=lambda c: (scores.get(c, 0.0), -candidates.index(c)))
    test = {name: vectorizers[name].transform(test_texts) for name in chosen.split("+")}
    tfidf = np.zeros((len(test_texts), n_labels))
    tfidf[:, models[chosen].classes_] = models[chosen].predict_proba(_features(test, chosen))
    rule = (f"the highest macro-F1 on the validation split (ties: {', '.join(TFIDF_FEATURES)}, in that order)"
            if len(val_texts) else "no validation rows: word+char")
    info = {"chosen": chosen, "features": TFIDF_DESCRIPTION[chosen], "validation_rows": len(val_texts),
            "validation_macro_f1": scores, "rule": rule}
    return {"majority": majority, "tfidf_logreg": tfidf}, info


def split_texts(rows: list[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """A labeled split's texts and label ids."""
    return [r["text"] for r in rows], np.array([r["label"] for r in rows], dtype=np.int64)


def baseline_predictions(train_texts: list[str], train_y: np.ndarray, test_texts: list[str], n_labels: int,
                         seed: int, validation: tuple[list[str], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Class probabilities on the test texts of a majority-class model and of TF-IDF + logistic regression over
    the features ``fit_baselines`` chooses on ``validation``."""
    return fit_baselines(train_texts, train_y, test_texts, n_labels, seed, validation)[0]


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


def vs_tfidf(report: dict[str, Any]) -> dict[str, float]:
    """By how much the classifier beats (positive) or trails (negative) TF-IDF + LR on the test split: accuracy and
    macro-F1 differences, in points (hundredths)."""
    tfidf = report["baselines"]["tfidf_logreg"]
    return {metric: round(100 * (report[MODEL][metric] - tfidf[metric]), 2) for metric in ("accuracy", "macro_f1")}


def evaluate_classifier(clf: CheckpointRef, labeled: LabeledRef, cfg: EvaluateConfig, workspace: Workspace,
                        max_length: int, seed: int = 0, threads: int | None = None) -> ReportRef:
    """Score the fine-tuned classifier on the test split beside baselines fit on the train split.

    The report (``report.json``) holds, for the model and for each baseline, accuracy, macro-F1, per-class
    precision/recall/F1 and the confusion matrix (``model``, ``baselines``), their calibration
    (``calibration``: ECE and the reliability bins), the most confident mistakes, the test predictions, a
    ``comparison`` table, and ``vs_tfidf``: by how many points the classifier beats or trails TF-IDF + LR;
    ``confusion_matrix.png`` plots the model's confusion matrix.
    """
    settings = cfg.model_dump(include={"batch_size", "calibration_bins", "confident_mistakes"})
    fp = fingerprint(STAGE_VERSION, "cls", BASELINES_VERSION, clf.fingerprint, labeled.fingerprint, settings,
                     max_length, seed)

    def build(out: Path) -> dict[str, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # not for a reused report

        from tasks.training import set_threads

        set_threads(threads)
        id2label = load_id2label(labeled)
        labels = [id2label[i] for i in range(len(id2label))]
        train_rows, test_rows = load_split(labeled, "train"), load_split(labeled, "test")
        val_rows = load_split(labeled, "validation")  # where the TF-IDF baseline chooses its features
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
        baselines, tfidf_features = fit_baselines(
            [r["text"] for r in train_rows], np.array([r["label"] for r in train_rows], dtype=np.int64), test_texts,
            len(labels), seed, split_texts(val_rows))
        proba.update(baselines)
        metrics = {name: classification_metrics(y_test, p.argmax(axis=1), labels) for name, p in proba.items()}
        report = {
            "split": "test",
            "labels": labels,
            "test_rows": len(test_rows),
            "test_fingerprint": labeled.fingerprint,
            MODEL: metrics.pop(MODEL),
            "baselines": metrics,
            "tfidf_features": tfidf_features,
            "calibration": {name: calibration(y_test, p, cfg.calibration_bins) for name, p in proba.items()},
            "confident_mistakes": confident_mistakes(test_texts, y_test, proba[MODEL], labels, cfg.confident_mistakes),
            "predictions": proba[MODEL].argmax(axis=1).tolist(),
            "confusion_matrix_png": CONFUSION_PNG,
        }
        report["comparison"] = comparison_rows(report)
        report["vs_tfidf"] = vs_tfidf(report)
        m = report[MODEL]
        plot_confusion_matrix(m["confusion_matrix"], labels, f"test accuracy {m['accuracy']:.3f}, macro-F1 "
                              f"{m['macro_f1']:.3f} ({len(test_rows)} rows)", out / CONFUSION_PNG)
        write_json(out / "report.json", report)
        b = report["baselines"]
        log.info("classifier: test accuracy %.4f, macro-F1 %.4f, ECE %.4f (TF-IDF+LR on %s %.4f / %.4f, majority "
                 "%.4f)", m["accuracy"], m["macro_f1"], report["calibration"][MODEL]["ece"], tfidf_features["features"],
                 b["tfidf_logreg"]["accuracy"], b["tfidf_logreg"]["macro_f1"], b["majority"]["accuracy"])
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "tfidf_logreg_accuracy": b["tfidf_logreg"]["accuracy"], "majority_accuracy": b["majority"]["accuracy"]}

    return workspace.materialize(ReportRef, fp, build, stage="evaluate_classifier",
                                 inputs={"classifier": clf.fingerprint, "labeled": labeled.fingerprint})
