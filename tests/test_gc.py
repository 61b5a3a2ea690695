"""``llmpipe gc``: leftovers and unreferenced artifacts, against a real workspace and a real MLflow SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from flows.cli import EXIT_CONFIG, main
from tasks import gc
from tasks.artifacts import (
    CheckpointRef,
    CorpusRef,
    TokenizerRef,
    TokensRef,
    Workspace,
    file_lock,
)

REPO = Path(__file__).resolve().parent.parent
DAY = 86400


def _writes(name: str, size: int = 1000):
    def build(out: Path) -> dict[str, Any]:
        (out / name).write_bytes(os.urandom(size))
        return {}

    return build


def _chain(ws: Workspace, tag: str) -> dict[str, str]:
    """corpus -> tokenizer -> tokens -> lm, as the pipeline links them; returns {name: fingerprint}."""
    fps = {name: f"{tag}{name[:3]}".ljust(20, "0") for name in ("corpus", "tokenizer", "tokens", "lm")}
    ws.materialize(CorpusRef, fps["corpus"], _writes("train.jsonl"), stage="ingest_corpus")
    ws.materialize(TokenizerRef, fps["tokenizer"], _writes("tokenizer.json"), stage="train_tokenizer",
                   inputs={"corpus": fps["corpus"]})
    ws.materialize(TokensRef, fps["tokens"], _writes("train.bin"), stage="tokenize",
                   inputs={"corpus": fps["corpus"], "tokenizer": fps["tokenizer"]})
    ws.materialize(CheckpointRef, fps["lm"], _writes("model.safetensors"), stage="pretrain",
                   inputs={"tokens": fps["tokens"], "tokenizer": fps["tokenizer"]})
    return fps


def _paths(entries: list[gc.Entry]) -> set[Path]:
    return {e.path for e in entries}


def _age(path: Path, days: float) -> None:
    """Set the modification time of ``path`` and everything under it ``days`` back."""
    when = time.time() - days * DAY
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when))


def test_crash_in_build_leaves_only_tmp_dir_that_gc_lists_and_removes(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    fp = "c" * 20
    crash = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from tasks.artifacts import CorpusRef, Workspace

        def build(out: Path):
            (out / "train.jsonl").write_bytes(b"x" * 5000)
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup runs

        Workspace({str(root)!r}).materialize(CorpusRef, {fp!r}, build, stage="ingest_corpus")
    """)
    proc = subprocess.run([sys.executable, "-c", crash], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    kind = root / "corpora"
    tmp_dirs = [p for p in kind.iterdir() if ".tmp-" in p.name]
    assert len(tmp_dirs) == 1 and tmp_dirs[0].is_dir() and not (kind / fp).exists()

    entries = gc.find_garbage(root, set(), keep_days=7)
    assert {(e.category, e.path) for e in entries} == {("temporary", tmp_dirs[0]), ("lock", kind / f"{fp}.lock")}
    assert next(e for e in entries if e.category == "temporary").size == 5000
    outcomes = gc.remove(entries)
    assert all(o.removed for o in outcomes)
    assert list(kind.iterdir()) == []
    ref = Workspace(root).materialize(CorpusRef, fp, _writes("train.jsonl"), stage="ingest_corpus")
    assert not ref.reused
    assert [e.category for e in gc.find_garbage(root, {fp}, keep_days=7)] == ["lock"]  # only the free lock file


def test_gc_keeps_registered_artifact_and_its_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    ws = Workspace(tmp_path / "ws")
    kept = _chain(ws, "a")  # its LM is a registered model version
    recent = _chain(ws, "b")  # its tokens are named by a run of the last days
    old = _chain(ws, "c")  # named only by a run of two weeks ago
    loose = ws.materialize(CorpusRef, "d" * 20, _writes("train.jsonl"), stage="ingest_corpus")  # named by nothing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    artifacts = (tmp_path / "mlartifacts").as_uri()
    client.create_registered_model("llmpipe-sentiment-lm")
    client.create_model_version("llmpipe-sentiment-lm", source=f"{artifacts}/model",
                                tags={"llmpipe.fingerprint": kept["lm"], "llmpipe.config_hash": "x"})
    exp = client.create_experiment("llmpipe", artifact_location=artifacts)
    client.create_run(exp, tags={"llmpipe.tokens_fingerprint": recent["tokens"], "llmpipe.stage": "tokenize"})
    client.create_run(exp, start_time=int((time.time() - 14 * DAY) * 1000),
                      tags={"llmpipe.fingerprint": old["lm"]})

    refs = gc.registry_references(client, "llmpipe", keep_days=7)
    assert refs == {kept["lm"], recent["tokens"]}
    entries = gc.find_garbage(ws.root, refs, keep_days=7)
    keep_dirs = {ws.dir(k, kept[n]) for k, n in (("corpora", "corpus"), ("tokenizers", "tokenizer"),
                                                  ("tokens", "tokens"), ("checkpoints", "lm"))}
    keep_dirs |= {ws.dir(k, recent[n]) for k, n in (("corpora", "corpus"), ("tokenizers", "tokenizer"),
                                                     ("tokens", "tokens"))}
    gone_dirs = {ws.dir("checkpoints", recent["lm"]), loose.dir} | {
        ws.dir(k, old[n]) for k, n in (("corpora", "corpus"), ("tokenizers", "tokenizer"), ("tokens", "tokens"),
                                       ("checkpoints", "lm"))}
    unreferenced = {e.path for e in entries if e.category == "unreferenced"}
    assert unreferenced == gone_dirs
    assert not keep_dirs & _paths(entries)

    # The same through the command line: listed, nothing removed; then removed with --delete.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    capsys.readouterr()
    assert main(["gc", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("unreferenced")]
    assert len(listed) == len(gone_dirs)
    assert f"checkpoints/{recent['lm']}" in out and f"corpora/{loose.fingerprint}" in out
    assert not [line for line in listed if kept["lm"] in line or recent["tokens"] in line]
    assert f"{len(entries)} entries" in out
    assert all(d.is_dir() for d in gone_dirs | keep_dirs)

    assert main(["gc", "--workspace", str(ws.root), "--delete"]) == 0
    out = capsys.readouterr().out
    assert f"removed {len(entries)}" in out
    assert not any(d.exists() for d in gone_dirs)
    assert all(Workspace.is_complete(d) for d in keep_dirs)
    assert not [p for p in ws.root.rglob("*") if ".tmp-" in p.name]
    assert list(cwd.iterdir()) == []
    assert main(["gc", "--workspace", str(ws.root)]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_held_lock_protects_work_dir_and_artifact(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    fp = "e" * 20
    work = ws.work_dir("checkpoints", fp)
    (work / "step-00000010").mkdir(parents=True)
    (work / "step-00000010" / "model.safetensors").write_bytes(b"w" * 300)
    _age(work, 30)
    fresh = ws.work_dir("checkpoints", "f" * 20)
    (fresh / "step-00000005").mkdir(parents=True)
    (fresh / "step-00000005" / ".model.safetensors.tmp-1234abcd").write_bytes(b"w" * 10)  # being written
    artifact = ws.materialize(CheckpointRef, "9" * 20, _writes("model.safetensors"), stage="pretrain")

    with file_lock(ws.lock_path("checkpoints", fp)) as held, \
            file_lock(ws.lock_path("checkpoints", "9" * 20)):
        assert held
        entries = gc.find_garbage(ws.root, set(), keep_days=7)
        assert work not in _paths(entries) and artifact.dir not in _paths(entries)
        assert ws.lock_path("checkpoints", fp) not in _paths(entries)
        # listed before the lock was taken: remove() still leaves it alone
        stale = gc.Entry("work", work, 300, "test", ws.lock_path("checkpoints", fp))
        (outcome,) = gc.remove([stale], keep_days=7)
        assert not outcome.removed and "held" in outcome.note and work.is_dir()

    entries = gc.find_garbage(ws.root, set(), keep_days=7)
    by_path = {e.path: e for e in entries}
    assert by_path[work].category == "work" and by_path[work].size == 300
    assert by_path[artifact.dir].category == "unreferenced"
    assert fresh not in by_path and not [p for p in by_path if ".tmp-" in p.name]  # recent: an unfinished build's
    assert gc.find_garbage(ws.root, None, keep_days=7) == [e for e in entries if e.category != "unreferenced"]
    gc.remove(entries, keep_days=7)
    assert not work.exists() and not artifact.dir.exists() and fresh.is_dir()


def test_interrupted_removal_is_a_leftover(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    ref = ws.materialize(TokensRef, "7" * 20, _writes("train.bin"), stage="tokenize")
    half = ref.dir.with_name(f"{ref.dir.name}.tmp-gc-0000beef")
    ref.dir.rename(half)  # what an interrupted gc (or damaged-artifact removal) leaves
    (entry,) = [e for e in gc.find_garbage(ws.root, {"7" * 20}, keep_days=7) if e.category != "lock"]
    assert entry.path == half and entry.category == "temporary"


def test_cli_gc_lists_and_exits_zero_without_creating_mlflow_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "cwd" / ".llmpipe"
    (root / "tokens" / ("1" * 20 + ".tmp-abcd1234")).mkdir(parents=True)
    (root / "tokens" / ("1" * 20 + ".tmp-abcd1234") / "train.bin").write_bytes(b"t" * 2048)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()

    assert main(["gc"]) == EXIT_CONFIG  # no store: refuses to judge what is unreferenced
    err = capsys.readouterr().err
    assert "--no-registry" in err

    assert main(["gc", "--no-registry"]) == 0  # the workspace: the config's (./.llmpipe)
    out = capsys.readouterr().out
    assert "only leftovers" in out
    assert "temporary" in out and f"tokens/{'1' * 20}.tmp-abcd1234" in out and "2.0 KB" in out
    assert "1 entries, 2048 bytes" in out and "nothing removed" in out
    assert (root / "tokens" / ("1" * 20 + ".tmp-abcd1234")).is_dir()
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == [".llmpipe"]  # no mlflow.db

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    assert main(["gc", "--set", f"workspace={root}"]) == EXIT_CONFIG
    assert main(["gc", "--workspace", str(root), "--no-registry", "--delete"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert list((root / "tokens").iterdir()) == [] and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == [".llmpipe"]


def test_find_tracking_uri_never_names_a_missing_store(tmp_path: Path) -> None:
    assert gc.find_tracking_uri({}, tmp_path) is None
    assert gc.find_tracking_uri({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, tmp_path) is None
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert gc.find_tracking_uri({}, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert gc.find_tracking_uri({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, tmp_path) == \
        f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert gc.find_tracking_uri({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, tmp_path) == "http://127.0.0.1:5000"
