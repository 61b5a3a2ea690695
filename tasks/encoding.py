"""Encoding documents exactly as a tokenizer does, fast: EOS after each document, special-token text as plain text.

For a GPT-2-style byte-level BPE (ByteLevel pre-tokenizer with its split pattern, no normaliser, only special
added tokens), text is split with the same pattern in Python (``re`` on ASCII text; the ``regex`` module's
Unicode classes on other text whose every character splits there exactly as in the tokenizer's pre-tokenizer,
probed when the encoder first meets it: their Unicode tables differ for recently assigned characters), and each
piece's ids come from a cache filled by the tokenizer itself; documents with other characters go through
``encode_batch_fast``. Used by the tokenize stage (``tasks.tokenize``).

The same holds for the ``cjk`` split (``tokenizer.split``): the tokenizer's pre-tokenizer is
``Sequence([Split(CJK_CHAR, isolated), ByteLevel])``, and ``_CJK_UNICODE_SPLIT`` does both in one pass (each
character of ``CJK_RANGES`` alone, GPT-2's pattern between them, exactly as on a piece that ends there).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import regex

# GPT-2's split pattern (the ByteLevel pre-tokenizer's), spelled for ASCII text: on ASCII, \p{L} is
# [A-Za-z], \p{N} is [0-9] and \s is [ \t\n\r\f\v] in both engines.
_ASCII_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""", re.ASCII)
# The same pattern with Unicode classes, for text beyond ASCII (``re`` has no \p{L} or \p{N}).
_UNICODE_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# Scripts written without spaces between words: under ``tokenizer.split: cjk`` each of these characters is a pre-token
# of its own. Whole Unicode blocks, as code point ranges rather than script properties, so the tokenizer's regex
# engine (Oniguruma) and Python's read the class alike whatever Unicode version each knows; no range holds a space.
# Hangul is left out: Korean is written with spaces between words, which GPT-2's pattern already splits at.
CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer Symbols
    (0x2E80, 0x2FDF),  # CJK Radicals Supplement, Kangxi Radicals
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA9E0, 0xA9FF),  # Myanmar Extended-B
    (0xAA60, 0xAA7F),  # Myanmar Extended-A
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF66, 0xFF9F),  # Halfwidth Katakana
    (0x1AFF0, 0x1B16F),  # Kana Extended-B, Kana Supplement, Kana Extended-A, Small Kana Extension
    (0x20000, 0x3FFFF),  # planes 2 and 3: CJK Unified Ideographs Extensions B-J, Compatibility Ideographs Supplement
)
_CJK_SET = "".join(f"{chr(a)}-{chr(b)}" for a, b in CJK_RANGES)  # literal characters: both engines read them alike
CJK_CHAR = f"[{_CJK_SET}]"  # the Split pre-tokenizer's pattern (isolated), stored in tokenizer.json
# The cjk Sequence in one pass: a CJK character alone, else GPT-2's pattern with CJK characters taken out of its
# classes and read as the end of the text by its lookahead, which is where the piece Split left ends.
_CJK_UNICODE_SPLIT = regex.compile(
    rf"""{CJK_CHAR}|'s|'t|'re|'ve|'m|'ll|'d| ?[^\P{{L}}{_CJK_SET}]+| ?[^\P{{N}}{_CJK_SET}]+"""
    rf"""| ?[^\s\p{{L}}\p{{N}}{_CJK_SET}]+|\s+(?![^\s{_CJK_SET}])|\s+"""
)
_CJK_CHAR_RE = regex.compile(CJK_CHAR)
SPLITS = {"gpt2": _UNICODE_SPLIT, "cjk": _CJK_UNICODE_SPLIT}
_PROBE_CHUNK = 512
_SURROGATES = frozenset(map(chr, range(0xD800, 0xE000)))  # not text: left to the tokenizer, which refuses them


def _probe(chars: list[str]) -> str:
    # each character beside letters, digits, spaces and itself, so every class it could be in shows
    return "".join(f"a {c}{c} 1{c}b{c} {c}\n" for c in chars)


