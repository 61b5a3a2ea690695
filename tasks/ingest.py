"""Ingestion: sources -> validated, cleaned, deduplicated, deterministically split JSONL artifacts.

The pretraining corpus streams through one pass: read (``tasks.sources``), optional Unicode normalisation,
strip, drop empty, drop too short or too long, drop exact duplicates (by content hash), assign a split
by the hash of the document, and write; training documents are repeated by their source's weight. A
document's split depends on its content alone, so adding documents never moves existing ones. The
counts of every step and a length histogram go to ``data_report.json`` in the artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks import sample_data
from tasks.artifacts import CorpusRef, LabeledRef, Workspace, fingerprint, write_json
from tasks.config import CorpusConfig, LabeledConfig, LabeledHub
from tasks.errors import ConfigError, DataError
from tasks.redact import excerpt
from tasks.sources import (
    Utf8Policy,
    file_digest,
    file_format,
    frame_fingerprint,
    frame_rows,
    hub_dataset_splits,
    hub_rows,
    is_missing,
    join_text,
    library_message,
    names_excerpt,
    open_corpus_source,
    table_rows,
)

log = logging.getLogger("llmpipe")

STAGE_VERSION = "ingest-2"
DATA_REPORT = "data_report.json"
SPLITS = ("train", "validation", "test")


def _unit(eight_bytes: bytes) -> float:
    """A number in [0, 1) fixed by eight bytes of a document's hash: splits never move when documents are added."""
    return int.from_bytes(eight_bytes, "big") / 2**64


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- normalisation


def normalize_text(text: str, form: str) -> str:
    """``text`` in Unicode normalisation form ``form`` ('none', 'nfc' or 'nfkc')."""
    return text if form == "none" else unicodedata.normalize(form.upper(), text)


def corpus_fingerprinted(cfg: CorpusConfig) -> dict[str, Any]:
    """The corpus section as the fingerprint hashes it: ``normalize`` in the form of before (the boolean ``nfc``), so
    corpora built before it are found again; only NFKC, which did not exist then, adds a key."""
    out = cfg.model_dump(mode="json", exclude={"normalize"})
    out["nfc"] = cfg.normalize == "nfc"
    if cfg.normalize not in ("none", "nfc"):
        out["normalize"] = cfg.normalize
    return out


# ---------------------------------------------------------------------------------------------- corpus


def _split_of(bucket: float, cfg: CorpusConfig) -> str:
    if bucket < cfg.validation_fraction:
        return "validation"
    if bucket < cfg.validation_fraction + cfg.test_fraction:
        return "test"
    return "train"


def _copies(weight: float, digest: bytes) -> int:
    """Training copies of a document: floor(weight), plus one for a hash-chosen share (the fractional part)."""
    whole = math.floor(weight)
    return whole + (1 if _unit(digest[8:16]) < weight - whole else 0)


def _histogram(lengths: Counter) -> list[dict[str, int]]:
    """Document lengths in power-of-two bins of characters: [1, 2), [2, 4), [4, 8), ..."""
    bins: Counter = Counter()
    for length, n in lengths.items():
        bins[max(length, 1).bit_length() - 1] += n
    return [{"min_chars": 2**b, "max_chars": 2 ** (b + 1) - 1, "documents": bins[b]}
            for b in range(min(bins, default=0), max(bins, default=-1) + 1)]


