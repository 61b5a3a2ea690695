"""Workspace garbage collection (``llmpipe gc``): what the workspace no longer needs, listed and removed.

Two sorts of garbage:

- **Leftovers.** ``*.tmp-*`` files and directories (a build, a checkpoint or a write that crashed, or an
  interrupted gc), ``<fp>.lock`` files whose lock nobody holds, and ``<fp>.work`` directories (resumable
  checkpoints of a build that did not finish) whose lock nobody holds and whose newest file is older than
  ``keep_days``. A leftover whose fingerprint's lock is held belongs to a build in progress and is kept;
  ``*.tmp-*`` entries inside a ``.work`` directory go with that directory (tokenize shards are written there
  without the lock).
- **Unreferenced artifacts.** Complete artifacts ``<workspace>/<kind>/<fp>/`` that no registered model
  version and no recent run of the experiment names in a ``llmpipe.*fingerprint`` tag
  (:func:`registry_references`), and that are not upstream of one that is (manifest ``inputs``,
  transitively). When the references are unknown (``referenced=None``) no artifact is called unreferenced.

Nothing is removed while its fingerprint's lock is held. A directory is renamed to ``.tmp-gc-*`` before it is
deleted, so an interrupted gc never leaves a half-removed artifact under its complete-looking name.

Plain functions, no Prefect; ``mlflow`` is only used through the client passed in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.artifacts import MANIFEST, discard, file_lock, lock_is_held

TMP_MARK = ".tmp-"
WORK_SUFFIX = ".work"
LOCK_SUFFIX = ".lock"
TAG_PREFIX, TAG_SUFFIX = "llmpipe.", "fingerprint"
# Top-level folders of the workspace that are not artifact kinds: Prefect's home (``flows.runtime.configure``).
NOT_KINDS = frozenset({"prefect"})
DAY = 86400.0


@dataclass(frozen=True)
class Entry:
    """One thing gc would remove."""

    category: str  # "temporary" | "lock" | "work" | "unreferenced"
    path: Path
    size: int
    why: str
    lock: Path | None = None  # the lock of the fingerprint it belongs to; held -> not touched


@dataclass(frozen=True)
class Outcome:
    entry: Entry
    removed: bool
    note: str = ""


# ---------------------------------------------------------------------------------------------- finding


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (links are not followed)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def newest_mtime(path: Path) -> float:
    """The newest modification time of ``path`` or anything under it."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _owner(name: str) -> str:
    """The fingerprint an entry of a kind folder belongs to: ``<fp>``, ``<fp>.work``, ``<fp>.tmp-x``, ``<fp>.lock``."""
    name = name.split(TMP_MARK, 1)[0]
    for suffix in (WORK_SUFFIX, LOCK_SUFFIX):
        name = name.removesuffix(suffix)
    return name


def _nested_tmp(top: Path, lock: Path | None) -> list[Entry]:
    """``*.tmp-*`` files and folders anywhere under ``top`` (not descending into them)."""
    found = []
    for dirpath, dirs, files in os.walk(top):
        here = Path(dirpath)
        for name in sorted(dirs):
            if TMP_MARK in name:
                found.append(_tmp_entry(here / name, lock))
        dirs[:] = sorted(d for d in dirs if TMP_MARK not in d)
        found += [_tmp_entry(here / name, lock) for name in sorted(files) if TMP_MARK in name]
    return found


def _tmp_entry(path: Path, lock: Path | None) -> Entry:
    why = ("interrupted removal" if f"{TMP_MARK}gc-" in path.name
           else "temporary files of a write that did not finish")
    return Entry("temporary", path, _size(path), why, lock)


