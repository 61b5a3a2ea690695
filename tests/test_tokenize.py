"""The tokenizer (trained or existing) and the sharded tokenize stage: exact encoding, packing, checksums, reuse."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import string
import threading
from pathlib import Path

import numpy as np
import pytest
import regex

from tasks import encoding, ingest, tokenize
from tasks.artifacts import TokensRef, Workspace
from tasks.config import CorpusConfig, FilesSource, TokenizerConfig, load_config
from tasks.errors import ConfigError, DataError
from tests.support import Chain, files_corpus, paragraphs, texts


def _reference_ids(tokenizer_file: Path, docs: list[str], eos: int) -> np.ndarray:
    """What the tokenizer itself gives, document by document, special-token text as plain text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.encode_special_tokens = True
    return np.array([i for d in docs for i in [*tok.encode(d, add_special_tokens=False).ids, eos]], dtype=np.int64)


def _split_docs(ref: TokensRef, split: str, tokenizer_dir: Path) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    arr, offsets = tokenize.open_tokens(ref, split), tokenize.document_offsets(ref, split)
    assert np.all(np.asarray(arr)[offsets[1:] - 1] == ref.meta["eos_id"])
    return [tok.decode(arr[a : b - 1].tolist(), skip_special_tokens=False) for a, b in itertools.pairwise(offsets)]


# ================================================================ encoding is exact


def test_encoder_matches_the_tokenizer_on_fuzzed_text(chain) -> None:
    tok_ref = chain.tokenizer
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + ["'s", "'ll", " ", "  ", "\n", "\r\n", "<|endoftext|>", "<|pad|>",
                                               "caf\u00e9", "\u65e5\u672c", "\u2028", "\xa0", "\U0001f600",
                                               "\x85", "\x96", "\u00b4", "\u2019", "na\u00efve", "\u0558", "\u00bd"]
    docs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(5000)]
    enc = encoding.Encoder(tok_ref.dir / "tokenizer.json", tok_ref.meta["eos_id"])
    assert enc.fast
    for batch in (docs[:1], docs[:700], docs):  # all-ASCII, mixed and repeated batches (a warm piece cache)
        ids, lengths = enc.encode(batch)
        expected = _reference_ids(tok_ref.dir / "tokenizer.json", batch, tok_ref.meta["eos_id"])
        assert np.array_equal(ids, expected)
        assert lengths.sum() == len(ids) and len(lengths) == len(batch)
    # A full piece cache starts over without changing the result.
    small = encoding.Encoder(tok_ref.dir / "tokenizer.json", tok_ref.meta["eos_id"])
    small.cache_limit = 2000
    for start in range(0, len(docs), 500):
        batch = docs[start : start + 500]
        assert np.array_equal(small.encode(batch)[0],
                              _reference_ids(tok_ref.dir / "tokenizer.json", batch, tok_ref.meta["eos_id"]))
    all_pieces = {p for d in docs for p in (encoding._ASCII_SPLIT if d.isascii() else encoding._UNICODE_SPLIT).findall(d)}
    assert len(all_pieces) > 2000 and len(small._piece) < len(all_pieces)  # it did start over


