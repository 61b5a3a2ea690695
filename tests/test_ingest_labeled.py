"""Labeled-data ingestion: files, hub datasets and DataFrames, labels and their ids, strict rows, splits of
train (stratified, grouped by duplicate or contained text), and fingerprints kept from before the source kinds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from flows import reports
from tasks import ingest
from tasks.artifacts import Workspace
from tasks.config import (
    LabeledConfig,
    LabeledDataFrames,
    LabeledFiles,
    LabeledHub,
    load_config,
)
from tasks.errors import DataError
from tests.support import jsonl_file, no_artifacts, texts


def _labeled_frame(n: int, labels=(0, 1), start: int = 0) -> pd.DataFrame:
    rows = [{"title": f"Item {i}", "review": f"Review {i}, a {lab} one.", "stars": lab}
            for i in range(start, start + n) for lab in labels]
    return pd.DataFrame(rows)


def test_labeled_hub_dataset_uses_given_splits_and_class_names(tmp_path: Path, ws: Workspace) -> None:
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(df: pd.DataFrame) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"sentence": list(df["review"]), "label": list(df["stars"])},
                                          features=features)

    saved = tmp_path / "sst"
    datasets.DatasetDict({"train": split(_labeled_frame(20)), "validation": split(_labeled_frame(4, start=100))}
                         ).save_to_disk(str(saved))
    cfg = LabeledConfig(source=LabeledHub(name=str(saved)), text_column="sentence")
    ref = ingest.ingest_labeled(cfg, ws)
    assert ingest.load_id2label(ref) == {0: "negative", 1: "positive"}
    assert ref.meta["splits_given"] == ["train", "validation"]
    assert ref.meta["rows"] == {"train": 36, "validation": 8, "test": 4}  # test split off train (10%), stratified
    assert ref.meta["class_balance"]["test"] == {"negative": 2, "positive": 2}
    report = ingest.load_data_report(ref)
    assert report["origin"]["validation"].endswith("split 'validation'")
    assert "| test |" in reports.data_report_markdown(report)


def test_labeled_dataframes_with_label_names_and_two_text_columns(ws: Workspace) -> None:
    cfg = LabeledConfig(source=LabeledDataFrames(), text_column=["title", "review"], label_column="stars",
                        label_names=["bad", "good"])
    frames = {"train": _labeled_frame(30), "test": _labeled_frame(5, start=500)}
    ref = ingest.ingest_labeled(cfg, ws, frames=frames)
    assert ingest.load_id2label(ref) == {0: "bad", 1: "good"}
    row = ingest.load_split(ref, "test")[0]
    assert row == {"text": "Item 500\nReview 500, a 0 one.", "label": 0}
    assert ref.meta["rows"]["test"] == 10 and ref.meta["rows"]["validation"] == 6
    frames["test"].loc[3, "stars"] = 7
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(cfg, ws, frames=frames)
    assert "DataFrame 'test': row 3: unknown label '7' in column 'stars'; expected one of 0, 1" in str(info.value)


def _test_split_error(train: Path, test: pd.DataFrame, ws: Workspace) -> tuple[LabeledConfig, str]:
    """Ingest ``train`` with ``test`` written beside it as test.csv; the config and the error it must raise."""
    test.to_csv(train.parent / "test.csv", index=False)
    cfg = LabeledConfig(source=LabeledFiles(train=str(train), test=str(train.parent / "test.csv")),
                        text_column="review", label_column="stars")
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(cfg, ws)
    return cfg, str(info.value)


def test_labeled_unknown_label_in_a_given_split_names_file_and_row(tmp_path: Path, ws: Workspace) -> None:
    _labeled_frame(10).to_parquet(tmp_path / "train.parquet")
    test = _labeled_frame(3, start=50)
    test.loc[4, "stars"] = 5
    _, msg = _test_split_error(tmp_path / "train.parquet", test, ws)
    assert f"{tmp_path / 'test.csv'}: row 6: label '5' does not occur in training labels ['0', '1']" in msg


def test_labeled_normalize_folds_full_width_text_before_splitting_and_only_then_changes_the_identity(
        tmp_path: Path, ws: Workspace) -> None:
    """NFKC turns full-width spellings into half-width ones before the splits are drawn, so ``duplicate_text`` keeps
    the two spellings of one review together; off (the default), the fingerprint is that of before."""
    rows = [{"text": f"Review {i}: fine, {lab}.", "label": lab} for i in range(30) for lab in ("bad", "good")]
    rows += [{"text": "Ｔｈｅ ｒｉｃｅ ｗａｓ ｃｏｌｄ！", "label": "bad"}, {"text": "The rice was cold!", "label": "bad"},
             {"text": "送餐很快，好吃！", "label": "good"}]
    src = LabeledFiles(train=str(jsonl_file(tmp_path / "train.jsonl", rows)))
    refs = {form: ingest.ingest_labeled(LabeledConfig(source=src, normalize=form, split_groups="duplicate_text"), ws)
            for form in ("none", "nfc", "nfkc")}
    assert len({r.fingerprint for r in refs.values()}) == 3
    assert ingest.fingerprinted(LabeledConfig(source=src)) == ingest.fingerprinted(
        LabeledConfig(source=src, normalize="none"))
    assert "normalize" not in ingest.fingerprinted(LabeledConfig(source=src))  # off: the identity of before
    every = {form: [t for s in ("train", "validation", "test") for t in texts(ref, s)] for form, ref in refs.items()}
    assert "Ｔｈｅ ｒｉｃｅ ｗａｓ ｃｏｌｄ！" in every["none"] and "送餐很快,好吃!" in every["nfkc"]
    assert "The rice was cold!" in every["nfkc"] and not any("Ｔ" in t for t in every["nfkc"])
    report = ingest.load_data_report(refs["nfkc"])
    assert report["normalize"] == "nfkc" and report["normalized_changed"] == {"train": 2}
    assert report["held_out_texts_in_train"] == {"validation": 0, "test": 0}  # one text now: kept together


def test_labeled_fingerprints_hash_the_flat_form_of_before_the_source_kinds(tmp_path: Path, ws: Workspace) -> None:
    """Labeled artifacts built before ``labeled.source`` had kinds keep their fingerprints, so they are reused."""
    assert ingest.ingest_labeled(load_config("tiny").labeled, ws).fingerprint == "cfd30be0f887e5465b81"
    files = LabeledConfig(source=LabeledFiles(train="t.csv", test="d.csv", has_header=False), text_column="0")
    assert ingest.fingerprinted(files) == {
        "source": "files", "train_path": str(Path.cwd().resolve() / "t.csv"), "validation_path": None,
        "test_path": str(Path.cwd().resolve() / "d.csv"), "has_header": False,  # paths normalised by the config
        "hub_name": None, "hub_config": None, "hub_revision": None, "hub_train_split": "train",
        "hub_validation_split": "validation", "hub_test_split": "test", "sample_train": 4000, "sample_eval": 500,
        "text_column": "0", "label_column": "label", "label_names": [], "labels": [], "validation_fraction": 0.1,
        "test_fraction": 0.1, "split_groups": "none"}


def test_labeled_declared_label_set_and_missing_label(tmp_path: Path, ws: Workspace) -> None:
    df = _labeled_frame(10, labels=("neg", "pos"))
    path = jsonl_file(tmp_path / "t.jsonl", df.to_dict("records"))
    cfg = LabeledConfig(source=LabeledFiles(train=str(path)), text_column="review", label_column="stars",
                        labels=["pos", "neg", "neutral"])
    ref = ingest.ingest_labeled(cfg, ws)
    assert ingest.load_id2label(ref) == {0: "pos", 1: "neg", 2: "neutral"}  # the declared order
    assert ref.meta["class_balance"]["train"]["neutral"] == 0
    rows = df.to_dict("records")
    rows[7]["stars"] = None
    jsonl_file(path, rows)
    with pytest.raises(DataError, match=r"t\.jsonl: line 8: missing label in column 'stars'"):
        ingest.ingest_labeled(cfg, ws)


SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"


@pytest.mark.parametrize("has_header", [False, True])
def test_labeled_env_file_read_as_csv_keeps_its_secrets_out_of_the_error(tmp_path: Path, ws: Workspace,
                                                                         has_header: bool) -> None:
    env = tmp_path / "prod.env"  # no known suffix: sniffed as CSV
    env.write_text(f"HF_TOKEN={SECRET}\nMLFLOW_TRACKING_URI=http://svc:pa55word@mlflow:5000\n", encoding="utf-8")
    cfg = LabeledConfig(source=LabeledFiles(train=str(env), has_header=has_header), text_column="0", label_column="0",
                        labels=["negative", "positive"])
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(cfg, ws)
    msg = str(info.value)
    assert SECRET not in msg and "pa55word" not in msg and str(env) in msg
    if has_header:  # the first line is the header: its "column names" are shown redacted
        assert "no column '0'; columns present: HF_TOKEN=***" in msg
    else:
        assert f"{env}: row 1: unknown label 'HF_TOKEN=***'; labeled.labels is" in msg
    assert no_artifacts(ws, "labeled")


def test_labeled_label_values_in_errors_are_short_excerpts(tmp_path: Path, ws: Workspace) -> None:
    train = _labeled_frame(10)
    train.to_csv(tmp_path / "train.csv", index=False)
    test = _labeled_frame(3, start=50)
    long_label = "This review text sits in the label column by mistake, and it goes on and on " * 3
    test["stars"] = test["stars"].astype(object)
    test.loc[2, "stars"] = long_label
    cfg, msg = _test_split_error(tmp_path / "train.csv", test, ws)
    assert f"{tmp_path / 'test.csv'}: row 4: label 'This review text sits in the label colum…' does not occur" in msg
    assert "by mistake" not in msg and "training labels ['0', '1']" in msg
    cfg = cfg.model_copy(update={"label_names": ["negative", "positive"]})
    with pytest.raises(DataError, match=r"row 4: unknown label 'This review.{29}…' in column 'stars'; expected one"):
        ingest.ingest_labeled(cfg, ws)


def test_labeled_csv_row_with_an_unquoted_comma_fails_instead_of_shifting_the_label(tmp_path: Path,
                                                                                    ws: Workspace) -> None:
    path = tmp_path / "train.csv"
    rows = "".join(f"review {i},{('neg', 'pos')[i % 2]}\n" for i in range(20))
    path.write_text(f"text,label\n{rows}great, really great,pos\n", encoding="utf-8")
    cfg = LabeledConfig(source=LabeledFiles(train=str(path)))
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(cfg, ws)
    assert f"{path}: line 22: 3 fields, expected 2 as in the header (line 1)" in str(info.value)
    assert "really great" not in str(info.value)
    assert no_artifacts(ws, "labeled")


def test_labeled_jsonl_row_without_the_label_key_names_line_and_key(tmp_path: Path, ws: Workspace) -> None:
    rows = _labeled_frame(10).to_dict("records")
    del rows[2]["stars"]
    path = jsonl_file(tmp_path / "train.jsonl", rows)
    cfg = LabeledConfig(source=LabeledFiles(train=str(path)), text_column="review", label_column="stars")
    with pytest.raises(DataError, match=r"train\.jsonl: line 3: no column 'stars'; columns present: title, review$"):
        ingest.ingest_labeled(cfg, ws)


def test_containment_groups_match_whole_words_and_keep_input_order_on_ties() -> None:
    texts = ["a film of quiet power", "quiet power", "quiet  power ", "film", "a fil", "power and grace",
             "power", "grace under fire"]
    # "a fil" is not a word-boundary part of "a film ..."; "power" goes to the first (longest) root holding it.
    assert ingest.containment_groups(texts) == [0, 0, 0, 0, 4, 5, 0, 7]
    assert ingest.containment_groups([]) == []


def test_duplicate_groups_ignore_whitespace_only() -> None:
    assert ingest.duplicate_groups(["ok lar", "Ok lar", " ok  lar ", "free entry", "ok lar"]) == [0, 1, 0, 3, 0]


def _phrase_frame(n_sentences: int) -> pd.DataFrame:
    """Sentences with their phrases, as SST-2 ships them: every phrase carries its sentence's label."""
    rows = []
    for i in range(n_sentences):
        label = i % 2
        words = [f"w{i}x{j}" for j in range(6)] + ["good" if label else "bad", "film"]
        rows.append({"text": " ".join(words), "label": label})
        rows += [{"text": " ".join(words[k:k + 3]), "label": label} for k in range(0, 6, 2)]
    return pd.DataFrame(rows)