def ingest_corpus(cfg: CorpusConfig, workspace: Workspace, seed: int = 0,
                  frames: Mapping[str, Any] | None = None) -> CorpusRef:
    """Read the pretraining sources, clean, deduplicate and split them by content hash.

    ``frames`` maps names to pandas DataFrames for sources of kind 'dataframe'.
    """
    utf8 = Utf8Policy(cfg.invalid_utf8)
    sources = [open_corpus_source(i, s, seed, frames, utf8) for i, s in enumerate(cfg.sources)]
    fp = fingerprint(STAGE_VERSION, [s.identity for s in sources], corpus_fingerprinted(cfg))

    def build(out: Path) -> dict[str, Any]:
        splits = [s for s in SPLITS if s != "test" or cfg.test_fraction > 0]
        with contextlib.ExitStack() as stack:
            files = {s: stack.enter_context(open(out / f"{s}.jsonl", "w", encoding="utf-8")) for s in splits}
            per_source, lengths = _clean_and_split(cfg, sources, files, utf8)
        report = _corpus_report(cfg, per_source, splits, lengths)
        if utf8.replaced:
            log.warning("corpus: invalid UTF-8 replaced in %d lines or files; the first: %s", utf8.replaced, utf8.first)
        written = report["splits"]
        too_few = [s for s in splits if written[s]["documents"] == 0]
        if too_few:
            total = sum(written[s]["unique_documents"] for s in splits)
            where = "; ".join(source.label for _, source, _ in per_source)
            if total == 0:
                raise DataError(f"corpus from {where} has no usable documents after cleaning "
                                f"({_step_summary(report)})")
            raise DataError(
                f"corpus from {where} has {total} unique documents: too few to fill the {', '.join(too_few)} "
                f"split(s) (corpus.validation_fraction={cfg.validation_fraction}, "
                f"corpus.test_fraction={cfg.test_fraction}) and keep some for training"
            )
        write_json(out / DATA_REPORT, report)
        meta = {
            "documents_read": report["steps"][0]["documents"],
            "empty_dropped": _total(per_source, "empty"),
            "short_dropped": _total(per_source, "short"),
            "long_dropped": _total(per_source, "long"),
            "duplicates_dropped": _total(per_source, "duplicate"),
            "invalid_utf8_replaced": utf8.replaced,
            "normalized_changed": _total(per_source, "normalized_changed"),
            "splits": splits,
            **{f"{s}_documents": written[s]["documents"] for s in splits},
            "train_chars": written["train"]["chars"],
        }
        log.info("corpus: %s", ", ".join(f"{k}={v}" for k, v in meta.items() if k != "splits"))
        return meta

    return workspace.materialize(CorpusRef, fp, build, stage="ingest_corpus", config=cfg)


def _clean_and_split(cfg: CorpusConfig, sources: list, files: dict[str, Any],
                     utf8: Utf8Policy) -> tuple[list, Counter]:
    """Stream every source's documents through cleaning, dedup and the hash split into ``files``; the counts."""
    seen: set[bytes] = set()
    lengths: Counter = Counter()
    per_source = []
    for spec, source in zip(cfg.sources, sources, strict=True):
        c: Counter = Counter()
        replaced_before = utf8.replaced
        for raw in source.documents():
            c["read"] += 1
            text = raw
            if cfg.normalize != "none":
                text = normalize_text(text, cfg.normalize)
                c["normalized_changed"] += text != raw
            text = text.strip()
            if not text:
                c["empty"] += 1
                continue
            if len(text) < cfg.min_chars:
                c["short"] += 1
                continue
            if cfg.max_chars is not None and len(text) > cfg.max_chars:
                c["long"] += 1
                continue
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if cfg.dedup:
                if digest[:16] in seen:
                    c["duplicate"] += 1
                    continue
                seen.add(digest[:16])
            split = _split_of(_unit(digest[:8]), cfg)
            copies = _copies(spec.weight, digest) if split == "train" else 1
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            for _ in range(copies):
                files[split].write(line)
            c[split] += 1
            c[f"{split}_written"] += copies
            c[f"{split}_chars"] += len(text) * copies
            lengths[len(text)] += 1
        c["invalid_utf8_replaced"] = utf8.replaced - replaced_before
        per_source.append((spec, source, c))
    return per_source, lengths


def _total(per_source: list, key: str) -> int:
    return sum(c[key] for _, _, c in per_source)


def _corpus_report(cfg: CorpusConfig, per_source: list, splits: list[str], lengths: Counter) -> dict[str, Any]:
    read = _total(per_source, "read")
    after_empty = read - _total(per_source, "empty")
    after_length = after_empty - _total(per_source, "short") - _total(per_source, "long")
    unique = after_length - _total(per_source, "duplicate")
    written = sum(_total(per_source, f"{s}_written") for s in splits)
    steps = [
        {"step": "read", "documents": read},
        {"step": "drop empty", "documents": after_empty},
        {"step": f"length filter ({cfg.min_chars} to {cfg.max_chars or 'any'} chars)", "documents": after_length},
        {"step": "deduplicate" if cfg.dedup else "deduplicate (off)", "documents": unique},
        {"step": "weight (train copies)", "documents": written},
    ]
    return {
        "steps": steps,
        "sources": [
            {"source": source.label, "kind": spec.kind, "weight": spec.weight, "read": c["read"],
             "invalid_utf8_replaced": c["invalid_utf8_replaced"], "normalized_changed": c["normalized_changed"],
             "empty_dropped": c["empty"], "short_dropped": c["short"], "long_dropped": c["long"],
             "duplicates_dropped": c["duplicate"], **{s: c[s] for s in splits},
             "train_written": c["train_written"]}
            for spec, source, c in per_source
        ],
        "splits": {s: {"documents": _total(per_source, f"{s}_written"), "unique_documents": _total(per_source, s),
                       "chars": _total(per_source, f"{s}_chars")} for s in splits},
        "length_histogram": _histogram(lengths),
        "settings": {"normalize": cfg.normalize, "dedup": cfg.dedup, "invalid_utf8": cfg.invalid_utf8,
                     "validation_fraction": cfg.validation_fraction, "test_fraction": cfg.test_fraction},
    }


