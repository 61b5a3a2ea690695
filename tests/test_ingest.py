"""Ingestion: every source kind, validation and cleaning, hash splits, weights, the data report, labeled data."""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from flows import reports
from tasks import ingest
from tasks.artifacts import Workspace
from tasks.config import (
    CorpusConfig,
    DataFrameSource,
    FilesSource,
    HubSource,
    LabeledConfig,
    LabeledDataFrames,
    LabeledFiles,
    LabeledHub,
    SampleSource,
    load_config,
)
from tasks.errors import ConfigError, DataError


def _docs(n: int, start: int = 0, word: str = "harbour") -> list[str]:
    return [f"Document {i} is about the {word}; it has number {i * 7}." for i in range(start, start + n)]


def _corpus(*sources, **kw) -> CorpusConfig:
    kw.setdefault("validation_fraction", 0.2)
    return CorpusConfig(sources=list(sources), **kw)


def _all_texts(ref) -> list[str]:
    return [r["text"] for split in ref.meta["splits"] for r in ingest.load_split(ref, split)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


# ================================================================ source kinds


def test_text_units_and_globs(tmp_path: Path, ws: Workspace) -> None:
    folder = tmp_path / "txt"
    (folder / "notes").mkdir(parents=True)
    for i, doc in enumerate(_docs(10, start=100)):
        (folder / "notes" / f"n{i}.md").write_text(f"{doc}\n\nSecond paragraph of note {i}.\n", encoding="utf-8")
    (folder / "a.txt").write_text("\n\n".join(_docs(10)) + "\n", encoding="utf-8")
    whole = ingest.ingest_corpus(_corpus(FilesSource(paths=[str(folder / "**" / "*.md")], text_unit="file")), ws)
    assert whole.meta["documents_read"] == 10
    assert f"{_docs(1, start=100)[0]}\n\nSecond paragraph of note 0." in _all_texts(whole)
    paragraphs = ingest.ingest_corpus(_corpus(FilesSource(paths=[str(folder / "**" / "*")])), ws)
    assert paragraphs.meta["documents_read"] == 30
    lines = ingest.ingest_corpus(_corpus(FilesSource(paths=[str(folder / "a.txt")], text_unit="line")), ws)
    assert sorted(_all_texts(lines)) == sorted(_docs(10))
    assert lines.meta["documents_read"] == 19 and lines.meta["empty_dropped"] == 9  # the blank separator lines


def test_jsonl_json_csv_tsv_parquet_sources_read_the_same_documents(tmp_path: Path, ws: Workspace) -> None:
    rows = [{"title": f"Title {i}", "body": d, "other": i} for i, d in enumerate(_docs(30))]
    _write_jsonl(tmp_path / "a.jsonl", rows[:10])
    (tmp_path / "b.json").write_text(json.dumps(rows[10:15]), encoding="utf-8")
    pd.DataFrame(rows[15:20]).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame(rows[20:25]).to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    pd.DataFrame(rows[25:]).to_parquet(tmp_path / "e.parquet")
    src = FilesSource(paths=[str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.csv", "d.tsv", "e.parquet")],
                      text_columns=["title", "body"])
    ref = ingest.ingest_corpus(_corpus(src), ws)
    assert ref.meta["documents_read"] == 30
    assert sorted(_all_texts(ref)) == sorted(f"Title {i}\n{d}" for i, d in enumerate(_docs(30)))
    # One column given as a plain string works too.
    only_body = ingest.ingest_corpus(_corpus(FilesSource(paths=[str(tmp_path / "e.parquet")], text_columns="body")), ws)
    assert sorted(_all_texts(only_body)) == sorted(_docs(30)[25:])


@pytest.mark.parametrize("name", ["t.csv", "t.tsv", "t.parquet", "t.jsonl", "t.json"])
def test_table_without_the_text_column_names_it_and_lists_the_columns(tmp_path: Path, ws: Workspace,
                                                                       name: str) -> None:
    df = pd.DataFrame({"review": _docs(5), "stars": range(5)})
    path = tmp_path / name
    if name.endswith(".parquet"):
        df.to_parquet(path)
    elif name.endswith(".jsonl"):
        _write_jsonl(path, df.to_dict("records"))
    elif name.endswith(".json"):
        path.write_text(df.to_json(orient="records"), encoding="utf-8")
    else:
        df.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
    with pytest.raises(DataError) as info:
        ingest.ingest_corpus(_corpus(FilesSource(paths=[str(path)])), ws)
    msg = str(info.value)
    assert str(path) in msg and "no column 'text'" in msg and "columns present: review, stars" in msg
    assert not (ws.root / "corpora").exists()  # refused before any artifact was started


def test_jsonl_row_without_the_text_field_and_bad_json_name_the_line(tmp_path: Path, ws: Workspace) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl: line 4 is not valid JSON"):
        ingest.ingest_corpus(_corpus(FilesSource(paths=[str(path)])), ws)


def test_hub_source_from_save_to_disk_and_from_local_data_files(tmp_path: Path, ws: Workspace) -> None:
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": _docs(20), "n": list(range(20))}),
        "validation": datasets.Dataset.from_dict({"content": _docs(20, start=50), "n": list(range(20))}),
    }).save_to_disk(str(saved))
    ref = ingest.ingest_corpus(_corpus(HubSource(name=str(saved), split="validation", text_columns="content")), ws)
    assert sorted(_all_texts(ref)) == sorted(_docs(20, start=50))

    files = tmp_path / "files"
    files.mkdir()
    _write_jsonl(files / "train.jsonl", [{"text": d} for d in _docs(12, start=200)])
    by_folder = ingest.ingest_corpus(_corpus(HubSource(name=str(files))), ws)
    by_builder = ingest.ingest_corpus(_corpus(HubSource(name="json", data_files=[str(files / "train.jsonl")])), ws)
    assert sorted(_all_texts(by_folder)) == sorted(_all_texts(by_builder)) == sorted(_docs(12, start=200))

    with pytest.raises(DataError, match=r"no such split; splits present: train, validation"):
        ingest.ingest_corpus(_corpus(HubSource(name=str(saved), split="test", text_columns="content")), ws)
    with pytest.raises(DataError, match=r"no column 'text'; columns present: content, n"):
        ingest.ingest_corpus(_corpus(HubSource(name=str(saved))), ws)


