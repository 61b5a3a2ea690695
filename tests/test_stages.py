"""Tests for the plain stage functions in ``tasks/`` on tiny configs (no Prefect, no MLflow)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, training_log

from tasks import evaluate, finetune, ingest, metrics, pretrain, tokenize
from tasks.artifacts import MANIFEST, TokensRef, Workspace
from tasks.config import (
    CorpusConfig,
    FilesSource,
    LabeledConfig,
    LabeledFiles,
    PipelineConfig,
    TokenizerConfig,
    load_config,
)
from tasks.errors import ConfigError, DataError
from tasks.training import STATE_FILE, ShuffledIndices, list_checkpoints, seed_everything, set_threads, train


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    set_threads(1)


def _paragraphs(n: int, start: int = 0) -> list[str]:
    topics = ["weather", "market", "harbour", "library", "garden", "station", "bakery", "river"]
    return [f"Paragraph {i} is about the {topics[i % len(topics)]}.\nIt has a second line, number {i * 7}."
            for i in range(start, start + n)]


def _files_corpus(path: Path, text_unit: str = "paragraph", **kw) -> CorpusConfig:
    return CorpusConfig(sources=[FilesSource(paths=[str(path)], text_unit=text_unit)], **kw)


def _texts(ref, split: str) -> list[str]:
    return [r["text"] for r in ingest.load_split(ref, split)]


class Chain:
    """corpus -> tokenizer -> tokens on the tiny config, built once per module."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.ws = Workspace(cfg.workspace)
        self.corpus = ingest.ingest_corpus(cfg.corpus, self.ws, cfg.seed)
        self.tokenizer = tokenize.train_tokenizer(self.corpus, cfg.tokenizer, self.ws)
        self.tokens = tokenize.tokenize_corpus(self.corpus, self.tokenizer, self.ws)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    return Chain(tiny_config(tmp_path_factory.mktemp("chain") / "ws"))


LEARN_STEPS = 200


@pytest.fixture(scope="module")
def learned_lm(chain: Chain):
    """A tiny LM trained long enough to beat the unigram baseline (a few seconds on one thread)."""
    cfg = load_config(None, [f"pretrain.max_steps={LEARN_STEPS}", "pretrain.log_every=20", "pretrain.eval_every=50",
                             "pretrain.checkpoint_every=100", "pretrain.block_size=32", "pretrain.batch_size=8",
                             "pretrain.warmup_steps=10"]).pretrain
    ref = pretrain.pretrain(chain.tokens, chain.tokenizer, chain.cfg.model, cfg, chain.ws, chain.cfg.seed)
    return cfg, ref


# ================================================================ ingest_corpus


def test_ingest_corpus_writes_train_and_validation_jsonl(tiny_cfg) -> None:
    ws = Workspace(tiny_cfg.workspace)
    ref = ingest.ingest_corpus(tiny_cfg.corpus, ws, tiny_cfg.seed)
    assert ref.dir == ws.dir("corpora", ref.fingerprint)
    assert ref.reused is False
    assert (ref.dir / MANIFEST).is_file()
    train, val = _texts(ref, "train"), _texts(ref, "validation")
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
    unique = _paragraphs(40)
    # Five duplicates (one differing only by surrounding whitespace), extra blank lines and a
    # whitespace-only "paragraph" between blocks, plus a too-short one.
    text = "\n\n".join(unique + unique[:4] + ["   " + unique[4] + "  "]) + "\n\n\n   \n\nok\n\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    ref = ingest.ingest_corpus(_files_corpus(path, validation_fraction=0.3, min_chars=5), Workspace(tmp_path / "ws"))
    meta = ref.meta
    assert meta["documents_read"] == 46
    assert meta["empty_dropped"] == 0  # whitespace-only lines separate paragraphs, they are not documents
    assert meta["short_dropped"] == 1
    assert meta["duplicates_dropped"] == 5
    train, val = _texts(ref, "train"), _texts(ref, "validation")
    assert meta["train_documents"] + meta["validation_documents"] == 40
    assert sorted(train + val) == sorted(unique)


