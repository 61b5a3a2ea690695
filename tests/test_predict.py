"""Prediction with registered classifiers: models:/ URIs, and input files read by the strict table readers
(errors name the file, line and column; rows numbered by their line), predictions written beside them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from flows.cli import main as cli
from tasks import predict
from tasks.errors import DataError, LlmpipeError
from tasks.predict import count_rows, input_rows, prediction_writer
from tasks.sources import Utf8Policy, table_rows


def _rows(path: Path, fmt: str, need: list[str]) -> list[tuple[str, dict]]:
    return [(where, dict(row)) for where, row in table_rows(path, fmt, need, Utf8Policy("fail"))]


def test_model_uri_forms() -> None:
    assert predict.model_uri("models:/m@champion") == "models:/m@champion"
    assert predict.model_uri("m/3") == "models:/m/3"
    with pytest.raises(LlmpipeError, match="expected models:/NAME@ALIAS"):
        predict.model_uri("models:/m")


def test_predict_file_errors_name_the_file_row_and_column(tmp_path: Path, capsys) -> None:
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("sentence,id\nfine film,1\n")
    assert cli(["predict", "--model", "models:/m@champion", "--input", str(csv_path)]) == 1
    assert f"{csv_path}: no column 'text'; columns present: sentence, id" in capsys.readouterr().err
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "good"}\n{"text": ""}\n')
    assert cli(["predict", "--model", "m@champion", "--input", str(jsonl)]) == 1
    assert f"{jsonl}: row 2: column 'text' is empty" in capsys.readouterr().err
    jsonl.write_text('{"text": "good"}\n{"text": \n')
    assert cli(["predict", "--model", "m@champion", "--input", str(jsonl)]) == 1
    assert f"{jsonl}: line 2 is not valid JSON" in capsys.readouterr().err
    assert cli(["predict", "--model", "m@champion", "--input", str(jsonl), "also a text"]) == 2
    assert cli(["predict", "--model", "nonsense", "some text"]) == 2  # a usage error
    assert not list(tmp_path.glob("*.predictions.*"))


def read_texts(path: Path, column: str) -> tuple[list[dict], list[str]]:
    rows = list(input_rows(path, column))
    return [row for row, _ in rows], [text for _, text in rows]


def test_predict_input_follows_the_same_strict_rules(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\n1,fine film\n2,great, really great\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.csv: line 3: 3 fields, expected 2 as in the header"):
        read_texts(path, "text")
    path.write_text('id,text\n1,fine film\n2,"never closed\n3,x\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.csv: line 3: a quoted field .* never closed"):
        read_texts(path, "text")
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.jsonl: line 3: no column 'text'; columns present: body"):
        read_texts(jsonl, "text")


def test_predict_input_rows_are_numbered_by_line(tmp_path: Path) -> None:
    path = tmp_path / "in.tsv"
    path.write_text("text\tid\nfine\t1\n\nalso fine\t2\n", encoding="utf-8")
    rows, texts = read_texts(path, "text")
    assert texts == ["fine", "also fine"] and rows == [{"text": "fine", "id": "1"}, {"text": "also fine", "id": "2"}]
    csv_path = tmp_path / "in.csv"
    csv_path.write_text('text,id\n"two\nlines",1\n"",2\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.csv: row 4: column 'text' is empty; expected text"):
        read_texts(csv_path, "text")
    with pytest.raises(DataError, match=r"unsupported file type \.json; use \.csv, \.tsv or \.jsonl"):
        (tmp_path / "x.json").write_text("[]")
        read_texts(tmp_path / "x.json", "text")


def test_predict_input_rows_round_trip_through_write_predictions(tmp_path: Path) -> None:

    path = tmp_path / "in.csv"
    path.write_text('\ufeffid,text\n1,"two\nlines, and a comma"\n2,plain\n', encoding="utf-8")
    rows, texts = read_texts(path, "text")
    assert texts == ["two\nlines, and a comma", "plain"]
    with prediction_writer(path) as write:
        write(rows[:1], [("pos", 0.9)])
        write(rows[1:], [("neg", 0.8)])
    out = tmp_path / "in.predictions.csv"
    assert [(r["id"], r["text"], r["label"]) for _, r in _rows(out, "csv", ["id", "text", "label", "score"])] == [
        ("1", "two\nlines, and a comma", "pos"), ("2", "plain", "neg")]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"id": 7, "text": "a"}\n', encoding="utf-8")
    assert read_texts(jsonl, "text") == ([{"id": 7, "text": "a"}], ["a"])


def test_an_input_file_is_checked_whole_and_a_failed_run_leaves_no_predictions(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n', encoding="utf-8")
    assert count_rows(path, "text") == 3
    rows = [row for row, _ in input_rows(path, "text")]
    with pytest.raises(RuntimeError, match="midway"), prediction_writer(path) as write:
        write(rows[:2], [("pos", 0.9), ("neg", 0.8)])
        raise RuntimeError("midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # neither the file nor its temporary
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.jsonl: no rows to predict"):
        count_rows(path, "text")


def test_the_progress_bar_shows_rows_done_and_their_rate() -> None:
    from flows.progress import rows_bar

    buf = io.StringIO()
    with rows_bar(5000, "predict reviews.csv", file=buf) as advance:
        advance(2048)
        advance(5000)
    shown = buf.getvalue()
    assert "predict reviews.csv" in shown and "5000/5000" in shown and "rows/s" in shown
