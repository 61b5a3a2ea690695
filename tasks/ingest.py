"""Ingestion: sources -> validated, deduplicated, deterministically split JSONL artifacts."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from tasks import sample_data
from tasks.artifacts import CorpusRef, LabeledRef, Workspace, file_sha256, fingerprint
from tasks.config import CorpusConfig, LabeledConfig
from tasks.errors import DataError

log = logging.getLogger("llmpipe")

STAGE_VERSION = "ingest-1"


def _doc_bucket(text: str) -> float:
    """A number in [0, 1) fixed by the document's content: splits never move when documents are added."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})") from None


def _expand(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"corpus.paths: pattern {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise DataError(f"corpus.paths: {p} is not a file")
            files.append(p)
    return files


def _split_documents(text: str, unit: str) -> list[str]:
    if unit == "file":
        return [text]
    if unit == "line":
        return text.splitlines()
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def _source_identity(cfg: CorpusConfig, seed: int) -> Any:
    if cfg.source == "sample":
        return {"sample": sample_data.VERSION, "seed": seed, "documents": cfg.sample_documents}
    return [(str(p), file_sha256(p)) for p in _expand(cfg.paths)]


def ingest_corpus(cfg: CorpusConfig, workspace: Workspace, seed: int = 0) -> CorpusRef:
    """Read the pretraining corpus, drop empty and short documents, deduplicate, split by content hash."""
    source_id = _source_identity(cfg, seed)
    fp = fingerprint(STAGE_VERSION, source_id, cfg.model_dump(exclude={"paths"}))

    def build(out: Path) -> dict[str, Any]:
        if cfg.source == "sample":
            raw = sample_data.pretraining_corpus(seed=seed, n_documents=cfg.sample_documents)
        else:
            raw = []
            for path in _expand(cfg.paths):
                raw.extend(_split_documents(_read_text(path), cfg.text_unit))
        docs = [d.strip() for d in raw]
        n_empty = sum(1 for d in docs if not d)
        docs = [d for d in docs if d]
        n_short = sum(1 for d in docs if len(d) < cfg.min_chars)
        docs = [d for d in docs if len(d) >= cfg.min_chars]
        seen: set[str] = set()
        unique = []
        for d in docs:
            h = hashlib.sha256(d.encode("utf-8")).hexdigest()
            if h not in seen:
                seen.add(h)
                unique.append(d)
        if not unique:
            where = "the built-in sample" if cfg.source == "sample" else ", ".join(cfg.paths)
            raise DataError(f"corpus from {where} has no usable documents after cleaning "
                            f"({len(raw)} read, {n_empty} empty, {n_short} shorter than corpus.min_chars)")
        splits: dict[str, list[dict]] = {"train": [], "validation": []}
        for d in unique:
            split = "validation" if _doc_bucket(d) < cfg.validation_fraction else "train"
            splits[split].append({"text": d})
        if not splits["train"] or not splits["validation"]:
            raise DataError(
                f"corpus has {len(unique)} unique documents: too few to hold out "
                f"corpus.validation_fraction={cfg.validation_fraction} for validation and keep some for training"
            )
        for name, rows in splits.items():
            write_jsonl(out / f"{name}.jsonl", rows)
        stats = {
            "documents_read": len(raw),
            "empty_dropped": n_empty,
            "short_dropped": n_short,
            "duplicates_dropped": len(docs) - len(unique),
            "train_documents": len(splits["train"]),
            "validation_documents": len(splits["validation"]),
            "train_chars": sum(len(r["text"]) for r in splits["train"]),
        }
        log.info("corpus: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
        return stats

    return workspace.materialize(CorpusRef, fp, build, stage="ingest_corpus", config=cfg)


def _read_table(path: Path, cfg: LabeledConfig) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"labeled data file not found: {path}")
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix in {".jsonl", ".json"}:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {i} is not valid JSON ({exc.msg})") from None
        columns = sorted({k for r in rows for k in r})
        start_row = 1
    else:
        delimiter = "\t" if suffix in {".tsv", ".tab"} or (suffix not in {".csv"} and "\t" in text[:4096]) else ","
        reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        records = list(reader)
        if cfg.has_header:
            if not records:
                raise DataError(f"{path}: empty file")
            columns, body, start_row = records[0], records[1:], 2
        else:
            width = max((len(r) for r in records), default=0)
            columns, body, start_row = [str(i) for i in range(width)], records, 1
        rows = [dict(zip(columns, r, strict=False)) for r in body]
    for col in (cfg.text_column, cfg.label_column):
        if col not in columns:
            raise DataError(f"{path}: no column {col!r}; columns present: {', '.join(map(str, columns)) or 'none'}")
    out = []
    for i, r in enumerate(rows):
        label = r.get(cfg.label_column)
        text_value = r.get(cfg.text_column)
        row_no = i + start_row
        if label is None or str(label).strip() == "":
            raise DataError(f"{path}: row {row_no}: missing label in column {cfg.label_column!r}")
        if text_value is None or not str(text_value).strip():
            continue
        out.append({"text": str(text_value).strip(), "label": str(label).strip(), "_row": row_no})
    return out


def _labeled_identity(cfg: LabeledConfig, seed: int) -> Any:
    if cfg.source == "sample":
        return {"sample": sample_data.VERSION, "seed": seed, "train": cfg.sample_train, "eval": cfg.sample_eval}
    paths = [cfg.train_path, cfg.validation_path, cfg.test_path]
    return [(p, file_sha256(Path(p)) if Path(p).is_file() else None) for p in paths if p]


def ingest_labeled(cfg: LabeledConfig, workspace: Workspace, seed: int = 0) -> LabeledRef:
    """Read labeled text, map labels to ids (``id2label``), and fix train/validation/test splits."""
    fp = fingerprint(STAGE_VERSION, _labeled_identity(cfg, seed), cfg, seed)

    def build(out: Path) -> dict[str, Any]:
        if cfg.source == "sample":
            data = sample_data.sentiment_dataset(
                seed=seed, n_train=cfg.sample_train, n_validation=cfg.sample_eval, n_test=cfg.sample_eval
            )
            splits = {k: [{"text": r["text"], "label": r["label"]} for r in v] for k, v in data.items()}
            origin = {k: "built-in sample" for k in splits}
        else:
            splits, origin = {}, {}
            for name, p in (("train", cfg.train_path), ("validation", cfg.validation_path), ("test", cfg.test_path)):
                if p:
                    splits[name] = _read_table(Path(p), cfg)
                    origin[name] = p
            splits = _complete_splits(splits, seed)
        labels = sorted({r["label"] for r in splits["train"]}, key=_label_sort_key)
        if len(labels) < 2:
            raise DataError(f"{origin.get('train', 'train split')}: only one class ({labels[0]!r}) in the training labels; "
                            "a classifier needs at least two")
        label2id = {lab: i for i, lab in enumerate(labels)}
        for name in ("validation", "test"):
            for r in splits[name]:
                if r["label"] not in label2id:
                    where = f"{origin.get(name, name + ' split')}: row {r.get('_row', '?')}"
                    raise DataError(f"{where}: label {r['label']!r} does not occur in training labels {labels}")
        balance = {}
        for name, rows in splits.items():
            counts = Counter(r["label"] for r in rows)
            balance[name] = {lab: counts.get(lab, 0) for lab in labels}
            write_jsonl(out / f"{name}.jsonl", [{"text": r["text"], "label": label2id[r["label"]]} for r in rows])
        id2label = {str(i): lab for lab, i in label2id.items()}
        (out / "labels.json").write_text(json.dumps({"id2label": id2label}, indent=2))
        log.info("labeled data: %s", json.dumps(balance))
        return {"id2label": id2label, "class_balance": balance, "rows": {k: len(v) for k, v in splits.items()}}

    return workspace.materialize(LabeledRef, fp, build, stage="ingest_labeled", config=cfg)


def _label_sort_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def _complete_splits(splits: dict[str, list[dict]], seed: int) -> dict[str, list[dict]]:
    """Stratified 80/10/10 (or 90/10) split of train for whichever splits were not given."""
    from sklearn.model_selection import train_test_split

    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits
    train = splits["train"]
    labels = [r["label"] for r in train]
    counts = Counter(labels)
    stratify = labels if min(counts.values()) >= 2 * (len(missing) + 1) else None
    frac = 0.1 * len(missing)
    rest, held = train_test_split(train, test_size=frac, random_state=seed, stratify=stratify)
    if len(missing) == 1:
        splits[missing[0]] = held
    else:
        held_labels = [r["label"] for r in held]
        strat2 = held_labels if stratify is not None and min(Counter(held_labels).values()) >= 2 else None
        splits["validation"], splits["test"] = train_test_split(held, test_size=0.5, random_state=seed, stratify=strat2)
    splits["train"] = rest
    return splits


def load_split(ref: CorpusRef | LabeledRef, split: str) -> list[dict[str, Any]]:
    return read_jsonl(ref.dir / f"{split}.jsonl")


def load_id2label(ref: LabeledRef) -> dict[int, str]:
    data = json.loads((ref.dir / "labels.json").read_text())
    return {int(k): v for k, v in data["id2label"].items()}
