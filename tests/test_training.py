"""The pretraining engine: exact resume after SIGKILL, accumulation, schedules, model families, DDP."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config, training_log
from safetensors.torch import load_file

from tasks import faults
from tasks.artifacts import Workspace
from tasks.config import load_config
from tasks.errors import TrainingDiverged
from tasks.ingest import ingest_corpus
from tasks.pretrain import build_lm, flops_per_token, pretrain, pretrain_fingerprint
from tasks.tokenize import tokenize_corpus, train_tokenizer
from tasks.training import list_checkpoints, lr_lambda, set_threads, train


@pytest.fixture(autouse=True)
def _one_thread():
    set_threads(1)


def _prepare(ws_root: Path, *overrides: str):
    cfg = tiny_config(ws_root, *overrides)
    ws = Workspace(cfg.workspace)
    corpus = ingest_corpus(cfg.corpus, ws, cfg.seed)
    tok = train_tokenizer(corpus, cfg.tokenizer, ws)
    return cfg, ws, tok, tokenize_corpus(corpus, tok, ws)


def _weights(ref) -> dict[str, torch.Tensor]:
    return load_file(str(ref.dir / "model.safetensors"))


def _processes_mentioning(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


STEPS = ["pretrain.max_steps=40", "pretrain.checkpoint_every=5", "pretrain.log_every=5", "pretrain.eval_every=20"]


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = _prepare(tmp_path / "a", *STEPS)
    reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)

    cfg_b, ws_b, tok_b, tokens_b = _prepare(tmp_path / "b", *STEPS)
    fp = pretrain_fingerprint(tokens_b, tok_b, cfg_b.model, cfg_b.pretrain, cfg_b.seed)
    work = ws_b.work_dir("checkpoints", fp)
    script = textwrap.dedent(f"""
        import sys, time; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        from conftest import tiny_config
        from tasks.artifacts import Workspace
        from tasks.ingest import ingest_corpus
        from tasks.tokenize import tokenize_corpus, train_tokenizer
        from tasks.pretrain import pretrain
        from tasks.training import set_threads
        set_threads(1)
        cfg = tiny_config({str(tmp_path / 'b')!r}, *{STEPS!r})
        ws = Workspace(cfg.workspace)
        c = ingest_corpus(cfg.corpus, ws, cfg.seed); t = train_tokenizer(c, cfg.tokenizer, ws)
        # A slow observer (it does not change the result) leaves time to kill the run mid-way.
        pretrain(tokenize_corpus(c, t, ws), t, cfg.model, cfg.pretrain, ws, cfg.seed,
                 on_progress=lambda *a: time.sleep(0.5))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(int(p.name.split("-")[1]) >= 15 for p in list_checkpoints(work)) or child.poll() is not None,
                  240, "a checkpoint at step 15")
        assert child.poll() is None, "training finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    killed_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(work))
    assert 15 <= killed_at < 40

    resumed = pretrain(tokens_b, tok_b, cfg_b.model, cfg_b.pretrain, ws_b, cfg_b.seed)
    assert resumed.meta["resumed_from"] == killed_at
    assert resumed.fingerprint == reference.fingerprint
    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = _prepare(tmp_path / "a", "pretrain.max_steps=8", "pretrain.log_every=1")
    big = pretrain(tokens, tok, cfg.model, cfg.pretrain.model_copy(update={"batch_size": 8}), ws, cfg.seed)
    cfg_b, ws_b, tok_b, tokens_b = _prepare(tmp_path / "b", "pretrain.max_steps=8", "pretrain.log_every=1")
    acc = pretrain(tokens_b, tok_b, cfg_b.model,
                   cfg_b.pretrain.model_copy(update={"batch_size": 4, "grad_accum_steps": 2}), ws_b, cfg_b.seed)
    # The micro-batch split is an execution detail: same global batch, same artifact identity.
    assert big.fingerprint == acc.fingerprint
    assert (acc.meta["micro_batch"], acc.meta["grad_accum_steps"]) == (4, 2)
    a, b = _weights(big), _weights(acc)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert acc.meta["tokens_seen"] == big.meta["tokens_seen"] == 8 * 8 * cfg.pretrain.block_size


