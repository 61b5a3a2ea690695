"""Tests for the deterministic sample data generators."""

from __future__ import annotations

import re

import pytest

from tasks.sample_data import LABELS, pretraining_corpus, sentiment_dataset

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _sentences(doc: str) -> list[str]:
    return _SENTENCE_END.split(doc)


@pytest.fixture(scope="module")
def dataset() -> dict[str, list[dict]]:
    return sentiment_dataset()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return pretraining_corpus()


@pytest.fixture(scope="module")
def tfidf_model(dataset):
    """TF-IDF (word 1-2 grams) + logistic regression fitted on the train split."""
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(max_iter=1000))
    model.fit([r["text"] for r in dataset["train"]], [r["label"] for r in dataset["train"]])
    return model


def test_labels_constant() -> None:
    assert LABELS == ("negative", "positive")


def test_sentiment_dataset_is_deterministic(dataset) -> None:
    assert sentiment_dataset(seed=0) == dataset
    other = sentiment_dataset(seed=1)
    assert other != dataset
    assert {r["text"] for r in other["test"]} != {r["text"] for r in dataset["test"]}


def test_pretraining_corpus_is_deterministic(corpus) -> None:
    assert pretraining_corpus(seed=0) == corpus
    other = pretraining_corpus(seed=1)
    assert other != corpus
    assert len(set(other) & set(corpus)) < len(corpus) // 10


def test_split_sizes_and_rows(dataset) -> None:
    assert set(dataset) == {"train", "validation", "test"}
    assert [len(dataset[k]) for k in ("train", "validation", "test")] == [4000, 500, 500]
    for rows in dataset.values():
        for row in rows:
            assert set(row) == {"text", "label"}
            assert row["label"] in LABELS
            assert isinstance(row["text"], str) and row["text"].strip() == row["text"] and row["text"]
            assert row["text"][0].isupper() and row["text"][-1] in ".!"


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_classes_balanced(dataset, split: str) -> None:
    labels = [r["label"] for r in dataset[split]]
    share = labels.count("positive") / len(labels)
    assert 0.45 <= share <= 0.55


def test_texts_distinct_and_splits_disjoint(dataset) -> None:
    texts = {k: [r["text"] for r in rows] for k, rows in dataset.items()}
    for split_texts in texts.values():
        assert len(set(split_texts)) == len(split_texts)
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])


def test_custom_split_sizes() -> None:
    data = sentiment_dataset(seed=7, n_train=11, n_validation=3, n_test=0)
    assert [len(data[k]) for k in ("train", "validation", "test")] == [11, 3, 0]
    for rows in data.values():
        positives = sum(r["label"] == "positive" for r in rows)
        assert abs(2 * positives - len(rows)) <= 1
    with pytest.raises(ValueError):
        sentiment_dataset(n_train=-1)


def test_sentiment_vocabulary_is_varied(dataset) -> None:
    texts = [r["text"] for rows in dataset.values() for r in rows]
    sentences = {s for t in texts for s in _sentences(t)}
    words = {w.lower() for t in texts for w in _WORD.findall(t)}
    assert len(sentences) >= 3000
    assert len(words) >= 300
    assert {"wonderful", "moving", "film", "brilliant", "terrible", "boring"} <= words


def test_corpus_documents(corpus) -> None:
    assert len(corpus) == 3000
    assert len(set(corpus)) == len(corpus)
    for doc in corpus:
        sentences = _sentences(doc)
        assert 3 <= len(sentences) <= 8, doc
        assert "  " not in doc
        assert all(s[0].isupper() and s[-1] in ".!" for s in sentences), doc
    assert len(pretraining_corpus(seed=3, n_documents=25)) == 25
    with pytest.raises(ValueError):
        pretraining_corpus(n_documents=-1)


def test_corpus_vocabulary(corpus) -> None:
    sentences = {s for doc in corpus for s in _sentences(doc)}
    words = {w.lower() for doc in corpus for w in _WORD.findall(doc)}
    assert len(sentences) >= 3000
    assert len(words) >= 300


def test_corpus_mixes_narrative_and_reviews(corpus) -> None:
    first_person = re.compile(r"\b(I|we)\b")
    review_share = sum(bool(first_person.search(doc)) for doc in corpus) / len(corpus)
    assert 0.25 <= review_share <= 0.45
    words = {w.lower() for doc in corpus for w in _WORD.findall(doc)}
    assert {"weather", "morning", "market", "wonderful", "terrible"} <= words


def test_corpus_does_not_contain_sentiment_texts(corpus, dataset) -> None:
    joined = "\n".join(corpus)
    leaked = [r["text"] for r in dataset["test"] + dataset["validation"] if r["text"] in joined]
    assert leaked == []


def test_tfidf_baseline_accuracy_in_range(dataset, tfidf_model) -> None:
    texts = [r["text"] for r in dataset["test"]]
    labels = [r["label"] for r in dataset["test"]]
    accuracy = tfidf_model.score(texts, labels)
    assert 0.90 <= accuracy <= 0.99, accuracy


def test_tfidf_baseline_reads_a_positive_verdict(tfidf_model) -> None:
    predictions = tfidf_model.predict(["a wonderful, moving film", "A dull, boring film."])
    assert list(predictions) == ["positive", "negative"]
