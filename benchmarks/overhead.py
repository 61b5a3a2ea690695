"""Overhead: where the wall time of ``llmpipe run`` goes, for a first run and an identical re-run.

``llmpipe run`` on the embedded defaults (the quickstart: Prefect's temporary local API, MLflow on SQLite, the
built-in sample data) runs twice in a fresh folder, as a user runs it, each time as a new process with
``LLMPIPE_TIMINGS`` set, so that the command notes when each of its phases ended:

- ``cli``: the interpreter, the command's imports and the config; ``configure``: environment and MLflow check;
- ``import prefect``; ``import flows and stages`` (the flows, the stages and what they import: torch,
  transformers, mlflow); ``mlflow store`` (opening the SQLite store, migrations on first use);
- ``prefect api``: starting Prefect's temporary local API (a server process, migrations on first use);
- ``flow``: the flow run, split into its stages from the task runs in Prefect's database, and the rest;
- ``summary``; ``exit``: from the summary to the end of the process (Prefect stops its API, MLflow flushes).

Then the same re-runs against a standing Prefect server (``prefect server start``, started once beforehand, with
``PREFECT_API_URL`` set), as a team runs the pipeline every night: the temporary API's start and stop drop out.

The floors that are not llmpipe's are measured beside them in fresh processes: the interpreter alone, and the
imports of prefect, mlflow, torch and transformers each on their own. The last line printed is one JSON object
with ``first_run_wall_s``, ``rerun_wall_s``, ``rerun_standing_api_wall_s`` and each run's phases.

    python benchmarks/overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clean_env() -> dict[str, str]:
    """What a new user's shell has: none of Prefect's or MLflow's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LLMPIPE_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_once(folder: Path, api_url: str | None = None, prefect_db: Path | None = None) -> dict:
    """One ``llmpipe run`` in ``folder`` (against the Prefect API at ``api_url``, whose database is ``prefect_db``;
    None: the temporary local one): wall time and the seconds of each phase."""
    marks_file = folder / "timings.json"
    env = {**clean_env(), "LLMPIPE_TIMINGS": str(marks_file)}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--no-progress"], cwd=folder, env=env,
                          capture_output=True, text=True)
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"llmpipe run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases: dict[str, float] = {}
    last = started
    for phase, at in json.loads(marks_file.read_text()):
        phases[phase] = round(at - last, 2)
        last = at
    phases["exit"] = round(ended - last, 2)
    db = prefect_db or folder / ".llmpipe" / "prefect" / "prefect.db"
    return {"wall_s": round(ended - started, 2), "phases": phases, "stages": stage_seconds(db, started),
            "summary": proc.stdout.strip()}


def stage_seconds(db: Path, since: float) -> dict[str, float]:
    """Seconds per stage of the flow run started after ``since``, from the task runs in Prefect's database
    (stages that ran as several tasks, such as the tokenize shards, add up; a subflow shows as ``flow NAME``)."""
    import re
    from datetime import datetime

    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select t.name, t.start_time, t.end_time, (select f.name from flow_run r join flow f on r.flow_id = f.id "
            "where r.parent_task_run_id = t.id) from task_run t where t.start_time is not null "
            "and t.end_time is not null").fetchall()
    out: dict[str, float] = {}
    for name, start, end, subflow in rows:
        t0, t1 = (datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp() for x in (start, end))
        if t0 >= since:
            stage = f"flow {subflow}" if subflow else re.sub(r"-[0-9a-f]{3}$", "", name)  # Prefect's run suffix
            out[stage] = round(out.get(stage, 0.0) + t1 - t0, 2)
    return out


def standing_server(home: Path) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on a free local port with its own home (so its own database); returns the
    process and its API URL once it answers."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**clean_env(), "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("prefect server start did not answer within 180 s")


def import_floor(module: str | None, repeats: int) -> float:
    """Median seconds for a fresh interpreter to import ``module`` (None: to start and exit)."""
    code = f"import {module}" if module else "pass"
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=clean_env(), check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="identical re-runs (the median counts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmpipe-overhead-") as tmp:
        folder = Path(tmp)
        say("first run ...")
        first = run_once(folder)
        say(first.pop("summary"))
        say(f"  {first['wall_s']} s: {first['phases']}")
        reruns = []
        for i in range(args.repeats):
            say(f"identical re-run {i + 1} ...")
            reruns.append(run_once(folder))
            reruns[-1].pop("summary")
            say(f"  {reruns[-1]['wall_s']} s: {reruns[-1]['phases']}")
        say("a standing Prefect server (prefect server start) ...")
        server, api_url = standing_server(folder / "standing-prefect")
        try:
            standing = []
            for i in range(args.repeats):
                say(f"identical re-run {i + 1} against it ...")
                standing.append(run_once(folder, api_url, folder / "standing-prefect" / "prefect.db"))
                standing[-1].pop("summary")
                say(f"  {standing[-1]['wall_s']} s: {standing[-1]['phases']}")
        finally:
            server.terminate()
            server.wait(timeout=60)
    say("import floors in fresh processes ...")
    floors = {name or "interpreter": import_floor(name, args.repeats)
              for name in (None, "prefect", "mlflow", "torch", "transformers", "flows.cli", "flows.pipeline")}
    rerun = sorted(reruns, key=lambda r: r["wall_s"])[len(reruns) // 2]
    rerun_standing = sorted(standing, key=lambda r: r["wall_s"])[len(standing) // 2]
    result = {
        "benchmark": "overhead", "cpu_count": os.cpu_count(),
        "first_run_wall_s": first["wall_s"], "rerun_wall_s": rerun["wall_s"],
        "rerun_walls_s": [r["wall_s"] for r in reruns],
        "rerun_standing_api_wall_s": rerun_standing["wall_s"],
        "rerun_standing_api_walls_s": [r["wall_s"] for r in standing],
        "first_run": first, "rerun": rerun, "rerun_standing_api": rerun_standing, "import_floors_s": floors,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
