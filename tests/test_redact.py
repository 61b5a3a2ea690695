"""Secrets never reach MLflow params and tags or Prefect logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tasks.redact import redact, redact_value


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("http://alice:s3cr3t-pw@mlflow.internal:5000", "s3cr3t-pw"),
        ("postgresql+psycopg://svc:hunter2@db/mlflow", "hunter2"),
        ("https://host/data.csv?token=abcdef123456&x=1", "abcdef123456"),
        ("HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz123456", "hf_abcdefghijklmnopqrstuvwxyz123456"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
        ("aws_secret_access_key: wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI/K7MDENG"),
        ("api_key=sk-live-1234567890", "sk-live-1234567890"),
    ],
)
def test_secrets_are_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and "***" in out


def test_ordinary_text_is_left_alone() -> None:
    for text in ("models:/llmpipe-sentiment@champion", "sqlite:///mlflow.db", "http://127.0.0.1:5000",
                 "pretrain step 100/600  loss 1.23", "/data/tokenizer/special_tokens_map.json",
                 "train_tokenizer: reusing artifact 0123 (/ws/tokenizers/0123)", "tokenize: built artifact 0123",
                 "eos_token: <|endoftext|>", "pad_token=<|pad|>", "llmpipe.tokens_fingerprint: abc"):
        assert redact(text) == text
    assert redact_value({"a": ["http://u:pw@h"], "b": 3}) == {"a": ["http://u:***@h"], "b": 3}


def test_mlflow_params_and_tags_are_redacted(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from tasks import register

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("redact", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    monkeypatch.setattr(register, "_client", lambda: client)  # the module's client, pointed at this store
    register.log_stage(run.info.run_id, None, {"corpus.url": "https://bob:topsecret@host/corpus.jsonl",
                                               "hub.token": "hf_abcdefghijklmnopqrstuvwxyz123456"}, [])
    data = client.get_run(run.info.run_id).data
    assert "topsecret" not in str(data.params) and "hf_abcdefghijklmnopqrstuvwxyz123456" not in str(data.params)
    assert data.params["corpus.url"] == "https://bob:***@host/corpus.jsonl"
    assert register._clean({"t": "http://u:pw@h"}) == {"t": "http://u:***@h"}


def test_prefect_log_forwarding_redacts() -> None:
    from flows.steps import _ToRunLogger

    seen: list[str] = []

    class Sink:
        def log(self, level: int, msg: str) -> None:
            seen.append(msg)

    handler = _ToRunLogger(Sink())
    logger = logging.getLogger("llmpipe.test-redact")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("connecting to %s", "http://carol:pa55word@tracking:5000")
    finally:
        logger.removeHandler(handler)
    assert seen == ["connecting to http://carol:***@tracking:5000"]
