"""The workspace: content-addressed artifact directories, atomic writes and the small *Ref types.

An artifact is a directory ``<workspace>/<kind>/<fingerprint>/`` holding its files and a
``manifest.json``. It is built in ``<fingerprint>.tmp-<id>`` and moved into place with
``os.replace``, so a directory under its final name is always complete; a crash leaves only a
``.tmp-*`` directory, which is never read. A per-fingerprint file lock makes a second writer wait
and then reuse what the first one built.

Durability: before the rename every file the build wrote, and every directory it wrote into, is
fsynced, and the parent directory is fsynced after it, so a power loss cannot leave a complete-looking
artifact with truncated files. The manifest records each file's size and SHA-256 (``files``); reuse
checks them, and a damaged artifact is removed (under its lock) and built again. Manifests written
before checksums were recorded (no ``files``) are trusted as they are.
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


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_fsync(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, fsynced to disk in the same pass."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = os.fstat(f.fileno()).st_size
        os.fsync(f.fileno())
    return size, digest


def seal(directory: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """Fsync every file and directory under ``directory`` and return ``{relative path: {size, sha256}}``.

    ``exclude`` names top-level files left out of the listing (they are still fsynced). Symbolic links are
    neither followed nor listed.
    """
    files: dict[str, dict[str, Any]] = {}
    for dirpath, _dirnames, filenames in os.walk(directory, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            path = here / name
            if path.is_symlink() or not path.is_file():
                continue
            size, digest = _hash_and_fsync(path)
            rel = path.relative_to(directory).as_posix()
            if rel not in exclude:
                files[rel] = {"size": size, "sha256": digest}
        _fsync_dir(here)
    return dict(sorted(files.items()))


def damage(path: Path) -> str | None:
    """What is wrong with the complete-looking artifact at ``path``, or None when its files match its manifest.

    Sizes are checked first (cheap, and what a power loss truncates), then SHA-256 of every file. A manifest
    without ``files`` (written before checksums were recorded) is trusted.
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{MANIFEST}: unreadable ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"{MANIFEST}: 'files' is not a mapping"
    if not all(isinstance(want, dict) for want in files.values()):
        return f"{MANIFEST}: 'files' entries are not mappings"
    for rel, want in files.items():
        try:
            size = (path / rel).stat().st_size
        except FileNotFoundError:
            return f"{rel}: missing"
        except OSError as exc:
            return f"{rel}: unreadable ({exc})"
        if size != want.get("size"):
            return f"{rel}: {size} bytes, the manifest says {want.get('size')}"
    for rel, want in files.items():
        try:
            with open(path / rel, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            return f"{rel}: unreadable ({exc})"
        if digest != want.get("sha256"):
            return f"{rel}: SHA-256 differs from the manifest (content changed)"
    return None


def _acquire(lock_path: Path, blocking: bool, on_wait: Callable[[], None] | None) -> Any:
    """The open, ``flock``-ed lock file, or None when it is held elsewhere and ``blocking`` is False."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fh = open(lock_path, "a")  # noqa: SIM115 - returned open: the lock lives as long as the file
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    fh.close()
                    return None
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fh.fileno())
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return fh
        except BaseException:
            fh.close()
            raise
        fh.close()  # the file we locked was removed meanwhile (llmpipe gc): lock the one there now


@contextlib.contextmanager
def file_lock(lock_path: Path, *, blocking: bool = True, on_wait: Callable[[], None] | None = None
              ) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing); yields whether it is held.

    With ``blocking=False`` a lock held elsewhere yields False at once. The lock is taken on the file that is
    at ``lock_path`` once it is held, so a lock file removed (by ``llmpipe gc``) while a waiter waited on it
    does not give two holders.
    """
    fh = _acquire(lock_path, blocking, on_wait)
    if fh is None:
        yield False
        return
    try:
        yield True
    finally:
        try:
            fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()


def lock_is_held(lock_path: Path) -> bool:
    """Whether another open file holds ``lock_path``'s lock (a missing file is not held). Creates nothing."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def discard(path: Path, why: str = "gc") -> None:
    """Remove a directory so that an interruption leaves no half-removed directory under its name: rename it
    to a ``.tmp-<why>-*`` sibling (never read, and removed by ``llmpipe gc``), make that durable, then delete."""
    if not path.exists() and not path.is_symlink():
        return
    doomed = path.with_name(f"{path.name}.tmp-{why}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    _fsync_dir(path.parent)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half of it; the file and
    the rename are fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")


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

    def intact(self, kind: str, fp: str, stage: str) -> bool:
        """Whether the artifact exists complete and undamaged; a damaged one is removed (under its lock, with a
        warning), so a stage that builds it in several steps (the tokenize shards) starts afresh."""
        final = self.dir(kind, fp)
        if not self.is_complete(final):
            return False
        if damage(final) is None:
            return True
        with self.lock(kind, fp):
            problem = damage(final) if self.is_complete(final) else None
            if problem is not None:
                log.warning("%s: artifact %s/%s is damaged (%s); removing it and building it again",
                            stage, kind, fp, problem)
                discard(final, "damaged")
        return False

    def lock_path(self, kind: str, fp: str) -> Path:
        return self.root / kind / f"{fp}.lock"

    @contextlib.contextmanager
    def lock(self, kind: str, fp: str, doing: str = "built") -> Iterator[None]:
        def waiting() -> None:
            log.info("%s/%s is being %s by another run; waiting for it", kind, fp, doing)

        with file_lock(self.lock_path(kind, fp), on_wait=waiting):
            yield

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

        The manifest records the stage, its inputs' fingerprints, its config, ``meta`` and every file's size
        and SHA-256. An existing artifact whose files no longer match is removed and built again.
        """
        kind = ref_type.model_fields["kind"].default
        final = self.dir(kind, fp)
        if self.is_complete(final) and damage(final) is None:
            return self._ref(ref_type, final, stage, reused=True)
        with self.lock(kind, fp):
            if self.is_complete(final):
                problem = damage(final)
                if problem is None:
                    return self._ref(ref_type, final, stage, reused=True)
                log.warning("%s: artifact %s/%s is damaged (%s); removing it and building it again",
                            stage, kind, fp, problem)
                discard(final, "damaged")
            elif final.exists():  # a directory under the final name without a manifest: not ours to trust
                discard(final, "incomplete")
            tmp = final.with_name(f"{fp}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            try:
                started = time.time()
                meta = build(tmp) or {}
                files = seal(tmp)  # every file and directory of the build is on disk before the rename
                manifest = {
                    "stage": stage,
                    "kind": kind,
                    "fingerprint": fp,
                    "inputs": inputs or {},
                    "config": config.model_dump(mode="json") if isinstance(config, BaseModel) else config,
                    "meta": meta,
                    "files": files,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.time() - started, 3),
                }
                write_json(tmp / MANIFEST, manifest)  # fsyncs the manifest and tmp's entries
                os.replace(tmp, final)
                _fsync_dir(final.parent)
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
