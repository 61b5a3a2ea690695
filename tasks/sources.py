"""Readers for every kind of source: local files (text, JSONL, JSON, CSV/TSV, Parquet), Hugging Face
datasets, pandas DataFrames and the built-in sample.

Files are read line by line, so a large corpus streams through without being held in memory. Every
problem is a ``DataError`` that names the file (or dataset, or DataFrame), and the line, row or byte
offset where it is. Rows are numbered as a person finds them: text, JSONL, CSV and TSV files by line
number in the file; JSON arrays by item, Parquet files and datasets by 0-based row; DataFrames by
index label.

Tables are strict: every CSV/TSV record has the header's number of fields (the first record's without a
header), a quoted CSV field must close, and every JSONL row and JSON item has the needed keys. Whoever
starts a run may not be whoever may read the data, so messages never quote the data: a value, a column
name or a library's error text appears only as ``excerpt``'s short, redacted excerpt.

Every local file is opened through ``tasks.confine`` (``open_file``, ``glob_files``, ``data_folder_files``): for a
run created through the API, only inside the operator's data folders and never through a link. A local dataset
folder is read here, not by ``datasets.load_dataset``: a ``save_to_disk`` folder by its ``state.json`` (plain file
names only), a folder of data files by split as ``datasets`` would choose them, but never by its README.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import sample_data
from tasks.config import is_local, is_url
from tasks.confine import data_folder_files, glob_files, open_file
from tasks.errors import ConfigError, DataError, PolicyError
from tasks.redact import LIBRARY_MESSAGE_CHARS, excerpt

BOM = b"\xef\xbb\xbf"
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
           ".parquet": "parquet", ".pq": "parquet"}
TABLE_FORMATS = {"jsonl", "json", "csv", "tsv", "parquet"}
Row = tuple[str, Mapping[str, Any]]  # (where, e.g. "line 7" or "row 3"; the row's values by column)

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a document in a CSV cell may be long


# ---------------------------------------------------------------------------------------------- decoding


@dataclass
class Utf8Policy:
    """What to do with undecodable UTF-8: 'fail' raises naming the file and byte offset; 'replace' counts it."""

    mode: str = "fail"
    replaced: int = 0  # lines (or whole-file documents) that needed a replacement character
    first: str | None = None  # where the first one was

    def decode(self, data: bytes, path: Path, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"{path}: not valid UTF-8 at byte offset {offset + exc.start} ({exc.reason})"
            if self.mode != "replace":
                raise DataError(where) from None
            self.replaced += 1
            self.first = self.first or where
            return data.decode("utf-8", errors="replace")


def read_lines(path: Path, utf8: Utf8Policy, field: str = "input") -> Iterator[tuple[int, str]]:
    """``(line number, line with its line ending)`` of a UTF-8 file; a leading byte-order mark is dropped.
    ``field``: the config field that named the file, for ``open_file``'s refusals."""
    offset = 0
    with open_file(path, field) as f:
        for number, raw in enumerate(f, start=1):
            skip = 3 if number == 1 and raw.startswith(BOM) else 0
            yield number, utf8.decode(raw[skip:], path, offset + skip)
            offset += len(raw)


def read_text(path: Path, utf8: Utf8Policy, field: str = "input") -> str:
    with open_file(path, field) as f:
        data = f.read()
    skip = 3 if data.startswith(BOM) else 0
    return utf8.decode(data[skip:], path, skip)


# ---------------------------------------------------------------------------------------------- files


def expand(patterns: list[str], field: str) -> list[Path]:
    """Files named by paths or glob patterns (``confine.glob_files``); an existing path is literal even when it
    holds [ ] * or ?."""
    return [path for pattern in patterns for path in glob_files(pattern, field)]


def file_digest(path: Path, field: str) -> str:
    """The SHA-256 of a file's bytes, read through ``open_file``."""
    with open_file(path, field) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_format(path: Path, declared: str = "auto", default: str = "txt", field: str = "input") -> str:
    if declared != "auto":
        return declared
    fmt = FORMATS.get(path.suffix.lower())
    if fmt:
        return fmt
    if default == "sniff":  # a labeled file without a known suffix: tab-separated if its first line has a tab
        with open_file(path, field) as f:
            return "tsv" if b"\t" in f.readline() else "csv"
    return default


def names_excerpt(names: Any, most: int = 20, quote: bool = False) -> str:
    """Column, split or label names from the data for a message: each a redacted excerpt, the first ``most``."""
    names = list(names)
    shown = ", ".join(excerpt(n, quote=quote) for n in names[:most])
    return (shown + (f" and {len(names) - most} more" if len(names) > most else "")) or "none"