def test_out_of_memory_halves_the_micro_batch_and_resumes(tmp_path: Path, monkeypatch) -> None:
    steps = ["pretrain.max_steps=12", "pretrain.checkpoint_every=4", "pretrain.log_every=1"]
    cfg, ws, tok, tokens = _prepare(tmp_path / "a", *steps)
    reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    cfg_b, ws_b, tok_b, tokens_b = _prepare(tmp_path / "b", *steps)
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:oom@6")
    survived = pretrain(tokens_b, tok_b, cfg_b.model, cfg_b.pretrain, ws_b, cfg_b.seed)
    assert survived.meta["resumed_from"] == 4
    assert (survived.meta["micro_batch"], survived.meta["grad_accum_steps"]) == (4, 2)
    assert survived.meta["tokens_seen"] == reference.meta["tokens_seen"]
    a, b = _weights(reference), _weights(survived)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_nan_loss_stops_pretraining_with_no_artifact(tmp_path: Path, monkeypatch) -> None:
    steps = ["pretrain.max_steps=10", "pretrain.checkpoint_every=4", "pretrain.log_every=1"]
    cfg, ws, tok, tokens = _prepare(tmp_path / "ws", *steps)
    monkeypatch.setattr(faults, "_fired", set())  # a fresh process, as far as fault rules go
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:nan@6")
    with pytest.raises(TrainingDiverged, match=r"^pretrain: training diverged at step 6: the loss is nan and the "
                       r"gradient norm is nan; 0 step\(s\) skipped before, and pretrain\.max_skipped_steps=0 allows "
                       r"no more"):
        pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    # Nothing under the artifact's name: only the resumable checkpoints (none after the NaN) and the lock.
    fp = pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed)
    left = sorted(p.name for p in (ws.root / "checkpoints").iterdir() if p.name.startswith(fp))
    assert set(left) <= {f"{fp}.work", f"{fp}.lock"} and f"{fp}.work" in left
    assert [p.name for p in list_checkpoints(ws.work_dir("checkpoints", fp))] == ["step-00000004"]
    assert not ws.is_complete(ws.root / "checkpoints" / fp)


def test_max_skipped_steps_skips_a_nan_step_and_reports_it(tmp_path: Path, monkeypatch, caplog) -> None:
    steps = ["pretrain.max_steps=10", "pretrain.checkpoint_every=4", "pretrain.log_every=1",
             "pretrain.max_skipped_steps=1"]
    cfg, ws, tok, tokens = _prepare(tmp_path / "ws", *steps)
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:nan@6")
    with caplog.at_level("WARNING", logger="llmpipe"):
        ref = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    assert "pretrain: step 6 skipped: the loss is nan and the gradient norm is nan" in caplog.text
    assert "1 of pretrain.max_skipped_steps=1 skips used" in caplog.text
    assert ref.meta["skipped_steps"] == 1 and ref.meta["steps"] == 10 and ref.meta["stop_reason"] == "max_steps"
    # A skipped step is no training step: its tokens are not counted, and step 6 was trained on the next batch.
    assert ref.meta["tokens_seen"] == 10 * 8 * cfg.pretrain.block_size
    history = training_log(ref)["history"]
    assert [h["step"] for h in history] == list(range(1, 11))
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    assert all(torch.isfinite(w).all() for w in _weights(ref).values())


