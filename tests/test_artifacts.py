"""Durable, verified artifacts: every file is fsynced and checksummed in the manifest; reuse checks them."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from tasks.artifacts import (
    MANIFEST,
    TokensRef,
    Workspace,
    damage,
    file_lock,
    file_sha256,
    lock_is_held,
    write_json,
)

FP = "0123456789abcdef0123"


class Builder:
    """A build that writes a weights file and a nested token file, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out: Path) -> dict[str, Any]:
        self.calls += 1
        (out / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (out / "shards").mkdir()
        (out / "shards" / "train.bin").write_bytes(b"\x01\x02" * 5000)
        return {"n": 1}


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


def _damaged_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]


def test_manifest_records_every_file_with_size_and_sha256(ws: Workspace) -> None:
    ref = ws.materialize(TokensRef, FP, Builder(), stage="tokenize")
    manifest = json.loads((ref.dir / MANIFEST).read_text())
    assert set(manifest["files"]) == {"weights.bin", "shards/train.bin"}
    for rel, entry in manifest["files"].items():
        assert entry == {"size": (ref.dir / rel).stat().st_size, "sha256": file_sha256(ref.dir / rel)}
    assert damage(ref.dir) is None
    assert sorted(p.name for p in ref.dir.parent.iterdir()) == [FP, f"{FP}.lock"]  # no temporary leftovers


def test_truncated_file_is_detected_on_reuse_and_rebuilt(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    build = Builder()
    ref = ws.materialize(TokensRef, FP, build, stage="tokenize")
    good = (ref.dir / "shards" / "train.bin").read_bytes()
    with open(ref.dir / "shards" / "train.bin", "r+b") as f:  # what a power loss leaves of unsynced data
        f.truncate(1000)
    assert "shards/train.bin" in (damage(ref.dir) or "")
    with caplog.at_level(logging.INFO, logger="llmpipe"):
        again = ws.materialize(TokensRef, FP, build, stage="tokenize")
    assert not again.reused and build.calls == 2
    assert (again.dir / "shards" / "train.bin").read_bytes() == good
    (warning,) = _damaged_warnings(caplog)
    assert f"tokens/{FP}" in warning and "shards/train.bin" in warning
    assert damage(again.dir) is None
    assert not [p for p in again.dir.parent.iterdir() if ".tmp-" in p.name]  # the damaged copy is gone


def test_changed_byte_is_rebuilt(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    build = Builder()
    ref = ws.materialize(TokensRef, FP, build, stage="tokenize")
    data = bytearray((ref.dir / "weights.bin").read_bytes())
    data[1234] ^= 0x40  # same size, one bit different
    (ref.dir / "weights.bin").write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="llmpipe"):
        again = ws.materialize(TokensRef, FP, build, stage="tokenize")
    assert not again.reused and build.calls == 2
    (warning,) = _damaged_warnings(caplog)
    assert "weights.bin" in warning and "SHA-256" in warning
    assert (again.dir / "weights.bin").read_bytes() == bytes(range(256)) * 64


def test_missing_file_and_unreadable_manifest_are_rebuilt(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    build = Builder()
    ref = ws.materialize(TokensRef, FP, build, stage="tokenize")
    (ref.dir / "weights.bin").unlink()
    with caplog.at_level(logging.INFO, logger="llmpipe"):
        assert not ws.materialize(TokensRef, FP, build, stage="tokenize").reused
    assert "weights.bin: missing" in _damaged_warnings(caplog)[0]
    (ref.dir / MANIFEST).write_text('{"stage": "tok')  # a manifest cut short
    assert not ws.materialize(TokensRef, FP, build, stage="tokenize").reused
    assert build.calls == 3
    assert ws.materialize(TokensRef, FP, build, stage="tokenize").reused and build.calls == 3


def test_manifest_without_files_is_trusted_as_before(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    build = Builder()
    ref = ws.materialize(TokensRef, FP, build, stage="tokenize")
    manifest = json.loads((ref.dir / MANIFEST).read_text())
    del manifest["files"]  # as written before checksums were recorded
    write_json(ref.dir / MANIFEST, manifest)
    (ref.dir / "weights.bin").write_bytes(b"changed")
    with caplog.at_level(logging.INFO, logger="llmpipe"):
        again = ws.materialize(TokensRef, FP, build, stage="tokenize")
    assert again.reused and build.calls == 1 and again.meta == {"n": 1}
    assert not _damaged_warnings(caplog)


def test_intact_artifact_is_reused_without_building(ws: Workspace) -> None:
    build = Builder()
    ws.materialize(TokensRef, FP, build, stage="tokenize")
    assert ws.materialize(TokensRef, FP, build, stage="tokenize").reused and build.calls == 1


def test_failed_build_leaves_nothing_under_the_final_name(ws: Workspace) -> None:
    def failing(out: Path) -> dict[str, Any]:
        (out / "half.bin").write_bytes(b"x" * 100)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ws.materialize(TokensRef, FP, failing, stage="tokenize")
    assert not ws.dir("tokens", FP).exists()
    assert not [p for p in ws.dir("tokens", FP).parent.iterdir() if ".tmp-" in p.name]


def test_lock_file_removed_while_waited_on_gives_one_holder(tmp_path: Path) -> None:
    """gc removes a free lock file while holding it; a run that was waiting on the old file must lock the new
    one, or two runs would build the same artifact at once."""
    lock = tmp_path / "k" / f"{FP}.lock"
    waiting, acquired, release = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with file_lock(lock, on_wait=waiting.set):
                acquired.set()
                release.wait(10)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            acquired.set()

    with file_lock(lock) as held:  # stands for gc: holds the lock, removes the file, lets go
        assert held and lock_is_held(lock)
        thread = threading.Thread(target=waiter)
        thread.start()
        assert waiting.wait(10)
        lock.unlink()
    assert acquired.wait(10) and not errors
    assert lock.exists() and lock_is_held(lock)  # the waiter holds the file now at the path
    with file_lock(lock, blocking=False) as other:
        assert other is False
    release.set()
    thread.join(10)
    assert not lock_is_held(lock)