def test_labeled_split_groups_hold_out_whole_sentences_and_drop_their_phrases(ws: Workspace) -> None:
    frame = _phrase_frame(60)
    plain = ingest.ingest_labeled(LabeledConfig(source=LabeledDataFrames()), ws, frames={"train": frame})
    grouped_cfg = LabeledConfig(source=LabeledDataFrames(), split_groups="contained_text")
    grouped = ingest.ingest_labeled(grouped_cfg, ws, frames={"train": frame})
    assert grouped.fingerprint != plain.fingerprint
    train = [r["text"] for r in ingest.load_split(grouped, "train")]
    held = [r["text"] for split in ("validation", "test") for r in ingest.load_split(grouped, split)]
    # 60 groups: 10% + 10% held out as whole sentences (8 words each), stratified by label.
    assert len(held) == 12 and all(len(t.split()) == 8 for t in held)
    assert grouped.meta["class_balance"]["validation"] == {"0": 3, "1": 3}
    # No training row is a sentence or a phrase of a held-out sentence; the rest of each group stays.
    assert not [t for t in train if any(f" {t} " in f" {h} " for h in held)]
    assert len(train) == 240 - 12 * 4
    report = ingest.load_data_report(grouped)
    assert report["held_out_group_rows_left_out"] == 36
    assert "grouped by containing text" in report["origin"]["validation"]
    assert "36 rows grouped with held-out texts" in reports.data_report_markdown(report)
    assert report["held_out_texts_in_train"] == {"validation": 0, "test": 0}
    # Without grouping, phrases of held-out sentences stay in training: the leak grouping removes.
    plain_train = {r["text"] for r in ingest.load_split(plain, "train")}
    plain_held = [r["text"] for r in ingest.load_split(plain, "validation")]
    assert any(f" {t} " in f" {h} " for h in plain_held for t in plain_train if t != h)