def library_message(exc: BaseException | str) -> str:
    """A library's exception text (csv, json, pyarrow, datasets) for a message: one line, redacted, cut short."""
    return excerpt(exc, LIBRARY_MESSAGE_CHARS, quote=False) or type(exc).__name__


def missing_column(name: str, column: str, present: list[str]) -> DataError:
    return DataError(f"{name}: no column {excerpt(column)}; columns present: {names_excerpt(present)}")


def _require(name: str, need: list[str], present: list[str]) -> None:
    for column in need:
        if column not in present:
            raise missing_column(name, column, present)


def _csv_records(path: Path, fmt: str, utf8: Utf8Policy, field: str) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, fields)`` per record; blank lines are skipped, quoted CSV fields may span lines.

    TSV fields are taken verbatim (no quoting), as in GLUE's and UCI's tab-separated sets. CSV is read with
    ``strict=True``: a quoted field that never closes (it would swallow the rest of the file) or text after a
    closing quote is an error naming the line where the record starts.
    """
    lines = (line for _, line in read_lines(path, utf8, field))
    if fmt == "tsv":
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    else:
        reader = csv.reader(lines, delimiter=",", strict=True)
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _csv_error(path, fmt, start, reader.line_num, exc) from None
        if record:
            yield start, record
        start = reader.line_num + 1


def _csv_error(path: Path, fmt: str, start: int, at: int, exc: csv.Error) -> DataError:
    reason = str(exc)
    if "unexpected end of data" in reason:  # strict mode's word for a quoted field still open at the end of file
        return DataError(f"{path}: line {start}: a quoted field in the record that starts here is never closed "
                         f"(unbalanced '\"'; it runs to the end of the file at line {at})")
    if "expected after" in reason:  # "',' expected after '\"'": text after what closed a quoted field
        return DataError(f"{path}: line {start}: not valid {fmt.upper()}: {library_message(exc)} at line {at} "
                         "(an unbalanced '\"' in the record that starts here?)")
    return DataError(f"{path}: line {start}: not valid {fmt.upper()} ({library_message(exc)})")


def _csv_rows(path: Path, fmt: str, has_header: bool, need: list[str], utf8: Utf8Policy,
              field: str) -> Iterator[Row]:
    records = _csv_records(path, fmt, utf8, field)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: empty file")
    if has_header:
        columns = first[1]
        like = f"as in the header (line {first[0]})"
    else:
        columns = [str(i) for i in range(len(first[1]))]
        records = _chain_first(first, records)
        like = f"as in the first row (line {first[0]})"
    _require(str(path), need, columns)
    width = len(columns)
    for line, record in records:
        if len(record) != width:
            if len(record) == 1 and not record[0].strip():
                continue  # a line of spaces is a blank line
            raise _ragged(path, fmt, line, width, len(record), like)
        yield f"row {line}", dict(zip(columns, record, strict=False))  # lengths checked above


def _ragged(path: Path, fmt: str, line: int, width: int, got: int, like: str) -> DataError:
    if fmt == "tsv":
        hint = "a tab inside a field, or a missing one?"
    else:
        hint = "a comma in a field that is not quoted, or an unbalanced '\"'?"
    return DataError(f"{path}: line {line}: {got} field{'s' * (got != 1)}, expected {width} {like} ({hint})")


def _chain_first(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _jsonl_rows(path: Path, need: list[str], utf8: Utf8Policy, field: str) -> Iterator[Row]:
    needed = frozenset(need)
    for number, line in read_lines(path, utf8, field):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({library_message(exc.msg)}, "
                            f"column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        if not needed <= row.keys():  # every row: a key missing in line 90,000 is as wrong as in line 1
            raise _missing_key(f"{path}: line {number}", need, row)
        yield f"line {number}", row


def _missing_key(where: str, need: list[str], row: dict) -> DataError:
    return missing_column(where, next(c for c in need if c not in row), list(row))


def _json_rows(path: Path, need: list[str], utf8: Utf8Policy, field: str) -> Iterator[Row]:
    try:
        data = json.loads(read_text(path, utf8, field))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({library_message(exc.msg)} at line {exc.lineno}, "
                        f"column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    needed = frozenset(need)
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
        if not needed <= row.keys():
            raise _missing_key(f"{path}: item {i}", need, row)
        yield f"item {i}", row


def _parquet_file(f: Any, path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises its own error types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({library_message(exc)})") from None


def _parquet_rows(path: Path, need: list[str], field: str) -> Iterator[Row]:
    with open_file(path, field) as f:
        pf = _parquet_file(f, path)
        _require(str(path), need, pf.schema_arrow.names)
        i = 0
        for batch in pf.iter_batches(batch_size=4096, columns=need):
            for row in batch.to_pylist():
                yield f"row {i}", row
                i += 1


def table_rows(path: Path, fmt: str, need: list[str], utf8: Utf8Policy, has_header: bool = True,
               field: str = "input") -> Iterator[Row]:
    """Rows of a JSONL, JSON, CSV, TSV or Parquet file; the ``need``ed columns are checked before the first row.
    ``field``: the config field that named the file, for ``open_file``'s refusals."""
    if fmt == "jsonl":
        return _jsonl_rows(path, need, utf8, field)
    if fmt == "json":
        return _json_rows(path, need, utf8, field)
    if fmt in ("csv", "tsv"):
        return _csv_rows(path, fmt, has_header, need, utf8, field)
    if fmt == "parquet":
        return _parquet_rows(path, need, field)
    raise ConfigError(f"{path}: format {fmt!r} is not a table (expected one of {', '.join(sorted(TABLE_FORMATS))})")


