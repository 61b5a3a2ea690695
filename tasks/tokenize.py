"""Tokenizer training and corpus tokenization into flat token files read through memmap."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import CorpusRef, TokenizerRef, TokensRef, Workspace, file_sha256, fingerprint
from tasks.config import TokenizerConfig
from tasks.errors import ConfigError, DataError
from tasks.ingest import read_jsonl

log = logging.getLogger("llmpipe")

STAGE_VERSION = "tokenize-1"
BYTE_ALPHABET = 256
ENCODE_BATCH = 2048


def train_tokenizer(corpus: CorpusRef, cfg: TokenizerConfig, workspace: Workspace) -> TokenizerRef:
    """Train a byte-level BPE on the corpus' training split; saved so ``AutoTokenizer`` loads it."""
    specials = list(dict.fromkeys([cfg.eos_token, cfg.pad_token]))
    if cfg.vocab_size < BYTE_ALPHABET + len(specials):
        raise ConfigError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: byte-level BPE needs {BYTE_ALPHABET} byte tokens "
            f"plus {len(specials)} special tokens ({', '.join(specials)})"
        )
    fp = fingerprint(STAGE_VERSION, corpus.fingerprint, cfg)

    def build(out: Path) -> dict[str, Any]:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        docs = read_jsonl(corpus.dir / "train.jsonl")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((d["text"] for d in docs), trainer=trainer, length=len(docs))
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token=cfg.eos_token,
            bos_token=cfg.eos_token,
            unk_token=cfg.eos_token,
            pad_token=cfg.pad_token,
        )
        fast.padding_side = "right"
        fast.save_pretrained(str(out))
        return {"vocab_size": tok.get_vocab_size(), "eos_id": tok.token_to_id(cfg.eos_token),
                "pad_id": tok.token_to_id(cfg.pad_token)}

    return workspace.materialize(TokenizerRef, fp, build, stage="train_tokenizer", config=cfg,
                                 inputs={"corpus": corpus.fingerprint})


def load_tokenizer(ref: TokenizerRef | str | Path):
    from transformers import AutoTokenizer

    path = ref.path if isinstance(ref, TokenizerRef) else str(ref)
    return AutoTokenizer.from_pretrained(path)


def _batches(docs: list[dict], size: int) -> Iterator[list[str]]:
    for i in range(0, len(docs), size):
        yield [d["text"] for d in docs[i : i + size]]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_corpus(corpus: CorpusRef, tokenizer: TokenizerRef, workspace: Workspace) -> TokensRef:
    """Encode each split in batches into one flat token file, EOS after every document."""
    fp = fingerprint(STAGE_VERSION, corpus.fingerprint, tokenizer.fingerprint)

    def build(out: Path) -> dict[str, Any]:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer.dir / "tokenizer.json"))
        eos = int(tokenizer.meta["eos_id"])
        dtype = token_dtype(tok.get_vocab_size())
        splits: dict[str, Any] = {}
        for split in ("train", "validation"):
            docs = read_jsonl(corpus.dir / f"{split}.jsonl")
            path = out / f"{split}.bin"
            n_tokens = 0
            with open(path, "wb") as f:
                for texts in _batches(docs, ENCODE_BATCH):
                    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
                    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
                    flat = np.empty(int(lengths.sum()), dtype=dtype)
                    ends = np.cumsum(lengths)
                    starts = ends - lengths
                    for e, s, end in zip(encs, starts, ends, strict=True):
                        flat[s : end - 1] = e.ids
                        flat[end - 1] = eos
                    flat.tofile(f)
                    n_tokens += flat.size
            splits[split] = {"file": path.name, "tokens": n_tokens, "documents": len(docs),
                             "bytes_text": sum(len(d["text"].encode()) for d in docs), "sha256": file_sha256(path)}
            log.info("tokenized %s: %d documents -> %d tokens", split, len(docs), n_tokens)
        return {"dtype": dtype.name, "vocab_size": tok.get_vocab_size(), "eos_id": eos, "splits": splits}

    return workspace.materialize(TokensRef, fp, build, stage="tokenize", inputs={
        "corpus": corpus.fingerprint, "tokenizer": tokenizer.fingerprint})


def open_tokens(ref: TokensRef, split: str, verify: bool = False) -> np.memmap:
    """The split's tokens as a read-only memmap (optionally checked against the stored checksum)."""
    info = ref.meta["splits"][split]
    path = ref.dir / info["file"]
    if verify and file_sha256(path) != info["sha256"]:
        raise DataError(f"{path}: checksum mismatch; the token file is corrupted (rebuild by deleting {ref.dir})")
    return np.memmap(path, dtype=np.dtype(ref.meta["dtype"]), mode="r")
