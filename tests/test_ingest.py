"""Corpus ingestion: every source kind, validation and cleaning, hash splits that never move, weights, the data
report, reuse of the artifact."""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from flows import reports
from tasks import ingest
from tasks.artifacts import MANIFEST, Workspace
from tasks.config import (
    CorpusConfig,
    DataFrameSource,
    FilesSource,
    HubSource,
    SampleSource,
    load_config,
)
from tasks.errors import ConfigError, DataError
from tests.support import files_corpus, jsonl_file, no_artifacts, paragraphs, texts


def _docs(n: int, start: int = 0, word: str = "harbour") -> list[str]:
    return [f"Document {i} is about the {word}; it has number {i * 7}." for i in range(start, start + n)]


def _corpus(*sources, **kw) -> CorpusConfig:
    kw.setdefault("validation_fraction", 0.2)
    return CorpusConfig(sources=list(sources), **kw)


def _all_texts(ref) -> list[str]:
    return [r["text"] for split in ref.meta["splits"] for r in ingest.load_split(ref, split)]


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
    jsonl_file(tmp_path / "a.jsonl", rows[:10])
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
        jsonl_file(path, df.to_dict("records"))
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
    jsonl_file(files / "train.jsonl", [{"text": d} for d in _docs(12, start=200)])
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


def test_normalize_folds_full_width_forms_before_dedup_and_only_then_changes_the_identity(tmp_path: Path,
                                                                                          ws: Workspace) -> None:
    """NFKC maps full-width ASCII (common in Chinese text) to half-width, so the two spellings of one review are
    duplicates; NFC leaves them apart. Off (the default), the corpus keeps the fingerprint of before."""
    half = "Order 123 came fast, rice was hot (ok)!"
    full = "Ｏｒｄｅｒ １２３ ｃａｍｅ ｆａｓｔ， ｒｉｃｅ ｗａｓ ｈｏｔ （ｏｋ）！"
    assert unicodedata.normalize("NFKC", full) == half != unicodedata.normalize("NFC", full)
    path = jsonl_file(tmp_path / "reviews.jsonl", [{"text": t} for t in [*_docs(20), half, full, "外卖很快，好吃！"]])
    src = FilesSource(paths=[str(path)])
    refs = {form: ingest.ingest_corpus(_corpus(src, normalize=form), ws) for form in ("none", "nfc", "nfkc")}
    assert refs["none"].meta["duplicates_dropped"] == refs["nfc"].meta["duplicates_dropped"] == 0
    assert refs["nfkc"].meta["duplicates_dropped"] == 1 and refs["nfkc"].meta["normalized_changed"] == 2
    assert full not in _all_texts(refs["nfkc"]) and "外卖很快,好吃!" in _all_texts(refs["nfkc"])
    assert full in _all_texts(refs["none"]) and refs["none"].meta["normalized_changed"] == 0
    assert len({r.fingerprint for r in refs.values()}) == 3
    assert ingest.load_data_report(refs["nfkc"])["settings"]["normalize"] == "nfkc"


def test_the_deprecated_nfc_switch_is_normalize_nfc_and_fingerprints_are_those_of_before(ws: Workspace) -> None:
    """``corpus.nfc: true`` still works (with a warning) and names the same corpus as ``normalize: nfc``; both, and
    normalisation off, keep the fingerprints corpora had before ``normalize`` existed (pinned from that code)."""
    sample = [SampleSource(documents=300)]
    with pytest.warns(FutureWarning, match="corpus.nfc is deprecated"):
        old = CorpusConfig(sources=sample, nfc=True)
    assert old == CorpusConfig(sources=sample, normalize="nfc")
    assert CorpusConfig(sources=sample, nfc=False) == CorpusConfig(sources=sample)
    assert ingest.ingest_corpus(CorpusConfig(sources=sample), ws).fingerprint == "5c7726ca54406e667bb1"
    assert ingest.ingest_corpus(old, ws).fingerprint == "188d1fa67f5164761c06"
    assert load_config(None, ["corpus.normalize=nfkc"]).corpus.normalize == "nfkc"
    with pytest.raises(ConfigError, match="corpus.normalize"):
        load_config(None, ["corpus.normalize=nfd"])


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
    nfc = ingest.ingest_corpus(_corpus(src, min_chars=10, max_chars=200, normalize="nfc"), ws)
    assert nfc.meta["duplicates_dropped"] == 2 and nfc.meta["normalized_changed"] == 1
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


