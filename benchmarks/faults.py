"""The fault and bad-input matrix: every case run for real, one table, exit 0 only if all behave.

Bad inputs must fail with an error that names the file, row or field (quoting no secret), and leave
nothing half-written. Faults must be survived: retried, resumed, or recovered with at most one
checkpoint interval of work lost. Whole `llmpipe run`s go through a real `prefect server` (and a real
`mlflow server` where the tracking server fails); runs created through the Prefect API meet a real
worker and must be refused what its operator did not allow. The last line printed is one JSON object.

    python benchmarks/faults.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from attacks import attack_cases
from safetensors.torch import load_file
from servers import MlflowServer, PrefectServer, free_port, stop

from tasks.artifacts import Workspace
from tasks.config import load_config
from tasks.errors import ConfigError, DataError, TrainingDiverged
from tasks.ingest import ingest_corpus, ingest_labeled
from tasks.pretrain import pretrain, pretrain_fingerprint
from tasks.resume import list_checkpoints
from tasks.tokenize import open_tokens, tokenize_corpus, train_tokenizer
from tasks.training import set_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parent.parent


def tiny(ws: Path, *overrides: str):
    return load_config("tiny", [f"workspace={ws}", *overrides])


def leftovers(ws: Path) -> list[str]:
    return [str(p) for p in ws.rglob("*.tmp-*")] if ws.exists() else []


def expect_error(kind: type[Exception], must_name: str, fn: Callable[[], object], ws: Path) -> tuple[bool, str, str]:
    try:
        fn()
    except kind as exc:
        msg = str(exc).splitlines()[0][:110]
        ok = must_name in str(exc) and not leftovers(ws)
        return ok, f"{kind.__name__}: {msg}", "0 bytes (nothing written)" if not leftovers(ws) else "tmp left"
    except Exception as exc:  # the wrong kind of failure
        return False, f"{type(exc).__name__}: {str(exc)[:110]}", "-"
    return False, "no error", "-"


def files_corpus(ws: Path, path: Path, **extra: str):
    cfg = tiny(ws, f"corpus.sources=[{{kind: files, paths: [{path}]}}]", *[f"corpus.{k}={v}" for k, v in extra.items()])
    return lambda: ingest_corpus(cfg.corpus, Workspace(ws), cfg.seed)


def labeled_files(ws: Path, train: Path, test: Path | None = None):
    cfg = tiny(ws, f"labeled.source={{kind: files, train: '{train}'" + (f", test: '{test}'" if test else "") + "}")
    return lambda: ingest_labeled(cfg.labeled, Workspace(ws), cfg.seed)


def prepared(ws: Path, *overrides: str):
    cfg = tiny(ws, *overrides)
    w = Workspace(ws)
    corpus = ingest_corpus(cfg.corpus, w, cfg.seed)
    tok = train_tokenizer(corpus, cfg.tokenizer, w)
    return cfg, w, tok, tokenize_corpus(corpus, tok, w)


def weights_equal(a, b, exact: bool) -> bool:
    x, y = load_file(str(a.dir / "model.safetensors")), load_file(str(b.dir / "model.safetensors"))
    return all((torch.equal(x[k], y[k]) if exact else torch.allclose(x[k], y[k], atol=1e-5)) for k in x)


# ---------------------------------------------------------------------------------------------- real servers


def _cli(server: PrefectServer, cwd: Path, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """``llmpipe ARGS`` in ``cwd`` against the Prefect server, MLflow on ``cwd/mlflow.db`` unless ``env`` says."""
    cwd.mkdir(parents=True, exist_ok=True)
    full = {**server.env, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def _versions(tracking_uri: str, name: str = "llmpipe-sentiment") -> list:
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")
    except Exception:  # no store, or no such model yet
        return []


def _tail(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[-1][:110] if text else f"exit {proc.returncode}"


def pipeline_cases(case: Callable, server: PrefectServer, root: Path) -> None:
    """Faults of whole `llmpipe run`s (against a real Prefect server) and deployment runs on a real worker."""
    tiny_run = ("run", "--config", "tiny")

    def enospc(ws: Path):
        out = _cli(server, ws, *tiny_run, LLMPIPE_FAULT="tokenize:enospc")
        text = out.stdout + out.stderr
        retried = "Retry 1/" in text
        ok = out.returncode == 1 and "No space left on device" in text and not retried and not leftovers(ws)
        return ok, f"exit {out.returncode}; retried={retried}; ENOSPC reported={'No space left' in text}", \
            "the run (nothing half-written)"

    case("full disk (ENOSPC) while tokenizing", "fails at once, not retried, nothing half-written", enospc)

    def killed_then_rerun(fault: str, lost: str, check: Callable[[subprocess.CompletedProcess], bool] | None = None):
        def run(ws: Path):
            killed = _cli(server, ws, *tiny_run, LLMPIPE_FAULT=fault)
            if killed.returncode != -signal.SIGKILL:
                return False, f"not killed: exit {killed.returncode}: {_tail(killed)}", "-"
            after_kill = len(_versions(f"sqlite:///{ws / 'mlflow.db'}"))
            again = _cli(server, ws, *tiny_run)
            versions = _versions(f"sqlite:///{ws / 'mlflow.db'}")
            decided = [v.tags.get("llmpipe.gate.decision") for v in versions]
            ok = again.returncode == 0 and len(versions) == 1 and decided[0] is not None
            ok = ok and (check is None or check(again))
            return ok, (f"SIGKILL; versions after the kill {after_kill}; rerun exit {again.returncode}, "
                        f"{len(versions)} version, decision {decided}"), lost
        return run

    case("kill -9 while tokenizing", "rerun completes, one version",
         killed_then_rerun("tokenize-shard:kill", "the shard being encoded"))
    case("kill -9 while fine-tuning", "rerun resumes from its checkpoint, one version",
         killed_then_rerun("finetune:kill@15", "< 10 steps", lambda out: "resuming from checkpoint at step 10"
                           in out.stdout + out.stderr))
    case("kill -9 while registering", "rerun completes the version's gate, still one version",
         killed_then_rerun("register:kill@1", "the alias decision (the version is reused)"))

    def majority_model(ws: Path):
        out = _cli(server, ws, *tiny_run)
        versions = _versions(f"sqlite:///{ws / 'mlflow.db'}")
        ok = out.returncode == 0 and len(versions) == 1 and not versions[0].aliases and \
            versions[0].tags.get("llmpipe.gate.decision") == "below-floor" and "WARNING" in out.stdout
        return ok, (f"registered={len(versions)}; aliases {versions[0].aliases if versions else '-'}; "
                    f"decision {versions[0].tags.get('llmpipe.gate.decision') if versions else '-'}"), "-"

    case("first model at the majority baseline", "registered without an alias, said plainly", majority_model)

    def mlflow_down_at_start(ws: Path):
        started = time.time()
        out = _cli(server, ws, *tiny_run, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
        ok = out.returncode == 1 and "does not answer" in out.stderr and not (ws / ".llmpipe").exists()
        return ok, f"exit {out.returncode} after {time.time() - started:.0f}s: {_tail(out)}", "0 bytes (nothing ran)"

    case("MLflow tracking server down at start", "a clear error before any stage", mlflow_down_at_start)

    def mlflow_down_mid_run(ws: Path):
        mlflow = MlflowServer(ws / "mlflow")
        env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        try:
            url = mlflow.start()
            ws.mkdir(parents=True, exist_ok=True)
            full = {**server.env, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO), **env}
            run = subprocess.Popen([sys.executable, "-m", "flows.cli", *tiny_run, "--set", "pretrain.max_steps=600"],
                                   cwd=ws, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.time() + 600
            while not list((ws / ".llmpipe" / "checkpoints").glob("*.work")) and time.time() < deadline \
                    and run.poll() is None:
                time.sleep(0.2)
            mlflow.stop()  # the tracking server goes away while the LM trains
            output = run.communicate(timeout=900)[0]
            half = len(_versions(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"))  # the store, read directly
            url = mlflow.start()  # back, on the same store
            again = _cli(server, ws, *tiny_run, "--set", "pretrain.max_steps=600", MLFLOW_TRACKING_URI=url, **env)
            versions = _versions(url)
        finally:
            mlflow.stop()
        ok = run.returncode == 1 and half == 0 and again.returncode == 0 and len(versions) == 1
        reason = next((line for line in reversed(output.splitlines()) if "llmpipe:" in line or "Error" in line), "")
        return ok, (f"exit {run.returncode} ({reason.strip()[:60]}); versions meanwhile {half}; "
                    f"rerun exit {again.returncode}, {len(versions)} version"), "the failed stage (artifacts reused)"

    case("MLflow tracking server down mid-run", "the run fails clearly, nothing half-registered; rerun completes",
         mlflow_down_mid_run)

    deployment_cases(case, server, root)


def deployment_cases(case: Callable, server: PrefectServer, root: Path) -> None:
    """Runs created through the Prefect API ask for what the worker's operator did not allow: each is refused."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws = root / "deployed" / "ws"
    outside = root / "deployed" / "outside"
    outside.mkdir(parents=True)
    (outside / "train.csv").write_text("text,label\n" + "".join(f"review {i},{'ab'[i % 2]}\n" for i in range(40)))
    data = root / "deployed" / "data"  # the operator's data folder; a dataset in it whose README points outside
    (data / "set").mkdir(parents=True)
    (data / "set" / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                            f"    path: {outside / 'train.csv'}\n---\n")
    deployed = _cli(server, root / "deployed", "deploy", "--config", "tiny", "--set", f"workspace={ws}")
    server.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu"],
                 {**server.env, "LLMPIPE_WORKSPACE_DIRS": str(ws), "LLMPIPE_DATA_DIRS": str(data),
                  "PYTHONPATH": str(REPO)}, REPO)
    worker = server.procs[-1]
    base = tiny(ws).model_dump(mode="json")

    def changed(section: str, **values) -> dict:
        cfg = json.loads(json.dumps(base))
        cfg[section].update(values)
        return cfg

    with temporary_settings({PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
        dep = None if deployed.returncode != 0 else client.read_deployment_by_name("llm_pipeline/cpu")

        def refused(field: str, setting: str, cfg: dict):
            def run(_: Path):
                if dep is None:
                    return False, f"llmpipe deploy failed: {_tail(deployed)}", "-"
                flow_run = client.create_flow_run_from_deployment(dep.id, parameters={"config": cfg})
                deadline = time.time() + 300
                while not (state := client.read_flow_run(flow_run.id).state).is_final() and time.time() < deadline:
                    time.sleep(1)
                message = state.message or ""
                ok = state.is_failed() and "refused before any stage ran" in message and field in message \
                    and setting in message and not (ws / "corpora").exists()
                line = next((x.strip() for x in message.splitlines() if x.strip().startswith(field)), message)
                return ok, f"{state.name}: {line[:100]}", "0 bytes (no stage ran)"
            return run

        case("deployment run: a path outside the allowed folders", "refused, the reason in the run's state",
             refused("labeled.source.train", "LLMPIPE_DATA_DIRS",
                     changed("labeled", source={"kind": "files", "train": str(outside / "train.csv")})))
        case("deployment run: a URL data file", "refused, the reason in the run's state",
             refused("corpus.sources[0].data_files", "LLMPIPE_ALLOW=urls", changed("corpus", sources=[
                 {"kind": "hub", "name": "csv", "data_files": ["https://203.0.113.9/corpus.csv"]}])))
        case("deployment run: trust_remote_code", "refused, the reason in the run's state",
             refused("model.trust_remote_code", "LLMPIPE_ALLOW=remote_code", changed("model", trust_remote_code=True)))
        case("deployment run: naming a pyfunc model for the gate", "refused, the reason in the run's state",
             refused("registry.model_name", "LLMPIPE_REGISTRY", changed("registry", model_name="pyfunc-evil")))
        case("deployment run: a README's data_files outside the folder", "refused, the reason in the run's state",
             refused("labeled.source.name", "README.md", changed("labeled", source={
                 "kind": "hub", "name": str(data / "set"), "validation_split": None, "test_split": None})))

        def command_override(_: Path):
            if dep is None:
                return False, f"llmpipe deploy failed: {_tail(deployed)}", "-"
            try:
                client.create_flow_run_from_deployment(dep.id, job_variables={"command": "touch /tmp/llmpipe-pwned"})
            except PrefectHTTPStatusError as exc:
                text = exc.response.text
                ok = exc.response.status_code == 422 and "'command' was unexpected" in text
                return ok, f"HTTP {exc.response.status_code} at creation: 'command' was unexpected", \
                    "0 bytes (no run exists)"
            return False, "the server accepted the run", "-"

        case("deployment run: a job-variable override of command", "refused by the pool's template",
             command_override)
    stop(worker)


def main() -> int:
    set_threads(1)
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="llmpipe-faults-"))

    def case(name: str, expected: str, run: Callable[[Path], tuple[bool, str, str]]) -> None:
        ws = root / f"case{len(rows)}"
        ws.mkdir()
        started = time.time()
        try:
            ok, observed, lost = run(ws)
        except Exception as exc:
            ok, observed, lost = False, f"crashed: {type(exc).__name__}: {exc}"[:140], "-"
        rows.append({"case": name, "expected": expected, "observed": observed, "lost": lost, "ok": ok,
                     "seconds": round(time.time() - started, 1)})

    def write(ws: Path, name: str, data: bytes) -> Path:
        path = ws / name
        path.write_bytes(data)
        return path

    # ---- bad inputs: a clear error naming the file/row/field, nothing half-written
    case("empty corpus", "DataError naming the file",
         lambda ws: expect_error(DataError, "empty.txt", files_corpus(ws / "w", write(ws, "empty.txt", b"")), ws / "w"))
    case("corpus of only duplicates", "DataError: too few documents",
         lambda ws: expect_error(DataError, "dup.txt", files_corpus(
             ws / "w", write(ws, "dup.txt", b"the same line\n\n" * 50)), ws / "w"))
    case("binary file", "DataError with file and byte offset",
         lambda ws: expect_error(DataError, "byte", files_corpus(
             ws / "w", write(ws, "blob.txt", bytes(range(256)) * 4)), ws / "w"))
    case("wrong encoding (latin-1)", "DataError with file and byte offset",
         lambda ws: expect_error(DataError, "latin.txt", files_corpus(
             ws / "w", write(ws, "latin.txt", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 20)),
             ws / "w"))
    case("CSV without the text column", "DataError naming the column",
         lambda ws: expect_error(DataError, "'text'", labeled_files(
             ws / "w", write(ws, "t.csv", b"review,label\ngood,1\nbad,0\n" * 10)), ws / "w"))
    case("labeled set with a single class", "DataError: one class",
         lambda ws: expect_error(DataError, "one class", labeled_files(
             ws / "w", write(ws, "one.csv", b"text,label\n" + b"".join(b"text %d,pos\n" % i for i in range(40)))),
             ws / "w"))
    case("validation/test label unseen in training", "DataError naming the row",
         lambda ws: expect_error(DataError, "row", labeled_files(
             ws / "w", write(ws, "tr.csv", b"text,label\n" + b"".join(b"t%d,%s\n" % (i, b"ab"[i % 2:i % 2 + 1])
                                                                      for i in range(40))),
             write(ws, "te.csv", b"text,label\nx,a\ny,c\n")), ws / "w"))
    case("sequence length above the model's context", "ConfigError naming pretrain.block_size",
         lambda ws: expect_error(ConfigError, "pretrain.block_size",
                                 lambda: tiny(ws, "pretrain.block_size=128"), ws))
    case("vocabulary too small for the special tokens", "ConfigError naming tokenizer.vocab_size",
         lambda ws: expect_error(ConfigError, "tokenizer.vocab_size",
                                 lambda: prepared(ws / "w", "tokenizer.vocab_size=257"), ws / "w"))

    def corrupted_shard(ws: Path):
        _, _, _, tokens = prepared(ws / "w")
        copy = ws / "copy"
        shutil.copytree(tokens.dir, copy)
        data = bytearray((copy / "train.bin").read_bytes())
        data[100] ^= 0xFF
        (copy / "train.bin").write_bytes(bytes(data))
        bad = tokens.model_copy(update={"path": str(copy)})
        return expect_error(DataError, "checksum", lambda: open_tokens(bad, "train", verify=True), ws / "w")

    case("corrupted token shard", "DataError: checksum mismatch", corrupted_shard)

    steps = ["pretrain.max_steps=30", "pretrain.checkpoint_every=10", "pretrain.log_every=1"]

    def partial_checkpoint(ws: Path):
        cfg, w, tok, tokens = prepared(ws / "ref", *steps)
        reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        cfg, w, tok, tokens = prepared(ws / "w", *steps)
        work = w.work_dir("checkpoints", pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed))
        os.environ["LLMPIPE_FAULT"] = "pretrain:oserror@25"
        try:
            pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        except OSError:
            pass
        finally:
            os.environ.pop("LLMPIPE_FAULT")
        (work / "step-00000030.tmp-dead").mkdir()                      # a crash while writing step 30
        (work / "step-00000020" / "state.json").unlink()                # step 20 left incomplete
        done = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        ok = done.meta["resumed_from"] == 10 and weights_equal(reference, done, exact=True)
        return ok, (f"step-20 incomplete and step-30.tmp skipped; resumed from step {done.meta['resumed_from']}; "
                    f"bit-identical={ok}"), f"{24 - done.meta['resumed_from']} steps (step 20 unusable)"

    case("partial checkpoint directory", "skipped; previous complete checkpoint used", partial_checkpoint)

    # ---- faults: survived, with at most one checkpoint interval lost
    def oom(ws: Path):
        cfg, w, tok, tokens = prepared(ws / "ref", *steps)
        reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        cfg, w, tok, tokens = prepared(ws / "w", *steps)
        os.environ["LLMPIPE_FAULT"] = "pretrain:oom@15"
        try:
            done = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        finally:
            os.environ.pop("LLMPIPE_FAULT")
        ok = (done.meta["micro_batch"], done.meta["grad_accum_steps"]) == (4, 2) and weights_equal(
            reference, done, exact=False)
        return ok, (f"micro-batch {done.meta['micro_batch']} x {done.meta['grad_accum_steps']}, resumed from "
                    f"{done.meta['resumed_from']}, weights within 1e-5={ok}"), f"{15 - 1 - done.meta['resumed_from']} steps"

    case("CUDA-style out of memory at step 15", "halve micro-batch, double accumulation, resume", oom)

    def sigkill(ws: Path):
        long = ["pretrain.max_steps=60", "pretrain.checkpoint_every=10", "pretrain.log_every=5"]
        cfg, w, tok, tokens = prepared(ws / "ref", *long)
        reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        cfg, w, tok, tokens = prepared(ws / "w", *long)
        work = w.work_dir("checkpoints", pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed))
        script = textwrap.dedent(f"""
            import sys, time; sys.path[:0] = [{str(REPO)!r}]
            from tasks.artifacts import Workspace
            from tasks.config import load_config
            from tasks.ingest import ingest_corpus
            from tasks.tokenize import tokenize_corpus, train_tokenizer
            from tasks.pretrain import pretrain
            from tasks.training import set_threads
            set_threads(1)
            cfg = load_config("tiny", ["workspace={ws / 'w'}", *{long!r}])
            ws = Workspace(cfg.workspace)
            c = ingest_corpus(cfg.corpus, ws, cfg.seed); t = train_tokenizer(c, cfg.tokenizer, ws)
            pretrain(tokenize_corpus(c, t, ws), t, cfg.model, cfg.pretrain, ws, cfg.seed,
                     on_progress=lambda *a: time.sleep(0.3))
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not any(int(p.name.split("-")[1]) >= 20 for p in list_checkpoints(work)):
            if child.poll() is not None or time.time() > deadline:
                return False, "child ended before it could be killed", "-"
            time.sleep(0.05)
        time.sleep(0.7)  # a little past the checkpoint: the work after it is what a crash loses
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = max(int(p.name.split("-")[1]) for p in list_checkpoints(work))
        done = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        ok = done.meta["resumed_from"] == killed and weights_equal(reference, done, exact=True)
        return ok, f"SIGKILL after step {killed}; resumed from {done.meta['resumed_from']}; bit-identical={ok}", \
            f"< {cfg.pretrain.checkpoint_every} steps"

    case("kill -9 during pretraining", "resume from newest checkpoint, bit-identical", sigkill)

    # ---- tables read strictly, errors that name without quoting
    case("ragged CSV row (an unquoted comma)", "DataError naming file and line; no row shifted",
         lambda ws: expect_error(DataError, "line 3: 3 fields, expected 2", labeled_files(
             ws / "w", write(ws, "ragged.csv", b"text,label\ngood film,pos\ngreat, really great,pos\n" * 1)),
             ws / "w"))
    case("unbalanced quote", "DataError naming the line where the field starts",
         lambda ws: expect_error(DataError, "line 3: a quoted field", labeled_files(
             ws / "w", write(ws, "quote.csv", b"text,label\nfine,pos\n\"never closed,neg\n" + b"x,pos\n" * 30)),
             ws / "w"))
    case("JSONL row without the label key", "DataError naming file, line and key",
         lambda ws: expect_error(DataError, "line 2: no column 'label'", labeled_files(
             ws / "w", write(ws, "rows.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b"}\n')), ws / "w"))
    def secret_in_table(ws: Path):
        path = write(ws, "settings.env", b"hello,pos\nworld,neg\napi,HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz012345\n")
        cfg = tiny(ws / "w", f"labeled.source={{kind: files, train: '{path}', has_header: false}}",
                   "labeled.text_column='0'", "labeled.label_column=1", "labeled.labels=[pos, neg]")
        try:
            ingest_labeled(cfg.labeled, Workspace(ws / "w"), cfg.seed)
        except DataError as exc:
            ok = "settings.env: row 3" in str(exc) and "hf_abcdefghij" not in str(exc) and not leftovers(ws / "w")
            return ok, f"DataError: {str(exc)[:110]}", "0 bytes (nothing written)"
        return False, "no error", "-"

    case("secret in a file read as a table", "error names file and row; the secret is masked", secret_in_table)

    def nan_loss(ws: Path):
        cfg, w, tok, tokens = prepared(ws / "w", *steps)
        os.environ["LLMPIPE_FAULT"] = "pretrain:nan@12"
        try:
            ok, observed, lost = expect_error(TrainingDiverged, "step 12", lambda: pretrain(
                tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed), ws / "w")
        finally:
            os.environ.pop("LLMPIPE_FAULT")
        fp = pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed)
        ok = ok and not w.dir("checkpoints", fp).exists()  # a diverged run never produces a final model
        return ok, observed, "the run (no model saved)"

    case("NaN loss injected at step 12", "TrainingDiverged naming the step; no model saved", nan_loss)

    def truncated_weights(ws: Path):
        cfg, w, tok, tokens = prepared(ws / "ref", *steps)
        reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        cfg, w, tok, tokens = prepared(ws / "w", *steps)
        damaged = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        weights = damaged.dir / "model.safetensors"
        with open(weights, "r+b") as f:  # what a power loss can leave: a complete-looking artifact, short file
            f.truncate(weights.stat().st_size // 2)
        import logging

        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("llmpipe").addHandler(handler)
        try:
            again = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        finally:
            logging.getLogger("llmpipe").removeHandler(handler)
        warned = any("is damaged (model.safetensors" in m for m in messages)
        same = weights_equal(reference, again, exact=True)
        ok = warned and not again.reused and again.fingerprint == damaged.fingerprint and same
        return ok, f"damage warned={warned}; rebuilt={not again.reused}; bit-identical to a clean run={same}", \
            "the stage (rebuilt)"

    case("truncated weight file in a complete artifact", "detected on reuse, warned, rebuilt", truncated_weights)

    def finetune_oom(ws: Path):
        from tasks.finetune import finetune

        cfg, w, tok, tokens = prepared(ws / "w", "finetune.max_steps=12", "finetune.checkpoint_every=4")
        lm = pretrain(tokens, tok, cfg.model, cfg.pretrain, w, cfg.seed)
        labeled = ingest_labeled(cfg.labeled, w, cfg.seed)
        reference = finetune(lm, labeled, cfg.finetune, Workspace(ws / "ref"), cfg.seed)
        os.environ["LLMPIPE_FAULT"] = "finetune:oom@6"
        try:
            done = finetune(lm, labeled, cfg.finetune, w, cfg.seed)
        finally:
            os.environ.pop("LLMPIPE_FAULT")
        ok = (done.meta["micro_batch"], done.meta["grad_accum_steps"]) == (4, 2) and \
            done.fingerprint == reference.fingerprint and weights_equal(reference, done, exact=False)
        return ok, (f"micro-batch {done.meta['micro_batch']} x {done.meta['grad_accum_steps']}, resumed from "
                    f"{done.meta['resumed_from']}, weights within 1e-5={ok}"), f"{6 - 1 - done.meta['resumed_from']} steps"

    case("fine-tuning out of memory at step 6", "halve micro-batch, double accumulation, resume", finetune_oom)

    # ---- attacks: refused before any stage, or confined where a stage reads
    attack_cases(case)

    # ---- the whole pipeline through the command line, deployment runs on a real server and worker
    with PrefectServer(root / "prefect") as server:
        pipeline_cases(case, server, root)

    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  {'ok':<4} {'expected':<48} {'lost':<26} observed")
    for r in rows:
        print(f"{r['case']:<{width}}  {'yes' if r['ok'] else 'NO':<4} {r['expected']:<48} {r['lost']:<26} {r['observed']}")
    shutil.rmtree(root, ignore_errors=True)
    passed = sum(r["ok"] for r in rows)
    print(json.dumps({"benchmark": "faults", "cases": len(rows), "as_expected": passed, "rows": rows}))
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
