"""The fault and bad-input matrix: every case run for real, one table, exit 0 only if all behave.

Bad inputs must fail with an error that names the file, row or field, and leave nothing
half-written. Faults must be survived: retried, resumed, or recovered with at most one checkpoint
interval of work lost. The last line printed is one JSON object.

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parent.parent
# The repository, not this folder, on the path: benchmarks/tokenize.py must not shadow the standard library.
sys.path[0] = str(REPO)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tasks.artifacts import Workspace  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.errors import ConfigError, DataError  # noqa: E402
from tasks.ingest import ingest_corpus, ingest_labeled  # noqa: E402
from tasks.pretrain import pretrain, pretrain_fingerprint  # noqa: E402
from tasks.tokenize import open_tokens, tokenize_corpus, train_tokenizer  # noqa: E402
from tasks.training import list_checkpoints, set_threads  # noqa: E402


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
    sets = ["labeled.source=files", f"labeled.train_path={train}"] + ([f"labeled.test_path={test}"] if test else [])
    cfg = tiny(ws, *sets)
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
