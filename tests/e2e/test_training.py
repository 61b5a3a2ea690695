"""Training in several processes and compiled: DDP and FSDP match one process (FSDP also after a crash), the
torchrun group dies with its task and at its time limit, the compiled engine trains like the eager one and gives
the same weights twice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flows.runtime import _stat
from tasks.pretrain import pretrain, pretrain_fingerprint
from tasks.training import list_checkpoints
from tests.support import REPO, prepared, processes_mentioning, training_log, wait_until, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Ten steps in one process at micro-batch 8: what two processes at micro-batch 4 must match."""
    cfg, ws, tok, tokens = prepared(tmp_path_factory.mktemp("parity") / "ws", "pretrain.max_steps=10",
                                    "pretrain.log_every=1")
    single = pretrain(tokens, tok, cfg.model, cfg.pretrain.model_copy(update={"batch_size": 8}), ws, cfg.seed)
    return cfg, ws, tok, tokens, single


def test_ddp_two_processes_match_one_process_at_the_same_global_batch(one_process) -> None:
    cfg, ws, tok, tokens, single = one_process
    ddp = pretrain(tokens, tok, cfg.model, cfg.pretrain.model_copy(update={"batch_size": 4, "devices": 2}), ws,
                   cfg.seed)
    assert ddp.meta["processes"] == 2 and single.meta["processes"] == 1
    assert ddp.meta["tokens_seen"] == single.meta["tokens_seen"]
    import json

    loss_1 = [h["loss"] for h in json.loads((single.dir / "training.json").read_text())["history"]]
    loss_2 = [h["loss"] for h in json.loads((ddp.dir / "training.json").read_text())["history"]]
    assert loss_1 == pytest.approx(loss_2, rel=1e-4)
    a, b = weights(single), weights(ddp)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_timeout_kills_the_whole_torchrun_group(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = prepared(tmp_path / "ws", "pretrain.max_steps=1000000", "pretrain.batch_size=4",
                                    "pretrain.devices=2", "pretrain.distributed_timeout_s=8")
    fp = pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed)
    spec = str(ws.work_dir("checkpoints", fp) / "torchrun_spec.json")
    with pytest.raises(TimeoutError, match="distributed_timeout_s"):
        pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    wait_until(lambda: not processes_mentioning(spec), "torchrun processes to end", 15)
    assert not list((ws.root / "checkpoints").glob(f"{fp}.tmp-*")), "a half-written artifact was left"


