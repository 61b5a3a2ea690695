"""A SIGTERM landing inside an MLflow write waits for the write: the store stays usable, the signal still stops.

Each case runs in its own Python process: installed signal handlers and the terminating flag are
process-wide, and must not leak into the test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# SIGTERM at random moments of a loop of MLflow writes on SQLite, as in a training loop's live metrics; then
# the cleanup a stage does on the way out (mark the run FAILED) must work, quickly, every time.
STRESS = textwrap.dedent("""
    import json, os, random, signal, sys, threading, time
    os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"
    from mlflow.entities import Metric
    from tasks import interrupts, tracking

    def exit_on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)  # as `llmpipe run` does
    interrupts.install()
    client = tracking.mlflow_client()  # with a plain MlflowClient about half of these cleanups fail: database is locked
    experiment = client.create_experiment("interrupts")
    random.seed(0)
    out = {"stopped": 0, "cleanup_ok": 0, "cleanup_failed": [], "slowest_cleanup_s": 0.0}
    for trial in range(int(sys.argv[1])):
        run_id = client.create_run(experiment).info.run_id
        threading.Timer(random.uniform(0.0, 0.12), os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            step = 0
            while True:
                step += 1
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(f"train/m{i}", float(step), now, step) for i in range(6)])
        except SystemExit:
            out["stopped"] += 1
        started = time.monotonic()
        try:
            client.set_terminated(run_id, "FAILED")
            out["cleanup_ok"] += 1
        except Exception as exc:
            out["cleanup_failed"].append(type(exc).__name__ + ": " + str(exc).splitlines()[0][:120])
            break
        finally:
            out["slowest_cleanup_s"] = max(out["slowest_cleanup_s"], time.monotonic() - started)
    out["terminating"] = interrupts.terminating()
    print(json.dumps(out))
""")


def _run(tmp_path: Path, code: str, *args: str, timeout: float = 300) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigterm_inside_mlflow_sqlite_writes_leaves_the_store_usable(tmp_path: Path) -> None:
    trials = 30
    out = _run(tmp_path, STRESS, str(trials))
    assert out["cleanup_failed"] == []
    assert out["stopped"] == out["cleanup_ok"] == trials  # every signal stopped the loop, every cleanup worked
    assert out["terminating"] is True


DEFER = textwrap.dedent("""
    import errno, json, os, signal
    from prefect.states import Failed
    from flows.retries import retry_transient
    from tasks import interrupts

    class Stop(Exception):
        pass

    def raise_stop(signum, frame):
        raise Stop(signum)

    signal.signal(signal.SIGUSR1, raise_stop)
    interrupts.install((signal.SIGUSR1,))
    interrupts.install((signal.SIGUSR1,))  # idempotent: wrapped once
    out = {"wrapped_once": signal.getsignal(signal.SIGUSR1).llmpipe_wraps is raise_stop,
           "retry_before": retry_transient(None, None, Failed(data=OSError(errno.EIO, "I/O error")))}
    steps = []
    try:
        with interrupts.shielded():
            os.kill(os.getpid(), signal.SIGUSR1)
            with interrupts.shielded():
                steps.append("inner")
            steps.append("after inner")  # the nested block's end does not raise: the outer one is still open
        steps.append("after outer")
    except Stop:
        steps.append("stopped at the end of the outer block")
    out["steps"] = steps
    out["terminating"] = interrupts.terminating()
    out["retry_after"] = retry_transient(None, None, Failed(data=OSError(errno.EIO, "I/O error")))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(10 ** 6):
            pass
        out["unshielded"] = "not raised"
    except Stop:
        out["unshielded"] = "raised at once"
    print(json.dumps(out))
""")


def test_a_signal_inside_shielded_blocks_takes_effect_when_the_outermost_ends(tmp_path: Path) -> None:
    out = _run(tmp_path, DEFER)
    assert out == {"wrapped_once": True, "steps": ["inner", "after inner", "stopped at the end of the outer block"],
                   "terminating": True, "unshielded": "raised at once",
                   # an I/O error is retried, until the process has been told to stop
                   "retry_before": True, "retry_after": False}
