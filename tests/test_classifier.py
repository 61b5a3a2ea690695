"""The sequence classifier: only its head may be fresh, texts truncated at the configured end, batches padded
to their longest text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import classifier
from tasks.artifacts import CheckpointRef
from tasks.config import FinetuneConfig
from tasks.errors import ConfigError
from tests.support import tiny_lm_dir


def test_truncation_keeps_the_configured_end(lm: CheckpointRef) -> None:
    text = " ".join(f"word{i}" for i in range(60))
    right = classifier.load_tokenizer(lm.dir, FinetuneConfig(truncation_side="right", max_length=32))
    left = classifier.load_tokenizer(lm.dir, FinetuneConfig(truncation_side="left", max_length=32))
    full = right(text)["input_ids"]
    assert len(full) > 8
    assert classifier.encode_texts(right, [text], 8) == [full[:8]]
    assert classifier.encode_texts(left, [text], 8) == [full[-8:]]


def test_only_the_classification_head_may_be_missing_or_mismatched(tmp_path: Path, caplog) -> None:
    from safetensors.torch import load_file, save_file

    labels = {0: "negative", 1: "positive"}
    good = tiny_lm_dir(tmp_path / "good")
    with caplog.at_level("INFO", logger="llmpipe"):
        model = classifier.load_classifier(good, labels, pad_id=0, max_length=16)
    assert model.score.weight.shape == (2, 32)
    assert "classification head initialised afresh (score.weight)" in caplog.text

    missing = tiny_lm_dir(tmp_path / "missing")
    weights = load_file(str(missing / "model.safetensors"))
    del weights["transformer.h.0.mlp.c_fc.weight"]
    save_file(weights, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"outside the classification head.*missing transformer\.h\.0\.mlp\.c_fc\."
                                          r"weight"):
        classifier.load_classifier(missing, labels, pad_id=0, max_length=16)

    mismatched = tiny_lm_dir(tmp_path / "mismatched")
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "vocab_size": 80}))
    with pytest.raises(ConfigError, match=r"mismatched transformer\.wte\.weight \(checkpoint \(64, 32\), model "
                                          r"\(80, 32\)\)"):
        classifier.load_classifier(mismatched, labels, pad_id=0, max_length=16)


def _bpe(split: str, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from tasks.tokenize import pre_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizer(split)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                       initial_alphabet=ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   model_max_length=16)


@pytest.mark.parametrize("split", ["gpt2", "cjk"])
def test_long_texts_cut_to_their_head_give_the_full_texts_ids(split: str) -> None:
    """Scoring tokenizes a long text's head only where that is provably exact: the ids always equal the
    library's for the whole text, on mixed English, Chinese, emoji, whitespace runs and special-token text."""
    import random

    rng = random.Random(0)
    parts = ["the", " film", "  ", "   ", "\n", "\n\n", "好吃", "送餐很慢", "！", "🎬", "👍🏽", " 3.5", "don't", "<|endoftext|>",
             "Très", " bien", ",", "\t", "味道一般", "x" * 30, " "]
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 400))) for _ in range(300)]
    tokenizer = _bpe(split, texts)
    for max_length in (4, 8, 16, 64):
        cut = classifier.encode_texts(tokenizer, texts, max_length, cut_long=True)
        assert cut == classifier.encode_texts(tokenizer, texts, max_length)
        assert cut == [ids or [tokenizer.eos_token_id]
                       for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    heads = classifier._head_ids(tokenizer, texts, 8)
    assert sum(ids is not None for ids in heads) > 100  # the head was used, not only the fallback
