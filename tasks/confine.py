"""Reads confined to the operator's data folders, for runs created through the Prefect API.

``tasks.policy`` checks such a run's config by value before any stage runs; what the libraries then read is
decided by more than the config: links inside a data folder, a dataset folder's own README, a saved dataset's
``state.json``, a file swapped for a link after the check. So every local read of data, tokenizers and checkpoints
goes through this module, and inside ``confined(Confinement(roots))`` (the flow enters it for each stage attempt of
a run created through the API):

- ``open_file`` opens a file race-free below one of the roots, one component at a time, never following a symbolic
  link, and only a regular file (no FIFO or device);
- ``glob_files`` lists a pattern's files without following links, with a time and an entry budget (for everyone);
- ``data_folder_files`` chooses a dataset folder's files by split by llmpipe's walk and ``datasets``' default split
  patterns, never by the folder's README;
- ``staged`` copies a tokenizer or checkpoint folder, file by file through ``open_file``, into a private folder, so
  ``transformers`` loads exactly the bytes that were checked;
- ``may_quote`` says whether messages and reports may quote what was read (``excerpt`` and the evaluation reports
  ask it).

Outside ``confined`` (the operator's own run: ``llmpipe run``, Python) reads are plain and follow links as before.
A refusal is a ``PolicyError`` that names the config field and the path as the run gave it, never a link's target
or a matched name the run did not give.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fnmatch
import glob
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.errors import ConfigError, DataError, PolicyError

GLOB_SECONDS = 10.0  # the longest a pattern's listing may take
GLOB_ENTRIES = 100_000  # the most folder entries a pattern's listing may visit
# What a dataset folder's data files are: the suffixes tasks.sources reads (its FORMATS, text and Arrow).
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".tab", ".parquet", ".pq", ".txt", ".arrow")
NO_LINKS = "links are not followed for runs created through the API"


@dataclass(frozen=True)
class Confinement:
    """What a run created through the API may read: files inside ``roots`` (the operator's data folders, already
    resolved); ``quote_data``: whether messages and reports may quote what it read."""

    roots: tuple[Path, ...]
    quote_data: bool = False


_CURRENT: ContextVar[Confinement | None] = ContextVar("llmpipe_confinement", default=None)


def current() -> Confinement | None:
    """The confinement in force; None in the operator's own run, where nothing is confined."""
    return _CURRENT.get()


@contextlib.contextmanager
def confined(c: Confinement | None) -> Iterator[None]:
    """Reads in this context (this thread or task, and what it copies its context to) are confined by ``c``."""
    token = _CURRENT.set(c)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def may_quote() -> bool:
    """Whether a message or report may quote data that was read: always, unless confined without ``quote_data``."""
    c = current()
    return c is None or c.quote_data


# ---------------------------------------------------------------------------------------------- files


def _below_root(path: str, field: str, c: Confinement) -> tuple[str, list[str]]:
    """The root that holds ``path`` (lexically, after normalising) and the components below it."""
    if not os.path.isabs(path):
        raise PolicyError(f"{field}: {path} is not an absolute path (runs created through the API name files by "
                          "absolute path)")
    norm = os.path.normpath(path)
    for root in sorted((str(r) for r in c.roots), key=len, reverse=True):
        if norm == root or norm.startswith(root.rstrip("/") + "/"):
            return root, [p for p in norm[len(root):].split("/") if p]
    raise PolicyError(f"{field}: {path} is outside the allowed data folders")


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_error(exc: OSError, name: str, dir_fd: int, last: bool, field: str, path: str) -> Exception:
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(name, dir_fd)):
        what = "is a symbolic link" if last else "passes through a symbolic link"
        return PolicyError(f"{field}: {path} {what} ({NO_LINKS})")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return DataError(f"{field}: file not found: {path}")
    if exc.errno == errno.ENXIO:  # a socket
        return PolicyError(f"{field}: {path} is not a regular file")
    return DataError(f"{field}: {path} cannot be read ({exc.strerror})")


