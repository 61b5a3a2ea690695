"""The workspace: content-addressed artifact directories, atomic writes and the small *Ref types.

An artifact is a directory ``<workspace>/<kind>/<fingerprint>/`` holding its files and a
``manifest.json``. It is built in ``<fingerprint>.tmp-<id>`` and moved into place with
``os.replace``, so a directory under its final name is always complete; a crash leaves only a
``.tmp-*`` directory, which is never read. A per-fingerprint file lock makes a second writer wait
and then reuse what the first one built.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

log = logging.getLogger("llmpipe")

MANIFEST = "manifest.json"


class ArtifactRef(BaseModel):
    """A small, serialisable pointer to a complete artifact directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    fingerprint: str
    path: str
    reused: bool = False
    meta: dict[str, Any] = {}

    @property
    def dir(self) -> Path:
        return Path(self.path)


class CorpusRef(ArtifactRef):
    kind: str = "corpora"


class LabeledRef(ArtifactRef):
    kind: str = "labeled"


class TokenizerRef(ArtifactRef):
    kind: str = "tokenizers"


class TokensRef(ArtifactRef):
    kind: str = "tokens"


class CheckpointRef(ArtifactRef):
    kind: str = "checkpoints"


class ReportRef(ArtifactRef):
    kind: str = "reports"

    def load(self) -> dict[str, Any]:
        return json.loads((self.dir / "report.json").read_text())


def fingerprint(*parts: Any) -> str:
    """Hash of upstream fingerprints, stage config and stage version: the artifact's identity."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, BaseModel):
            part = part.model_dump(mode="json")
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class Workspace:
    """The artifact root (``./.llmpipe`` by default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def dir(self, kind: str, fp: str) -> Path:
        return self.root / kind / fp

    def work_dir(self, kind: str, fp: str) -> Path:
        """A stable scratch directory for an artifact still being built (resumable checkpoints)."""
        return self.root / kind / f"{fp}.work"

    @staticmethod
    def is_complete(path: Path) -> bool:
        return (path / MANIFEST).is_file()

    @contextlib.contextmanager
    def lock(self, kind: str, fp: str) -> Iterator[None]:
        lock_path = self.root / kind / f"{fp}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s/%s is being built by another run; waiting for it", kind, fp)
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def materialize(
        self,
        ref_type: type[ArtifactRef],
        fp: str,
        build: Callable[[Path], dict[str, Any]],
        *,
        stage: str,
        inputs: dict[str, str] | None = None,
        config: Any = None,
    ) -> ArtifactRef:
        """Return the artifact ``fp``, building it with ``build(tmp_dir) -> meta`` unless it exists.

        The manifest records the stage, its inputs' fingerprints, its config and ``meta``.
        """
        kind = ref_type.model_fields["kind"].default
        final = self.dir(kind, fp)
        if self.is_complete(final):
            return self._ref(ref_type, final, stage, reused=True)
        with self.lock(kind, fp):
            if self.is_complete(final):
                return self._ref(ref_type, final, stage, reused=True)
            if final.exists():  # a directory under the final name without a manifest: not ours to trust
                shutil.rmtree(final)
            tmp = final.with_name(f"{fp}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            try:
                started = time.time()
                meta = build(tmp) or {}
                manifest = {
                    "stage": stage,
                    "kind": kind,
                    "fingerprint": fp,
                    "inputs": inputs or {},
                    "config": config.model_dump(mode="json") if isinstance(config, BaseModel) else config,
                    "meta": meta,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.time() - started, 3),
                }
                write_json(tmp / MANIFEST, manifest)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return self._ref(ref_type, final, stage, reused=False)

    @staticmethod
    def _ref(ref_type: type[ArtifactRef], path: Path, stage: str, reused: bool) -> ArtifactRef:
        manifest = json.loads((path / MANIFEST).read_text())
        if reused:
            log.info("%s: reusing artifact %s (%s)", stage, manifest["fingerprint"], path)
        else:
            log.info("%s: built artifact %s in %.1fs", stage, manifest["fingerprint"], manifest["build_seconds"])
        return ref_type(fingerprint=manifest["fingerprint"], path=str(path), reused=reused, meta=manifest["meta"])