def test_hub_dataset_missing_offline_is_a_data_error(ws: Workspace) -> None:
    with pytest.raises(DataError, match="no-such-org/no-such-dataset"):
        ingest.ingest_corpus(_corpus(HubSource(name="no-such-org/no-such-dataset")), ws)


def test_dataframe_source_is_content_addressed(ws: Workspace) -> None:
    df = pd.DataFrame({"text": _docs(20), "id": range(20)})
    cfg = _corpus(DataFrameSource(name="notes"))
    ref = ingest.ingest_corpus(cfg, ws, frames={"notes": df})
    assert sorted(_all_texts(ref)) == sorted(_docs(20))
    assert ingest.ingest_corpus(cfg, ws, frames={"notes": df.copy()}).reused
    changed = df.copy()
    changed.loc[3, "text"] = "Something else entirely, long enough."
    assert ingest.ingest_corpus(cfg, ws, frames={"notes": changed}).fingerprint != ref.fingerprint
    with pytest.raises(ConfigError, match=r"frames=\{'notes': df\}"):
        ingest.ingest_corpus(cfg, ws)


def test_sources_mix_by_weight(tmp_path: Path, ws: Workspace) -> None:
    (tmp_path / "a.txt").write_text("\n".join(_docs(300, word="garden")), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(_docs(300, word="river")), encoding="utf-8")
    one = FilesSource(paths=[str(tmp_path / "a.txt")], text_unit="line")
    cfg = _corpus(one.model_copy(update={"weight": 2.0}),
                  FilesSource(paths=[str(tmp_path / "b.txt")], text_unit="line", weight=0.5))
    ref = ingest.ingest_corpus(cfg, ws)
    train = [r["text"] for r in ingest.load_split(ref, "train")]
    garden = [t for t in train if "garden" in t]
    river = [t for t in train if "river" in t]
    report = ingest.load_data_report(ref)
    a, b = report["sources"]
    assert len(garden) == 2 * a["train"] == a["train_written"] and len(set(garden)) == a["train"]
    assert len(river) == b["train_written"] and 0.35 < b["train_written"] / b["train"] < 0.65
    assert len(set(river)) == len(river)
    # Held-out splits are not weighted: each held-out document once.
    val = [r["text"] for r in ingest.load_split(ref, "validation")]
    assert len(val) == len(set(val)) == a["validation"] + b["validation"]
    # The kept share is chosen by content hash: the same documents every time, in any workspace.
    again = ingest.ingest_corpus(cfg, Workspace(tmp_path / "other"))
    assert [r["text"] for r in ingest.load_split(again, "train")] == train