def split_agreed_chars(pre_tokenizer: Any, chars: Iterable[str], pattern: Any = _UNICODE_SPLIT) -> frozenset[str]:
    """The characters of ``chars`` that ``pattern`` splits exactly as ``pre_tokenizer`` does, probed in every
    context the pattern distinguishes."""
    def same(chars: list[str]) -> bool:
        text = _probe(chars)
        return pattern.findall(text) == [text[s:e] for _, (s, e) in pre_tokenizer.pre_tokenize_str(text)]

    chars = sorted(set(chars) - _SURROGATES)
    agreed: set[str] = set()
    for i in range(0, len(chars), _PROBE_CHUNK):
        chunk = chars[i : i + _PROBE_CHUNK]
        agreed.update(chunk if same(chunk) else (c for c in chunk if same([c])))
    return frozenset(agreed)


def _is_gpt2_byte_level(pre: dict[str, Any]) -> bool:
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


def fast_split(tokenizer_json: dict[str, Any]) -> str | None:
    """Which split (a key of ``SPLITS``) encodes text piece by piece with identical ids: ``gpt2`` for the ByteLevel
    pre-tokenizer, ``cjk`` for ``Sequence([Split(CJK_CHAR, isolated), ByteLevel])``; None when neither applies."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    model = tokenizer_json.get("model") or {}
    if not (tokenizer_json.get("normalizer") is None and model.get("type") == "BPE" and not model.get("dropout")
            and all(t.get("special") for t in tokenizer_json.get("added_tokens", []))):
        return None
    if _is_gpt2_byte_level(pre):
        return "gpt2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (steps and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern") == {"Regex": CJK_CHAR} and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and _is_gpt2_byte_level(steps[1])):
        return "cjk"
    return None


def supports_fast_path(tokenizer_json: dict[str, Any]) -> bool:
    """Whether text can be split with ``_ASCII_SPLIT`` / ``SPLITS[...]`` and encoded piece by piece, with identical
    ids."""
    return fast_split(tokenizer_json) is not None


class Encoder:
    """Encodes documents exactly as the tokenizer does (special-token text as plain text), EOS after each."""

    cache_limit = 1_000_000  # pieces kept; the cache starts over beyond this, bounding its memory

    def __init__(self, tokenizer_file: str | Path, eos_id: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_file))
        self.tok.encode_special_tokens = True
        self.eos_id = eos_id
        self.split = fast_split(json.loads(self.tok.to_str()))
        self.fast = self.split is not None
        self._unicode_split = SPLITS[self.split or "gpt2"]
        # Characters of text that takes the split path: ASCII always; any other once probed against this tokenizer
        # (when first met), and ``refused`` those it splits otherwise.
        self.splittable: set[str] = set(map(chr, range(128)))
        self.refused: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        # Piece 0 is the end-of-document marker (None), standing for [eos]. Piece i's ids are
        # _ids[_starts[i] : _starts[i] + _lens[i]].
        self._piece = _PieceIndex()
        self._starts = np.zeros(1024, dtype=np.int64)
        self._lens = np.zeros(1024, dtype=np.int64)
        self._ids = np.zeros(4096, dtype=np.int64)
        self._lens[0], self._ids[0], self._n_ids = 1, self.eos_id, 1

    def _learn(self, pieces: list[str]) -> None:
        """Fill in the ids of ``pieces``, the last ones ``_piece`` numbered."""
        encodings = self.tok.encode_batch_fast(pieces, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        first, n_new = len(self._piece) - len(pieces), int(lens.sum())
        self._starts = _grow(self._starts, first + len(pieces))
        self._lens = _grow(self._lens, first + len(pieces))
        self._ids = _grow(self._ids, self._n_ids + n_new)
        self._lens[first : first + len(pieces)] = lens
        self._starts[first : first + len(pieces)] = self._n_ids + np.cumsum(lens) - lens
        self._ids[self._n_ids : self._n_ids + n_new] = [i for e in encodings for i in e.ids]
        self._n_ids += n_new

    def _piece_ids(self, pieces: list[str | None]) -> np.ndarray:
        return np.fromiter(map(self._piece.__getitem__, pieces), dtype=np.int64, count=len(pieces))

    def _check(self, chars: set[str]) -> None:
        """Probe the characters not met before: into ``splittable`` or ``refused``.

        Under the gpt2 split, characters of CJK_RANGES are refused unprobed: a run of them is one piece, a clause,
        which the piece cache seldom meets twice, so the tokenizer alone encodes such text faster (waimai reviews:
        about twice as fast, docs/benchmarks.md)."""
        new = chars - self.splittable - self.refused
        if new and self.split == "gpt2":
            spaceless = set(_CJK_CHAR_RE.findall("".join(new)))
            self.refused |= spaceless
            new -= spaceless
        if new:
            agreed = split_agreed_chars(self.tok.pre_tokenizer, new, self._unicode_split)
            self.splittable |= agreed
            self.refused |= new - agreed

    def _splits(self, text: str) -> bool:
        """Whether ``text`` takes the split path: ASCII, or every other character one the split agrees on."""
        return self._take_split([text])[0]

    def _take_split(self, texts: list[str]) -> list[bool]:
        if not self.fast:
            return [False] * len(texts)
        chars = [None if t.isascii() else set(t) for t in texts]
        self._check(set().union(*(c for c in chars if c)))
        return [c is None or c <= self.splittable for c in chars]

    def _encode_split(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces: list[str | None] = []
        for text in texts:
            pieces += (_ASCII_SPLIT if text.isascii() else self._unicode_split).findall(text)
            pieces.append(None)
        pids = self._piece_ids(pieces)  # pieces not seen yet are numbered as they are met
        if self._piece.new:
            if len(self._piece) > self.cache_limit:  # start over, with this batch's pieces
                self._reset()
                pids = self._piece_ids(pieces)
            new, self._piece.new = self._piece.new, []
            self._learn(new)
        lens = self._lens[pids]
        ends = np.cumsum(lens)
        ids = self._ids[np.arange(int(ends[-1])) + np.repeat(self._starts[pids] - (ends - lens), lens)]
        doc_ends = ends[pids == 0]
        return ids, np.diff(doc_ends, prepend=0)

    def _encode_slow(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.empty(int(lens.sum()), dtype=np.int64)
        pos = 0
        for e, n in zip(encodings, lens, strict=True):
            ids[pos : pos + n - 1] = e.ids
            ids[pos + n - 1] = self.eos_id
            pos += n
        return ids, lens

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: the documents' ids, each followed by EOS, and each document's length with its EOS."""
        if not texts:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        split = self._take_split(texts)
        if all(split):
            return self._encode_split(texts)
        if not any(split):
            return self._encode_slow(texts)
        # A mixed batch: encode each kind together, then put the documents back in order.
        parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(texts)
        lengths = np.empty(len(texts), dtype=np.int64)
        for flag, encode in ((True, self._encode_split), (False, self._encode_slow)):
            where = [i for i, a in enumerate(split) if a == flag]
            ids, lens = encode([texts[i] for i in where])
            for i, chunk, n in zip(where, np.split(ids, np.cumsum(lens)[:-1]), lens, strict=True):
                parts[i], lengths[i] = chunk, n
        return np.concatenate(parts), lengths


class _PieceIndex(dict):
    """Piece -> its number in the encoder's cache. A piece not seen yet gets the next number when it is looked up
    and waits in ``new`` to be learned: one pass over a batch's pieces, whether or not some are new."""

    def __init__(self) -> None:
        super().__init__({None: 0})
        self.new: list[str] = []

    def __missing__(self, piece: str) -> int:
        self[piece] = number = len(self)
        self.new.append(piece)
        return number


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    if size <= len(a):
        return a
    out = np.zeros(max(size, 2 * len(a)), dtype=a.dtype)
    out[: len(a)] = a
    return out


_local = threading.local()


def encoder_for(tokenizer_file: str, eos_id: int) -> Encoder:
    """One encoder per thread and tokenizer, kept for the next shard (its piece cache stays warm)."""
    cache = _local.__dict__.setdefault("encoders", {})
    key = (tokenizer_file, eos_id)
    if key not in cache:
        cache.clear()
        cache[key] = Encoder(tokenizer_file, eos_id)
    return cache[key]
