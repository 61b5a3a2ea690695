"""Many runs at once on a team's stack: N flow runs created at once through the Prefect API, as a team's clicks and
schedules would, against a Prefect server and an MLflow tracking server on PostgreSQL (a throwaway cluster), MLflow
proxying the model files, and workers sharing one workspace; then the same against SQLite for comparison.

The runs mix identical configs and variations of the ``mini`` preset (``--variants`` fine-tunes of one language
model, by default 3: each config ``N / variants`` times), so most of their stages find the artifact another run
builds or built. For each backend it reports: runs completed, failed or crashed; the wall time from the first
creation to the last final state; how many times each artifact fingerprint was built (each once: the others wait
and reuse it); registered versions per classifier fingerprint (one; counted in the store's own table, deleted ones
included); and API errors: errors the servers logged (a failed request is one; MLflow's 5xx answers) with the
exceptions behind them, and failed or retried API calls in the workers' logs. Exit 0 only if, on PostgreSQL, every run completes, every artifact is built once, every
classifier fingerprint has one version and no API call failed. The last line printed is one JSON object.

    python benchmarks/load.py [--runs 12] [--workers 2] [--variants 3] [--backends postgres sqlite]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from servers import MlflowServer, Postgres, PrefectServer

from tasks.config import load_config

REPO = Path(__file__).resolve().parent.parent
MODEL = "load-model"

# An error a server logged (Prefect's log records at ERROR: a failed request's traceback is one record; MLflow's
# 5xx answers), and what it was (the exception lines: database is locked, a refused connection, ...).
SERVER_ERRORS = re.compile(r"\| ERROR\s+\||\" 5\d\d |^ERROR |\[ERROR\]")
SERVER_CAUSES = re.compile(r"^\w[\w.]*(Error|Exception): ")
# A client giving up on, or retrying, an API call (in the workers' logs, with the runs' own).
CLIENT_ERRORS = re.compile(r"PrefectHTTPStatusError|HTTPStatusError|Received response with retryable status|"
                           r"ConnectError|ReadTimeout|RemoteProtocolError|API request to .* failed")


def configs(ws: Path, runs: int, variants: int) -> list[dict[str, Any]]:
    """``runs`` configs of the mini preset: ``variants`` fine-tunes (learning rates) of one LM, round robin."""
    out = []
    for i in range(runs):
        lr = 0.001 * (1 + i % variants / 10)
        cfg = load_config("mini", [f"workspace={ws}", f"registry.model_name={MODEL}", "runtime.threads=1",
                                   f"finetune.lr={lr:.6g}"])
        out.append(cfg.model_dump(mode="json"))
    return out


def _llmpipe(server: PrefectServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=server.env, capture_output=True,
                          text=True, timeout=600)


def _versions_in_store(backend: str, pg: Postgres | None, mlflow_root: Path) -> dict[str, int]:
    """Rows of the store's model-version table per fingerprint tag (deleted versions included)."""
    query = (f"SELECT value, count(*) FROM model_version_tags WHERE name = '{MODEL}' "
             "AND key = 'llmpipe.fingerprint' GROUP BY value")
    if backend == "postgres":
        rows = [line.split("|") for line in pg.psql("mlflow", query).splitlines() if line]
    else:
        with sqlite3.connect(mlflow_root / "mlflow.db") as db:
            rows = db.execute(query).fetchall()
    return {fp: int(n) for fp, n in rows}


def _errors(paths: list[Path], pattern: re.Pattern) -> list[str]:
    found = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if pattern.search(line):
                found.append(f"{path.name}: {line.strip()[:200]}")
    return found


def _causes(paths: list[Path]) -> dict[str, int]:
    """The exception lines of the servers' tracebacks, counted (a chained exception counts each of its lines)."""
    return dict(collections.Counter(line.strip()[:160] for path in paths
                                    for line in path.read_text(errors="replace").splitlines()
                                    if SERVER_CAUSES.match(line.strip())))