def test_ingest_files_line_unit_counts_empty_lines(tmp_path: Path) -> None:
    lines = [f"Line number {i} about the weather." for i in range(30)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines[:10] + ["", "   "] + lines + [lines[0]]) + "\n", encoding="utf-8")
    ref = ingest.ingest_corpus(_files_corpus(path, text_unit="line", validation_fraction=0.3),
                               Workspace(tmp_path / "ws"))
    assert ref.meta["documents_read"] == 43
    assert ref.meta["empty_dropped"] == 2
    assert ref.meta["duplicates_dropped"] == 11
    assert sorted(_texts(ref, "train") + _texts(ref, "validation")) == sorted(lines)


def test_split_is_stable_when_documents_are_appended(tmp_path: Path) -> None:
    path = tmp_path / "grow.txt"
    path.write_text("\n\n".join(_paragraphs(40)), encoding="utf-8")
    cfg = _files_corpus(path, validation_fraction=0.3)
    ws = Workspace(tmp_path / "ws")
    before = ingest.ingest_corpus(cfg, ws)
    path.write_text("\n\n".join(_paragraphs(40) + _paragraphs(40, start=1000)), encoding="utf-8")
    after = ingest.ingest_corpus(cfg, ws)
    assert after.fingerprint != before.fingerprint  # new content, new artifact
    assert after.reused is False
    assert set(_texts(before, "train")) <= set(_texts(after, "train"))
    assert set(_texts(before, "validation")) <= set(_texts(after, "validation"))
    assert after.meta["train_documents"] + after.meta["validation_documents"] == 80
    # Order of documents in the file does not matter either.
    path.write_text("\n\n".join(list(reversed(_paragraphs(40)))), encoding="utf-8")
    reordered = ingest.ingest_corpus(cfg, Workspace(tmp_path / "ws2"))
    assert set(_texts(reordered, "validation")) == set(_texts(before, "validation"))


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(_paragraphs(20)), encoding="utf-8")
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
        ingest.ingest_corpus(_files_corpus(tmp_path / "nothing-here*.txt"),
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


# ================================================================ ingest_labeled


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
    splits = {s: _texts(ref, s) for s in ("train", "validation", "test")}
    assert sorted(t for texts in splits.values() for t in texts) == sorted(r["text"] for r in rows)
    # Deterministic for a seed.
    again = ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(path))),
                                  Workspace(tmp_path / "ws2"), seed=3)
    assert _texts(again, "test") == splits["test"]


# ================================================================ tokenizer and tokens


def test_trained_tokenizer_loads_with_auto_tokenizer(chain: Chain) -> None:
    from transformers import AutoTokenizer

    ref = chain.tokenizer
    tok = AutoTokenizer.from_pretrained(ref.path)
    assert tok.eos_token == chain.cfg.tokenizer.eos_token == "<|endoftext|>"
    assert tok.pad_token == chain.cfg.tokenizer.pad_token == "<|pad|>"
    assert tok.eos_token_id == ref.meta["eos_id"] and tok.pad_token_id == ref.meta["pad_id"]
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) == ref.meta["vocab_size"] == chain.cfg.tokenizer.vocab_size
    text = "The weather at the market was wonderful."
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text


def test_tokenizer_training_is_deterministic(chain: Chain, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "other")
    corpus = ingest.ingest_corpus(chain.cfg.corpus, ws, chain.cfg.seed)
    ref = tokenize.train_tokenizer(corpus, chain.cfg.tokenizer, ws)
    assert ref.reused is False and ref.path != chain.tokenizer.path
    assert ref.fingerprint == chain.tokenizer.fingerprint
    assert (ref.dir / "tokenizer.json").read_bytes() == (chain.tokenizer.dir / "tokenizer.json").read_bytes()