def text_documents(path: Path, unit: str, utf8: Utf8Policy, field: str = "input") -> Iterator[str]:
    """Documents of a text file: the whole file, each line, or each blank-line-separated block of lines."""
    if unit == "file":
        yield read_text(path, utf8, field)
        return
    block: list[str] = []
    for _, line in read_lines(path, utf8, field):
        line = line.rstrip("\r\n")
        if unit == "line":
            yield line
        elif line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def is_missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and value != value)  # NaN from pandas


def join_text(row: Mapping[str, Any], columns: list[str]) -> str:
    """The row's text: its text columns, non-empty ones joined with a newline."""
    if len(columns) == 1:
        value = row.get(columns[0])
        return "" if is_missing(value) else str(value)
    return "\n".join(str(v) for c in columns if not is_missing(v := row.get(c)))


# ---------------------------------------------------------------------------------------------- datasets and frames


# Builder names whose local data files llmpipe reads, and the format each reads them in (json: _json_format).
BUILDERS = {"json": None, "csv": "csv", "parquet": "parquet", "text": "txt", "arrow": "arrow"}


def hub_dataset_splits(name: str, config: str | None = None, revision: str | None = None,
                       data_files: list[str] | None = None, field: str = "dataset") -> dict[str, Any]:
    """All splits of a dataset, by split name, as ``datasets.Dataset``s.

    A local folder (``save_to_disk``, or data files) and local ``data_files`` (with a builder name: json, csv,
    parquet, text, arrow; or a folder) are read here, through ``tasks.confine``; a Hub name through ``datasets``,
    refused unless every data file it resolves is on the Hub (``hf://``: its README may name others). Data files
    given as URLs go to ``datasets`` with the builder named (the policy decides whether a run may name URLs).
    ``field``: the config section (``corpus.sources[0]``), for messages.
    """
    import datasets

    label = f"dataset {name!r}" + (f" (config {config!r})" if config else "")
    urls = [f for f in data_files or [] if is_url(f)]
    if urls and len(urls) != len(data_files or []):
        raise ConfigError(f"{field}.data_files: give either local files or URLs, not both")
    try:
        local = name not in BUILDERS and is_local(name)
        if (local or name in BUILDERS) and data_files and not urls:
            where = f"{field}.data_files"
            paths = expand(data_files, where)
            formats = {p: _data_format(p, where) if local else BUILDERS[name] or _json_format(p, where) for p in paths}
            return {"train": _files_dataset(paths, formats, str, where)}
        if local:
            return _local_dataset(Path(name), f"{field}.name")
        if name in BUILDERS:
            return dict(datasets.load_dataset(name, config, data_files=data_files or None))
        builder = datasets.load_dataset_builder(name, config, revision=revision, data_files=data_files or None)
        require_hub_files(builder, f"{field}.name", label)
        builder.download_and_prepare()
        return dict(builder.as_dataset())
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ValueError) as exc:
        if isinstance(exc, ConfigError | DataError):
            raise
        raise DataError(f"{label}: cannot be loaded ({library_message(exc)})") from None
    except ConnectionError as exc:  # retried, unless offline mode makes it permanent
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(f"{label}: not in the local cache, and offline mode is on "
                            f"({library_message(exc)})") from None
        raise