def test_labeled_real_sst2_and_sms_spam(shared_data: Path, ws: Workspace) -> None:
    sst = LabeledConfig(source=LabeledFiles(train=str(shared_data / "sst2" / "train.tsv"),
                                            validation=str(shared_data / "sst2" / "dev.tsv")), text_column="sentence",
                        label_names=["negative", "positive"])
    ref = ingest.ingest_labeled(sst, ws)
    assert ref.meta["splits_given"] == ["train", "validation"]
    total = ref.meta["rows"]["train"] + ref.meta["rows"]["test"]
    assert total == 67349 and ref.meta["rows"]["validation"] == 872
    assert ref.meta["class_balance"]["validation"] == {"negative": 428, "positive": 444}
    # Grouped by sentence: GLUE's 67,349 phrases come from 6,886 texts; the held-out test split is 689 whole
    # sentences (dev's length), and their 5,950 phrases leave training.
    ref = ingest.ingest_labeled(sst.model_copy(update={"split_groups": "contained_text"}), ws)
    test = ingest.load_split(ref, "test")
    assert len(test) == 689 and ref.meta["rows"]["train"] == 67349 - 689 - 5950
    assert 18 < sum(len(r["text"].split()) for r in test) / len(test) < 21
    spam = LabeledConfig(source=LabeledFiles(train=str(shared_data / "sms_spam" / "SMSSpamCollection"),
                                             has_header=False), text_column="1", label_column="0")
    ref = ingest.ingest_labeled(spam, ws)
    balance = ref.meta["class_balance"]
    assert sum(balance[s]["ham"] for s in balance) == 4827 and sum(balance[s]["spam"] for s in balance) == 747
    # Stratified: each split keeps the 13% spam share.
    for split in ("train", "validation", "test"):
        share = balance[split]["spam"] / sum(balance[split].values())
        assert 0.11 < share < 0.16, split
    # A plain 10% split scores 60 test messages that are also training messages; duplicate_text keeps copies
    # together: 20% of the 5,160 distinct messages, none seen in training, spam share kept.
    assert ingest.load_data_report(ref)["held_out_texts_in_train"]["test"] == 60
    dedup = ingest.ingest_labeled(spam.model_copy(update={"split_groups": "duplicate_text", "test_fraction": 0.2}), ws)
    report = ingest.load_data_report(dedup)
    assert report["held_out_texts_in_train"] == {"validation": 0, "test": 0}
    assert report["rows"]["test"] == 1033 and report["class_balance"]["test"] == {"ham": 904, "spam": 129}
    # TSV fields are verbatim: a message that starts with a quote keeps it.
    assert any(r["text"].startswith('"') for r in ingest.load_split(ref, "train"))


