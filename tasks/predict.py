"""Prediction with registered classifiers: ``models:/`` URIs, texts scored, and prediction files.

Input files are CSV, TSV or JSONL, read by ``tasks.sources.table_rows`` with the labeled-data reader's strict rules,
checked whole before a model is loaded, then scored a chunk at a time (constant memory); the predictions are written
beside them in the same format, atomically.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.errors import DataError, LlmpipeError
from tasks.serving import COMPILE_MIN_TEXTS, MODEL_WORK
from tasks.sources import Utf8Policy, file_format, table_rows
from tasks.tracking import mlflow_client, tracking_uri

CHUNK = 2048  # rows of an input file scored at a time: ``llmpipe predict``'s memory does not grow with the file

MODEL_SPEC = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:@(?P<alias>[\w\-]+)|/(?P<version>\d+))$")


def model_uri(spec: str) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the ``models:/`` prefix may be left out)."""
    m = MODEL_SPEC.match(spec.strip())
    if not m:
        raise LlmpipeError(f"--model: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {spec!r}")
    suffix = f"@{m['alias']}" if m["alias"] else f"/{m['version']}"
    return f"models:/{m['name']}{suffix}"


def resolve_version(uri: str):
    """The registered version behind a ``models:/`` URI; a clear error when there is none."""
    from mlflow.exceptions import MlflowException

    m = MODEL_SPEC.match(uri)
    assert m is not None
    client = mlflow_client()
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        what = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        raise LlmpipeError(f"{uri}: registered model {m['name']!r} has no {what} at {tracking_uri()} "
                           f"({exc.error_code})") from None


def predict(model_uri: str, texts: list[str]) -> list[dict[str, Any]]:
    """Load a registered classifier (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) and score texts."""
    import mlflow

    empty = [i for i, t in enumerate(texts, 1) if not t.strip()]
    if empty:
        raise DataError(f"text {empty[0]} is empty; every text needs at least one character")
    with MODEL_WORK:
        model = mlflow.pyfunc.load_model(model_uri)
    preds = _labels(model.predict(texts))
    return [{"text": t, "label": label, "score": score} for t, (label, score) in zip(texts, preds, strict=True)]


def _labels(out: Any) -> list[tuple[str, float]]:
    """``(label, score)`` per text from a pyfunc classifier's output: llmpipe's DataFrame, or the list of dicts of
    versions registered with MLflow's own transformers pyfunc."""
    records = out.to_dict("records") if hasattr(out, "to_dict") else list(out)
    return [(str(r["label"]), float(r["score"])) for r in records]


def input_rows(path: Path, column: str) -> Iterator[tuple[dict[str, Any], str]]:
    """``(row, text)`` for each row of a CSV, TSV or JSONL file, read as it goes (constant memory); errors name the
    file, line and column.

    Read by ``tasks.sources.table_rows``, with the labeled-data reader's strict rules and wording (a ragged or
    unbalanced CSV row, a JSONL row without the column); rows are numbered by their line in the file.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    fmt = file_format(path)
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson") or fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .tsv or .jsonl")
    for where, row in table_rows(path, fmt, [column], Utf8Policy("fail")):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
            line = where.rsplit(" ", 1)[-1]  # "row 7" (CSV, TSV) or "line 7" (JSONL): line 7 of the file
            raise DataError(f"{path}: row {line}: column {column!r} is {problem}; expected text")
        yield dict(row), value


def count_rows(path: Path, column: str) -> int:
    """Check every row of an input file (``input_rows``' errors) before any model is loaded; the number of rows."""
    n = sum(1 for _ in input_rows(path, column))
    if not n:
        raise DataError(f"{path}: no rows to predict")
    return n


def predictions_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.predictions{path.suffix}")


@contextlib.contextmanager
def prediction_writer(path: Path) -> Iterator[Callable[[list[dict[str, Any]], list[tuple[str, float]]], None]]:
    """Write input rows with ``label`` and ``score`` added, batch by batch, next to the input in its format.

    Rows go to a temporary sibling that replaces ``<name>.predictions.<ext>`` only when every row is written
    (fsynced); on an error it is removed, so no half-written predictions file is ever seen."""
    out = predictions_path(path)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    writer: csv.DictWriter | None = None
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:

            def write(rows: list[dict[str, Any]], preds: list[tuple[str, float]]) -> None:
                nonlocal writer
                merged = [{**row, "label": label, "score": round(score, 6)}
                          for row, (label, score) in zip(rows, preds, strict=True)]
                if jsonl:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in merged)
                    return
                if writer is None:  # every row of a CSV or TSV file has the header's columns
                    writer = csv.DictWriter(f, fieldnames=list(merged[0]),
                                            delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                    writer.writeheader()
                writer.writerows(merged)

            yield write
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def predict_file(model_uri: str, path: Path, column: str, rows: int, chunk: int = CHUNK,
                 on_progress: Callable[[int], None] | None = None) -> tuple[Path, dict[str, int]]:
    """Label every row of ``path`` (``rows`` of them: ``count_rows`` checked the file first) with a registered
    classifier, ``chunk`` rows at a time (constant memory), into ``<name>.predictions.<ext>`` beside it. A file of
    at least ``COMPILE_MIN_TEXTS`` rows is scored through compiled kernels from its first chunk on. Returns that file
    and the count of each label; ``on_progress`` gets the number of rows done after each chunk."""
    import mlflow

    with MODEL_WORK:
        model = mlflow.pyfunc.load_model(model_uri, model_config={"compile_min_texts": 1}
                                         if rows >= COMPILE_MIN_TEXTS else None)
    counts: dict[str, int] = {}
    done = 0
    with prediction_writer(path) as write:
        rows_in = input_rows(path, column)
        for batch in iter(lambda: list(itertools.islice(rows_in, chunk)), []):
            rows = [row for row, _ in batch]
            preds = _labels(model.predict([text for _, text in batch]))
            write(rows, preds)
            for label, _ in preds:
                counts[label] = counts.get(label, 0) + 1
            done += len(rows)
            if on_progress:
                on_progress(done)
    return predictions_path(path), counts