def _poisoned_gradient_loss(bad_calls: set[int]):
    """The LM loss, plus on the listed calls a term whose value is 0 and whose gradient is NaN (sqrt'(0) x 0)."""
    from tasks.pretrain import lm_loss

    calls = []

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        loss = lm_loss(model, batch)
        if len(calls) in bad_calls:
            loss = loss + torch.sqrt((model.get_input_embeddings().weight * 0).sum())
        return loss

    return loss_fn


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_non_finite_gradient_with_a_finite_loss_stops_training(tmp_path: Path, grad_clip: float) -> None:
    import numpy as np

    from tasks.pretrain import BlockBatches

    cfg, *_ = _prepare(tmp_path / "ws", "pretrain.max_steps=6", "pretrain.log_every=1", "pretrain.warmup_steps=0",
                       f"pretrain.grad_clip={grad_clip}")

    def run(max_skipped: int, bad_calls: set[int], work: str):
        torch.manual_seed(0)
        model = build_lm(cfg.model, 64, 0, 1)
        source = BlockBatches(np.arange(2000) % 64, 16, 4, 0)
        run_cfg = cfg.pretrain.model_copy(update={"max_skipped_steps": max_skipped})
        result = train(model, source, run_cfg, tmp_path / work, loss_fn=_poisoned_gradient_loss(bad_calls),
                       name="pretrain")
        return model, result

    with pytest.raises(TrainingDiverged, match=r"at step 3: the gradient norm is nan; 0 step\(s\) skipped") as err:
        run(0, {3}, "a")
    assert "the loss is" not in str(err.value)  # the loss itself was finite
    assert not list_checkpoints(tmp_path / "a")
    model, result = run(1, {3}, "b")
    assert (result.steps, result.skipped_steps) == (6, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in result.history)  # measured, clip or not
    # The limit bounds the skips of a whole run: two bad steps with one allowed stop at the second.
    with pytest.raises(TrainingDiverged, match=r"at step 3: the gradient norm is nan; 1 step\(s\) skipped before, "
                       r"and pretrain\.max_skipped_steps=1 allows no more"):
        run(1, {3, 4}, "c")


def test_fault_kinds_raise_what_they_stand_for(monkeypatch) -> None:
    import errno

    from tasks.errors import ConfigError

    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LLMPIPE_FAULT", "register:enospc,tokenize,pretrain:oserror@3")
    with pytest.raises(OSError, match="No space left on device") as full:
        faults.check("register")
    assert full.value.errno == errno.ENOSPC
    faults.check("register")  # each rule fires once per process
    with pytest.raises(OSError) as io:
        faults.check("tokenize")  # the default kind: a transient I/O failure
    assert io.value.errno == errno.EIO
    faults.check("pretrain")
    with pytest.raises(OSError, match="at step 3") as io:
        faults.check("pretrain", 3)
    assert io.value.errno == errno.EIO

    monkeypatch.setenv("LLMPIPE_FAULT", "finetune:nan@2")
    faults.check("finetune", 2)  # a nan rule raises nothing: it poisons the step's loss, once
    assert not faults.poison_loss("finetune", 1) and not faults.poison_loss("pretrain", 2)
    assert faults.poison_loss("finetune", 2) and not faults.poison_loss("finetune", 2)
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:nan")
    with pytest.raises(ConfigError, match="needs the training step"):
        faults.check("pretrain")
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:segfault@3")
    with pytest.raises(ConfigError, match="unknown fault kind 'segfault'"):
        faults.check("tokenize")


def test_global_batch_tokens_sets_accumulation() -> None:
    cfg = load_config("tiny", ["pretrain.global_batch_tokens=1024"])
    assert cfg.pretrain.accum_steps == 1024 // (8 * 32)
    with pytest.raises(ValueError, match="global_batch_tokens"):
        load_config("tiny", ["pretrain.global_batch_tokens=1000"])