def _manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def artifacts(workspace: Path) -> dict[str, list[Path]]:
    """Every complete artifact of the workspace: ``{fingerprint: [<kind>/<fp> directories]}``."""
    found: dict[str, list[Path]] = {}
    for kind_dir in _kind_dirs(Path(workspace)):
        for path in sorted(kind_dir.iterdir()):
            if path.is_dir() and not path.is_symlink() and TMP_MARK not in path.name \
                    and not path.name.endswith(WORK_SUFFIX) and (path / MANIFEST).is_file():
                found.setdefault(path.name, []).append(path)
    return found


def upstream_closure(workspace: Path, referenced: Iterable[str]) -> set[str]:
    """``referenced`` and every fingerprint upstream of them (manifest ``inputs``, transitively)."""
    index = artifacts(workspace)
    kept: set[str] = set()
    pending = [fp for fp in referenced if isinstance(fp, str)]
    while pending:
        fp = pending.pop()
        if fp in kept:
            continue
        kept.add(fp)
        for path in index.get(fp, []):
            inputs = _manifest(path).get("inputs") or {}
            if isinstance(inputs, dict):
                pending.extend(v for v in inputs.values() if isinstance(v, str))
    return kept


def _kind_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir())
            if p.is_dir() and not p.is_symlink() and p.name not in NOT_KINDS and TMP_MARK not in p.name]


def find_garbage(workspace: Path, referenced: set[str] | None, keep_days: float,
                 now: float | None = None) -> list[Entry]:
    """What the workspace no longer needs. ``referenced``: fingerprints still in use (see
    :func:`registry_references`), or None when unknown: then only leftovers are listed."""
    root = Path(workspace).resolve()
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    cutoff = now - keep_days * DAY
    kept = upstream_closure(root, referenced) if referenced is not None else set()
    entries: list[Entry] = []
    for path in sorted(root.iterdir()):  # leftovers at the top (a kind folder being removed, ...)
        if TMP_MARK in path.name:
            entries.append(_tmp_entry(path, None))
    for kind_dir in _kind_dirs(root):
        for path in sorted(kind_dir.iterdir()):
            name = path.name
            lock = kind_dir / f"{_owner(name)}{LOCK_SUFFIX}"
            if TMP_MARK in name:
                if not lock_is_held(lock):
                    entries.append(_tmp_entry(path, lock))
            elif name.endswith(LOCK_SUFFIX) and path.is_file():
                if not lock_is_held(path):
                    entries.append(Entry("lock", path, _size(path), "lock file, not held", path))
            elif name.endswith(WORK_SUFFIX) and path.is_dir():
                if lock_is_held(lock):
                    continue
                newest = newest_mtime(path)
                if newest < cutoff:
                    age = (now - newest) / DAY
                    entries.append(Entry("work", path, _size(path),
                                         f"checkpoints of an unfinished build, newest file {age:.1f} days old",
                                         lock))
            elif path.is_dir() and not path.is_symlink():
                if lock_is_held(lock):
                    continue
                complete = (path / MANIFEST).is_file()
                if complete and referenced is not None and name not in kept:
                    entries.append(Entry("unreferenced", path, _size(path),
                                         f"{_manifest(path).get('stage', kind_dir.name)} artifact no registered "
                                         f"model or run of the last {keep_days:g} days refers to", lock))
                else:
                    entries += _nested_tmp(path, lock)
    return entries


# ---------------------------------------------------------------------------------------------- references


def _fingerprint_tags(tags: dict[str, str] | None) -> set[str]:
    return {str(v).strip() for k, v in (tags or {}).items()
            if k.startswith(TAG_PREFIX) and k.endswith(TAG_SUFFIX) and v and str(v).strip()}