def test_sample_source_is_the_default_and_mixes_with_files(tmp_path: Path, ws: Workspace) -> None:
    default = load_config(None, []).corpus
    assert default.sources == [SampleSource()]
    (tmp_path / "extra.txt").write_text("\n\n".join(_docs(20)), encoding="utf-8")
    ref = ingest.ingest_corpus(_corpus(SampleSource(documents=50), FilesSource(paths=[str(tmp_path / "extra.txt")])),
                               ws, seed=3)
    assert ref.meta["documents_read"] == 70
    assert [s["read"] for s in ingest.load_data_report(ref)["sources"]] == [50, 20]


# ================================================================ validation and cleaning


def test_invalid_utf8_replace_mode_counts_and_keeps_going(tmp_path: Path, ws: Workspace) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes("\n\n".join(_docs(10)).encode() + b"\n\nbroken \xff\xfe here\n")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 at byte offset \d+"):
        ingest.ingest_corpus(_corpus(FilesSource(paths=[str(bad)])), ws)
    ref = ingest.ingest_corpus(_corpus(FilesSource(paths=[str(bad)]), invalid_utf8="replace"), ws)
    assert ref.meta["invalid_utf8_replaced"] == 1
    assert "broken \ufffd\ufffd here" in _all_texts(ref)
    assert ingest.load_data_report(ref)["sources"][0]["invalid_utf8_replaced"] == 1


def test_bom_and_crlf_are_not_part_of_the_text(tmp_path: Path, ws: Workspace) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(_docs(10)).encode() + b"\r\n")
    ref = ingest.ingest_corpus(_corpus(FilesSource(paths=[str(path)], text_unit="line")), ws)
    assert sorted(_all_texts(ref)) == sorted(_docs(10))


def test_nfc_empty_length_and_dedup_counts(tmp_path: Path, ws: Workspace) -> None:
    composed = "Caf\u00e9 au lait at the harbour, a long enough document."
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    lines = [*_docs(20), composed, decomposed, "", "   ", "tiny", "x" * 500, _docs(1)[0]]
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = FilesSource(paths=[str(path)], text_unit="line")
    raw = ingest.ingest_corpus(_corpus(src, min_chars=10, max_chars=200), ws)
    assert raw.meta["documents_read"] == 27
    assert (raw.meta["empty_dropped"], raw.meta["short_dropped"], raw.meta["long_dropped"]) == (2, 1, 1)
    assert raw.meta["duplicates_dropped"] == 1  # the repeated first document; the NFD form differs byte-wise
    nfc = ingest.ingest_corpus(_corpus(src, min_chars=10, max_chars=200, nfc=True), ws)
    assert nfc.meta["duplicates_dropped"] == 2 and nfc.meta["nfc_changed"] == 1
    assert decomposed not in _all_texts(nfc)
    no_dedup = ingest.ingest_corpus(_corpus(src, min_chars=10, max_chars=200, dedup=False), ws)
    assert no_dedup.meta["duplicates_dropped"] == 0
    assert len(_all_texts(no_dedup)) == len(_all_texts(raw)) + 1
    report = ingest.load_data_report(raw)
    assert [s["documents"] for s in report["steps"]] == [27, 25, 23, 22, 22]
    assert sum(b["documents"] for b in report["length_histogram"]) == 22
    for b in report["length_histogram"]:
        assert b["max_chars"] == 2 * b["min_chars"] - 1
    assert report["splits"]["train"]["documents"] + report["splits"]["validation"]["documents"] == 22
    md = reports.data_report_markdown(report)
    assert "| deduplicate | 22 |" in md and "### Document length (characters)" in md and str(path) in md


def test_max_below_min_chars_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_chars"):
        load_config(None, ["corpus.min_chars=50", "corpus.max_chars=10"])