def require_hub_files(builder: Any, field: str, label: str) -> None:
    """Refuse a Hub data set's builder unless every data file it resolved is on the Hub (``hf://``): a README on the
    Hub may name files by absolute path or ``..`` pattern, which would resolve on the worker's disk."""
    elsewhere = [f for files in (builder.config.data_files or {}).values() for f in files
                 if not str(f).startswith("hf://")]
    if elsewhere:
        raise PolicyError(f"{field}: {label} names {len(elsewhere)} data file(s) that are not on the Hugging "
                          "Face Hub (hf://), in its README or data_files; local data files are read with the "
                          f"builders {', '.join(BUILDERS)}, or as a local folder")


def _local_dataset(folder: Path, field: str) -> dict[str, Any]:
    """A local folder's splits: written by ``save_to_disk`` (``dataset_dict.json`` or ``state.json``), else its data
    files by split (``confine.data_folder_files``)."""
    if (folder / "dataset_dict.json").is_file():
        splits = _json_file(folder / "dataset_dict.json", field).get("splits")
        if not isinstance(splits, list):
            raise DataError(f"{folder / 'dataset_dict.json'}: no list of splits")
        return {split: _saved_split(folder / _plain_name(split, folder / "dataset_dict.json", field), field)
                for split in splits}
    if (folder / "state.json").is_file():
        return {"train": _saved_split(folder, field)}
    splits = data_folder_files(folder, field)
    formats = {p: _data_format(p, field) for files in splits.values() for p in files}
    return {split: _files_dataset(files, formats, lambda p: p.relative_to(folder).as_posix(), field)
            for split, files in splits.items()}


def _plain_name(name: Any, where: Path, field: str) -> str:
    """A file or folder name a saved dataset's metadata gives: one name inside the folder, nothing else."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise PolicyError(f"{field}: {where} names a file outside its folder (only plain file names are read)")
    return name


def _json_file(path: Path, field: str) -> dict[str, Any]:
    with open_file(path, field) as f:
        try:
            data = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({library_message(exc)})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _saved_split(folder: Path, field: str) -> Any:
    """One split written by ``save_to_disk``: its Arrow files (plain names from ``state.json``), its features from
    ``dataset_info.json`` (ClassLabel names kept) and its fingerprint."""
    import datasets
    import pyarrow as pa

    state = _json_file(folder / "state.json", field)
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{folder / 'state.json'}: no _data_files")
    names = [_plain_name(e.get("filename") if isinstance(e, dict) else None, folder / "state.json", field)
             for e in entries]
    table = pa.concat_tables([_arrow_table(folder / n, field) for n in names])
    info = datasets.DatasetInfo.from_dict(_json_file(folder / "dataset_info.json", field))
    return datasets.Dataset(table, info=info, fingerprint=state.get("_fingerprint"))


def _arrow_table(path: Path, field: str) -> Any:
    import pyarrow as pa

    with open_file(path, field) as f:
        try:
            return pa.ipc.open_stream(f).read_all()
        except pa.ArrowException as exc:
            raise DataError(f"{path}: not an Arrow stream file ({library_message(exc)})") from None


def _data_format(path: Path, field: str) -> str:
    """A dataset folder's data file's format, by suffix."""
    fmt = FORMATS.get(path.suffix.lower()) or path.suffix.lower().lstrip(".")  # txt, arrow
    return _json_format(path, field) if fmt == "json" else fmt


def _json_format(path: Path, field: str) -> str:
    """'json' for a file that holds a JSON array, else 'jsonl': ``datasets``' json builder reads either."""
    with open_file(path, field) as f:
        head = f.read(4096).lstrip(BOM).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


def _files_dataset(files: list[Path], formats: dict[Path, str], name: Any, field: str) -> Any:
    """One split from data files read by llmpipe's own readers, named by each file's ``name(path)`` and SHA-256: a
    text file gives a 'text' column of its lines, as ``datasets``' text builder does."""
    import datasets
    import pyarrow as pa

    tables = []
    for path in files:
        fmt = formats[path]
        if fmt == "parquet":
            with open_file(path, field) as f:
                tables.append(_parquet_file(f, path).read())
        elif fmt == "arrow":
            tables.append(_arrow_table(path, field))
        elif fmt == "txt":
            tables.append(pa.table({"text": list(text_documents(path, "line", Utf8Policy(), field))}))
        else:
            rows = [dict(row) for _, row in table_rows(path, fmt, [], Utf8Policy(), True, field)]
            try:
                tables.append(pa.Table.from_pylist(rows))
            except pa.ArrowException as exc:
                raise DataError(f"{path}: a column holds values of several types ({library_message(exc)})") from None
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as exc:
        raise DataError(f"{field}: the files of one split do not share columns of one type "
                        f"({library_message(exc)})") from None
    identity = [(name(p), file_digest(p, field)) for p in files]
    return datasets.Dataset(table, fingerprint=hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16])


