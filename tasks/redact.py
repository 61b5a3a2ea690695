"""Keep secrets out of what llmpipe writes for people: MLflow params and tags, Prefect logs and artifacts."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_PATTERNS = [
    # user:password@ in URIs (MLflow/Prefect servers, databases, object stores)
    (re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)[^@\s/]+(?=@)"), rf"\g<keep>{MASK}"),
    # key=value and key: value where the key ends in a secret word (HF_TOKEN=, password:, api_key=,
    # aws_secret_access_key:), but not tokenizer settings such as eos_token or "train_tokenizer: ..."
    (re.compile(r"(?i)(?P<keep>\b(?![\w.-]*\b(?:eos|bos|pad|unk|sep|cls|mask)_token\b)[\w.-]*"
                r"(?:token|password|passwd|secret|api[_-]?key|access[_-]?key)\b\s*[=:]\s*)(?!\*\*\*)"
                r"[^\s&,;'\"]+"), rf"\g<keep>{MASK}"),
    # bearer tokens and well-known token shapes (Hugging Face, GitHub, AWS access key ids)
    (re.compile(r"(?i)(?P<keep>bearer\s+)[A-Za-z0-9._~+/-]+=*"), rf"\g<keep>{MASK}"),
    (re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b"), MASK),
]


def redact(text: str) -> str:
    """``text`` with passwords in URIs, secret-looking key values and known token shapes masked."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_value(value: Any) -> Any:
    """Redact strings inside a value (dicts and lists included); other values pass through."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value
