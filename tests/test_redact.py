"""Secrets never reach MLflow params and tags or Prefect logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tasks.redact import excerpt, redact, redact_exception, redact_value

SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"


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

    from tasks import tracking

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("redact", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    monkeypatch.setattr(tracking, "mlflow_client", lambda: client)  # the module's client, pointed at this store
    tracking.log_stage(run.info.run_id, None, {"corpus.url": "https://bob:topsecret@host/corpus.jsonl",
                                               "hub.token": "hf_abcdefghijklmnopqrstuvwxyz123456"}, [])
    data = client.get_run(run.info.run_id).data
    assert "topsecret" not in str(data.params) and "hf_abcdefghijklmnopqrstuvwxyz123456" not in str(data.params)
    assert data.params["corpus.url"] == "https://bob:***@host/corpus.jsonl"
    assert tracking.clean({"t": "http://u:pw@h"}) == {"t": "http://u:***@h"}


def test_prefect_log_forwarding_redacts() -> None:
    from flows.logs import ToRunLogger

    seen: list[str] = []

    class Sink:
        def log(self, level: int, msg: str) -> None:
            seen.append(msg)

    handler = ToRunLogger(Sink())
    logger = logging.getLogger("llmpipe.test-redact")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("connecting to %s", "http://carol:pa55word@tracking:5000")
    finally:
        logger.removeHandler(handler)
    assert seen == ["connecting to http://carol:***@tracking:5000"]


# ================================================================ quoted keys, Authorization headers, signed URLs


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ('{"api_key": "abc-123-def", "model": "m"}', "abc-123-def", '{"api_key": "***", "model": "m"}'),
        ("{'password': 'x y z', 'user': 'bob'}", "x y z", "{'password': '***', 'user': 'bob'}"),
        ('"HF_TOKEN": "no-known-shape-9f8e7d"', "no-known-shape-9f8e7d", '"HF_TOKEN": "***"'),
        ("client_secret: 'quoted in yaml'", "quoted in yaml", "client_secret: '***'"),
        ("AWSAccessKeyId=ASIAXEXAMPLEKEY\nAWSSecretKey=wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI/K7MDENG",
         "AWSAccessKeyId=***\nAWSSecretKey=***"),
        ('"token": 1234567890, "n": 2', "1234567890", '"token": ***, "n": 2'),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Authorization: Basic ***"),
        ("Authorization: token ghx-abcdef0123", "ghx-abcdef0123", "Authorization: token ***"),
        ("authorization: s3cr3t-value-without-scheme", "s3cr3t-value-without-scheme", "authorization: ***"),
        ("{'Authorization': 'Digest username=\"bob\", response=\"6629fae4\"', 'Accept': '*/*'}", "6629fae4",
         "{'Authorization': 'Digest ***', 'Accept': '*/*'}"),
        ('"Proxy-Authorization": "Negotiate YIIBhgYGKwYBBQUC"', "YIIBhgYGKwYBBQUC",
         '"Proxy-Authorization": "Negotiate ***"'),
        ("https://b.s3.amazonaws.com/k.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIAXEXAMPLE%2F20240101"
         "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=IQoJb3JpZ2luX2Vj"
         "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835", "aeeed9bbccd4d02ee5c0109b86d86835",
         "https://b.s3.amazonaws.com/k.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
         "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=***&X-Amz-Signature=***"),
        ("https://b.s3.amazonaws.com/k?AWSAccessKeyId=ASIAXEXAMPLEKEY&Expires=1141889120&Signature=vjbyPxybdZ%2ByT2%3D",
         "vjbyPxybdZ%2ByT2%3D", "https://b.s3.amazonaws.com/k?AWSAccessKeyId=***&Expires=1141889120&Signature=***"),
        ("https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=svc%40p.iam"
         "%2F20190301%2Fauto%2Fstorage%2Fgoog4_request&X-Goog-Expires=600&X-Goog-Signature=2d2a6f5055eb1c3a",
         "2d2a6f5055eb1c3a", "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256"
         "&X-Goog-Credential=***&X-Goog-Expires=600&X-Goog-Signature=***"),
        ("https://acct.blob.core.windows.net/c/b.csv?sv=2021-08-06&sr=b&sp=r&sig=abc%2Bdef%3D",
         "abc%2Bdef%3D", "https://acct.blob.core.windows.net/c/b.csv?sv=2021-08-06&sr=b&sp=r&sig=***"),
    ],
)
def test_quoted_keys_authorization_and_signed_urls_are_masked(text: str, secret: str, kept: str) -> None:
    out = redact(text)
    assert secret not in out and out == kept
    assert redact(out) == out  # masking twice changes nothing


def test_tokenizer_settings_and_plain_words_stay_in_quoted_forms_too() -> None:
    for text in ('{"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}', "{'mask_token': '<mask>'}",
                 "no authorization header was sent", "the signature of a function", '"password": null',
                 "https://host/data.csv?design=1&signed=true", "mlflow model signature=infer_signature(x, y)"):
        assert redact(text) == text


def test_excerpt_is_short_redacted_and_quoted() -> None:
    assert excerpt("7") == "'7'"
    assert excerpt(f"HF_TOKEN={SECRET}") == "'HF_TOKEN=***'"
    long = "word " * 100
    assert excerpt(long) == repr(long[:40] + "…") and len(excerpt(long)) <= 45
    # A secret that starts inside the excerpt is masked whole, not cut into a readable prefix.
    assert excerpt("x" * 30 + f" {SECRET} and more") == repr("x" * 30 + " *** and m…")
    assert excerpt("line one\n  line two", quote=False) == "line one line two"
    assert excerpt(123456) == "'123456'"


def test_redact_exception_rewrites_the_message_in_place() -> None:
    exc = ValueError(f"cannot load https://u:pw123@host/x?token=abc with {SECRET}")
    assert redact_exception(exc) is exc
    assert str(exc) == "cannot load https://u:***@host/x?token=*** with ***" and exc.args == (str(exc),)
    key = KeyError(SECRET)
    assert str(redact_exception(key)) == "'***'"
    os_error = FileNotFoundError(2, "No such file or directory", f"/data/{SECRET}.csv")
    assert SECRET not in str(redact_exception(os_error)) and os_error.filename == "/data/***.csv"
    several = RuntimeError("failed:", {"password": "hunter2"})
    assert "hunter2" not in str(redact_exception(several)) and several.args[1] == {"password": "***"}
    # Chained exceptions and notes show in tracebacks: they are redacted too.
    try:
        try:
            raise OSError(f"cannot reach https://svc:pw-in-cause@host with {SECRET}")
        except OSError as inner:
            outer = RuntimeError("download failed")
            outer.add_note("password=note-secret")
            raise outer from inner
    except RuntimeError as caught:
        assert redact_exception(caught) is caught
        assert "pw-in-cause" not in str(caught.__cause__) and SECRET not in str(caught.__cause__)
        assert caught.__notes__ == ["password=***"] and caught.args == ("download failed",)
    plain = ValueError("nothing secret", 3)
    args = plain.args
    assert redact_exception(plain).args is args  # untouched


def test_redact_value_masks_strings_under_secret_keys() -> None:
    value = {"db": {"password": "plain-words", "user": "bob"}, "hub.token": "xyz", "eos_token": "<|endoftext|>",
             "tokens": ["a"], "api_key": None}
    assert redact_value(value) == {"db": {"password": "***", "user": "bob"}, "hub.token": "***",
                                   "eos_token": "<|endoftext|>", "tokens": ["a"], "api_key": None}


def test_redaction_time_grows_linearly_with_the_text() -> None:
    import time

    # Trying a key at every word boundary made such runs quadratic: 16,000 characters took 24 s, 40,000 minutes.
    for text in ("a-" * 20_000, "a." * 20_000, "x://" + "a+" * 20_000):
        started = time.perf_counter()
        assert redact(text) == text
        assert time.perf_counter() - started < 2.0