def open_file(path: str | Path, field: str) -> BinaryIO:
    """``path`` opened for reading in binary.

    Confined, the path must be absolute and inside a root; it is opened from the root down, each folder with
    ``O_NOFOLLOW`` relative to the one before, so a link anywhere below the root, or one swapped in after a check,
    is refused rather than followed, and the file must be a regular file. A missing file is a ``DataError``.
    """
    c = current()
    if c is None:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"{field}: file not found: {path}") from None
        except IsADirectoryError:
            raise DataError(f"{field}: {path} is a folder, not a file") from None
    text = os.fspath(path)
    root, parts = _below_root(text, field, c)
    if not parts:
        raise DataError(f"{field}: {text} is a folder, not a file")
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # a data folder the operator named that is not there
        raise DataError(f"{field}: file not found: {text}") from None
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise _open_error(exc, part, fd, last, field, text) from None
            os.close(fd)
            fd = child
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise DataError(f"{field}: {text} is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise PolicyError(f"{field}: {text} is not a regular file (a FIFO, socket or device)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------- listings


class _Budget:
    """Counts the entries a listing visits and the time it takes; exceeding either refuses the pattern."""

    def __init__(self, what: str, field: str, refuse: type[Exception], seconds: float, entries: int):
        self.what, self.field, self.refuse = what, field, refuse
        self.seconds, self.entries = seconds, entries
        self.visited, self.deadline = 0, time.monotonic() + seconds

    def tick(self) -> None:
        self.visited += 1
        if self.visited > self.entries:
            raise self.refuse(f"{self.field}: listing {self.what} visits more than {self.entries:,} folder entries "
                              "(the listing budget); name a narrower pattern or a smaller folder")
        if time.monotonic() > self.deadline:
            raise self.refuse(f"{self.field}: listing {self.what} took longer than {self.seconds:g} s (the listing "
                              "budget); name a narrower pattern or a smaller folder")


def _hidden(name: str, part: str) -> bool:
    """As ``glob``: a wildcard does not match a name that starts with a dot unless the pattern's part does."""
    return name.startswith(".") and not part.startswith(".")


def _scan(folder: str, budget: _Budget) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                budget.tick()
                yield entry
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # as glob: nothing there
        return


def _walk(base: str, parts: list[str], budget: _Budget, follow: bool) -> tuple[set[str], set[str]]:
    """Regular files below ``base`` that match ``parts`` (``**``: any number of folders), and the symbolic links
    that matched (neither followed nor returned unless ``follow``)."""
    found: set[str] = set()
    links: set[str] = set()
    pending = [(base, 0)]
    while pending:
        folder, i = pending.pop()
        part, last = parts[i], i == len(parts) - 1
        if part == "**" and not last:
            pending.append((folder, i + 1))  # no folder at all
        for entry in _scan(folder, budget):
            if _hidden(entry.name, part) or (part != "**" and not fnmatch.fnmatchcase(entry.name, part)):
                continue
            if entry.is_symlink() and not follow:
                links.add(entry.path)
            elif entry.is_dir(follow_symlinks=follow):
                if part == "**":
                    pending.append((entry.path, i))
                elif not last:
                    pending.append((entry.path, i + 1))
            elif last and entry.is_file(follow_symlinks=follow):
                found.add(entry.path)
    return found, links


def _listing(base: str, parts: list[str], what: str, field: str, seconds: float = GLOB_SECONDS,
             entries: int = GLOB_ENTRIES) -> list[Path]:
    """The sorted regular files below folder ``base`` that ``parts`` match (possibly none); ``what`` (the pattern or
    the folder as the run gave it) is what refusals name."""
    c = current()
    if c is not None:
        root, below = _below_root(base, field, c)
        for i in range(len(below)):
            if os.path.islink(os.path.join(root, *below[: i + 1])):
                raise PolicyError(f"{field}: {what} passes through a symbolic link ({NO_LINKS})")
    refuse = ConfigError if c is None else PolicyError
    found, links = _walk(base, parts, _Budget(what, field, refuse, seconds, entries), follow=c is None)
    if links:
        raise PolicyError(f"{field}: {what} reaches {len(links)} symbolic link{'s' * (len(links) > 1)} ({NO_LINKS})")
    return sorted(Path(p) for p in found)


def glob_files(pattern: str, field: str, *, seconds: float = GLOB_SECONDS, entries: int = GLOB_ENTRIES) -> list[Path]:
    """The regular files a path or glob pattern names, sorted; an existing path is taken literally, even with
    [ ] * or ?.

    A pattern may hold one ``**`` (any number of folders) and no ``..``; its listing may visit at most ``entries``
    folder entries in ``seconds``. Confined, the listing starts inside a root and neither follows nor returns links:
    a link that matches refuses the pattern. Refusals name the pattern, never what it matched.
    """
    path = Path(pattern)
    if os.path.lexists(pattern) or not glob.has_magic(pattern):
        if path.is_dir():
            raise DataError(f"{field}: {path} is not a file (use a glob such as {path / '*.txt'})")
        if current() is not None:
            open_file(path, field).close()  # a regular file inside a root, reached without a link
        elif not path.is_file():
            raise DataError(f"{field}: file not found: {pattern}" if not path.exists() else f"{field}: {path} is "
                            "not a file")
        return [path]
    refuse = ConfigError if current() is None else PolicyError
    parts = list(path.parts)
    if ".." in parts:
        raise refuse(f"{field}: pattern {pattern!r} has a '..' component; name the folder it means instead")
    if parts.count("**") > 1:
        raise refuse(f"{field}: pattern {pattern!r} has more than one '**'; one recursive wildcard is allowed")
    if current() is not None and not path.is_absolute():
        raise PolicyError(f"{field}: pattern {pattern!r} is not absolute (runs created through the API name files "
                          "by absolute path)")
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    base = os.path.join(*parts[:first]) if first else "."
    matches = _listing(base, parts[first:], f"pattern {pattern!r}", field, seconds, entries)
    if not matches:
        raise DataError(f"{field}: pattern {pattern!r} matches no file")
    return matches


# ---------------------------------------------------------------------------------------------- folders


def data_folder_files(folder: str | Path, field: str) -> dict[str, list[Path]]:
    """The data files of a local dataset folder by split, as ``datasets`` chooses them by default, but from the
    names llmpipe listed itself: its split patterns (``data/{split}-00000-of-00001.*``; else train, validation
    (valid, dev, val) and test (eval) in a file or folder name; else every file is train). The folder's README.md
    (its ``configs`` and ``data_files``) is never read. Data files have one of ``DATA_SUFFIXES``; hidden files and
    ``datasets``' own metadata files (``dataset_info.json``, ...) are not data."""
    from datasets.data_files import FILES_TO_IGNORE, _get_data_files_patterns
    from fsspec.utils import glob_translate

    listed = _listing(str(folder), ["**"], str(folder), field)
    files = {p.relative_to(folder).as_posix(): p for p in listed
             if p.suffix.lower() in DATA_SUFFIXES and p.name not in FILES_TO_IGNORE}
    if not files:
        raise DataError(f"{field}: {folder} holds no data files ({', '.join(DATA_SUFFIXES)})")

    def resolve(pattern: str) -> list[str]:  # what datasets' resolver would find among the listed names
        regex = re.compile(glob_translate(pattern))
        return [name for name in files if regex.match(name)]

    return {str(split): [files[name] for name in sorted({n for p in patterns for n in resolve(p)})]
            for split, patterns in _get_data_files_patterns(resolve).items()}


_STAGED: dict[tuple, Path] = {}  # (folder, its files' names, mtimes and sizes) -> its private copy
_STAGED_LOCK = threading.Lock()


def _remove_staged() -> None:
    for copy in _STAGED.values():
        shutil.rmtree(copy, ignore_errors=True)


def staged(folder: str | Path, field: str) -> Path:
    """A tokenizer or checkpoint folder to load with ``transformers``: the folder itself, or, confined, a private copy
    of its files (hidden ones aside) made through ``open_file``, so what loads is exactly what was checked; a link
    inside is refused. Copies are kept for the process (a folder whose files did not change is copied once) and
    removed when it exits."""
    if current() is None:
        return Path(folder)
    files = _listing(str(folder), ["**"], str(folder), field)
    if not files:
        raise DataError(f"{field}: {folder} is not a folder, or holds no files")
    key = (os.path.normpath(folder), *((str(p), (s := p.lstat()).st_mtime_ns, s.st_size) for p in files))
    with _STAGED_LOCK:
        copy = _STAGED.get(key)
        if copy is None:
            copy = Path(tempfile.mkdtemp(prefix="llmpipe-staged-"))
            try:
                for p in files:
                    target = copy / p.relative_to(folder)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open_file(p, field) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
            except BaseException:
                shutil.rmtree(copy, ignore_errors=True)
                raise
            if not _STAGED:
                atexit.register(_remove_staged)
            _STAGED[key] = copy
    return copy
