"""The tokenizer (trained byte-level BPE, or an existing one), and tokenization into packed token files.

Tokenizing is three steps, so that a flow can run the middle one as one task per shard:

1. ``plan_tokenize``: cut each split's JSONL into shards, line-aligned byte ranges of about
   ``tokenizer.shard_mb`` each (nothing is read but the few bytes around each cut).
2. ``encode_shard``: encode one shard's documents in batches, EOS after each, into
   ``<tokens>/<fingerprint>.work/<split>-NNNNN.bin`` (written aside and renamed, with a JSON sidecar
   holding its counts and checksum). A shard already there is reused, so a retried or second run
   never encodes it twice.
3. ``pack_tokens``: concatenate the shards of each split into one flat token file ``<split>.bin``
   (uint16, or uint32 when the vocabulary exceeds 65,536 ids), with a document index
   ``<split>.idx.npy`` (token offset where each document starts, then the total) and SHA-256
   checksums of the file and of every shard. The result does not depend on the shard size.

Encoding is exactly ``tokenizer.encode(text, add_special_tokens=False)`` with special-token text
treated as plain text (a document that contains the literal text '<|endoftext|>' does not get a
false document boundary). For a GPT-2-style byte-level BPE (ByteLevel pre-tokenizer with its split
pattern, alone or after the ``cjk`` split's, no normaliser, only special added tokens), documents take a faster
path (``tasks.encoding``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.artifacts import (
    CorpusRef,
    TokenizerRef,
    TokensRef,
    Workspace,
    file_sha256,
    fingerprint,
    write_json,
)
from tasks.config import TokenizerConfig, is_local
from tasks.confine import staged
from tasks.encoding import CJK_CHAR, encoder_for
from tasks.errors import ConfigError, DataError
from tasks.redact import LIBRARY_MESSAGE_CHARS, excerpt

log = logging.getLogger("llmpipe")

STAGE_VERSION = "tokenize-2"
TOKENIZER_VERSION = "tokenizer-2"
BYTE_ALPHABET = 256
BATCH_CHARS = 1 << 20  # characters of text encoded per batch: bounds memory, whatever the shard size
EXECUTION_ONLY = {"shard_mb"}  # tokenizer settings that change how tokenization runs, not the tokenizer
_COPY_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------- tokenizer


def _pretrained(cfg: TokenizerConfig):
    from transformers import AutoTokenizer

    # A local folder loads from confine.staged: for a run created through the API, a copy of its checked files.
    source = str(staged(cfg.pretrained, "tokenizer.pretrained")) if is_local(cfg.pretrained) else cfg.pretrained
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer.pretrained: cannot load {cfg.pretrained!r} "
                          f"({excerpt(exc, LIBRARY_MESSAGE_CHARS, quote=False)})") from None
    if not tok.is_fast:
        raise ConfigError(f"tokenizer.pretrained: {cfg.pretrained!r} has no fast (Rust) tokenizer; llmpipe needs one")
    return tok


def tokenizer_settings(cfg: TokenizerConfig) -> dict[str, Any]:
    """The settings that make the tokenizer: its fingerprint and the artifact's recorded config. ``split`` joined
    later: left at gpt2, it leaves the fingerprints of before unchanged (the artifact's meta records it either way)."""
    return cfg.model_dump(exclude=EXECUTION_ONLY | ({"split"} if cfg.split == "gpt2" else set()))


def pre_tokenizer(split: str) -> Any:
    """The trained tokenizer's pre-tokenizer: GPT-2's ByteLevel split, or (``cjk``) each character of
    ``tasks.encoding.CJK_RANGES`` isolated first, then the ByteLevel split on the text between them."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split == "gpt2":
        return byte_level
    if split == "cjk":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CJK_CHAR), behavior="isolated"), byte_level])
    raise ConfigError(f"tokenizer.split={split!r}: one of gpt2, cjk")


def train_tokenizer(corpus: CorpusRef, cfg: TokenizerConfig, workspace: Workspace) -> TokenizerRef:
    """Train a byte-level BPE on the corpus' training split, or take ``cfg.pretrained``.

    Either way the artifact is a ``save_pretrained`` folder that ``AutoTokenizer.from_pretrained`` loads.
    """
    settings = tokenizer_settings(cfg)
    if cfg.pretrained:
        tok = _pretrained(cfg)
        # Named by content: the same tokenizer from another folder or hub mirror is the same artifact.
        fp = fingerprint(TOKENIZER_VERSION, "pretrained", tok.backend_tokenizer.to_str(), tok.special_tokens_map,
                         {k: v for k, v in settings.items() if k != "pretrained"})
        return workspace.materialize(TokenizerRef, fp, lambda out: _save_pretrained(tok, cfg, out),
                                     stage="train_tokenizer", config=settings)
    specials = list(dict.fromkeys([cfg.eos_token, cfg.pad_token, *cfg.special_tokens]))
    if cfg.vocab_size < BYTE_ALPHABET + len(specials):
        raise ConfigError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: byte-level BPE needs {BYTE_ALPHABET} byte tokens "
            f"plus {len(specials)} special tokens ({', '.join(specials)})"
        )
    fp = fingerprint(TOKENIZER_VERSION, corpus.fingerprint, settings)

    def build(out: Path) -> dict[str, Any]:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizer(cfg.split)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_texts(corpus.dir / "train.jsonl"), trainer=trainer,
                                length=corpus.meta.get("train_documents"))
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token=cfg.eos_token,
            bos_token=cfg.eos_token,
            unk_token=cfg.eos_token,
            pad_token=cfg.pad_token,
            additional_special_tokens=list(cfg.special_tokens) or None,
        )
        fast.padding_side = "right"
        fast.save_pretrained(str(out))
        return {"vocab_size": tok.get_vocab_size(), "eos_id": tok.token_to_id(cfg.eos_token),
                "pad_id": tok.token_to_id(cfg.pad_token), "trained": True, "split": cfg.split}

    return workspace.materialize(TokenizerRef, fp, build, stage="train_tokenizer", config=settings,
                                 inputs={"corpus": corpus.fingerprint})


def _save_pretrained(tok: Any, cfg: TokenizerConfig, out: Path) -> dict[str, Any]:
    """An existing tokenizer, given an EOS and a padding token when it lacks them, saved into ``out``."""
    vocab = tok.get_vocab()
    if tok.eos_token is None:
        if cfg.eos_token not in vocab:
            raise ConfigError(f"tokenizer.pretrained: {cfg.pretrained!r} has no EOS token and no "
                              f"tokenizer.eos_token={cfg.eos_token!r} in its vocabulary")
        tok.eos_token = cfg.eos_token
    added: dict[str, Any] = {}
    if tok.pad_token is None:
        added["pad_token"] = cfg.pad_token
    extra = [t for t in cfg.special_tokens if t not in vocab]
    if extra:
        added["additional_special_tokens"] = extra
    if added:
        tok.add_special_tokens(added)
    tok.padding_side = "right"
    tok.save_pretrained(str(out))
    return {"vocab_size": len(tok), "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "trained": False,
            "pretrained": cfg.pretrained}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------- plan, shards, pack


class ShardSpec(BaseModel):
    """One shard to encode: a line-aligned byte range of a split's JSONL file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str
    split: str
    index: int
    corpus_file: str
    start: int
    end: int
    tokenizer_file: str
    eos_id: int
    dtype: str
    work_dir: str
    artifact_dir: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


class ShardResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    split: str
    index: int
    file: str
    tokens: int
    documents: int
    bytes_text: int
    sha256: str
    skipped: bool = False  # the tokens artifact was already complete; nothing was written


class TokenizePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str
    corpus: CorpusRef
    tokenizer: TokenizerRef
    splits: list[str]
    shards: list[ShardSpec]
    done: TokensRef | None = None  # the artifact exists already: nothing to do


def tokens_fingerprint(corpus: CorpusRef, tokenizer: TokenizerRef) -> str:
    return fingerprint(STAGE_VERSION, corpus.fingerprint, tokenizer.fingerprint)


def _line_aligned_ranges(path: Path, target: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    starts = [0]
    with open(path, "rb") as f:
        while starts[-1] + target < size:
            f.seek(starts[-1] + target)
            f.readline()
            if f.tell() >= size:
                break
            starts.append(f.tell())
    return list(zip(starts, [*starts[1:], size], strict=True))


def _reuse(workspace: Workspace, fp: str) -> TokensRef:
    def never(out: Path) -> dict[str, Any]:
        raise RuntimeError(f"tokens/{fp} vanished while it was being reused; run the stage again")

    return workspace.materialize(TokensRef, fp, never, stage="tokenize")


def plan_tokenize(corpus: CorpusRef, tokenizer: TokenizerRef, workspace: Workspace,
                  shard_mb: float = 16.0) -> TokenizePlan:
    """The shards to encode, or the finished artifact when it exists."""
    fp = tokens_fingerprint(corpus, tokenizer)
    splits = list(corpus.meta.get("splits") or ["train", "validation"])
    if workspace.intact("tokens", fp, "tokenize"):
        return TokenizePlan(fingerprint=fp, corpus=corpus, tokenizer=tokenizer, splits=splits, shards=[],
                            done=_reuse(workspace, fp))
    dtype = token_dtype(int(tokenizer.meta["vocab_size"])).name
    target = max(1, int(shard_mb * 2**20))
    shards = []
    for split in splits:
        path = corpus.dir / f"{split}.jsonl"
        for index, (start, end) in enumerate(_line_aligned_ranges(path, target)):
            shards.append(ShardSpec(
                fingerprint=fp, split=split, index=index, corpus_file=str(path), start=start, end=end,
                tokenizer_file=str(tokenizer.dir / "tokenizer.json"), eos_id=int(tokenizer.meta["eos_id"]),
                dtype=dtype, work_dir=str(workspace.work_dir("tokens", fp)),
                artifact_dir=str(workspace.dir("tokens", fp)),
            ))
    log.info("tokenize: %d shards of about %.3g MB (%s)", len(shards), shard_mb,
             ", ".join(f"{s}: {sum(x.split == s for x in shards)}" for s in splits))
    return TokenizePlan(fingerprint=fp, corpus=corpus, tokenizer=tokenizer, splits=splits, shards=shards)


def _documents(spec: ShardSpec) -> Iterator[list[str]]:
    """The shard's documents in batches of about ``BATCH_CHARS`` characters."""
    lines: list[bytes] = []
    size = 0
    with open(spec.corpus_file, "rb") as f:
        f.seek(spec.start)
        pos = spec.start
        for line in f:
            if pos >= spec.end:
                break
            pos += len(line)
            lines.append(line)
            size += len(line)
            if size >= BATCH_CHARS:
                yield _parse_rows(spec, lines, pos - size)
                lines, size = [], 0
    if lines:
        yield _parse_rows(spec, lines, pos - size)


def _parse_rows(spec: ShardSpec, lines: list[bytes], offset: int) -> list[str]:
    """The texts of ``{"text": ...}`` JSON lines, parsed as one array (far faster than line by line)."""
    try:
        return [row["text"] for row in json.loads(b"[" + b",".join(lines) + b"]")]
    except (json.JSONDecodeError, KeyError, TypeError):
        for line in lines:  # find the bad line to name it
            try:
                json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{spec.corpus_file}: byte offset {offset}: not a corpus row ({{\"text\": ...}}); "
                                "the corpus artifact is damaged (delete it to rebuild)") from None
            offset += len(line)
        raise


def encode_shard(spec: ShardSpec) -> ShardResult:
    """Encode one shard into ``<work_dir>/<split>-NNNNN.bin``; reuse it when a complete one is there already."""
    if Workspace.is_complete(Path(spec.artifact_dir)):
        return ShardResult(split=spec.split, index=spec.index, file="", tokens=0, documents=0, bytes_text=0,
                           sha256="", skipped=True)
    work = Path(spec.work_dir)
    out, sidecar = work / f"{spec.name}.bin", work / f"{spec.name}.json"
    if sidecar.is_file() and out.is_file():
        done = ShardResult.model_validate_json(sidecar.read_text())
        if out.stat().st_size == done.tokens * np.dtype(spec.dtype).itemsize:
            return done
    try:
        return _write_shard(spec, work, out, sidecar)
    except FileNotFoundError:
        # The work folder went away under us: another run packed the artifact and cleaned up.
        if Workspace.is_complete(Path(spec.artifact_dir)):
            return encode_shard(spec)
        raise


def _write_shard(spec: ShardSpec, work: Path, out: Path, sidecar: Path) -> ShardResult:
    work.mkdir(parents=True, exist_ok=True)
    encoder = encoder_for(spec.tokenizer_file, spec.eos_id)
    dtype = np.dtype(spec.dtype)
    tag = uuid.uuid4().hex[:8]
    tmp, tmp_docs = work / f".{spec.name}.bin.tmp-{tag}", work / f".{spec.name}.docs.tmp-{tag}"
    h = hashlib.sha256()
    n_tokens = n_bytes = 0
    lengths: list[np.ndarray] = []
    try:
        with open(tmp, "wb") as f:
            for texts in _documents(spec):
                ids, lens = encoder.encode(texts)
                data = ids.astype(dtype).tobytes()
                f.write(data)
                h.update(data)
                n_tokens += len(ids)
                n_bytes += sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
                lengths.append(lens)
        with open(tmp_docs, "wb") as f:
            np.save(f, np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64))
        os.replace(tmp_docs, work / f"{spec.name}.docs.npy")
        os.replace(tmp, out)
    except BaseException:
        for p in (tmp, tmp_docs):
            p.unlink(missing_ok=True)
        raise
    result = ShardResult(split=spec.split, index=spec.index, file=str(out), tokens=n_tokens,
                         documents=int(sum(len(x) for x in lengths)), bytes_text=n_bytes, sha256=h.hexdigest())
    write_json(sidecar, result.model_dump())
    return result


def pack_tokens(plan: TokenizePlan, results: list[ShardResult], workspace: Workspace) -> TokensRef:
    """Concatenate each split's shards into ``<split>.bin`` with its document index; the tokens artifact."""
    if plan.done is not None:
        return plan.done
    fp = plan.fingerprint
    expected = {(s.split, s.index) for s in plan.shards}

    def build(out: Path) -> dict[str, Any]:
        got = {(r.split, r.index): r for r in results if not r.skipped}
        missing = sorted(expected - set(got))
        if missing:
            raise RuntimeError(f"tokenize: shards {missing} were not encoded; run the stage again")
        splits: dict[str, Any] = {}
        for split in plan.splits:
            shards = [got[(split, i)] for i in range(sum(1 for s in plan.shards if s.split == split))]
            splits[split] = _pack_split(split, shards, out)
            log.info("tokenized %s: %d documents -> %d tokens in %d shards", split, splits[split]["documents"],
                     splits[split]["tokens"], len(shards))
        vocab = int(plan.tokenizer.meta["vocab_size"])
        return {"dtype": token_dtype(vocab).name, "vocab_size": vocab, "eos_id": int(plan.tokenizer.meta["eos_id"]),
                "splits": splits}

    ref = workspace.materialize(TokensRef, fp, build, stage="tokenize", inputs={
        "corpus": plan.corpus.fingerprint, "tokenizer": plan.tokenizer.fingerprint})
    shutil.rmtree(workspace.work_dir("tokens", fp), ignore_errors=True)
    return ref


def _pack_split(split: str, shards: list[ShardResult], out: Path) -> dict[str, Any]:
    path = out / f"{split}.bin"
    whole = hashlib.sha256()
    lengths = []
    with open(path, "wb") as f:
        for r in shards:
            part = hashlib.sha256()
            with open(r.file, "rb") as src:
                while block := src.read(_COPY_CHUNK):
                    f.write(block)
                    part.update(block)
                    whole.update(block)
            if part.hexdigest() != r.sha256:
                raise DataError(f"{r.file}: checksum mismatch; the shard changed after it was written")
            lengths.append(np.load(Path(r.file).with_suffix(".docs.npy")))
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    index = out / f"{split}.idx.npy"
    with open(index, "wb") as f:
        np.save(f, offsets)
    return {"file": path.name, "index": index.name, "tokens": int(offsets[-1]), "documents": len(offsets) - 1,
            "bytes_text": sum(r.bytes_text for r in shards), "sha256": whole.hexdigest(),
            "shards": [{"tokens": r.tokens, "documents": r.documents, "sha256": r.sha256} for r in shards]}


def tokenize_corpus(corpus: CorpusRef, tokenizer: TokenizerRef, workspace: Workspace, *,
                    shard_mb: float = 16.0, workers: int = 1) -> TokensRef:
    """Plan, encode every shard (``workers`` processes when more than one), pack.

    In a flow, ``flows.steps.tokenize_corpus`` runs the same three steps with one task per shard.
    """
    plan = plan_tokenize(corpus, tokenizer, workspace, shard_mb)
    if plan.done is not None:
        return plan.done
    if workers > 1 and len(plan.shards) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(plan.shards)), mp_context=_process_context()) as ex:
            results = list(ex.map(encode_shard, plan.shards))
    else:
        results = [encode_shard(s) for s in plan.shards]
    return pack_tokens(plan, results, workspace)


def _process_context():
    """'fork' (workers start at once, modules already loaded) when this process runs no other Python thread,
    which is when forking is safe; 'spawn' otherwise."""
    import multiprocessing

    safe = threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if safe else "spawn")


def _texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


# ---------------------------------------------------------------------------------------------- reading


def open_tokens(ref: TokensRef, split: str, verify: bool = False) -> np.ndarray:
    """The split's tokens as a read-only memmap (optionally checked against the stored checksum)."""
    info = ref.meta["splits"][split]
    path = ref.dir / info["file"]
    if verify and file_sha256(path) != info["sha256"]:
        raise DataError(f"{path}: checksum mismatch; the token file is corrupted (rebuild by deleting {ref.dir})")
    dtype = np.dtype(ref.meta["dtype"])
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def document_offsets(ref: TokensRef, split: str) -> np.ndarray:
    """Token offset where each document of the split starts, then the total: document i is ``[o[i], o[i+1])``."""
    return np.load(ref.dir / ref.meta["splits"][split]["index"], mmap_mode="r")