def test_three_way_split_is_stable_when_documents_are_appended(tmp_path: Path) -> None:
    path = tmp_path / "grow.txt"
    path.write_text("\n".join(_docs(200)), encoding="utf-8")
    cfg = _corpus(FilesSource(paths=[str(path)], text_unit="line"), validation_fraction=0.1, test_fraction=0.1)
    before = ingest.ingest_corpus(cfg, Workspace(tmp_path / "a"))
    assert before.meta["splits"] == ["train", "validation", "test"] and before.meta["test_documents"] > 0
    path.write_text("\n".join(_docs(200) + _docs(200, start=5000)), encoding="utf-8")
    after = ingest.ingest_corpus(cfg, Workspace(tmp_path / "b"))
    for split in ("train", "validation", "test"):
        old = {r["text"] for r in ingest.load_split(before, split)}
        new = {r["text"] for r in ingest.load_split(after, split)}
        assert old <= new, split
    assert sum(after.meta[f"{s}_documents"] for s in ("train", "validation", "test")) == 400


def test_too_few_documents_for_the_splits(tmp_path: Path, ws: Workspace) -> None:
    path = tmp_path / "two.txt"
    path.write_text("first document here\n\nsecond document here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"2 unique documents: too few to fill the validation split"):
        ingest.ingest_corpus(_corpus(FilesSource(paths=[str(path)]), validation_fraction=0.01), ws)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable documents"):
        ingest.ingest_corpus(_corpus(FilesSource(paths=[str(empty)])), ws)


def test_concurrent_runs_build_once_and_agree(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("\n".join(_docs(3000)), encoding="utf-8")
    cfg = _corpus(FilesSource(paths=[str(path)], text_unit="line"))
    ws = Workspace(tmp_path / "ws")
    refs: list = [None, None]

    def run(i: int) -> None:
        refs[i] = ingest.ingest_corpus(cfg, ws)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refs[0].path == refs[1].path
    assert sorted(r.reused for r in refs) == [False, True]
    assert [p.name for p in (ws.root / "corpora").iterdir() if ".tmp-" in p.name] == []


# ================================================================ real data


def test_real_corpora_tiny_shakespeare_and_wikitext(shared_data: Path, ws: Workspace) -> None:
    shakespeare = FilesSource(paths=[str(shared_data / "tinyshakespeare" / "input.txt")])
    wiki = FilesSource(paths=[str(shared_data / "wikitext2" / "valid.txt")], text_unit="line")
    ref = ingest.ingest_corpus(_corpus(shakespeare, wiki, validation_fraction=0.05), ws)
    report = ingest.load_data_report(ref)
    ts, wt = report["sources"]
    assert ts["read"] > 7000 and ts["empty_dropped"] == 0
    assert ts["duplicates_dropped"] > 0  # short speeches repeat ("First Citizen:\nWe know't, we know't.")
    assert wt["read"] == 3760 and wt["empty_dropped"] > 1000  # WikiText has a blank line after each paragraph
    assert report["steps"][-1]["documents"] == ref.meta["train_documents"] + ref.meta["validation_documents"]


# ================================================================ labeled data


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


def test_labeled_unknown_label_in_a_given_split_names_file_and_row(tmp_path: Path, ws: Workspace) -> None:
    _labeled_frame(10).to_parquet(tmp_path / "train.parquet")
    test = _labeled_frame(3, start=50)
    test.loc[4, "stars"] = 5
    test.to_csv(tmp_path / "test.csv", index=False)
    cfg = LabeledConfig(source=LabeledFiles(train=str(tmp_path / "train.parquet"), test=str(tmp_path / "test.csv")),
                        text_column="review", label_column="stars")
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(cfg, ws)
    msg = str(info.value)
    assert f"{tmp_path / 'test.csv'}: row 6: label '5' does not occur in training labels ['0', '1']" in msg


def test_labeled_fingerprints_hash_the_flat_form_of_before_the_source_kinds(tmp_path: Path, ws: Workspace) -> None:
    """Labeled artifacts built before ``labeled.source`` had kinds keep their fingerprints, so they are reused."""
    assert ingest.ingest_labeled(load_config("tiny").labeled, ws).fingerprint == "cfd30be0f887e5465b81"
    files = LabeledConfig(source=LabeledFiles(train="t.csv", test="d.csv", has_header=False), text_column="0")
    assert ingest.fingerprinted(files) == {
        "source": "files", "train_path": "t.csv", "validation_path": None, "test_path": "d.csv", "has_header": False,
        "hub_name": None, "hub_config": None, "hub_revision": None, "hub_train_split": "train",
        "hub_validation_split": "validation", "hub_test_split": "test", "sample_train": 4000, "sample_eval": 500,
        "text_column": "0", "label_column": "label", "label_names": [], "labels": [], "validation_fraction": 0.1,
        "test_fraction": 0.1, "split_groups": "none"}


def test_labeled_declared_label_set_and_missing_label(tmp_path: Path, ws: Workspace) -> None:
    df = _labeled_frame(10, labels=("neg", "pos"))
    path = _write_jsonl(tmp_path / "t.jsonl", df.to_dict("records"))
    cfg = LabeledConfig(source=LabeledFiles(train=str(path)), text_column="review", label_column="stars",
                        labels=["pos", "neg", "neutral"])
    ref = ingest.ingest_labeled(cfg, ws)
    assert ingest.load_id2label(ref) == {0: "pos", 1: "neg", 2: "neutral"}  # the declared order
    assert ref.meta["class_balance"]["train"]["neutral"] == 0
    rows = df.to_dict("records")
    rows[7]["stars"] = None
    _write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"t\.jsonl: line 8: missing label in column 'stars'"):
        ingest.ingest_labeled(cfg, ws)


SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"


def _no_artifacts(ws: Workspace, kind: str) -> bool:
    folder = ws.root / kind
    return not folder.exists() or not [p for p in folder.iterdir() if p.is_dir()]


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
    assert _no_artifacts(ws, "labeled")


def test_labeled_label_values_in_errors_are_short_excerpts(tmp_path: Path, ws: Workspace) -> None:
    train = _labeled_frame(10)
    train.to_csv(tmp_path / "train.csv", index=False)
    test = _labeled_frame(3, start=50)
    long_label = "This review text sits in the label column by mistake, and it goes on and on " * 3
    test["stars"] = test["stars"].astype(object)
    test.loc[2, "stars"] = long_label
    test.to_csv(tmp_path / "test.csv", index=False)
    cfg = LabeledConfig(source=LabeledFiles(train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv")),
                        text_column="review", label_column="stars")
    with pytest.raises(DataError) as info:
        ingest.ingest_labeled(cfg, ws)
    msg = str(info.value)
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
    assert _no_artifacts(ws, "labeled")


def test_labeled_jsonl_row_without_the_label_key_names_line_and_key(tmp_path: Path, ws: Workspace) -> None:
    rows = _labeled_frame(10).to_dict("records")
    del rows[2]["stars"]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = LabeledConfig(source=LabeledFiles(train=str(path)), text_column="review", label_column="stars")
    with pytest.raises(DataError, match=r"train\.jsonl: line 3: no column 'stars'; columns present: title, review$"):
        ingest.ingest_labeled(cfg, ws)


@pytest.mark.parametrize("name", ["late.csv", "late.tsv", "late.jsonl", "late.json"])
def test_corpus_table_error_after_the_first_row_names_it_and_leaves_nothing(tmp_path: Path, ws: Workspace,
                                                                            name: str) -> None:
    path = tmp_path / name
    docs = _docs(30)
    if name.endswith(".jsonl"):
        _write_jsonl(path, [{"text": d} for d in docs[:25]] + [{"body": docs[25]}] + [{"text": d} for d in docs[26:]])
        expected = f"{path}: line 26: no column 'text'; columns present: body"
    elif name.endswith(".json"):
        path.write_text(json.dumps([{"text": d} for d in docs[:25]] + [{"body": "x"}]), encoding="utf-8")
        expected = f"{path}: item 25: no column 'text'; columns present: body"
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        lines = [f"text{sep}n"] + [f"{d.replace(',', '')}{sep}{i}" for i, d in enumerate(docs)]
        lines[27] += f"{sep}extra"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        expected = f"{path}: line 28: 3 fields, expected 2 as in the header (line 1)"
    with pytest.raises(DataError) as info:
        ingest.ingest_corpus(_corpus(FilesSource(paths=[str(path)])), ws)
    assert expected in str(info.value)
    assert _no_artifacts(ws, "corpora")


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