@pytest.mark.parametrize("name", ["late.csv", "late.tsv", "late.jsonl", "late.json"])
def test_corpus_table_error_after_the_first_row_names_it_and_leaves_nothing(tmp_path: Path, ws: Workspace,
                                                                            name: str) -> None:
    path = tmp_path / name
    docs = _docs(30)
    if name.endswith(".jsonl"):
        jsonl_file(path, [{"text": d} for d in docs[:25]] + [{"body": docs[25]}] + [{"text": d} for d in docs[26:]])
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
    assert no_artifacts(ws, "corpora")


def test_ingest_corpus_writes_train_and_validation_jsonl(tiny_cfg) -> None:
    ws = Workspace(tiny_cfg.workspace)
    ref = ingest.ingest_corpus(tiny_cfg.corpus, ws, tiny_cfg.seed)
    assert ref.dir == ws.dir("corpora", ref.fingerprint)
    assert ref.reused is False
    assert (ref.dir / MANIFEST).is_file()
    train, val = texts(ref, "train"), texts(ref, "validation")
    assert ref.meta["train_documents"] == len(train) > 0
    assert ref.meta["validation_documents"] == len(val) > 0
    assert ref.meta["documents_read"] == tiny_cfg.corpus.sources[0].documents == 300
    assert len(train) + len(val) == 300 - ref.meta["duplicates_dropped"]
    assert not set(train) & set(val)
    assert all(t == t.strip() and t for t in train + val)
    # Every row is exactly {"text": ...}.
    rows = [json.loads(line) for line in (ref.dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"text"} for r in rows)
    assert ref.meta["train_chars"] == sum(len(t) for t in train)
    manifest = json.loads((ref.dir / MANIFEST).read_text())
    assert manifest["stage"] == "ingest_corpus" and manifest["fingerprint"] == ref.fingerprint


def test_ingest_files_deduplicates_paragraphs(tmp_path: Path) -> None:
    unique = paragraphs(40)
    # Five duplicates (one differing only by surrounding whitespace), extra blank lines and a
    # whitespace-only "paragraph" between blocks, plus a too-short one.
    text = "\n\n".join(unique + unique[:4] + ["   " + unique[4] + "  "]) + "\n\n\n   \n\nok\n\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    ref = ingest.ingest_corpus(files_corpus(path, validation_fraction=0.3, min_chars=5), Workspace(tmp_path / "ws"))
    meta = ref.meta
    assert meta["documents_read"] == 46
    assert meta["empty_dropped"] == 0  # whitespace-only lines separate paragraphs, they are not documents
    assert meta["short_dropped"] == 1
    assert meta["duplicates_dropped"] == 5
    train, val = texts(ref, "train"), texts(ref, "validation")
    assert meta["train_documents"] + meta["validation_documents"] == 40
    assert sorted(train + val) == sorted(unique)


def test_ingest_files_line_unit_counts_empty_lines(tmp_path: Path) -> None:
    lines = [f"Line number {i} about the weather." for i in range(30)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines[:10] + ["", "   "] + lines + [lines[0]]) + "\n", encoding="utf-8")
    ref = ingest.ingest_corpus(files_corpus(path, text_unit="line", validation_fraction=0.3),
                               Workspace(tmp_path / "ws"))
    assert ref.meta["documents_read"] == 43
    assert ref.meta["empty_dropped"] == 2
    assert ref.meta["duplicates_dropped"] == 11
    assert sorted(texts(ref, "train") + texts(ref, "validation")) == sorted(lines)