def _labeled_rows(n_per_class: int, labels=("neg", "neutral", "pos"), start: int = 0) -> list[dict]:
    return [{"text": f"Review {i} of the {lab} kind, with a comma.", "label": lab}
            for i in range(start, start + n_per_class) for lab in labels]


def _write_table(path: Path, rows: list[dict], columns=("text", "label")) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({c: r[c] for c in columns if c in r}) + "\n" for r in rows),
                        encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writerow(columns)
            for r in rows:
                w.writerow([r.get(c, "") for c in columns])
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_ingest_labeled_from_files_discovers_string_labels(tmp_path: Path, suffix: str) -> None:
    train = _labeled_rows(10)
    val = _labeled_rows(2, start=100)
    test = _labeled_rows(3, start=200)
    cfg = LabeledConfig(source=LabeledFiles(train=str(_write_table(tmp_path / f"train{suffix}", train)),
                                            validation=str(_write_table(tmp_path / f"val{suffix}", val)),
                                            test=str(_write_table(tmp_path / f"test{suffix}", test))))
    ref = ingest.ingest_labeled(cfg, Workspace(tmp_path / "ws"))
    id2label = ingest.load_id2label(ref)
    assert id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert ref.meta["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert ref.meta["rows"] == {"train": 30, "validation": 6, "test": 9}
    assert ref.meta["class_balance"]["test"] == {"neg": 3, "neutral": 3, "pos": 3}
    for split, rows in (("train", train), ("validation", val), ("test", test)):
        stored = ingest.load_split(ref, split)
        assert [(r["text"], id2label[r["label"]]) for r in stored] == [(r["text"], r["label"]) for r in rows]
        assert all(isinstance(r["label"], int) for r in stored)


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows = _labeled_rows(10, labels=("10", "2", "-1"))
    cfg = LabeledConfig(source=LabeledFiles(train=str(_write_table(tmp_path / "t.jsonl", rows))))
    ref = ingest.ingest_labeled(cfg, Workspace(tmp_path / "ws"))
    assert ingest.load_id2label(ref) == {0: "-1", 1: "2", 2: "10"}


def test_missing_text_column_names_it_and_lists_present_columns(tmp_path: Path) -> None:
    rows = [{"review": r["text"], "label": r["label"]} for r in _labeled_rows(5)]
    path = _write_table(tmp_path / "train.csv", rows, columns=("review", "label"))
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(path))), Workspace(tmp_path / "ws"))
    msg = str(info.value)
    assert str(path) in msg and "'text'" in msg
    assert "columns present: review, label" in msg