def test_text_beyond_ascii_takes_the_split_path_only_where_the_split_agrees_with_the_tokenizer(chain) -> None:
    """The ``regex`` module's Unicode tables can be newer than the tokenizer's: characters they classify differently
    (found by probing each character when the encoder first meets it) send their document through the tokenizer
    itself."""
    tok_ref = chain.tokenizer
    enc = encoding.Encoder(tok_ref.dir / "tokenizer.json", tok_ref.meta["eos_id"])
    pre = enc.tok.pre_tokenizer
    chars = [*map(chr, range(0x80, 0x3100)), *map(chr, range(0x4E00, 0x9FFF, 7)), *"\u65e5\u672c",
             *map(chr, range(0xFF00, 0xFFF0)), *map(chr, range(0x1F600, 0x1F650))]
    assert not enc.refused and len(enc.splittable) == 128  # nothing probed before it is met
    enc.encode(["".join(chars)])
    assert set(chars) == enc.splittable - set(map(chr, range(128))) | enc.refused
    for c in chars:
        if encoding._CJK_CHAR_RE.match(c):  # text without spaces goes to the tokenizer under gpt2 (unprobed)
            assert c in enc.refused, hex(ord(c))
            continue
        probe = encoding._probe([c])
        agrees = encoding._UNICODE_SPLIT.findall(probe) == [probe[a:b] for _, (a, b) in pre.pre_tokenize_str(probe)]
        assert agrees == (c in enc.splittable), hex(ord(c))
    assert {"\u00e9", "\x85", "\x96", "\xa0", "\u2019", "\u2028", "\u3002", "\uff0c", "\U0001f600"} <= enc.splittable
    assert enc._splits("caf\u00e9 \u2019n\u00e9") and enc._splits("\U0001f600") and not enc._splits("\u65e5\u672c")
    for c in enc.refused - encoding._SURROGATES:  # characters the engines classify differently (Unicode versions)
        assert not enc._splits("a" + c)
    enc.refused.add("\u0558")  # as if it were one of them: a batch mixes both paths, documents kept in order
    enc.splittable.discard("\u0558")
    docs = ["a", "b\u0558 c", "\u00e9t\u00e9"]
    assert enc._take_split(docs) == [True, False, True]
    expected = _reference_ids(tok_ref.dir / "tokenizer.json", docs, tok_ref.meta["eos_id"])
    assert np.array_equal(enc.encode(docs)[0], expected)
    # A lone surrogate is never probed: its document goes to the tokenizer, which refuses it as before.
    assert not enc._splits("a\ud800b") and "\ud800" in enc.refused