def load(backend: str, root: Path, runs: int, workers: int, variants: int) -> dict[str, Any]:
    """One backend: its servers, ``workers`` workers, ``runs`` runs created at once; what happened."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root.mkdir(parents=True)
    ws = root / "ws"
    pg = Postgres(root / "postgres") if backend == "postgres" else None
    if pg:
        pg.start()
    try:
        mlflow = MlflowServer(root / "mlflow", backend_uri=pg.url("mlflow") if pg else None)
        prefect_db = pg.url("prefect", "postgresql+asyncpg") if pg else None
        lease_storage = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}
        with mlflow as tracking_uri, PrefectServer(root / "prefect", database_url=prefect_db,
                                                  server_settings=lease_storage,
                                                  MLFLOW_TRACKING_URI=tracking_uri,
                                                  PREFECT_RUNNER_POLL_FREQUENCY="2",
                                                  PREFECT_CLIENT_RETRY_EXTRA_CODES="500") as server:
            done = _llmpipe(server, "deploy", "--config", "mini", "--set", f"workspace={ws}",
                            "--set", f"registry.model_name={MODEL}")
            if done.returncode:
                raise RuntimeError(f"llmpipe deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            logs = [server.start(f"worker-{i}", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu",
                                                "--name", f"load-worker-{i}"],
                                 {**server.env, "LLMPIPE_GPU_SLOT": f"load-gpu-{i}",
                                  "LLMPIPE_WORKSPACE_DIRS": str(ws)}) for i in range(workers)]
            with temporary_settings({PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
                nightly = client.read_deployment_by_name("llm_pipeline/nightly")
                start = time.perf_counter()

                def create(params: dict[str, Any]):
                    # A client each, as separate people's would be (settings are per thread: set them here).
                    with temporary_settings({PREFECT_API_URL: server.url}), get_client(sync_client=True) as own:
                        return own.create_flow_run_from_deployment(nightly.id, parameters={"config": params})

                with concurrent.futures.ThreadPoolExecutor(runs) as pool:
                    created = list(pool.map(create, configs(ws, runs, variants)))
                states: dict[Any, Any] = {}
                deadline = time.time() + 3600
                while len(states) < runs and time.time() < deadline:
                    for run in created:
                        if run.id not in states and (now := client.read_flow_run(run.id)).state.is_final():
                            states[run.id] = now.state
                            print(f"  {backend}: {run.name} {now.state.name} at {time.perf_counter() - start:.0f} s",
                                  file=sys.stderr)
                    time.sleep(2)
                wall = time.perf_counter() - start
            text = "".join(log.read_text(errors="replace") for log in logs)
            built = collections.Counter(re.findall(r"built artifact (\w+) in", text))
            versions = _versions_in_store(backend, pg, root / "mlflow")
            server_logs = [root / "prefect" / "server.log", root / "mlflow" / "mlflow.log"]
            api_errors = _errors(server_logs, SERVER_ERRORS) + _errors(logs, CLIENT_ERRORS)
            causes = _causes(server_logs)
    finally:
        if pg:
            pg.stop()
    names = collections.Counter(s.name for s in states.values())
    return {
        "runs": runs, "completed": names.get("Completed", 0), "failed": names.get("Failed", 0),
        "crashed": names.get("Crashed", 0), "unfinished": runs - len(states), "wall_s": round(wall, 1),
        "artifacts_built": len(built), "max_builds_per_artifact": max(built.values(), default=0),
        "reused": len(re.findall(r"reusing artifact \w+", text)),
        "classifier_fingerprints": len(versions), "max_versions_per_fingerprint": max(versions.values(), default=0),
        "api_errors": len(api_errors), "api_error_lines": api_errors[:5], "server_exceptions": causes,
    }


def passed(result: dict[str, Any]) -> bool:
    return (result["completed"] == result["runs"] and result["max_builds_per_artifact"] == 1
            and result["max_versions_per_fingerprint"] == 1 and result["api_errors"] == 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["postgres", "sqlite"], choices=["postgres", "sqlite"])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="llmpipe-load-") as tmp:
        for backend in args.backends:
            print(f"{backend}: {args.runs} runs ({args.variants} configs), {args.workers} workers", file=sys.stderr)
            results[backend] = load(backend, Path(tmp) / backend, args.runs, args.workers, args.variants)
    print(f"{'backend':<10} {'completed':>9} {'failed':>6} {'crashed':>7} {'wall s':>7} {'built':>5} "
          f"{'max builds':>10} {'versions':>8} {'max versions':>12} {'API errors':>10}")
    for backend, r in results.items():
        print(f"{backend:<10} {r['completed']:>9} {r['failed']:>6} {r['crashed']:>7} {r['wall_s']:>7} "
              f"{r['artifacts_built']:>5} {r['max_builds_per_artifact']:>10} {r['classifier_fingerprints']:>8} "
              f"{r['max_versions_per_fingerprint']:>12} {r['api_errors']:>10}")
        for line in r["api_error_lines"]:
            print(f"  {backend} API error: {line}")
        for line, n in r["server_exceptions"].items():
            print(f"  {backend} server exception x{n}: {line}")
    out: dict[str, Any] = {"runs": args.runs, "workers": args.workers, "variants": args.variants, **results}
    if "postgres" in results and "sqlite" in results and results["postgres"]["wall_s"]:
        out["sqlite_wall_over_postgres"] = round(results["sqlite"]["wall_s"] / results["postgres"]["wall_s"], 3)
    ok = passed(results["postgres"]) if "postgres" in results else all(map(passed, results.values()))
    out["ok"] = ok
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