def test_missing_label_names_the_row(tmp_path: Path) -> None:
    rows = _labeled_rows(3)
    rows[4]["label"] = ""  # the 5th data row: line 6 of the file, after the header
    path = _write_table(tmp_path / "train.csv", rows)
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(path))), Workspace(tmp_path / "ws"))
    msg = str(info.value)
    assert str(path) in msg and "row 6" in msg and "'label'" in msg


def test_single_class_is_refused(tmp_path: Path) -> None:
    path = _write_table(tmp_path / "train.tsv", _labeled_rows(20, labels=("pos",)))
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(path))), Workspace(tmp_path / "ws"))
    msg = str(info.value)
    assert "only one class" in msg and "'pos'" in msg and str(path) in msg


def test_validation_label_unseen_in_train_is_refused(tmp_path: Path) -> None:
    train = _write_table(tmp_path / "train.csv", _labeled_rows(5, labels=("neg", "pos")))
    val_rows = _labeled_rows(1, labels=("neg", "pos"), start=50) + [{"text": "A mixed bag.", "label": "meh"}]
    val = _write_table(tmp_path / "val.csv", val_rows)
    test = _write_table(tmp_path / "test.csv", _labeled_rows(1, labels=("neg", "pos"), start=80))
    cfg = LabeledConfig(source=LabeledFiles(train=str(train), validation=str(val), test=str(test)))
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(cfg, Workspace(tmp_path / "ws"))
    msg = str(info.value)
    assert str(val) in msg and "row 4" in msg and "'meh'" in msg and "'neg'" in msg and "'pos'" in msg