def test_split_is_stable_when_documents_are_appended(tmp_path: Path) -> None:
    path = tmp_path / "grow.txt"
    path.write_text("\n\n".join(paragraphs(40)), encoding="utf-8")
    cfg = files_corpus(path, validation_fraction=0.3)
    ws = Workspace(tmp_path / "ws")
    before = ingest.ingest_corpus(cfg, ws)
    path.write_text("\n\n".join(paragraphs(40) + paragraphs(40, start=1000)), encoding="utf-8")
    after = ingest.ingest_corpus(cfg, ws)
    assert after.fingerprint != before.fingerprint  # new content, new artifact
    assert after.reused is False
    assert set(texts(before, "train")) <= set(texts(after, "train"))
    assert set(texts(before, "validation")) <= set(texts(after, "validation"))
    assert after.meta["train_documents"] + after.meta["validation_documents"] == 80
    # Order of documents in the file does not matter either.
    path.write_text("\n\n".join(list(reversed(paragraphs(40)))), encoding="utf-8")
    reordered = ingest.ingest_corpus(cfg, Workspace(tmp_path / "ws2"))
    assert set(texts(reordered, "validation")) == set(texts(before, "validation"))


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(paragraphs(20)), encoding="utf-8")
    bad = tmp_path / "bad.txt"
    data = "Caf\u00e9 is fine.\n\nThis is not: ".encode() + b"\xff\xfe here.\n"
    bad.write_bytes(data)
    offset = data.index(b"\xff")
    cfg = CorpusConfig(sources=[FilesSource(paths=[str(good), str(bad)])])
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(DataError) as info:
        ingest.ingest_corpus(cfg, ws)
    msg = str(info.value)
    assert str(bad) in msg
    assert f"byte offset {offset}" in msg
    assert str(good) not in msg
    # The failed build leaves no artifact and no temporary directory behind.
    assert [p.name for p in (ws.root / "corpora").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_corpus_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing-here"):
        ingest.ingest_corpus(files_corpus(tmp_path / "nothing-here*.txt"),
                             Workspace(tmp_path / "ws"))


def test_stage_reuses_its_artifact(tiny_cfg) -> None:
    ws = Workspace(tiny_cfg.workspace)
    first = ingest.ingest_corpus(tiny_cfg.corpus, ws, tiny_cfg.seed)
    mtime = (first.dir / MANIFEST).stat().st_mtime_ns
    second = ingest.ingest_corpus(tiny_cfg.corpus, ws, tiny_cfg.seed)
    assert (first.reused, second.reused) == (False, True)
    assert second.fingerprint == first.fingerprint and second.path == first.path
    assert second.meta == first.meta
    assert (first.dir / MANIFEST).stat().st_mtime_ns == mtime  # not rebuilt
    # A different seed is a different artifact.
    other = ingest.ingest_corpus(tiny_cfg.corpus, ws, tiny_cfg.seed + 1)
    assert other.fingerprint != first.fingerprint and other.reused is False


def test_leftover_tmp_dir_is_ignored(tiny_cfg, tmp_path: Path) -> None:
    reference = ingest.ingest_corpus(tiny_cfg.corpus, Workspace(tmp_path / "reference"), tiny_cfg.seed)
    fp = reference.fingerprint
    ws = Workspace(tiny_cfg.workspace)
    # A crashed build: a half-written temporary directory with a plausible manifest.
    leftover = ws.root / "corpora" / f"{fp}.tmp-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "train.jsonl").write_text('{"text": "half"}\n')
    (leftover / MANIFEST).write_text(json.dumps({"fingerprint": fp, "meta": {}, "build_seconds": 0}))
    ref = ingest.ingest_corpus(tiny_cfg.corpus, ws, tiny_cfg.seed)
    assert ref.reused is False
    assert ref.dir == ws.dir("corpora", fp) and ".tmp-" not in ref.path
    assert (ref.dir / "train.jsonl").read_bytes() == (reference.dir / "train.jsonl").read_bytes()
    assert ref.meta == reference.meta
    # A directory under the final name without a manifest is not trusted either.
    ws2 = Workspace(tmp_path / "ws2")
    partial = ws2.dir("corpora", fp)
    partial.mkdir(parents=True)
    (partial / "train.jsonl").write_text('{"text": "half"}\n')
    rebuilt = ingest.ingest_corpus(tiny_cfg.corpus, ws2, tiny_cfg.seed)
    assert rebuilt.reused is False
    assert (rebuilt.dir / "train.jsonl").read_bytes() == (reference.dir / "train.jsonl").read_bytes()


def test_literal_path_with_brackets(tmp_path: Path) -> None:
    path = tmp_path / "notes[1].txt"
    path.write_text("\n\n".join(paragraphs(40)), encoding="utf-8")
    ref = ingest.ingest_corpus(files_corpus(path, validation_fraction=0.3), Workspace(tmp_path / "ws"))
    assert ref.meta["documents_read"] == 40
