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