def hub_rows(ds: Any, need: list[str], name: str) -> Iterator[Row]:
    _require(name, need, list(ds.column_names))
    i = 0
    for batch in ds.select_columns(need).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in need), strict=True):
            yield f"row {i}", dict(zip(need, values, strict=True))
            i += 1


def frame_rows(df: Any, need: list[str], name: str) -> Iterator[Row]:
    _require(name, need, [str(c) for c in df.columns])
    for index, row in zip(df.index, df[need].to_dict("records"), strict=True):
        yield f"row {index}", row


def frame_fingerprint(df: Any, columns: list[str]) -> str:
    """A hash of the DataFrame's index and the given columns' values."""
    import pandas as pd

    hashed = pd.util.hash_pandas_object(df[columns].astype(str), index=True).to_numpy()
    return hashlib.sha256(hashed.tobytes() + json.dumps(columns).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- corpus sources


class CorpusSource:
    """One configured source of pretraining documents, resolved and checked; ``documents()`` streams its text."""

    def __init__(self, label: str, identity: Any, documents: Any):
        self.label, self.identity, self._documents = label, identity, documents

    def documents(self) -> Iterator[str]:
        return self._documents()


def check_files(cfg: Any, field: str) -> list[tuple[Path, str]]:
    """A 'files' source's files and formats; the text columns of tables checked (header, schema or first row)."""
    files = [(p, file_format(p, cfg.format)) for p in expand(cfg.paths, f"{field}.paths")]
    for path, fmt in files:
        if fmt in TABLE_FORMATS:
            next(table_rows(path, fmt, cfg.text_columns, Utf8Policy("replace"), cfg.has_header, f"{field}.paths"), None)
    return files


def open_corpus_source(index: int, cfg: Any, seed: int, frames: Mapping[str, Any] | None,
                       utf8: Utf8Policy) -> CorpusSource:
    """Resolve ``corpus.sources[index]``: files found, columns checked, dataset loaded; nothing is read yet."""
    field = f"corpus.sources[{index}]"
    if cfg.kind == "sample":
        return CorpusSource(
            f"built-in sample ({cfg.documents} documents)",
            {"sample": sample_data.VERSION, "seed": seed, "documents": cfg.documents},
            lambda: iter(sample_data.pretraining_corpus(seed=seed, n_documents=cfg.documents)),
        )
    if cfg.kind == "files":
        files = check_files(cfg, field)

        def documents() -> Iterator[str]:
            for path, fmt in files:
                if fmt == "txt":
                    yield from text_documents(path, cfg.text_unit, utf8, f"{field}.paths")
                else:
                    for _, row in table_rows(path, fmt, cfg.text_columns, utf8, cfg.has_header, f"{field}.paths"):
                        yield join_text(row, cfg.text_columns)

        label = ", ".join(str(p) for p, _ in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return CorpusSource(label, [(str(p), file_digest(p, f"{field}.paths")) for p, _ in files], documents)
    if cfg.kind == "hub":
        splits = hub_dataset_splits(cfg.name, cfg.config, cfg.revision, cfg.data_files, field)
        label = f"dataset {cfg.name!r}" + (f" ({cfg.config})" if cfg.config else "") + f" split {cfg.split!r}"
        if cfg.split not in splits:
            raise DataError(f"{field}: {label}: no such split; splits present: {names_excerpt(splits)}")
        ds = splits[cfg.split]
        _require(label, cfg.text_columns, list(ds.column_names))
        return CorpusSource(
            label, {"dataset": cfg.name, "config": cfg.config, "split": cfg.split, "fingerprint": ds._fingerprint},
            lambda: (join_text(row, cfg.text_columns) for _, row in hub_rows(ds, cfg.text_columns, label)),
        )
    if cfg.kind == "dataframe":
        df = (frames or {}).get(cfg.name)
        if df is None:
            raise ConfigError(f"{field}: DataFrame {cfg.name!r} was not passed in; call "
                              f"ingest_corpus(cfg, workspace, seed, frames={{{cfg.name!r}: df}}) from Python")
        label = f"DataFrame {cfg.name!r}"
        _require(label, cfg.text_columns, [str(c) for c in df.columns])
        return CorpusSource(
            label, {"dataframe": frame_fingerprint(df, cfg.text_columns)},
            lambda: (join_text(row, cfg.text_columns) for _, row in frame_rows(df, cfg.text_columns, label)),
        )
    raise ConfigError(f"{field}: unknown kind {cfg.kind!r}")
