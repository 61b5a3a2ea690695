"""Data-parallel training under torchrun, launched by a stage as a subprocess.

``run_torchrun(entry, spec, cfg, work_dir)`` runs ``entry(spec)`` (a function of the stage's own module, such as
``tasks.pretrain.torchrun_worker``) in every worker, after this module has set up the worker's process group and
its logging; ``spec`` is JSON. The launcher owns the whole process tree: torchrun starts in its own session (process group), is
told by the kernel to stop when the launching thread dies (``PR_SET_PDEATHSIG``), and is killed as a
group when the stage fails, is cancelled or runs past ``pretrain.distributed_timeout_s``. Each
worker likewise dies with its torchrun agent, so no training process outlives the task. Each process checks,
right after asking for its death signal, that the parent it was started by is still there: a parent that
died first (killed while it was still starting its children) sends no signal, and torchrun's agent, told to
stop while it is starting its workers, may exit without stopping the ones it has just started.

Multi-node: run the same flow on every node with ``pretrain.nnodes=N``, ``pretrain.node_rank=i``
and ``pretrain.rdzv_endpoint=HOST:PORT`` of node 0 (c10d rendezvous); the workspace must be on
storage all nodes share.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.artifacts import write_json
from tasks.config import PretrainConfig

log = logging.getLogger("llmpipe")

PR_SET_PDEATHSIG = 1


# The process a launched process must die with, by number: the task for torchrun's agent, the agent for its workers.
PARENT_PID_ENV = "LLMPIPE_TORCHRUN_PARENT_PID"


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask Linux to send ``sig`` to this process when its parent thread exits (no-op elsewhere). With ``parent``
    (the pid this process was started by), exit at once if that parent is already gone: the kernel only
    signals a parent's death that comes after the request."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        print(f"llmpipe: process {parent}, which started this one, is gone; exiting", file=sys.stderr)
        os._exit(128 + sig)


def torchrun_command(spec_path: Path, cfg: PretrainConfig) -> list[str]:
    """torchrun, started through ``launch`` (tied to the launching thread), running ``worker SPEC`` in each process."""
    cmd = [sys.executable, "-m", "tasks.distributed", "launch", sys.executable, "-m", "torch.distributed.run",
           f"--nproc-per-node={cfg.devices}", f"--nnodes={cfg.nnodes}"]
    if cfg.nnodes > 1:
        cmd += [f"--node-rank={cfg.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                f"--rdzv-id=llmpipe-{spec_path.parent.name}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "tasks.distributed", "worker", str(spec_path)]


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the launched process group, then SIGKILL whatever is left after ``grace_s``."""
    if proc.poll() is not None:  # the leader is gone; members may remain
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_torchrun(entry: Callable[[dict[str, Any]], Any], spec: dict[str, Any], cfg: PretrainConfig,
                 work_dir: Path) -> None:
    """Run ``entry(spec)`` in ``cfg.devices`` processes per node; raise if any fails or time runs out.

    ``entry`` is a module-level function, imported by name in each worker; ``spec`` must be JSON.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / "torchrun_spec.json"
    write_json(spec_path, {"entry": f"{entry.__module__}:{entry.__qualname__}", "device": cfg.device, "spec": spec})
    cmd = torchrun_command(spec_path, cfg)
    log.info("%s: launching %d x %d processes under torchrun", entry.__module__.rsplit(".", 1)[-1], cfg.nnodes,
             cfg.devices)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cfg.devices)),
           PARENT_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    tail: deque[str] = deque(maxlen=60)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith("[llmpipe] "):
                log.info("%s", line.removeprefix("[llmpipe] "))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        while proc.poll() is None:
            if cfg.distributed_timeout_s and time.monotonic() - started > cfg.distributed_timeout_s:
                raise TimeoutError(f"distributed pretraining ran past pretrain.distributed_timeout_s="
                                   f"{cfg.distributed_timeout_s}s; its process group was killed")
            time.sleep(0.2)
    finally:
        kill_group(proc)
        reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {proc.returncode}; last output:\n" + "\n".join(tail))


def _worker(spec_path: str) -> None:
    """One torchrun worker: dies with its agent, joins the process group (NCCL on CUDA, else gloo), logs through
    rank 0's stdout, and runs the stage's entry."""
    die_with_parent(signal.SIGKILL, int(os.environ[PARENT_PID_ENV]))
    import importlib

    import torch

    launch = json.loads(Path(spec_path).read_text())
    backend = "nccl" if torch.cuda.is_available() and launch["device"] != "cpu" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if torch.distributed.get_rank() == 0:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[llmpipe] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    module, name = launch["entry"].split(":")
    try:
        getattr(importlib.import_module(module), name)(launch["spec"])
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str]) -> None:
    if argv[0] == "launch":  # become torchrun, tied to the launching thread's life; its workers, to torchrun's
        die_with_parent(signal.SIGTERM, int(os.environ[PARENT_PID_ENV]))
        os.environ[PARENT_PID_ENV] = str(os.getpid())  # exec keeps the pid: the workers' parent is this process
        os.execv(argv[1], argv[1:])
    elif argv[0] == "worker":
        _worker(argv[1])
    else:
        raise SystemExit(f"usage: python -m tasks.distributed launch CMD... | worker SPEC ({argv})")


if __name__ == "__main__":
    main(sys.argv[1:])
