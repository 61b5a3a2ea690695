"""TF-IDF + LR baselines fair in any script: which features, and what the choice costs.

For each data set, the labeled artifact is built as its preset builds it (the same splits), from the local files
in ``../shared/data``; then TF-IDF + logistic regression is fit on the training split over each candidate feature
set (word 1-2-grams; character 1-3-grams, ``char_wb`` and ``char``; the union of word and each character set) and
scored on the validation and test splits. ``fit_baselines`` (the evaluation's own, choosing among
``evaluate.TFIDF_FEATURES`` on the validation split) is timed against the single word-n-gram baseline of before
on the same rows, in alternating rounds. The last line printed is one JSON object.

    python benchmarks/baselines.py [--data ../shared/data] [--sets waimai sst2 sms_spam imdb imdb-1000] [--rounds 1]

``imdb`` uses all 25,000 training reviews (10% split off for validation) and the preset's fixed 5,000 test reviews:
the timing at IMDB size; ``imdb-1000`` the preset's own budget of 1,000 labels (900 train, 100 validation).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks import evaluate
from tasks.artifacts import Workspace
from tasks.config import load_config
from tasks.ingest import ingest_labeled, load_id2label, load_split
from tasks.metrics import classification_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent


def labeled_overrides(name: str, data: Path) -> tuple[str, list[str]]:
    """The preset and the overrides that read its local files."""
    if name == "waimai":
        d = data / "waimai"
        return "waimai", [f"labeled.source={{kind: files, train: {d / 'train.jsonl'}, test: {d / 'test.jsonl'}}}"]
    if name == "sst2":
        d = data / "sst2"
        return "sst2", [f"labeled.source={{kind: files, train: {d / 'train.tsv'}, test: {d / 'dev.tsv'}}}"]
    if name == "sms_spam":
        f = data / "sms_spam" / "SMSSpamCollection"
        return "sms-spam", [f"labeled.source={{kind: files, train: {f}, has_header: false}}",
                            "labeled.text_column='1'", "labeled.label_column=0"]
    if name in ("imdb", "imdb-1000"):  # all 25,000 training reviews, or the preset's budget of 1,000
        d = data / "imdb"
        return "imdb", [f"labeled.source={{kind: files, train: {d / 'train.jsonl'}, test: {d / 'test.jsonl'}}}",
                        *(["labeled.max_train_examples=null"] if name == "imdb" else [])]
    raise SystemExit(f"unknown data set {name!r}")


def candidates() -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return {"word": lambda: TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
            "char_wb": lambda: TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), min_df=1, sublinear_tf=True),
            "char": lambda: TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=1, sublinear_tf=True)}


def each_feature_set(train: tuple, validation: tuple, test: tuple, labels: list[str], seed: int) -> dict[str, Any]:
    """Validation macro-F1, test accuracy and macro-F1 and seconds of every candidate, the unions included."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    out, mats = {}, {}
    for name, make in candidates().items():
        started = time.perf_counter()
        vec = make()
        mats[name] = (vec.fit_transform(train[0]), vec.transform(validation[0]), vec.transform(test[0]))
        mats[name + "_s"] = time.perf_counter() - started
    sets = {k: mats[k] for k in candidates()}
    sets.update({f"word+{c}": tuple(sp.hstack([w, x], format="csr") for w, x in zip(mats["word"], mats[c], strict=True))
                 for c in ("char_wb", "char")})
    for name, (xtr, xva, xte) in sets.items():
        started = time.perf_counter()
        clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed).fit(xtr, train[1])
        va = classification_metrics(validation[1], clf.predict(xva), labels)
        te = classification_metrics(test[1], clf.predict(xte), labels)
        fit_s = time.perf_counter() - started + sum(mats[p + "_s"] for p in name.split("+"))
        out[name] = {"features": xtr.shape[1], "validation_macro_f1": round(va["macro_f1"], 4),
                     "test_accuracy": round(te["accuracy"], 4), "test_macro_f1": round(te["macro_f1"], 4),
                     "seconds": round(fit_s, 1)}
        print(name, out[name], flush=True)
    return out


def word_only(train: tuple, test: tuple, n_labels: int, seed: int) -> np.ndarray:
    """The baseline of before: word 1-2-grams only."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed).fit(vec.fit_transform(train[0]), train[1])
    return clf.predict_proba(vec.transform(test[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--sets", nargs="+", default=["waimai", "sst2", "sms_spam", "imdb"])
    parser.add_argument("--rounds", type=int, default=1, help="alternating timing rounds (old, new) per data set")
    parser.add_argument("--no-candidates", action="store_true", help="time fit_baselines only")
    args = parser.parse_args()
    results: dict[str, Any] = {"benchmark": "baselines", "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            preset, overrides = labeled_overrides(name, Path(args.data))
            cfg = load_config(preset, overrides)
            labeled = ingest_labeled(cfg.labeled, Workspace(tmp), cfg.seed)
            id2label = load_id2label(labeled)
            labels = [id2label[i] for i in range(len(id2label))]
            splits = {}
            for split in ("train", "validation", "test"):
                rows = load_split(labeled, split)
                splits[split] = ([r["text"] for r in rows], np.array([r["label"] for r in rows], dtype=np.int64))
            entry: dict[str, Any] = {"rows": {k: len(v[0]) for k, v in splits.items()}}
            print(name, entry["rows"], flush=True)
            if not args.no_candidates:
                entry["candidates"] = each_feature_set(splits["train"], splits["validation"], splits["test"], labels,
                                                       cfg.seed)
            old, new = [], []
            for _ in range(args.rounds):
                started = time.perf_counter()
                word_only(splits["train"], splits["test"], len(labels), cfg.seed)
                old.append(time.perf_counter() - started)
                started = time.perf_counter()
                proba, info = evaluate.fit_baselines(*splits["train"], splits["test"][0], len(labels), cfg.seed,
                                                     splits["validation"])
                new.append(time.perf_counter() - started)
            m = classification_metrics(splits["test"][1], proba["tfidf_logreg"].argmax(axis=1), labels)
            entry["fit_baselines"] = {**info, "test_accuracy": round(m["accuracy"], 4),
                                      "test_macro_f1": round(m["macro_f1"], 4)}
            entry["seconds"] = {"word_only": [round(s, 1) for s in old], "fit_baselines": [round(s, 1) for s in new],
                                "added_median": round(float(np.median(new) - np.median(old)), 1)}
            print(name, json.dumps(entry, ensure_ascii=False), flush=True)
            results["sets"][name] = entry
    results["load_average"] = os.getloadavg()
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