@contextlib.contextmanager
def task_starting_its_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A task process pretraining on two processes under torchrun, yielded (with its spec path, which the command
    lines of torchrun's agent and workers name) the moment both workers exist: the agent may still be starting
    them, and they have not yet asked to die with it. Whatever is left is killed afterwards."""
    cfg, ws, tok, tokens = prepared(tmp_path / "ws", "pretrain.max_steps=1000000", "pretrain.batch_size=4",
                                    "pretrain.devices=2", "pretrain.log_every=1")
    fp = pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed)
    spec = str(ws.work_dir("checkpoints", fp) / "torchrun_spec.json")
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(REPO)!r}]
        from tests.support import tiny_config
        from tasks.artifacts import Workspace
        from tasks.ingest import ingest_corpus
        from tasks.tokenize import tokenize_corpus, train_tokenizer
        from tasks.pretrain import pretrain
        cfg = tiny_config({str(tmp_path / 'ws')!r}, "pretrain.max_steps=1000000", "pretrain.batch_size=4",
                          "pretrain.devices=2", "pretrain.log_every=1")
        ws = Workspace(cfg.workspace)
        c = ingest_corpus(cfg.corpus, ws, cfg.seed); t = train_tokenizer(c, cfg.tokenizer, ws)
        pretrain(tokenize_corpus(c, t, ws), t, cfg.model, cfg.pretrain, ws, cfg.seed)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(processes_mentioning(spec)) >= 3, "torchrun and two workers", 120)
        yield child, spec
    finally:
        for pid in processes_mentioning(spec):
            os.kill(pid, signal.SIGKILL)
        if child.poll() is None:
            child.kill()
        child.wait()


def test_killing_the_task_process_leaves_no_orphaned_workers(tmp_path: Path) -> None:
    with task_starting_its_workers(tmp_path) as (child, spec):
        child.send_signal(signal.SIGKILL)
        child.wait()
        wait_until(lambda: not processes_mentioning(spec), "every torchrun process to end", 30)


def test_killing_torchrun_as_it_starts_its_workers_leaves_none_behind(tmp_path: Path) -> None:
    # The agent dies (SIGKILL: the OOM killer's choice) before its workers have asked to die with it, and
    # cannot stop them itself: the workers see that their parent is gone, and exit.
    with task_starting_its_workers(tmp_path) as (child, spec):
        # The agent is the task's child (a worker being forked shows the agent's command line until its exec).
        (agent,) = [pid for pid in processes_mentioning(spec) if (_stat(pid) or [0, 0])[1] == str(child.pid)]
        os.kill(agent, signal.SIGKILL)
        wait_until(lambda: not processes_mentioning(spec), "both workers to end", 30)
        assert child.wait(timeout=60) == 1  # and the task fails (torchrun exited with -9), it does not hang


def test_compiled_engine_trains_like_the_eager_one(tmp_path: Path) -> None:
    # pretrain.compile=true: the model and its loss compiled together; same losses as eager, up to rounding.
    args = ["pretrain.max_steps=12", "pretrain.log_every=1", "pretrain.eval_every=12"]
    cfg, ws, tok, tokens = prepared(tmp_path / "eager", *args)
    eager = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # where parallel loops could race: the compiled embeddings' backward sums rows
    try:
        cfg_c, ws_c, tok_c, tokens_c = prepared(tmp_path / "compiled", *args, "pretrain.compile=true")
        compiled = pretrain(tokens_c, tok_c, cfg_c.model, cfg_c.pretrain, ws_c, cfg_c.seed)
        cfg_2, ws_2, tok_2, tokens_2 = prepared(tmp_path / "compiled-again", *args, "pretrain.compile=true")
        again = pretrain(tokens_2, tok_2, cfg_2.model, cfg_2.pretrain, ws_2, cfg_2.seed)
    finally:
        torch.set_num_threads(threads)
    assert compiled.fingerprint == eager.fingerprint  # compilation is an execution detail
    loss_e = [h["loss"] for h in training_log(eager)["history"]]
    loss_c = [h["loss"] for h in training_log(compiled)["history"]]
    assert len(loss_c) == len(loss_e) == 12
    assert loss_c[-1] < loss_c[0] - 0.3  # it learns
    assert max(abs(a - b) for a, b in zip(loss_e, loss_c, strict=True)) < 2e-3
    assert compiled.meta["val_loss"] == pytest.approx(eager.meta["val_loss"], abs=2e-3)
    # Twice compiled, the same weights bit for bit: in deterministic mode the embeddings' backward sums each row
    # in a fixed order (without it, two threads' atomic adds change the last bits from run to run).
    first, second = weights(compiled), weights(again)
    assert first.keys() == second.keys()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is back


def test_fsdp_two_processes_resume_after_a_crash_and_match_one_process(one_process, monkeypatch) -> None:
    # FSDP (fully_shard over a CPU device mesh, gloo): sharded weights, gathered checkpoints and
    # evaluation, a crash at step 7, a resume from the step-4 checkpoint, and the same training as one
    # process at the same global batch.
    cfg, ws, tok, tokens, single = one_process
    sharded_cfg = cfg.pretrain.model_copy(update={"batch_size": 4, "devices": 2, "strategy": "fsdp",
                                                  "checkpoint_every": 4, "eval_every": 5})
    work_dir = ws.work_dir("checkpoints", pretrain_fingerprint(tokens, tok, cfg.model, sharded_cfg, cfg.seed))
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:oserror@7")
    with pytest.raises(RuntimeError, match="torchrun exited"):
        pretrain(tokens, tok, cfg.model, sharded_cfg, ws, cfg.seed)
    assert [p.name for p in list_checkpoints(work_dir)] == ["step-00000004"]
    monkeypatch.delenv("LLMPIPE_FAULT")
    sharded = pretrain(tokens, tok, cfg.model, sharded_cfg, ws, cfg.seed)
    assert sharded.meta["processes"] == 2 and sharded.meta["resumed_from"] == 4
    assert sharded.meta["tokens_seen"] == single.meta["tokens_seen"]
    log_1, log_2 = training_log(single), training_log(sharded)
    assert [h["loss"] for h in log_1["history"]] == pytest.approx([h["loss"] for h in log_2["history"]], rel=1e-4)
    assert [h["grad_norm"] for h in log_1["history"]] == pytest.approx([h["grad_norm"] for h in log_2["history"]],
                                                                       rel=1e-3)
    assert [e["step"] for e in log_2["evals"]] == [5, 10]
    assert sharded.meta["val_loss"] == pytest.approx(single.meta["val_loss"], rel=5e-4)
    a, b = weights(single), weights(sharded)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
