"""What nights bring: a killed `llmpipe run`, two runs at once, a stage that fails once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.distributed import die_with_parent

pytestmark = pytest.mark.slow

LONG_PRETRAIN = ["--config", "tiny", "--set", "pretrain.max_steps=1000", "--set", "pretrain.checkpoint_every=100",
                 "--set", "pretrain.log_every=100", "--set", "pretrain.eval_every=500"]


def _env() -> dict[str, str]:
    """A user's environment: no Prefect or MLflow settings, so `llmpipe run` uses its embedded defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LLMPIPE_FAULT"))}


def _llmpipe(cwd: Path, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **kw}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env or _env(), text=True,
                            start_new_session=True, preexec_fn=die_with_parent, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _lm_dir(cwd: Path) -> Path:
    dirs = [p for p in (cwd / ".llmpipe" / "checkpoints").iterdir()
            if p.is_dir() and (p / "manifest.json").is_file() and '"causal-lm"' in (p / "manifest.json").read_text()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _checkpoint_steps(cwd: Path) -> list[int]:
    root = cwd / ".llmpipe" / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("*.work/step-*") if ".tmp-" not in p.name)


def test_kill_9_of_the_whole_run_then_rerun_resumes_and_matches(tmp_path: Path) -> None:
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    clean.mkdir()
    crashed.mkdir()
    reference = _llmpipe(clean, "run", *LONG_PRETRAIN)

    victim = _llmpipe(crashed, "run", *LONG_PRETRAIN)
    deadline = time.monotonic() + 600
    while not any(s >= 300 for s in _checkpoint_steps(crashed)):
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 300 in time"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the CLI, its Prefect API and everything else it started
    victim.wait()
    killed_at = max(_checkpoint_steps(crashed))
    assert 300 <= killed_at < 1000

    out = _finish(_llmpipe(crashed, "run", *LONG_PRETRAIN))
    for stage in ("ingest_corpus", "train_tokenizer", "tokenize"):
        assert f"{stage}: reusing artifact" in out
    resumed = [int(line.rsplit("step ", 1)[1].split()[0]) for line in out.splitlines()
               if "pretrain: resuming from checkpoint at step" in line]
    assert resumed and resumed[0] >= killed_at  # at most one checkpoint interval lost
    _finish(reference)

    a = load_file(str(_lm_dir(clean) / "model.safetensors"))
    b = load_file(str(_lm_dir(crashed) / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_two_runs_at_once_on_one_workspace_and_one_registry(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    first = _llmpipe(tmp_path, "run", "--config", "tiny", "--set", "finetune.max_steps=20")
    second = _llmpipe(tmp_path, "run", "--config", "tiny", "--set", "finetune.max_steps=24")
    outs = [_finish(first), _finish(second)]
    assert all("llm_pipeline finished" in o for o in outs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = client.search_model_versions("name='llmpipe-sentiment'")
    assert len(versions) == 2
    fps = {v.tags["llmpipe.fingerprint"] for v in versions}
    assert len(fps) == 2
    # Each version's files are whole: the registered classifier loads and predicts.
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # not set_tracking_uri: global
    for v in versions:
        pred = mlflow.pyfunc.load_model(f"models:/llmpipe-sentiment/{v.version}").predict(["a wonderful film"])
        assert pred["label"][0] in {"negative", "positive"}
    # One complete artifact per shared upstream stage, no leftovers of a half-written one.
    assert not list((tmp_path / ".llmpipe").glob("*/*.tmp-*"))
    assert len(list((tmp_path / ".llmpipe" / "corpora").glob("*/manifest.json"))) == 1


def test_a_stage_that_fails_once_is_retried_and_a_data_error_is_not(tmp_path: Path) -> None:
    env = {**_env(), "LLMPIPE_FAULT": "tokenize:oserror"}
    out = _finish(_llmpipe(tmp_path, "run", "--config", "tiny", env=env))
    assert "injected transient I/O failure in tokenize" in out
    assert "llm_pipeline finished" in out

    bad = tmp_path / "bad"
    bad.mkdir()
    proc = _llmpipe(bad, "run", "--config", "tiny", env={**_env(), "LLMPIPE_FAULT": "tokenize:dataerror"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    assert "injected data error in tokenize" in out
    assert "Awaiting Retry" not in out  # a user error fails at once


def _session_processes(sid: int) -> list[str]:
    """Command lines of the live processes in session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("moment", ["while the API starts", "while pretraining"])
def test_kill_9_of_the_cli_alone_takes_its_temporary_api_down(tmp_path: Path, moment: str) -> None:
    # The OOM killer picks the largest process, the CLI; no exit code of its runs, yet the server must go,
    # also when the CLI dies before the server has answered (Prefect has not handed the CLI the server yet).
    proc = _llmpipe(tmp_path, "run", "--config", "tiny", "--set", "pretrain.max_steps=1000000",
                    "--set", "pretrain.log_every=5")
    try:
        if moment == "while the API starts":
            deadline = time.monotonic() + 120
            while not any("uvicorn" in cmd for cmd in _session_processes(proc.pid)):
                assert proc.poll() is None and time.monotonic() < deadline, "the temporary API never started"
                time.sleep(0.05)
        else:
            assert any("pretrain step" in line for line in proc.stdout), "pretraining never started"
        assert any("flows.runtime guard" in cmd for cmd in _session_processes(proc.pid)), "no guard"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_processes(proc.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def test_sigterm_crashes_the_run_cleanly_and_leaves_no_server_behind(tmp_path: Path) -> None:
    # A scheduler's timeout sends SIGTERM to the CLI alone; its temporary Prefect API must not outlive it.
    proc = _llmpipe(tmp_path, "run", "--config", "tiny", "--set", "pretrain.max_steps=1000000",
                    "--set", "pretrain.log_every=5")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "pretrain step" in line:
            break
    assert any("uvicorn" in cmd for cmd in _session_processes(proc.pid)), "the temporary Prefect API is not running"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen)[-2000:] + rest[-2000:]
    assert "Crashed('Execution was aborted by a termination signal.')" in rest
    deadline = time.monotonic() + 15
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_processes(proc.pid) == []