def test_vocab_below_byte_alphabet_is_a_config_error(chain: Chain) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size"):
        load_config(None, ["tokenizer.vocab_size=257"])
    # The stage checks too, for configs built without validation.
    small = TokenizerConfig.model_construct(**{**chain.cfg.tokenizer.model_dump(), "vocab_size": 257})
    with pytest.raises(ConfigError) as info:
        tokenize.train_tokenizer(chain.corpus, small, chain.ws)
    assert "tokenizer.vocab_size=257" in str(info.value) and "256" in str(info.value)


def _decode_docs(tokens: np.ndarray, tokenizer_dir: Path, eos: int) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    arr = np.asarray(tokens)
    assert arr[-1] == eos
    ends = np.flatnonzero(arr == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(arr[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends, strict=True)]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_token_file_decodes_back_to_documents(chain: Chain, split: str) -> None:
    ref = chain.tokens
    arr = tokenize.open_tokens(ref, split, verify=True)
    assert arr.dtype == np.uint16 and ref.meta["dtype"] == "uint16"
    info = ref.meta["splits"][split]
    assert len(arr) == info["tokens"]
    assert int(arr.max()) < ref.meta["vocab_size"]
    docs = _texts(chain.corpus, split)
    assert info["documents"] == len(docs)
    assert _decode_docs(arr, chain.tokenizer.dir, ref.meta["eos_id"]) == docs


def test_corrupted_token_file_is_detected(chain: Chain, tmp_path: Path) -> None:
    copy = tmp_path / "tokens-copy"
    shutil.copytree(chain.tokens.dir, copy)
    data = bytearray((copy / "train.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "train.bin").write_bytes(bytes(data))
    bad = chain.tokens.model_copy(update={"path": str(copy)})
    assert isinstance(bad, TokensRef) and bad.dir == copy
    with pytest.raises(DataError) as info:
        tokenize.open_tokens(bad, "train", verify=True)
    assert "checksum" in str(info.value) and str(copy / "train.bin") in str(info.value)
    # Without verification it still opens; the untouched split and the original still verify.
    assert len(tokenize.open_tokens(bad, "train")) == chain.tokens.meta["splits"]["train"]["tokens"]
    tokenize.open_tokens(bad, "validation", verify=True)
    tokenize.open_tokens(chain.tokens, "train", verify=True)


# ================================================================ training engine


def test_pretrain_learns(chain: Chain, learned_lm) -> None:
    cfg, ref = learned_lm
    log = training_log(ref)
    assert ref.meta["steps"] == LEARN_STEPS and ref.meta["resumed_from"] is None
    assert ref.meta["tokens_seen"] == LEARN_STEPS * cfg.batch_size * cfg.block_size
    assert [e["step"] for e in log["evals"]] == [50, 100, 150, 200]
    report = evaluate.evaluate_lm(ref, chain.tokens, chain.cfg.evaluate, chain.ws, cfg.block_size).load()
    first_loss = log["history"][0]["loss"]
    initial = float(np.log(chain.tokens.meta["vocab_size"]))  # a fresh model is close to uniform
    assert first_loss > report["unigram_loss"]
    assert report["val_loss"] < report["unigram_loss"] - 0.3
    assert report["val_loss"] < initial - 1.0
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]
    assert report["val_ppl"] == pytest.approx(np.exp(report["val_loss"]))
    assert len(report["samples"]) == chain.cfg.evaluate.samples
    # The resumable work directory is gone once the artifact exists.
    assert not chain.ws.work_dir("checkpoints", ref.fingerprint).exists()


def test_pretrain_resumes_exactly_after_a_crash(chain: Chain, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    overrides = ("pretrain.max_steps=20", "pretrain.checkpoint_every=5")
    cfg_a = tiny_config(Path(chain.cfg.workspace), *overrides)
    full = pretrain.pretrain(chain.tokens, chain.tokenizer, cfg_a.model, cfg_a.pretrain, chain.ws, cfg_a.seed)
    assert full.meta["resumed_from"] is None and full.meta["steps"] == 20

    # Second workspace; log every step so the callback sees step 11, after checkpoint 10 was written.
    cfg_b = tiny_config(tmp_path / "ws", *overrides, "pretrain.log_every=1")
    b = Chain(cfg_b)
    fp = pretrain.pretrain_fingerprint(b.tokens, b.tokenizer, cfg_b.model, cfg_b.pretrain, cfg_b.seed)
    assert fp == full.fingerprint  # log_every only observes; the crashed run is the same artifact
    work_dir = b.ws.work_dir("checkpoints", fp)

    # What pretrain()'s build does, up to a crash at step 11.
    seed_everything(cfg_b.seed)
    model = pretrain.build_lm(cfg_b.model, b.tokens.meta["vocab_size"], b.tokenizer.meta["eos_id"],
                              b.tokenizer.meta["pad_id"])
    source = pretrain.BlockBatches(tokenize.open_tokens(b.tokens, "train"), cfg_b.pretrain.block_size,
                                   cfg_b.pretrain.batch_size, cfg_b.seed)
    val = tokenize.open_tokens(b.tokens, "validation")

    def evaluate_fn(m):
        loss, _ = pretrain.lm_eval_loss(m, val, cfg_b.pretrain.block_size, cfg_b.pretrain.batch_size,
                                        cfg_b.pretrain.eval_batches)
        return {"val_loss": loss}

    class Crash(Exception):
        pass

    seen: list[int] = []

    def crash_at_11(step: int, total: int, row: dict) -> None:
        seen.append(step)
        if step == 11:
            raise Crash

    with pytest.raises(Crash):
        train(model, source, cfg_b.pretrain, work_dir, loss_fn=pretrain.lm_loss, evaluate=evaluate_fn,
              tokens_in=lambda batch: int(batch["targets"].numel()), on_progress=crash_at_11)
    assert seen == list(range(1, 12))
    assert [p.name for p in list_checkpoints(work_dir)] == ["step-00000005", "step-00000010"]
    assert not b.ws.is_complete(b.ws.dir("checkpoints", fp))

    resumed = pretrain.pretrain(b.tokens, b.tokenizer, cfg_b.model, cfg_b.pretrain, b.ws, cfg_b.seed)
    assert resumed.reused is False
    assert resumed.meta["resumed_from"] == 10
    assert resumed.meta["steps"] == 20 and resumed.meta["tokens_seen"] == full.meta["tokens_seen"]
    assert resumed.meta["val_loss"] == full.meta["val_loss"]
    expected = load_file(str(full.dir / "model.safetensors"))
    got = load_file(str(resumed.dir / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not work_dir.exists()


def test_list_checkpoints_ignores_partial_ones(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path / "absent") == []
    for name, complete in [("step-00000005", True), ("step-00000010.tmp-xyz", True), ("step-00000015", False),
                           ("step-00000100", True), ("step-00000020", True), ("other", True)]:
        d = tmp_path / name
        d.mkdir()
        if complete:
            (d / STATE_FILE).write_text("{}")
    (tmp_path / "step-00000030").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000020", "step-00000100"]


def test_shuffled_indices_cover_each_epoch_and_restore(tmp_path: Path) -> None:
    a = ShuffledIndices(10, 4, seed=1)
    drawn = np.concatenate([a.next_indices() for _ in range(5)])  # 20 indices = two full epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert not np.array_equal(drawn[:10], drawn[10:])
    state = a.state_dict()
    b = ShuffledIndices(10, 4, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(4):
        assert np.array_equal(a.next_indices(), b.next_indices())


# ================================================================ finetune and evaluation


def test_finetune_and_evaluate_classifier_report(chain: Chain, learned_lm) -> None:
    _, lm = learned_lm
    cfg = chain.cfg
    labeled = ingest.ingest_labeled(cfg.labeled, chain.ws, cfg.seed)
    clf = finetune.finetune(lm, labeled, cfg.finetune, chain.ws, cfg.seed)
    assert clf.meta["steps"] == cfg.finetune.max_steps and clf.meta["task"] == "text-classification"
    assert clf.meta["id2label"] == {"0": "negative", "1": "positive"}
    ref = evaluate.evaluate_classifier(clf, labeled, cfg.evaluate, chain.ws, cfg.finetune.max_length, cfg.seed)
    report = ref.load()
    n_test = labeled.meta["rows"]["test"]
    assert report["labels"] == ["negative", "positive"]
    assert report["test_rows"] == len(report["predictions"]) == n_test == cfg.labeled.source.eval_rows
    model = report["model"]
    assert 0.0 <= model["accuracy"] <= 1.0 and 0.0 <= model["macro_f1"] <= 1.0
    assert sum(map(sum, model["confusion_matrix"])) == n_test
    y_test = np.array([r["label"] for r in ingest.load_split(labeled, "test")])
    assert metrics.classification_metrics(y_test, np.array(report["predictions"]), report["labels"]) == model
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"}
    assert report["baselines"]["majority"]["accuracy"] == pytest.approx(0.5)  # the sample test set is balanced
    assert report["baselines"]["tfidf_logreg"]["accuracy"] > 0.5
    assert ref.meta == {"accuracy": model["accuracy"], "macro_f1": model["macro_f1"],
                        "tfidf_logreg_accuracy": report["baselines"]["tfidf_logreg"]["accuracy"],
                        "majority_accuracy": report["baselines"]["majority"]["accuracy"]}
    # The classifier artifact loads as a transformers sequence classifier with the labels attached.
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(clf.path)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed: int) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    k = 4
    y_true = rng.integers(0, k, size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, k, size=200))
    y_pred[y_pred == 3] = 2  # class 3 is never predicted: its precision is 0 by convention
    labels = ["a", "b", "c", "d"]
    m = metrics.classification_metrics(y_true, y_pred, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=range(k),
                                                   zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(k)).tolist()
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(k), zero_division=0)
    for i, lab in enumerate(labels):
        assert m["per_class"][lab] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})


def test_constant_prediction_scores_the_majority_baseline() -> None:
    train_y = np.array([0] * 3 + [1] * 7 + [2] * 2)
    test_y = np.array([1, 1, 0, 2, 1, 0, 1, 2, 2, 1])
    words = ["red", "green", "blue"]
    train_texts = [f"{words[y]} thing number {i}" for i, y in enumerate(train_y)]
    test_texts = [f"{words[y]} item {i}" for i, y in enumerate(test_y)]
    labels = ["r", "g", "b"]
    proba = evaluate.baseline_predictions(train_texts, train_y, test_texts, len(labels), seed=0)
    base = {name: metrics.classification_metrics(test_y, p.argmax(axis=1), labels) for name, p in proba.items()}
    constant = metrics.classification_metrics(test_y, np.full_like(test_y, 1), labels)
    assert base["majority"] == constant
    assert constant["accuracy"] == base["majority"]["accuracy"] == 0.5
    assert base["tfidf_logreg"]["accuracy"] == 1.0  # the colour word gives the label away


# ================================================================ input edge cases


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


def test_literal_path_with_brackets(tmp_path: Path) -> None:
    path = tmp_path / "notes[1].txt"
    path.write_text("\n\n".join(_paragraphs(40)), encoding="utf-8")
    ref = ingest.ingest_corpus(_files_corpus(path, validation_fraction=0.3), Workspace(tmp_path / "ws"))
    assert ref.meta["documents_read"] == 40


def test_literal_eos_text_does_not_split_a_document(chain: Chain, tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(_paragraphs(40) + ["Before <|endoftext|> after, still one document."]),
                    encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    corpus = ingest.ingest_corpus(_files_corpus(path, validation_fraction=0.3), ws)
    tokens = tokenize.tokenize_corpus(corpus, chain.tokenizer, ws)
    for split in ("train", "validation"):
        arr = tokenize.open_tokens(tokens, split)
        assert _decode_docs(arr, chain.tokenizer.dir, tokens.meta["eos_id"]) == _texts(corpus, split)
