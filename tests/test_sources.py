"""Strict tables: ragged rows, unbalanced quotes and missing keys are errors naming the file and line, and no
error message quotes the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.errors import DataError
from tasks.sources import Utf8Policy, table_rows

SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"


def _rows(path: Path, fmt: str, need: list[str], has_header: bool = True) -> list[tuple[str, dict]]:
    return [(where, dict(row)) for where, row in table_rows(path, fmt, need, Utf8Policy("fail"), has_header)]


def _error(path: Path, fmt: str, need: list[str], has_header: bool = True) -> str:
    with pytest.raises(DataError) as info:
        _rows(path, fmt, need, has_header)
    return str(info.value)


# ================================================================ ragged rows


def test_csv_row_with_an_unquoted_comma_names_its_line_and_the_field_counts(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\nfine film,pos\ngreat, really great,pos\ndull,neg\n", encoding="utf-8")
    msg = _error(path, "csv", ["text", "label"])
    assert f"{path}: line 3: 3 fields, expected 2 as in the header (line 1)" in msg
    assert "really great" not in msg  # the row's text is not echoed


def test_csv_row_with_too_few_fields_and_a_headerless_file(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("text,label\n\nfine film,pos\nno label here\n", encoding="utf-8")
    assert f"{path}: line 4: 1 field, expected 2 as in the header" in _error(path, "csv", ["text", "label"])
    headerless = tmp_path / "headerless.csv"
    headerless.write_text("a,b,c\nd,e,f\ng,h\n", encoding="utf-8")
    assert f"{headerless}: line 3: 2 fields, expected 3 as in the first row (line 1)" in _error(
        headerless, "csv", ["0"], has_header=False)


def test_tsv_row_with_an_extra_tab_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "sst.tsv"
    path.write_text("sentence\tlabel\na fine film\t1\nstray\ttab inside\t0\n", encoding="utf-8")
    msg = _error(path, "tsv", ["sentence", "label"])
    assert f"{path}: line 3: 3 fields, expected 2 as in the header" in msg and "a tab inside a field" in msg
    assert "stray" not in msg


def test_blank_and_space_only_lines_are_skipped_not_ragged(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("text,label\nfine,pos\n\n   \r\ndull,neg\n", encoding="utf-8")
    assert _rows(path, "csv", ["text"]) == [("row 2", {"text": "fine", "label": "pos"}),
                                           ("row 5", {"text": "dull", "label": "neg"})]


# ================================================================ quotes


def test_quoted_fields_spanning_lines_still_work_and_later_lines_keep_their_numbers(tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"first line\nsecond, with a comma\n""quoted"" third",pos\nplain,neg\n'
                    '"one, two",pos\n', encoding="utf-8")
    assert _rows(path, "csv", ["text", "label"]) == [
        ("row 2", {"text": 'first line\nsecond, with a comma\n"quoted" third', "label": "pos"}),
        ("row 5", {"text": "plain", "label": "neg"}),
        ("row 6", {"text": "one, two", "label": "pos"}),
    ]


def test_quote_never_closed_names_the_line_where_it_starts(tmp_path: Path) -> None:
    path = tmp_path / "open.csv"
    rows = "".join(f"review {i},pos\n" for i in range(20))
    path.write_text(f'text,label\nfine,pos\n"it swallows,pos\n{rows}', encoding="utf-8")
    msg = _error(path, "csv", ["text", "label"])
    assert f"{path}: line 3: a quoted field in the record that starts here is never closed" in msg
    assert "swallows" not in msg and "review" not in msg
    # One column: no field count to disagree, the quote alone is caught.
    single = tmp_path / "single.csv"
    single.write_text('text\nfine\n"open\nmore\n', encoding="utf-8")
    assert f"{single}: line 3: a quoted field" in _error(single, "csv", ["text"])


def test_unbalanced_quote_in_the_middle_names_the_line_where_it_starts(tmp_path: Path) -> None:
    # The quote opened on line 3 closes on line 5, where text follows it: strict CSV rejects the record.
    path = tmp_path / "middle.csv"
    path.write_text('text,label\nfine,pos\n"broken,pos\nok,neg\n"fine",pos\nlast,neg\n', encoding="utf-8")
    msg = _error(path, "csv", ["text", "label"])
    assert f"{path}: line 3: not valid CSV" in msg and "at line 5" in msg and "unbalanced" in msg
    assert "broken" not in msg
    # Closed right before a comma, the swallowed lines make a record of the wrong width.
    path.write_text('text,label\nfine,pos\n"broken,pos\nok,neg\n",pos,x\nlast,neg\n', encoding="utf-8")
    assert f"{path}: line 3: 3 fields, expected 2" in _error(path, "csv", ["text", "label"])


# ================================================================ keys of JSONL rows and JSON items


def test_jsonl_row_3_without_the_label_key_names_the_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "labeled.jsonl"
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "stars": 5},
            {"text": "d", "label": "pos"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    msg = _error(path, "jsonl", ["text", "label"])
    assert f"{path}: line 3: no column 'label'; columns present: text, stars" in msg
    # Present but empty or null is not missing: the readers drop or reject those values themselves.
    rows[2] = {"text": None, "label": ""}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [w for w, _ in _rows(path, "jsonl", ["text", "label"])] == ["line 1", "line 2", "line 3", "line 4"]


def test_json_array_item_without_the_text_key_names_the_item(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps([{"body": "x", "title": "t"}, {"title": "u"}]), encoding="utf-8")
    assert f"{path}: item 1: no column 'body'; columns present: title" in _error(path, "json", ["body"])


# ================================================================ errors do not quote the data


def test_column_names_from_a_secret_header_are_redacted_and_short(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(f"HF_TOKEN={SECRET}\nMLFLOW_TRACKING_URI=http://svc:pa55word@mlflow:5000\n", encoding="utf-8")
    msg = _error(path, "csv", ["text"])
    assert SECRET not in msg and "pa55word" not in msg
    assert f"{path}: no column 'text'; columns present: HF_TOKEN=***" in msg
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"column_with_a_rather_long_name_{i:03d}_and_more" for i in range(50)) + "\n",
                    encoding="utf-8")
    msg = _error(wide, "csv", ["text"])
    assert "and 30 more" in msg and "and_more" not in msg and len(msg) < 1200


def test_json_errors_quote_no_data(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "ok"}}\n{{"text": "{SECRET}" "label": 1}}\n', encoding="utf-8")
    msg = _error(path, "jsonl", ["text"])
    assert f"{path}: line 2 is not valid JSON (Expecting ',' delimiter, column" in msg and SECRET not in msg


# ================================================================ read_texts (llmpipe predict --input)