def _step_summary(report: dict[str, Any]) -> str:
    return ", ".join(f"{s['step']}: {s['documents']}" for s in report["steps"][:4])


def load_data_report(ref: CorpusRef | LabeledRef) -> dict[str, Any]:
    return json.loads((ref.dir / DATA_REPORT).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- labeled data


def _label_sort_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 from a pandas column with missing values is the label 1
    return str(value).strip()


class _LabeledReader:
    """Turns rows of any source into ``{"text", "label", "_where"}``, checking every label as it goes."""

    def __init__(self, cfg: LabeledConfig, names: dict[str, str] | None = None):
        self.cfg = cfg
        self.names = {str(i): name for i, name in enumerate(cfg.label_names)} or names or {}
        self.empty: Counter = Counter()
        self.normalized: Counter = Counter()  # rows whose text normalisation changed, per split

    def rows(self, origin: str, rows: Iterable[tuple[str, Mapping[str, Any]]], split: str) -> list[dict[str, Any]]:
        cfg, out = self.cfg, []
        for where, row in rows:
            raw = row.get(cfg.label_column)
            if is_missing(raw) or _label_text(raw) == "":
                raise DataError(f"{origin}: {where}: missing label in column {cfg.label_column!r}")
            label = _label_text(raw)
            if self.names:
                if label not in self.names:
                    raise DataError(f"{origin}: {where}: unknown label {excerpt(label)} in column "
                                    f"{cfg.label_column!r}; expected one of {names_excerpt(self.names)} "
                                    "(labeled.label_names)")
                label = self.names[label]
            if cfg.labels and label not in cfg.labels:
                raise DataError(f"{origin}: {where}: unknown label {excerpt(label)}; labeled.labels is {cfg.labels}")
            joined = join_text(row, cfg.text_columns)
            text = normalize_text(joined, cfg.normalize)
            self.normalized[split] += text != joined
            text = text.strip()
            if not text:
                self.empty[split] += 1
                continue
            out.append({"text": text, "label": label, "_where": where})
        return out


def _read_table(path: Path, cfg: LabeledConfig, has_header: bool, reader: _LabeledReader,
                split: str) -> list[dict[str, Any]]:
    """Labeled rows of a CSV, TSV, JSONL, JSON or Parquet file."""
    field = f"labeled.source.{split}"
    fmt = file_format(path, default="sniff", field=field)
    rows = table_rows(path, fmt, [*cfg.text_columns, cfg.label_column], Utf8Policy("fail"), has_header, field)
    return reader.rows(str(path), rows, split)


def _class_label_names(ds: Any, column: str) -> dict[str, str] | None:
    """``{"0": "neg", ...}`` when a dataset's label column is a ``ClassLabel``."""
    feature = ds.features.get(column)
    names = getattr(feature, "names", None)
    return {str(i): n for i, n in enumerate(names)} if names else None


def _hub_splits(src: LabeledHub) -> dict[str, str | None]:
    """The dataset's split names for train, validation and test."""
    return {"train": src.train_split, "validation": src.validation_split, "test": src.test_split}


def fingerprinted(cfg: LabeledConfig) -> dict[str, Any]:
    """The labeled section as the fingerprint hashes it: in the flat form it had before its source kinds, so that
    labeled artifacts built before are found again. The fields of the kinds not chosen keep their defaults of
    then."""
    src = cfg.source
    flat: dict[str, Any] = {
        "source": src.kind, "train_path": None, "validation_path": None, "test_path": None, "has_header": True,
        "hub_name": None, "hub_config": None, "hub_revision": None, "hub_train_split": "train",
        "hub_validation_split": "validation", "hub_test_split": "test", "sample_train": 4000, "sample_eval": 500,
    }
    if src.kind == "files":
        flat.update(train_path=src.train, validation_path=src.validation, test_path=src.test,
                    has_header=src.has_header)
    elif src.kind == "hub":
        flat.update(hub_name=src.name, hub_config=src.config, hub_revision=src.revision,
                    hub_train_split=src.train_split, hub_validation_split=src.validation_split,
                    hub_test_split=src.test_split)
    elif src.kind == "sample":
        flat.update(sample_train=src.train_rows, sample_eval=src.eval_rows)
    # The label budget joined later: unset, it leaves the fingerprints of before unchanged.
    unset = {k for k in ("max_train_examples", "max_test_examples") if getattr(cfg, k) is None}
    if cfg.normalize == "none":  # so did normalisation
        unset.add("normalize")
    return {**cfg.model_dump(mode="json", exclude={"source", *unset}), **flat}


def _labeled_identity(cfg: LabeledConfig, seed: int, frames: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """What the labeled data is (for the fingerprint) and a function that reads it into splits."""
    need = [*cfg.text_columns, cfg.label_column]
    src = cfg.source
    if src.kind == "sample":
        return {"sample": sample_data.VERSION, "seed": seed, "train": src.train_rows, "eval": src.eval_rows}, None
    if src.kind == "files":
        paths = {s: getattr(src, s) for s in SPLITS if getattr(src, s)}
        return [(s, p, file_digest(Path(p), f"labeled.source.{s}")) for s, p in paths.items()], None
    if src.kind == "hub":
        available = hub_dataset_splits(src.name, src.config, src.revision, field="labeled.source")
        names = _hub_splits(src)
        chosen = {s: available[name] for s, name in names.items() if name and name in available}
        label = f"dataset {src.name!r}"
        if "train" not in chosen:
            raise DataError(f"{label}: no split {src.train_split!r} for training (labeled.source.train_split); "
                            f"splits present: {names_excerpt(available)}")
        for split, ds in chosen.items():
            if any(c not in ds.column_names for c in need):
                missing = next(c for c in need if c not in ds.column_names)
                raise DataError(f"{label} split {names[split]!r}: no column {missing!r}; "
                                f"columns present: {names_excerpt(ds.column_names)}")
        return [(s, names[s], ds._fingerprint) for s, ds in chosen.items()], chosen
    frames = dict(frames or {})
    if "train" not in frames:
        raise ConfigError("labeled.source.kind is 'dataframe': pass the DataFrames to ingest_labeled as "
                          "frames={'train': df, ...} (validation and test optional)")
    unknown = sorted(set(frames) - set(SPLITS))
    if unknown:
        raise ConfigError(f"labeled frames: unknown split(s) {unknown}; expected train, validation, test")
    for split, df in frames.items():
        present = [str(c) for c in df.columns]
        for column in need:
            if column not in present:
                raise DataError(f"DataFrame {split!r}: no column {column!r}; columns present: "
                                f"{names_excerpt(present)}")
    return [(s, frame_fingerprint(df, need)) for s, df in frames.items()], frames


def ingest_labeled(cfg: LabeledConfig, workspace: Workspace, seed: int = 0,
                   frames: Mapping[str, Any] | None = None) -> LabeledRef:
    """Read labeled text, map labels to ids (``id2label``), and fix train/validation/test splits.

    Splits the source provides are used as given; missing ones are split off train, stratified by label.
    ``frames`` maps split names to pandas DataFrames when ``cfg.source.kind`` is 'dataframe'.
    """
    identity, loaded = _labeled_identity(cfg, seed, frames)
    fp = fingerprint(STAGE_VERSION, identity, fingerprinted(cfg), seed)

    def build(out: Path) -> dict[str, Any]:
        need = [*cfg.text_columns, cfg.label_column]
        reader = _LabeledReader(cfg)
        splits: dict[str, list[dict]] = {}
        origin: dict[str, str] = {}
        src = cfg.source
        if src.kind == "sample":
            data = sample_data.sentiment_dataset(
                seed=seed, n_train=src.train_rows, n_validation=src.eval_rows, n_test=src.eval_rows
            )
            splits = {k: [{"text": normalize_text(r["text"], cfg.normalize), "label": r["label"]} for r in v]
                      for k, v in data.items()}
            origin = {k: "built-in sample" for k in splits}
        elif src.kind == "files":
            for split in SPLITS:
                p = getattr(src, split)
                if p:
                    splits[split] = _read_table(Path(p), cfg, src.has_header, reader, split)
                    origin[split] = p
        elif src.kind == "hub":
            reader.names = reader.names or _class_label_names(loaded["train"], cfg.label_column) or {}
            names = _hub_splits(src)
            for split, ds in loaded.items():
                origin[split] = f"dataset {src.name!r} split {names[split]!r}"
                splits[split] = reader.rows(origin[split], hub_rows(ds, need, origin[split]), split)
        else:
            for split, df in loaded.items():
                origin[split] = f"DataFrame {split!r}"
                splits[split] = reader.rows(origin[split], frame_rows(df, need, origin[split]), split)
        for split in list(splits):
            if not splits[split]:
                raise DataError(f"{origin[split]}: no rows with text")
        given = list(splits)
        budget = {}
        if cfg.max_train_examples is not None and len(splits["train"]) > cfg.max_train_examples:
            budget["train"] = {"rows": cfg.max_train_examples, "of": len(splits["train"])}
            splits["train"] = stratified_sample(splits["train"], cfg.max_train_examples, seed)
        n_rows = sum(len(v) for v in splits.values())
        splits = _complete_splits(splits, cfg, seed, origin.get("train", "train split"))
        # With split_groups, the other texts of a held-out group leave training (they would leak its answer).
        left_out = n_rows - sum(len(v) for v in splits.values())
        if cfg.max_test_examples is not None and len(splits["test"]) > cfg.max_test_examples:
            budget["test"] = {"rows": cfg.max_test_examples, "of": len(splits["test"])}
            splits["test"] = stratified_sample(splits["test"], cfg.max_test_examples, seed)
        how = _SPLIT_GROUPS[cfg.split_groups][2]
        for split in SPLITS:
            origin.setdefault(split, f"split off {origin.get('train', 'train')} ({how})")
        labels = list(cfg.labels) or sorted({r["label"] for r in splits["train"]}, key=_label_sort_key)
        if len(labels) < 2:
            raise DataError(f"{origin.get('train', 'train split')}: only one class ({excerpt(labels[0])}) in the "
                            "training labels; a classifier needs at least two")
        label2id = {lab: i for i, lab in enumerate(labels)}
        for name in ("validation", "test"):
            for r in splits[name]:
                if r["label"] not in label2id:
                    where = f"{origin[name]}: {r.get('_where', 'a row')}"
                    raise DataError(f"{where}: label {excerpt(r['label'])} does not occur in training labels "
                                    f"[{names_excerpt(labels, quote=True)}]")
        balance = {}
        for name, rows in splits.items():
            counts = Counter(r["label"] for r in rows)
            balance[name] = {lab: counts.get(lab, 0) for lab in labels}
            write_jsonl(out / f"{name}.jsonl", ({"text": r["text"], "label": label2id[r["label"]]} for r in rows))
        id2label = {str(i): lab for lab, i in label2id.items()}
        write_json(out / "labels.json", {"id2label": id2label})
        rows_count = {k: len(v) for k, v in splits.items()}
        write_json(out / DATA_REPORT, {"labels": labels, "class_balance": balance, "rows": rows_count,
                                       "origin": origin, "splits_given": given,
                                       "held_out_group_rows_left_out": left_out, "budget": budget,
                                       "held_out_texts_in_train": _texts_in_train(splits),
                                       "empty_text_dropped": dict(reader.empty),
                                       "normalize": cfg.normalize, "normalized_changed": dict(reader.normalized)})
        log.info("labeled data: %s", json.dumps(balance, ensure_ascii=False))
        return {"id2label": id2label, "class_balance": balance, "rows": rows_count, "splits_given": given}

    return workspace.materialize(LabeledRef, fp, build, stage="ingest_labeled", config=cfg)


def stratified_sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` of ``rows``, drawn with ``seed`` so that each label keeps its share (a plain draw where a label has
    too few rows to stratify), in their original order."""
    from sklearn.model_selection import train_test_split

    labels = [r["label"] for r in rows]
    counts = Counter(labels)
    stratify = labels if min(counts.values()) >= 2 and n >= len(counts) and len(rows) - n >= len(counts) else None
    keep, _ = train_test_split(range(len(rows)), train_size=n, random_state=seed, stratify=stratify)
    return [rows[i] for i in sorted(keep)]


def _complete_splits(splits: dict[str, list[dict]], cfg: LabeledConfig, seed: int,
                     origin: str) -> dict[str, list[dict]]:
    """Split whichever of validation and test were not given off train, stratified by label.

    The units drawn are rows, or groups of rows (``split_groups``: copies of one text, or the texts contained in
    one longer text): a held-out group contributes one text, its longest, and leaves training whole.
    """
    from sklearn.model_selection import train_test_split

    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits
    train = splits["train"]
    grouping, what, _ = _SPLIT_GROUPS[cfg.split_groups]
    groups = grouping([r["text"] for r in train])
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    units = list(members)
    fractions = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
    held_share = sum(fractions[s] for s in missing)
    labels = [train[u]["label"] for u in units]
    counts = Counter(labels)
    n_held = math.ceil(len(units) * held_share)
    # Stratify only when every class can appear in each part; a tiny class falls back to a plain split.
    stratify = labels if min(counts.values()) >= 2 * (len(missing) + 1) and n_held >= len(counts) else None
    need = len(missing) * (len(counts) if stratify else 1)
    if n_held < need or len(units) - n_held < len(counts):
        raise DataError(
            f"{origin}: {len(units)} {what} are too few to split off {' and '.join(missing)} "
            f"({held_share:.0%} of train) and keep every class in training; give more rows or the "
            f"{' and '.join(missing)} split(s) explicitly"
        )
    try:
        rest, held = train_test_split(units, test_size=held_share, random_state=seed, stratify=stratify)
        if len(missing) == 1:
            parts = {missing[0]: held}
        else:
            held_labels = [train[u]["label"] for u in held]
            strat2 = held_labels if stratify is not None and min(Counter(held_labels).values()) >= 2 else None
            share = fractions["test"] / held_share
            validation, test = train_test_split(held, test_size=share, random_state=seed, stratify=strat2)
            parts = {"validation": validation, "test": test}
    except ValueError as exc:  # sklearn's own checks, for what the sizes above do not foresee
        raise DataError(f"{origin}: cannot split off {' and '.join(missing)}: {library_message(exc)}") from None
    for name, part in parts.items():
        splits[name] = [train[u] for u in part]
    splits["train"] = [train[i] for u in rest for i in members[u]]
    return splits


def _texts_in_train(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Per held-out split, how many rows have a text that is also a training text: answers seen in training."""
    train = {_norm_text(r["text"]) for r in splits["train"]}
    return {name: sum(_norm_text(r["text"]) in train for r in splits[name]) for name in ("validation", "test")}


def _norm_text(text: str) -> str:
    return " ".join(text.split())


def duplicate_groups(texts: list[str]) -> list[int]:
    """For each text, the index of its first occurrence (whitespace runs and ends aside)."""
    first: dict[str, int] = {}
    return [first.setdefault(_norm_text(t), i) for i, t in enumerate(texts)]


def containment_groups(texts: list[str]) -> list[int]:
    """For each text, the index of the longest text that contains it at word boundaries (its own when none).

    Longest first, each text joins the lowest-index group root containing it, else starts a group; candidate
    roots come from an inverted index on the text's two rarest words, so SST-2's 67k phrases group in about
    2 s. Deterministic: ties in length keep input order.
    """
    norm = [_norm_text(t) for t in texts]
    order = sorted(range(len(norm)), key=lambda i: (-len(norm[i]), i))
    group = list(range(len(norm)))
    index: dict[str, set[int]] = {}
    for i in order:
        words = set(norm[i].split())
        rare = sorted(words, key=lambda w: (len(index.get(w, ())), w))[:2]
        candidates = set.intersection(*(index.get(w, set()) for w in rare)) if rare else set()
        padded = f" {norm[i]} "
        root = next((r for r in sorted(candidates) if padded in f" {norm[r]} "), None)
        if root is None:
            for w in words:
                index.setdefault(w, set()).add(i)
        else:
            group[i] = root
    return group


# split_groups -> (grouping of the training texts, what a unit is, how the split is named in the report)
_SPLIT_GROUPS = {
    "none": (lambda texts: list(range(len(texts))), "rows", "stratified"),
    "duplicate_text": (duplicate_groups, "distinct texts", "duplicates together, stratified"),
    "contained_text": (containment_groups, "groups of contained texts", "grouped by containing text, stratified"),
}


def load_split(ref: CorpusRef | LabeledRef, split: str) -> list[dict[str, Any]]:
    return read_jsonl(ref.dir / f"{split}.jsonl")


def load_id2label(ref: LabeledRef) -> dict[int, str]:
    data = json.loads((ref.dir / "labels.json").read_text())
    return {int(k): v for k, v in data["id2label"].items()}