def registry_references(client: Any, experiment: str, keep_days: float, now: float | None = None) -> set[str]:
    """Fingerprints in ``llmpipe.*fingerprint`` tags of every registered model version, and of the runs of
    ``experiment`` that started within ``keep_days`` (stage runs carry their artifact's and its inputs')."""
    from mlflow.entities import ViewType

    refs: set[str] = set()
    token = None
    while True:
        page = client.search_model_versions(max_results=1000, page_token=token)
        for mv in page:
            refs |= _fingerprint_tags(mv.tags)
        token = page.token
        if not token:
            break
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return refs
    since = int(((time.time() if now is None else now) - keep_days * DAY) * 1000)
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {since}",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        for run in page:
            refs |= _fingerprint_tags(run.data.tags)
        token = page.token
        if not token:
            break
    return refs


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (``sqlite:////abs/path`` when absolute); None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None  # not SQLite, or ``sqlite://`` (in memory)
    rest = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(rest) if rest else None


def existing_store(uri: str) -> bool:
    """Whether ``uri`` names a store that exists, checked without touching it (MLflow's SQLite and file stores
    create themselves on first use). Servers are assumed to exist."""
    if uri.startswith("sqlite:"):
        path = _sqlite_file(uri)
        return path is not None and path.is_file()
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).is_dir()
    if "://" not in uri:
        return Path(uri).is_dir()
    return True


def find_tracking_uri(environ: dict[str, str] | None = None, cwd: Path | None = None) -> str | None:
    """``MLFLOW_TRACKING_URI`` when it names an existing store, else ``sqlite:///mlflow.db`` when ``mlflow.db`` is
    in ``cwd``; None when neither (gc then cannot know what is referenced)."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        path = _sqlite_file(uri)
        if path is not None:  # a relative path is relative to cwd
            uri = f"sqlite:///{(cwd / path).resolve()}"
        return uri if existing_store(uri) else None
    default = cwd / "mlflow.db"
    return f"sqlite:///{default.resolve()}" if default.is_file() else None


# ---------------------------------------------------------------------------------------------- removing


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_one(entry: Entry, keep_days: float, now: float) -> Outcome:
    path = entry.path
    if not path.exists() and not path.is_symlink():
        return Outcome(entry, False, "already gone")
    if entry.category == "lock":
        with file_lock(path, blocking=False) as held:
            if not held:
                return Outcome(entry, False, "its lock is held now")
            path.unlink(missing_ok=True)  # waiters on this file notice and lock the next one (file_lock)
        return Outcome(entry, True)
    if entry.lock is None:
        _rm(path)
        return Outcome(entry, True)
    lock_existed = entry.lock.exists()
    with file_lock(entry.lock, blocking=False) as held:
        if not held:
            return Outcome(entry, False, "its lock is held now")
        try:
            if entry.category == "work" and newest_mtime(path) >= now - keep_days * DAY:
                return Outcome(entry, False, "written to since it was listed")
            if entry.category == "temporary":
                _rm(path)  # never read under this name; a partial removal stays a .tmp-* leftover
            else:
                discard(path, "gc")  # renamed first: never a half-removed artifact under its name
        finally:
            if not lock_existed:  # taking the lock created the file; leave none behind
                entry.lock.unlink(missing_ok=True)
    return Outcome(entry, True)


def remove(entries: Iterable[Entry], keep_days: float = 0.0, now: float | None = None) -> list[Outcome]:
    """Remove ``entries`` (from :func:`find_garbage`), each under its fingerprint's lock, skipping any whose lock
    is held now; lock files go last. Returns what happened to each."""
    now = time.time() if now is None else now
    ordered = sorted(entries, key=lambda e: e.category == "lock")
    outcomes = []
    for entry in ordered:
        try:
            outcomes.append(_remove_one(entry, keep_days, now))
        except OSError as exc:
            outcomes.append(Outcome(entry, False, f"could not remove: {exc}"))
    return outcomes


# ---------------------------------------------------------------------------------------------- output


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def describe(entry: Entry, root: Path) -> str:
    """One line: category, path (relative to the workspace), size, why."""
    try:
        shown = entry.path.relative_to(root)
    except ValueError:
        shown = entry.path
    return f"{entry.category:<12}  {str(shown):<44}  {human(entry.size):>9}  {entry.why}"