def test_stratified_split_when_only_train_is_given(tmp_path: Path) -> None:
    rows = _labeled_rows(70, labels=("a",)) + _labeled_rows(30, labels=("b",), start=500)
    path = _write_table(tmp_path / "train.jsonl", rows)
    ref = ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(path))), Workspace(tmp_path / "ws"),
                                seed=3)
    assert ref.meta["rows"] == {"train": 80, "validation": 10, "test": 10}
    balance = ref.meta["class_balance"]
    assert balance["train"] == {"a": 56, "b": 24}
    assert balance["validation"] == {"a": 7, "b": 3}
    assert balance["test"] == {"a": 7, "b": 3}
    splits = {s: texts(ref, s) for s in ("train", "validation", "test")}
    assert sorted(t for texts in splits.values() for t in texts) == sorted(r["text"] for r in rows)
    # Deterministic for a seed.
    again = ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(path))),
                                  Workspace(tmp_path / "ws2"), seed=3)
    assert texts(again, "test") == splits["test"]


def _labeled_from_text(tmp_path: Path, name: str, text: str) -> list[dict]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    cfg = LabeledConfig(source=LabeledFiles(train=str(path)))
    return ingest._read_table(path, cfg, True, ingest._LabeledReader(cfg), "train")


def test_csv_blank_line_is_skipped(tmp_path: Path) -> None:
    rows = _labeled_from_text(tmp_path, "t.csv", "text,label\ngood film,pos\n\nbad film,neg\n\n")
    assert [r["label"] for r in rows] == ["pos", "neg"]


def test_csv_with_utf8_bom_is_read(tmp_path: Path) -> None:
    rows = _labeled_from_text(tmp_path, "t.csv", "\ufefftext,label\ngood film,pos\n")
    assert rows[0]["text"] == "good film"


def test_csv_multiline_quoted_field_keeps_newline(tmp_path: Path) -> None:
    rows = _labeled_from_text(tmp_path, "t.csv", 'text,label\n"line one\nline two",pos\n')
    assert rows[0]["text"] == "line one\nline two"


def test_jsonl_error_reports_file_line_number(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 3|row 3"):
        _labeled_from_text(tmp_path, "t.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n')


def test_tiny_labeled_file_is_a_data_error(tmp_path: Path) -> None:
    path = _write_table(tmp_path / "train.csv", _labeled_rows(2, labels=("neg", "pos")))
    with pytest.raises(DataError):
        ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(path))), Workspace(tmp_path / "ws"))


def test_label_budget_draws_a_stratified_seeded_subset_and_is_part_of_the_identity(tmp_path: Path,
                                                                                   ws: Workspace) -> None:
    from collections import Counter

    frame = _labeled_frame(300)  # 600 rows, half of each label
    frame.loc[frame.index[:200], "stars"] = 0  # 400 of label 0, 200 of label 1
    frame.to_csv(tmp_path / "train.csv", index=False)
    _labeled_frame(100, start=1000).to_csv(tmp_path / "test.csv", index=False)
    base = LabeledConfig(source=LabeledFiles(train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv")),
                         text_column="review", label_column="stars")
    everything = ingest.ingest_labeled(base, ws)
    budget = base.model_copy(update={"max_train_examples": 60, "max_test_examples": 50})
    small = ingest.ingest_labeled(budget, ws)
    assert small.fingerprint != everything.fingerprint
    # Unset, the budget leaves the fingerprints of before alone.
    assert "max_train_examples" not in ingest.fingerprinted(base)

    train, validation = ingest.load_split(small, "train"), ingest.load_split(small, "validation")
    assert len(train) + len(validation) == 60  # validation comes out of the budget
    assert Counter(r["label"] for r in train + validation) == {0: 40, 1: 20}  # each label keeps its share
    test = ingest.load_split(small, "test")
    assert len(test) == 50 and Counter(r["label"] for r in test) == {0: 25, 1: 25}
    assert ingest.load_data_report(small)["budget"] == {"train": {"rows": 60, "of": 600},
                                                         "test": {"rows": 50, "of": 200}}
    all_train = {r["text"] for r in ingest.load_split(everything, "train") + ingest.load_split(everything,
                                                                                               "validation")}
    assert {r["text"] for r in train + validation} <= all_train

    # The same seed draws the same rows; another seed, others.
    again = ingest.ingest_labeled(budget, Workspace(tmp_path / "ws2"))
    assert again.fingerprint == small.fingerprint and texts(again, "train") == texts(small, "train")
    other = ingest.ingest_labeled(budget, Workspace(tmp_path / "ws3"), seed=1)
    assert texts(other, "train") != texts(small, "train")
