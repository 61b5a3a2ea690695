"""Prediction with registered classifiers: ``models:/`` URIs, texts scored, and prediction files.

Input files are CSV, TSV or JSONL, read by ``tasks.sources.table_rows`` with the labeled-data reader's strict rules;
the predictions are written beside them in the same format.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from pathlib import Path
from typing import Any

from tasks.artifacts import write_atomic
from tasks.errors import DataError, LlmpipeError
from tasks.sources import Utf8Policy, file_format, table_rows
from tasks.tracking import mlflow_client, tracking_uri

# transformers builds models on the meta device through process-wide hooks, so two threads loading models
# at once (two registrations in one worker's thread pool) can corrupt each other: model work takes turns.
MODEL_WORK = threading.Lock()

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
    empty = [i for i, t in enumerate(texts, 1) if not t.strip()]
    if empty:
        raise DataError(f"text {empty[0]} is empty; every text needs at least one character")
    out = _predict(model_uri, texts)
    records = out.to_dict("records") if hasattr(out, "to_dict") else list(out)
    return [{"text": t, "label": r["label"], "score": float(r["score"])} for t, r in zip(texts, records, strict=True)]


def _predict(model_uri: str, texts: list[str]):
    """The pyfunc model's prediction: a DataFrame with ``label`` and ``score``."""
    import mlflow

    with MODEL_WORK:
        return mlflow.pyfunc.load_model(model_uri).predict(texts)


def read_texts(path: Path, column: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and texts of a CSV, TSV or JSONL file; errors name the file, line and column.

    Read by ``tasks.sources.table_rows``, with the labeled-data reader's strict rules and wording (a ragged or
    unbalanced CSV row, a JSONL row without the column); rows are numbered by their line in the file.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    fmt = file_format(path)
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson") or fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .tsv or .jsonl")
    rows: list[dict[str, Any]] = []
    texts = []
    for where, row in table_rows(path, fmt, [column], Utf8Policy("fail")):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
            line = where.rsplit(" ", 1)[-1]  # "row 7" (CSV, TSV) or "line 7" (JSONL): line 7 of the file
            raise DataError(f"{path}: row {line}: column {column!r} is {problem}; expected text")
        rows.append(dict(row))
        texts.append(value)
    if not texts:
        raise DataError(f"{path}: no rows to predict")
    return rows, texts


def predictions_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.predictions{path.suffix}")


def write_predictions(path: Path, rows: list[dict[str, Any]], preds: list[dict[str, Any]]) -> Path:
    """Write the input rows with ``label`` and ``score`` added, next to the input, in its format (atomically)."""
    out = predictions_path(path)
    merged = [{**row, "label": p["label"], "score": round(p["score"], 6)} for row, p in zip(rows, preds, strict=True)]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    else:
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in merged for k in r))
        writer = csv.DictWriter(buf, fieldnames=fields, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(merged)
        write_atomic(out, buf.getvalue())
    return out