def test_encoder_matches_on_real_text_and_without_the_fast_path(chain, shared_data: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, normalizers

    tok_ref = chain.tokenizer
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    docs = [p for p in text.split("\n\n")[:1500]]
    docs += (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8").splitlines()[:1500]
    with open(shared_data / "imdb" / "unsup.jsonl", encoding="utf-8") as f:  # reviews in French, with dashes, ...
        docs += list(itertools.islice((d for d in map(lambda line: json.loads(line)["text"], f) if not d.isascii()),
                                      1500))
    eos = tok_ref.meta["eos_id"]
    expected = _reference_ids(tok_ref.dir / "tokenizer.json", docs, eos)
    assert np.array_equal(encoding.Encoder(tok_ref.dir / "tokenizer.json", eos).encode(docs)[0], expected)
    # A tokenizer with a normaliser cannot take the fast path; the result is still the tokenizer's.
    tok = Tokenizer.from_file(str(tok_ref.dir / "tokenizer.json"))
    tok.normalizer = normalizers.Lowercase()
    tok.save(str(tmp_path / "lower.json"))
    slow = encoding.Encoder(tmp_path / "lower.json", eos)
    assert not slow.fast
    assert np.array_equal(slow.encode(docs)[0], _reference_ids(tmp_path / "lower.json", docs, eos))


# ================================================================ the cjk split (tokenizer.split)

# Reviews and phrases in scripts with and without spaces, beside English, digits, emoji and CJK punctuation.
MIXED = ["外卖送得很快，味道不错！", "味道一般，以后不会再来了。。。", "日本語のテキストです。カタカナ、ひらがな。コーヒー",
         "한국어 문장입니다. 정말 맛있어요!", "ภาษาไทยอร่อยมาก ๑๒๓", "The food was great 😀👍 would order again",
         "价格 12 元，量少 (small)", "ཀ་ཁ་ག་", "ကြက်သားဟင်း", "ខ្មែរ", "ລາວ", "𠀀𠀁𪛟 rare", "ｱｲｳ ＡＢＣ１２３",
         "don't 中 'll", "味道\u3000很好", "送餐\n\n慢", "  中  文  ", "x\t日", "٣ arabic عربي", "café naïve"]


def _mixed_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    seps = ["", " ", "  ", "\n", " \n", "\t", "，", "'s ", "1"]
    return ["".join(rng.choice(MIXED) + rng.choice(seps) for _ in range(rng.randint(0, 6))) for _ in range(n)]


def _pieces(pre, text: str) -> list[str]:
    return [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def mixed_tokenizers(tmp_path_factory) -> dict:
    """A byte-level BPE per split, trained on mixed-script text."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "c.txt").write_text("\n".join(_mixed_docs(3000, 0)), encoding="utf-8")
    ws = Workspace(root / "ws")
    corpus = ingest.ingest_corpus(files_corpus(root / "c.txt", text_unit="line"), ws)
    return {split: tokenize.train_tokenizer(corpus, TokenizerConfig(vocab_size=600, split=split), ws)
            for split in ("gpt2", "cjk")}


def test_cjk_split_pre_tokenizes_as_the_tokenizers_sequence_and_as_gpt2_without_cjk(shared_data: Path) -> None:
    cjk, gpt2 = tokenize.pre_tokenizer("cjk"), tokenize.pre_tokenizer("gpt2")
    assert _pieces(cjk, "a 中文 b  中 x") == ["a", " ", "中", "文", " b", "  ", "中", " x"]  # a space before Han: alone
    assert _pieces(gpt2, "a 中文 b") == ["a", " 中文", " b"]
    assert _pieces(cjk, "ภาษา한국어 𠀀") == ["ภ", "า", "ษ", "า", "한국어", " ", "𠀀"]  # Hangul keeps GPT-2's split
    docs = [*MIXED, *_mixed_docs(20_000, 1)]
    for text in docs:
        assert encoding._CJK_UNICODE_SPLIT.findall(text) == _pieces(cjk, text), repr(text)
    # Text without a CJK character: the cjk split is GPT-2's, piece for piece.
    english = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    english += "".join(paragraphs(300)) + (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8")[:200_000]
    assert _pieces(cjk, english) == _pieces(gpt2, english) == encoding._CJK_UNICODE_SPLIT.findall(english)


def test_every_cjk_character_is_a_piece_of_its_own_in_both_engines() -> None:
    """The fast path's exactness on CJK characters by construction: the class is literal code point ranges, so
    Oniguruma and ``regex`` read it alike, and a character alone is one piece whatever class it is in."""
    cjk = tokenize.pre_tokenizer("cjk")
    chars = [chr(c) for a, b in encoding.CJK_RANGES for c in range(a, min(b, 0x2FFFF) + 1, 1 if b < 0x10000 else 5)]
    chars += [chr(0x3FFFF), chr(0x20000), chr(0x323AF)]
    assert len(chars) > 40_000
    assert encoding.split_agreed_chars(cjk, chars, encoding._CJK_UNICODE_SPLIT) == frozenset(chars)
    text = "".join(chars)
    assert encoding._CJK_UNICODE_SPLIT.findall(text) == _pieces(cjk, text) == chars
    assert not any(regex.match(r"\s", c) for c in chars)  # no range holds a space


@pytest.mark.parametrize("split", ["gpt2", "cjk"])
def test_encoder_matches_the_tokenizer_on_mixed_scripts(mixed_tokenizers, split: str) -> None:
    tok_ref = mixed_tokenizers[split]
    path, eos = tok_ref.dir / "tokenizer.json", tok_ref.meta["eos_id"]
    assert tok_ref.meta["split"] == split
    enc = encoding.Encoder(path, eos)
    assert enc.fast and enc.split == split
    docs = [*MIXED, *_mixed_docs(3000, 2)]
    # The split path, not the tokenizer: under gpt2 for documents without CJK characters only.
    assert enc._take_split(docs) == [split == "cjk" or not encoding._CJK_CHAR_RE.search(d) for d in docs]
    for batch in (docs[:500], docs, docs):  # a cold and a warm piece cache
        assert np.array_equal(enc.encode(batch)[0], _reference_ids(path, batch, eos))


@pytest.mark.parametrize("split", ["gpt2", "cjk"])
def test_encoder_matches_the_tokenizer_on_chinese_reviews(shared_data: Path, tmp_path: Path, split: str) -> None:
    waimai = shared_data / "waimai"
    if not (waimai / "train.jsonl").is_file():
        pytest.skip(f"{waimai / 'train.jsonl'} not found: the waimai reviews are not in the shared data folder")
    ws = Workspace(tmp_path / "ws")
    corpus = ingest.ingest_corpus(CorpusConfig(sources=[FilesSource(paths=[str(waimai / "train.jsonl")])]), ws)
    tok_ref = tokenize.train_tokenizer(corpus, TokenizerConfig(vocab_size=1024, split=split), ws)
    path, eos = tok_ref.dir / "tokenizer.json", tok_ref.meta["eos_id"]
    with open(waimai / "test.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    enc = encoding.Encoder(path, eos)
    assert enc.split == split
    # cjk: every review takes the split path; gpt2: a review with Chinese in it goes to the tokenizer.
    assert enc._take_split(docs) == [split == "cjk" or not encoding._CJK_CHAR_RE.search(d) for d in docs]
    assert np.array_equal(enc.encode(docs)[0], _reference_ids(path, docs, eos))
    train = texts(corpus, "train")
    assert np.array_equal(enc.encode(train)[0], _reference_ids(path, train, eos))
    # The stage writes the same ids.
    tokens = tokenize.tokenize_corpus(corpus, tok_ref, ws, shard_mb=0.2)
    assert np.array_equal(np.asarray(tokenize.open_tokens(tokens, "train")), _reference_ids(path, train, eos))


def test_the_default_split_keeps_tokenizer_fingerprints_and_cjk_is_a_new_tokenizer(chain, tmp_path: Path) -> None:
    cfg = chain.cfg.tokenizer
    assert cfg.split == "gpt2" and "split" not in tokenize.tokenizer_settings(cfg)
    # The tiny chain's tokenizer as named before tokenizer.split existed.
    assert chain.tokenizer.fingerprint == "e667494c3bd1314f73b6"
    assert chain.tokenizer.meta["split"] == "gpt2"
    assert json.loads((chain.tokenizer.dir / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == "ByteLevel"
    cjk = tokenize.train_tokenizer(chain.corpus, cfg.model_copy(update={"split": "cjk"}), Workspace(tmp_path / "ws"))
    assert cjk.fingerprint != chain.tokenizer.fingerprint and cjk.meta["split"] == "cjk"
    manifest = json.loads((cjk.dir / "manifest.json").read_text())
    assert manifest["config"]["split"] == "cjk"
    pre = json.loads((cjk.dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]
    assert encoding.fast_split(json.loads((cjk.dir / "tokenizer.json").read_text())) == "cjk"
    # On English text the two tokenizers agree exactly (the sample corpus has no CJK character).
    docs = texts(chain.corpus, "validation")
    assert np.array_equal(_reference_ids(cjk.dir / "tokenizer.json", docs, cjk.meta["eos_id"]),
                          _reference_ids(chain.tokenizer.dir / "tokenizer.json", docs, chain.tokenizer.meta["eos_id"]))
    assert load_config(None, ["tokenizer.split=cjk"]).tokenizer.split == "cjk"
    with pytest.raises(ConfigError, match=r"tokenizer\.split='cjk' applies to a trained tokenizer"):
        load_config(None, ["tokenizer.split=cjk", "tokenizer.pretrained=gpt2"])


def test_a_foreign_split_pre_tokenizer_takes_the_tokenizer_path(tmp_path: Path) -> None:
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tok = Tokenizer.from_file(str(_tiny_bpe(tmp_path)))
    for pre in (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[一-龥]"), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False)]),
                pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(encoding.CJK_CHAR), behavior="removed"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False)]),
                pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                         pre_tokenizers.Split(Regex(encoding.CJK_CHAR), behavior="isolated")])):
        tok.pre_tokenizer = pre
        assert encoding.fast_split(json.loads(tok.to_str())) is None


def _tiny_bpe(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "tiny.json"))
    assert encoding.fast_split(json.loads(tok.to_str())) == "gpt2"
    return tmp_path / "tiny.json"


# ================================================================ the stage


def test_packed_tokens_decode_back_to_documents_and_shard_size_does_not_matter(chain, tmp_path: Path) -> None:
    ws, corpus, tok_ref = chain.ws, chain.corpus, chain.tokenizer
    one = tokenize.tokenize_corpus(corpus, tok_ref, Workspace(tmp_path / "one"))
    many = tokenize.tokenize_corpus(corpus, tok_ref, Workspace(tmp_path / "many"), shard_mb=0.004)
    assert one.fingerprint == many.fingerprint
    assert len(one.meta["splits"]["train"]["shards"]) == 1 and len(many.meta["splits"]["train"]["shards"]) > 5
    for split in ("train", "validation"):
        info = many.meta["splits"][split]
        assert (one.dir / info["file"]).read_bytes() == (many.dir / info["file"]).read_bytes()
        assert info["sha256"] == one.meta["splits"][split]["sha256"]
        assert info["documents"] == sum(s["documents"] for s in info["shards"]) == len(texts(corpus, split))
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert _split_docs(many, split, tok_ref.dir) == texts(corpus, split)
        arr = tokenize.open_tokens(many, split, verify=True)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    assert not ws.work_dir("tokens", many.fingerprint).exists()  # the shards are gone once packed
    assert not Workspace(tmp_path / "many").work_dir("tokens", many.fingerprint).exists()


def test_process_workers_give_identical_files(chain, tmp_path: Path) -> None:
    corpus, tok_ref = chain.corpus, chain.tokenizer
    serial = tokenize.tokenize_corpus(corpus, tok_ref, Workspace(tmp_path / "serial"), shard_mb=0.01)
    parallel = tokenize.tokenize_corpus(corpus, tok_ref, Workspace(tmp_path / "parallel"), shard_mb=0.01, workers=2)
    assert serial.meta == parallel.meta
    for split in ("train", "validation"):
        assert (serial.dir / f"{split}.bin").read_bytes() == (parallel.dir / f"{split}.bin").read_bytes()
        assert (serial.dir / f"{split}.idx.npy").read_bytes() == (parallel.dir / f"{split}.idx.npy").read_bytes()


def _big_vocab_tokenizer(path: Path) -> list[str]:
    """A byte-level BPE with 66,001 tokens saved in ``path``; returns words whose token id is above 65,535."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    pairs = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    merges = []
    for p in pairs:
        merges.append((p[0], p[1]))
        vocab[p] = len(vocab)
    for p, q in itertools.product(pairs, pairs):
        if len(vocab) > 66_000:
            break
        merges.append((p, q))
        vocab[p + q] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(path))
    high = [w for w, i in vocab.items() if i > 65_535 and len(w) == 4][:2000]
    return [w for w in high if tok.encode(" " + w).ids[-1] == vocab[w]]


def test_ids_above_65535_round_trip_through_uint32(tmp_path: Path) -> None:
    words = _big_vocab_tokenizer(tmp_path / "big-tok")
    assert len(words) > 100
    rng = random.Random(1)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" number {i}." for i in range(400)]
    (tmp_path / "c.txt").write_text("\n".join(docs), encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    corpus = ingest.ingest_corpus(CorpusConfig(sources=[FilesSource(paths=[str(tmp_path / "c.txt")],
                                                                    text_unit="line")]), ws)
    tok_ref = tokenize.train_tokenizer(corpus, TokenizerConfig(pretrained=str(tmp_path / "big-tok")), ws)
    assert tok_ref.meta["vocab_size"] == 66_002  # 66,001 and the added padding token
    tokens = tokenize.tokenize_corpus(corpus, tok_ref, ws, shard_mb=0.005)
    assert tokens.meta["dtype"] == "uint32" and len(tokens.meta["splits"]["train"]["shards"]) > 1
    for split in ("train", "validation"):
        arr = tokenize.open_tokens(tokens, split, verify=True)
        assert arr.dtype == np.uint32 and int(arr.max()) > 65_535
        assert _split_docs(tokens, split, tok_ref.dir) == texts(corpus, split)
        assert np.array_equal(np.asarray(arr), _reference_ids(tok_ref.dir / "tokenizer.json", texts(corpus, split),
                                                              tokens.meta["eos_id"]))


# ================================================================ the tokenizer


def test_pretrained_tokenizer_by_path_is_content_addressed_and_loads(chain, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ws, corpus, trained = chain.ws, chain.corpus, chain.tokenizer
    exported = tmp_path / "exported"
    AutoTokenizer.from_pretrained(trained.path).save_pretrained(str(exported))
    ref = tokenize.train_tokenizer(corpus, TokenizerConfig(pretrained=str(exported)), ws)
    assert ref.meta["trained"] is False and ref.meta["vocab_size"] == trained.meta["vocab_size"]
    assert (ref.meta["eos_id"], ref.meta["pad_id"]) == (trained.meta["eos_id"], trained.meta["pad_id"])
    loaded = AutoTokenizer.from_pretrained(ref.path)
    assert loaded("the harbour at dawn").input_ids == AutoTokenizer.from_pretrained(trained.path)(
        "the harbour at dawn").input_ids
    # The same tokenizer copied elsewhere is the same artifact.
    copy = tmp_path / "copy"
    AutoTokenizer.from_pretrained(str(exported)).save_pretrained(str(copy))
    again = tokenize.train_tokenizer(corpus, TokenizerConfig(pretrained=str(copy)), ws)
    assert again.fingerprint == ref.fingerprint and again.reused
    with pytest.raises(ConfigError, match=r"tokenizer\.pretrained: cannot load 'no-such-org/no-such-tokenizer'"):
        tokenize.train_tokenizer(corpus, TokenizerConfig(pretrained="no-such-org/no-such-tokenizer"), ws)


def test_extra_special_tokens_are_reserved(chain, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    cfg, corpus, plain = chain.cfg, chain.corpus, chain.tokenizer
    ws = Workspace(tmp_path / "ws")
    specials = cfg.tokenizer.model_copy(update={"special_tokens": ["<|user|>", "<|assistant|>"]})
    ref = tokenize.train_tokenizer(corpus, specials, ws)
    assert ref.fingerprint != plain.fingerprint
    tok = AutoTokenizer.from_pretrained(ref.path)
    assert {"<|user|>", "<|assistant|>"} <= set(tok.all_special_tokens)
    assert len(tok) == cfg.tokenizer.vocab_size
    # shard_mb changes how tokenization runs, never the tokenizer.
    same = tokenize.train_tokenizer(corpus, cfg.tokenizer.model_copy(update={"shard_mb": 1.0}), ws)
    assert same.fingerprint == plain.fingerprint


# ================================================================ reuse, resumption and concurrency


def test_shards_are_reused_and_a_corrupt_shard_is_refused(chain, tmp_path: Path) -> None:
    corpus, tok_ref = chain.corpus, chain.tokenizer
    ws = Workspace(tmp_path / "ws")
    plan = tokenize.plan_tokenize(corpus, tok_ref, ws, shard_mb=0.01)
    first = tokenize.encode_shard(plan.shards[0])
    sidecar = Path(first.file).with_suffix(".json")
    assert json.loads(sidecar.read_text())["sha256"] == first.sha256
    mtime = Path(first.file).stat().st_mtime_ns
    assert tokenize.encode_shard(plan.shards[0]) == first  # a retry reuses the finished shard
    assert Path(first.file).stat().st_mtime_ns == mtime
    results = [first] + [tokenize.encode_shard(s) for s in plan.shards[1:]]
    data = bytearray(Path(first.file).read_bytes())
    data[3] ^= 0x01
    Path(first.file).write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        tokenize.pack_tokens(plan, results, ws)
    assert not ws.is_complete(ws.dir("tokens", plan.fingerprint))
    # A truncated shard (a size that does not match its sidecar) is encoded again.
    Path(first.file).write_bytes(bytes(data[:10]))
    redone = tokenize.encode_shard(plan.shards[0])
    assert redone == first and Path(first.file).stat().st_size == first.tokens * 2
    ref = tokenize.pack_tokens(plan, [redone, *results[1:]], ws)
    assert tokenize.open_tokens(ref, "train", verify=True) is not None


def test_a_second_run_during_the_first_reuses_its_shards_and_artifact(chain, tmp_path: Path) -> None:
    """Two runs interleaved step by step: neither reads a half-written file, and they end with one artifact."""
    corpus, tok_ref = chain.corpus, chain.tokenizer
    ws = Workspace(tmp_path / "ws")
    plan_a = tokenize.plan_tokenize(corpus, tok_ref, ws, shard_mb=0.01)
    results_a = [tokenize.encode_shard(s) for s in plan_a.shards]
    plan_b = tokenize.plan_tokenize(corpus, tok_ref, ws, shard_mb=0.01)  # starts while A has not packed
    assert plan_b.done is None and plan_b.shards == plan_a.shards
    b_first = tokenize.encode_shard(plan_b.shards[0])
    assert b_first == results_a[0]  # reused A's finished shard
    ref_a = tokenize.pack_tokens(plan_a, results_a, ws)  # A packs and removes the shards
    assert ref_a.reused is False
    b_rest = [tokenize.encode_shard(s) for s in plan_b.shards[1:]]
    assert all(r.skipped for r in b_rest)  # the artifact is complete: nothing more to encode
    ref_b = tokenize.pack_tokens(plan_b, [b_first, *b_rest], ws)
    assert ref_b.reused and ref_b.path == ref_a.path and ref_b.meta == ref_a.meta
    assert tokenize.plan_tokenize(corpus, tok_ref, ws).done == ref_b


def test_a_second_run_waits_for_the_first_to_finish_packing(chain, tmp_path: Path) -> None:
    corpus, tok_ref = chain.corpus, chain.tokenizer
    ws = Workspace(tmp_path / "ws")
    fp = tokenize.tokens_fingerprint(corpus, tok_ref)
    out: list = []
    with ws.lock("tokens", fp):  # the first run, packing
        second = threading.Thread(target=lambda: out.append(tokenize.tokenize_corpus(corpus, tok_ref, ws)))
        second.start()
        second.join(timeout=3)
        assert second.is_alive() and not out  # it encoded its shards and now waits at the lock
    second.join()
    assert ws.is_complete(Path(out[0].path))


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
    docs = texts(chain.corpus, split)
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


def test_literal_eos_text_does_not_split_a_document(chain: Chain, tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(paragraphs(40) + ["Before <|endoftext|> after, still one document."]),
                    encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    corpus = ingest.ingest_corpus(files_corpus(path, validation_fraction=0.3), ws)
    tokens = tokenize.tokenize_corpus(corpus, chain.tokenizer, ws)
    for split in ("train", "validation"):
        arr = tokenize.open_tokens(tokens, split)
        assert _decode_docs(arr, chain.tokenizer.dir, tokens.meta["eos_id"]) == texts(corpus, split)
