"""Keep secrets out of what llmpipe writes for people: MLflow params and tags, Prefect logs and artifacts, and
the messages of errors about input data.

``redact`` masks secrets in a string; ``excerpt`` is the one way an error message shows part of an input value
(redacted, and at most a few dozen characters, or nothing at all where ``tasks.confine.may_quote`` says the run may
not quote what it read); ``redact_exception`` rewrites an exception's message in place.
"""

from __future__ import annotations

import re
from typing import Any

from tasks.confine import may_quote

MASK = "***"
NOT_SHOWN = "(not shown)"  # what stands for data a run created through the API may not have quoted back
EXCERPT_CHARS = 40  # the most of an input value (a cell, a label, a line) an error message shows
LIBRARY_MESSAGE_CHARS = 120  # the most of a library's exception text (csv, json, pyarrow, datasets) one shows

# A key is matched from the start of its run of [\w.-] characters only, never from inside one: trying every word
# boundary made "a-a-a-..." quadratic (16,000 characters took 24 s).
_KEY_START = r"(?<![\w.-])"
_SECRET_KEY = r"[\w.-]*(?:token|password|passwd|secret|(?:api|access|secret|private)[_-]?key)"
_NOT_TOKENIZER = r"(?![\w.-]*\b(?:eos|bos|pad|unk|sep|cls|mask)_token\b)"  # eos_token: <|endoftext|> is no secret
_AUTH_SCHEMES = (r"(?:basic|bearer|digest|token|negotiate|ntlm|aws4-hmac-sha256|hoba|mutual|apikey|api-key|key"
                 r"|oauth|sharedkey|sharedkeylite|gssapi|kerberos|sso-key|splunk|dpop)")
_SIGNED_URL_PARAMS = (r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
                      r"|awsaccesskeyid")  # names no one uses for anything else; plain Signature= and sig= only in URLs

# A secret-looking key, bare or quoted (JSON, YAML, Python reprs), then = or :, then its value: a quoted string
# (its quotes kept) or a bare word. HF_TOKEN=..., password: ..., "api_key": "...", 'password': '...'.
_KEY_VALUE = re.compile(
    rf"(?i)(?P<keep>(?>(?P<kq>[\"']?){_KEY_START}{_NOT_TOKENIZER}{_SECRET_KEY}\b(?P=kq)\s*[=:]\s*))"
    r"(?!\*\*\*)(?!(?:null|none|true|false)\b)"
    r"(?:(?P<vq>[\"'])(?:\\.|(?!(?P=vq))[^\\\r\n])*(?P=vq)|(?P<open>[\"']?)[^\s&,;'\"]+)"
)


_SECRET_NAME = re.compile(rf"(?i){_NOT_TOKENIZER}{_SECRET_KEY}")  # a dict key, whole


def _mask_value(m: re.Match) -> str:
    if m.group("vq"):
        return f"{m.group('keep')}{m.group('vq')}{MASK}{m.group('vq')}"
    return f"{m.group('keep')}{m.group('open') or ''}{MASK}"


_PATTERNS: list[tuple[re.Pattern, Any]] = [
    # user:password@ in URIs (MLflow/Prefect servers, databases, object stores)
    (re.compile(r"(?P<keep>(?<![a-zA-Z0-9+.-])[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)[^@\s/]+(?=@)"), rf"\g<keep>{MASK}"),
    # HTTP Authorization (and Proxy-Authorization) values of any scheme: the scheme stays readable, the rest of
    # the value goes (to the closing quote when quoted, else to the end of the line)
    (re.compile(rf"(?i)(?P<keep>(?>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*(?P<vq>[\"'])?(?:{_AUTH_SCHEMES}\s+)?))"
                r"(?!\*\*\*)(?(vq)(?:(?!(?P=vq))[^\r\n])+|[^\r\n]+)"), rf"\g<keep>{MASK}"),
    # key=value and key: value where the key ends in a secret word, bare or quoted
    (_KEY_VALUE, _mask_value),
    # signed URLs: AWS SigV4 and legacy S3, GCS V4 and Azure SAS query parameters (the rest of the URL stays)
    (re.compile(rf"(?i)(?P<keep>(?<![\w-])(?:{_SIGNED_URL_PARAMS})=|[?&](?:signature|sig)=)(?!\*\*\*)[^&#\s'\",;]+"),
     rf"\g<keep>{MASK}"),
    # bearer tokens and well-known token shapes (Hugging Face, GitHub, AWS access key ids)
    (re.compile(r"(?i)(?P<keep>bearer\s+)[A-Za-z0-9._~+/-]+=*"), rf"\g<keep>{MASK}"),
    (re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b"), MASK),
]


def redact(text: str) -> str:
    """``text`` with passwords in URIs, secret-looking key values, Authorization headers, signed-URL signatures
    and known token shapes masked."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_value(value: Any) -> Any:
    """Redact strings inside a value (dicts and lists included); other values pass through.

    A non-empty string under a secret-looking dict key (``{"password": "..."}``, ``{"hub.token": "..."}``, not
    ``eos_token``) is masked whole.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and isinstance(v, str) and v and _SECRET_NAME.fullmatch(k)
                else redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


def excerpt(value: Any, limit: int = EXCERPT_CHARS, quote: bool = True) -> str:
    """A short, redacted excerpt of ``value`` for an error message.

    Secrets are masked first (on a bounded head of the text, so a huge cell costs nothing), then the text is cut
    to ``limit`` characters, with '…' when something was cut. ``quote``: shown as a Python string literal
    (newlines and control characters escaped), for values from the data; otherwise whitespace runs become one
    space, for names and library messages embedded in a sentence. ``NOT_SHOWN`` when the run may not quote data.
    """
    if not may_quote():
        return NOT_SHOWN
    text = value if isinstance(value, str) else str(value)
    head = redact(text[: 8 * limit + 256])
    if not quote:
        head = " ".join(head.split())
    cut = head[:limit] + ("…" if len(head) > limit or len(text) > 8 * limit + 256 else "")
    return repr(cut) if quote else cut


def redact_exception(exc: BaseException) -> BaseException:
    """Mask secrets in ``exc``'s message, in place, and return ``exc``.

    Rewritten only where redaction changes the text: the ``args`` (an exception without secrets keeps its
    arguments as they were), an ``OSError``'s file names, notes added with ``add_note``, and the same for the
    exceptions chained to it (``__cause__``, ``__context__``), whose messages a traceback shows too. An exception
    whose message does not come from its arguments (a class that overrides ``__str__``) keeps its message.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    pending: list[BaseException] = []
    while current is not None:
        if id(current) not in seen:
            seen.add(id(current))
            _redact_one(current)
            pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        current = pending.pop() if pending else None
    return exc


def _redact_one(exc: BaseException) -> None:
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        notes[:] = [redact(n) if isinstance(n, str) else n for n in notes]
    try:
        shown = str(exc)
    except Exception:  # a broken __str__: nothing to rewrite
        return
    if redact(shown) == shown:
        return
    exc.args = tuple(redact_value(a) for a in exc.args)
    if isinstance(exc, OSError):
        for attr in ("filename", "filename2"):
            name = getattr(exc, attr, None)
            if isinstance(name, str):
                setattr(exc, attr, redact(name))
    try:
        still = str(exc)
    except Exception:
        still = ""
    if redact(still) != still and len(exc.args) != 1:
        exc.args = (redact(shown),)  # a message built from several arguments: the redacted message, whole
