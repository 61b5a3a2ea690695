"""`llmpipe run` as a person sees it: a live display on a pseudo-terminal, plain log lines off one (whole runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _run_in_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal (120 x 40) as its stdin, stdout and stderr; (exit status, raw output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, stdin=terminal,
                            stdout=terminal, stderr=terminal, close_fds=True, start_new_session=True)
    os.close(terminal)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 1 << 16)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        return proc.wait(timeout=60), out.decode("utf-8", "replace")
    finally:
        os.close(controller)


def _clean_env() -> dict[str, str]:
    """What a new user's shell has: none of the suite's Prefect or MLflow settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal (Linux)")
def test_run_shows_a_live_display_on_a_terminal_and_plain_lines_off_one(tmp_path: Path) -> None:
    import sqlite3

    # The pseudo-terminal's size governs, not COLUMNS/LINES a CI runner may export (rich reads those first).
    env = {**_clean_env(), "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    # 60 pretraining steps: a dozen reports, so a busy machine still shows several frames of it.
    rc, raw = _run_in_terminal(["run", "--config", "tiny", "--set", "pretrain.max_steps=60"], tmp_path, env,
                               timeout_s=900)
    text = ANSI.sub("", raw)
    assert rc == 0, text[-4000:]
    frames = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    # The display advances: the same stage seen at two of its steps (tiny: a report every 5 steps).
    for stage, total in (("pretrain", 60), ("finetune", 20)):
        steps = {int(m[1]) for line in frames if (m := re.search(rf"{stage} .*step (\d+)/{total}\b", line))}
        assert len(steps) >= 2 and steps <= set(range(5, total + 1, 5)), (stage, steps)
    pretrain_rows = [f for f in frames if re.search(r"pretrain .*step \d+/60", f)]
    assert any(re.search(r"pretrain .*step \d+/60 +loss \d+\.\d{4} +[\d.]+[kM]? tok/s .*left", f)
               for f in pretrain_rows), pretrain_rows[-12:]
    # ...and ends with every stage done, with its time.
    for stage in ("start up", "ingest-corpus", "train-tokenizer", "tokenize", "pretrain", "evaluate-lm",
                  "register-lm", "ingest-labeled", "finetune", "evaluate-classifier", "register"):
        assert any(re.match(rf"✓ {stage} .*(\d\.\ds|\d:\d\d)$", f.rstrip()) for f in frames), stage
    assert "llm_pipeline finished in" in text and "Predict:    llmpipe predict --model" in text
    assert "Beginning flow run" not in text and "Finished in state" not in text  # INFO lines: in the Prefect UI
    assert "Started monitoring system metrics" not in text and "Creating initial MLflow" not in text
    assert "anonymous usage data" not in text  # analytics are off, so is Prefect's notice about them
    assert raw.count("\x1b[1A") > 10  # it redraws in place

    # Fine-tuning drew its curve: in the artifact, logged to MLflow, and as a Prefect artifact.
    assert len(list((tmp_path / ".llmpipe" / "checkpoints").glob("*/training_curve.png"))) == 1
    assert list((tmp_path / "mlartifacts").rglob("training_curve.png"))
    with sqlite3.connect(tmp_path / ".llmpipe" / "prefect" / "prefect.db") as db:
        curves = dict(db.execute("select key, data from artifact where key like '%curve'").fetchall())
    assert set(curves) == {"pretrain-loss-curve", "finetune-training-curve"}
    assert all("data:image/png;base64," in data for data in curves.values())

    # Not on a terminal (a pipe, as in CI or under a worker): Prefect's log lines, no control sequence at all.
    for flow, summary in (("finetune", "  classifier:     test accuracy"),
                          ("pretrain", "  language model: validation perplexity")):
        run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", "tiny", "--set",
                              "pretrain.max_steps=60", "--flow", flow],
                             cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "\x1b" not in run.stdout and "\x1b" not in run.stderr
        assert "Beginning flow run" in run.stderr and f"for flow '{flow}'" in run.stderr
        assert "Started monitoring system metrics" not in run.stderr  # MLflow's INFO lines are off
        assert f"\n{flow} finished in " in run.stdout and "(every artifact reused)" in run.stdout
        assert summary in run.stdout
        assert ("  language model:" in run.stdout) == (flow == "pretrain")
        assert ("Predict:" in run.stdout) == (flow == "finetune")
    assert "Fine-tune:  llmpipe run --flow finetune --config tiny" in run.stdout
