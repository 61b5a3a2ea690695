"""Hugging Face checkpoints that a stage starts from (``model.init_from``, ``finetune.init_from``): where they
are (a local folder through ``confine.staged``: for a run created through the API, a private copy of its checked
files), and what names them in a fingerprint (their files' content, not the name they were given)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.artifacts import file_sha256
from tasks.config import is_local
from tasks.confine import staged
from tasks.errors import ConfigError


def local_dir(name: str, field: str) -> Path:
    """The folder holding checkpoint ``name``: itself when local (``confine.staged``), else the Hub snapshot
    (downloaded once, cached)."""
    if is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{field}={name}: no such directory")
        return staged(path, field)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name))
    except Exception as exc:  # the hub client raises its own error types (offline, not found, gated)
        raise ConfigError(f"{field}={name}: cannot fetch it from the Hugging Face Hub ({type(exc).__name__})") from None


def identity(name: str, field: str) -> list[tuple[str, str]]:
    """Every file of the checkpoint, by relative path and SHA-256: a changed folder is a different checkpoint."""
    root = local_dir(name, field)
    return sorted((f.relative_to(root).as_posix(), file_sha256(f)) for f in root.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts))


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same strings to the same ids (special tokens included)."""
    return a.get_vocab() == b.get_vocab()