def test_stops_at_max_tokens(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = _prepare(tmp_path / "ws", "pretrain.max_tokens=1000")
    ref = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    assert ref.meta["stop_reason"] == "max_tokens"
    assert ref.meta["tokens_seen"] == 4 * 8 * 32  # first step count at which 8x32-token batches pass 1000


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedules_warm_up_then_decay_to_the_floor(schedule: str) -> None:
    cfg = load_config(None, [f"pretrain.schedule={schedule}", "pretrain.max_steps=100", "pretrain.warmup_steps=10"])
    f = lr_lambda(cfg.pretrain)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(100) == pytest.approx(cfg.pretrain.min_lr_ratio)
    if schedule == "wsd":
        assert f(50) == 1.0 and f(79) == 1.0 and f(90) < 1.0
    else:
        assert 0.1 < f(50) < 1.0


def test_llama_family_trains_and_generates(tmp_path: Path) -> None:
    from transformers import pipeline

    cfg, ws, tok, tokens = _prepare(tmp_path / "ws", "model.family=llama", "pretrain.max_steps=30")
    ref = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    assert ref.meta["family"] == "llama"
    history = (ref.dir / "training.json").read_text()
    assert '"loss"' in history and (ref.dir / "loss_curve.png").stat().st_size > 1000
    assert ref.meta["final_train_loss"] < 6.0  # ln(400) = 5.99 is a uniform guess over the vocabulary
    out = pipeline("text-generation", model=str(ref.dir))("The", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The")


def test_model_presets_and_flops() -> None:
    cfg = load_config(None, ["model.preset=gpt2-124m"])
    model = build_lm(cfg.model, 50257, 0, 1)
    n = sum(p.numel() for p in model.parameters())
    assert 124e6 < n < 125e6  # GPT-2 small with a tied output layer
    fpt = flops_per_token(model, 1024)
    assert fpt == pytest.approx(6 * (n - 1024 * 768) + 12 * 12 * 1024 * 768)
    assert load_config(None, ["model.preset=small", "model.n_layer=3"]).model.n_layer == 3


def test_continue_from_a_checkpoint_directory(tmp_path: Path) -> None:
    import shutil

    from tasks.config import ConfigError

    cfg, ws, tok, tokens = _prepare(tmp_path / "ws")
    first = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    # A checkpoint continued from needs the tokenizer it was trained with, said before anything runs.
    with pytest.raises(ConfigError, match="model.init_from continues a checkpoint.*set tokenizer.pretrained"):
        tiny_config(tmp_path / "ws", f"model.init_from={first.dir}")
    start = tmp_path / "start"
    shutil.copytree(first.dir, start)
    model_cfg = cfg.model.model_copy(update={"init_from": str(start)})
    second = pretrain(tokens, tok, model_cfg, cfg.pretrain, ws, cfg.seed)
    assert second.fingerprint != first.fingerprint
    assert second.meta["final_train_loss"] < first.meta["final_train_loss"]
    # Named by its content: the same folder with one file changed is another start, another artifact.
    (start / "generation_config.json").write_text('{"max_new_tokens": 7}\n')
    assert pretrain_fingerprint(tokens, tok, model_cfg, cfg.pretrain, cfg.seed) != second.fingerprint
    # Its own tokenizer must be the pipeline's.
    other, *_ = _prepare(tmp_path / "other-ws", "tokenizer.vocab_size=300")
    other_tok = train_tokenizer(ingest_corpus(other.corpus, Workspace(other.workspace), 0), other.tokenizer,
                                Workspace(other.workspace))
    for f in other_tok.dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, start / f.name)
    with pytest.raises(ConfigError, match="its tokenizer differs from the pipeline's"):
        pretrain(tokens, tok, model_cfg, cfg.pretrain, ws, cfg.seed)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Ten steps in one process at micro-batch 8: what two processes at micro-batch 4 must match."""
    cfg, ws, tok, tokens = _prepare(tmp_path_factory.mktemp("parity") / "ws", "pretrain.max_steps=10",
                                    "pretrain.log_every=1")
    single = pretrain(tokens, tok, cfg.model, cfg.pretrain.model_copy(update={"batch_size": 8}), ws, cfg.seed)
    return cfg, ws, tok, tokens, single


@pytest.mark.slow
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
    a, b = _weights(single), _weights(ddp)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
def test_timeout_kills_the_whole_torchrun_group(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = _prepare(tmp_path / "ws", "pretrain.max_steps=1000000", "pretrain.batch_size=4",
                                    "pretrain.devices=2", "pretrain.distributed_timeout_s=8")
    fp = pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed)
    spec = str(ws.work_dir("checkpoints", fp) / "torchrun_spec.json")
    with pytest.raises(TimeoutError, match="distributed_timeout_s"):
        pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    _wait_for(lambda: not _processes_mentioning(spec), 15, "torchrun processes to end")
    assert not list((ws.root / "checkpoints").glob(f"{fp}.tmp-*")), "a half-written artifact was left"


@pytest.mark.slow
def test_killing_the_task_process_leaves_no_orphaned_workers(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = _prepare(tmp_path / "ws", "pretrain.max_steps=1000000", "pretrain.batch_size=4",
                                    "pretrain.devices=2", "pretrain.log_every=1")
    fp = pretrain_fingerprint(tokens, tok, cfg.model, cfg.pretrain, cfg.seed)
    spec = str(ws.work_dir("checkpoints", fp) / "torchrun_spec.json")
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        from conftest import tiny_config
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
        # Wait until both workers are up (the spec path is on their command lines, and the agent's).
        _wait_for(lambda: len(_processes_mentioning(spec)) >= 3, 120, "torchrun and two workers")
        child.send_signal(signal.SIGKILL)
        child.wait()
        _wait_for(lambda: not _processes_mentioning(spec), 30, "every torchrun process to end")
    finally:
        for pid in _processes_mentioning(spec):
            os.kill(pid, signal.SIGKILL)
        if child.poll() is None:
            child.kill()


@pytest.mark.slow
def test_compiled_engine_trains_like_the_eager_one(tmp_path: Path) -> None:
    # pretrain.compile=true: the model and its loss compiled together; same losses as eager, up to rounding.
    args = ["pretrain.max_steps=12", "pretrain.log_every=1", "pretrain.eval_every=12"]
    cfg, ws, tok, tokens = _prepare(tmp_path / "eager", *args)
    eager = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    cfg_c, ws_c, tok_c, tokens_c = _prepare(tmp_path / "compiled", *args, "pretrain.compile=true")
    compiled = pretrain(tokens_c, tok_c, cfg_c.model, cfg_c.pretrain, ws_c, cfg_c.seed)
    assert compiled.fingerprint == eager.fingerprint  # compilation is an execution detail
    loss_e = [h["loss"] for h in training_log(eager)["history"]]
    loss_c = [h["loss"] for h in training_log(compiled)["history"]]
    assert len(loss_c) == len(loss_e) == 12
    assert loss_c[-1] < loss_c[0] - 0.3  # it learns
    assert max(abs(a - b) for a, b in zip(loss_e, loss_c, strict=True)) < 2e-3
    assert compiled.meta["val_loss"] == pytest.approx(eager.meta["val_loss"], abs=2e-3)


def test_compile_without_a_cpu_compiler_fails_before_training(tmp_path: Path) -> None:
    import numpy as np
    import torch._inductor.config as inductor_config

    from tasks.errors import ConfigError
    from tasks.pretrain import BlockBatches, lm_loss
    from tasks.training import train

    cfg, *_ = _prepare(tmp_path / "ws", "pretrain.compile=true", "pretrain.device=cpu")
    model = build_lm(cfg.model, 64, 0, 1)
    source = BlockBatches(np.arange(2000) % 64, 16, 4, 0)
    # inductor's own patch() restores its config exactly; monkeypatch.setattr on the config proxy does not.
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}), \
            pytest.raises(ConfigError, match=r"pretrain\.compile=true on CPU needs a C\+\+ compiler"):
        train(model, source, cfg.pretrain, tmp_path / "work", loss_fn=lm_loss, name="pretrain")
    assert not list((tmp_path / "work").glob("step-*"))


@pytest.mark.slow
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
    a, b = _weights(single), _weights(sharded)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
