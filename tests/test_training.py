"""The training engine: checkpoints and batch order, accumulation, out of memory, non-finite steps, schedules,
stopping rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import faults
from tasks.config import load_config
from tasks.errors import TrainingDiverged
from tasks.pretrain import build_lm, pretrain, pretrain_fingerprint
from tasks.resume import STATE_FILE, list_checkpoints
from tasks.training import ShuffledIndices, deterministic_compiled, lr_scheduler, train
from tests.support import prepared, training_log, weights


def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = prepared(tmp_path / "a", "pretrain.max_steps=8", "pretrain.log_every=1")
    big = pretrain(tokens, tok, cfg.model, cfg.pretrain.model_copy(update={"batch_size": 8}), ws, cfg.seed)
    cfg_b, ws_b, tok_b, tokens_b = prepared(tmp_path / "b", "pretrain.max_steps=8", "pretrain.log_every=1")
    acc = pretrain(tokens_b, tok_b, cfg_b.model,
                   cfg_b.pretrain.model_copy(update={"batch_size": 4, "grad_accum_steps": 2}), ws_b, cfg_b.seed)
    # The micro-batch split is an execution detail: same global batch, same artifact identity.
    assert big.fingerprint == acc.fingerprint
    assert (acc.meta["micro_batch"], acc.meta["grad_accum_steps"]) == (4, 2)
    a, b = weights(big), weights(acc)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert acc.meta["tokens_seen"] == big.meta["tokens_seen"] == 8 * 8 * cfg.pretrain.block_size


def test_out_of_memory_halves_the_micro_batch_and_resumes(tmp_path: Path, monkeypatch) -> None:
    steps = ["pretrain.max_steps=12", "pretrain.checkpoint_every=4", "pretrain.log_every=1"]
    cfg, ws, tok, tokens = prepared(tmp_path / "a", *steps)
    reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    cfg_b, ws_b, tok_b, tokens_b = prepared(tmp_path / "b", *steps)
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:oom@6")
    survived = pretrain(tokens_b, tok_b, cfg_b.model, cfg_b.pretrain, ws_b, cfg_b.seed)
    assert survived.meta["resumed_from"] == 4
    assert (survived.meta["micro_batch"], survived.meta["grad_accum_steps"]) == (4, 2)
    assert survived.meta["tokens_seen"] == reference.meta["tokens_seen"]
    a, b = weights(reference), weights(survived)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_nan_loss_stops_pretraining_with_no_artifact(tmp_path: Path, monkeypatch) -> None:
    steps = ["pretrain.max_steps=10", "pretrain.checkpoint_every=4", "pretrain.log_every=1"]
    cfg, ws, tok, tokens = prepared(tmp_path / "ws", *steps)
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
    cfg, ws, tok, tokens = prepared(tmp_path / "ws", *steps)
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
    assert all(torch.isfinite(w).all() for w in weights(ref).values())


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

    cfg, *_ = prepared(tmp_path / "ws", "pretrain.max_steps=6", "pretrain.log_every=1", "pretrain.warmup_steps=0",
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


def test_global_batch_tokens_sets_accumulation() -> None:
    cfg = load_config("tiny", ["pretrain.global_batch_tokens=1024"])
    assert cfg.pretrain.accum_steps == 1024 // (8 * 32)
    with pytest.raises(ValueError, match="global_batch_tokens"):
        load_config("tiny", ["pretrain.global_batch_tokens=1000"])


def test_stops_at_max_tokens(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = prepared(tmp_path / "ws", "pretrain.max_tokens=1000")
    ref = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    assert ref.meta["stop_reason"] == "max_tokens"
    assert ref.meta["tokens_seen"] == 4 * 8 * 32  # first step count at which 8x32-token batches pass 1000


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedules_warm_up_then_decay_to_the_floor(schedule: str) -> None:
    cfg = load_config(None, [f"pretrain.schedule={schedule}", "pretrain.max_steps=100", "pretrain.warmup_steps=10"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    (f,) = lr_scheduler(optimizer, cfg.pretrain).lr_lambdas
    warmup = [f(step) for step in range(10)]
    assert warmup == sorted(warmup) and warmup[0] <= 0.1 and max(f(step) for step in range(100)) == 1.0
    assert f(100) == pytest.approx(cfg.pretrain.min_lr_ratio, rel=1e-3)
    if schedule == "wsd":
        assert f(50) == 1.0 and f(79) == 1.0 and f(90) < 1.0
    else:
        assert 0.1 < f(50) < 1.0


def test_compile_without_a_cpu_compiler_fails_before_training(tmp_path: Path) -> None:
    import numpy as np
    import torch._inductor.config as inductor_config

    from tasks.errors import ConfigError
    from tasks.pretrain import BlockBatches, lm_loss
    from tasks.training import train

    cfg, *_ = prepared(tmp_path / "ws", "pretrain.compile=true", "pretrain.device=cpu")
    model = build_lm(cfg.model, 64, 0, 1)
    source = BlockBatches(np.arange(2000) % 64, 16, 4, 0)
    # inductor's own patch() restores its config exactly; monkeypatch.setattr on the config proxy does not.
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}), \
            pytest.raises(ConfigError, match=r"pretrain\.compile=true on CPU needs a C\+\+ compiler"):
        train(model, source, cfg.pretrain, tmp_path / "work", loss_fn=lm_loss, name="pretrain")
    assert not list((tmp_path / "work").glob("step-*"))


def test_list_checkpoints_ignores_partial_ones(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path / "absent") == []
    for name, complete in [("step-00000005", True), ("step-00000010.tmp-xyz", True), ("step-00000015", False),
                           ("step-00000100", True), ("step-00000020", True), ("other", True)]:
        d = tmp_path / name
        d.mkdir()
        if complete:
            (d / STATE_FILE).write_text("{}")
    (tmp_path / "step-00000030").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000020", "step-00000100"]


def test_shuffled_indices_cover_each_epoch_and_restore(tmp_path: Path) -> None:
    a = ShuffledIndices(10, 4, seed=1)
    drawn = np.concatenate([a.next_indices() for _ in range(5)])  # 20 indices = two full epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert not np.array_equal(drawn[:10], drawn[10:])
    state = a.state_dict()
    b = ShuffledIndices(10, 4, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(4):
        assert np.array_equal(a.next_indices(), b.next_indices())


def test_deterministic_mode_is_on_only_while_compiled_cpu_training_runs() -> None:
    import torch.utils.deterministic as det

    settings = lambda: (torch.are_deterministic_algorithms_enabled(),  # noqa: E731
                        torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    before = settings()
    with deterministic_compiled(False):
        assert settings() == before
    with pytest.raises(RuntimeError, match="stop"), deterministic_compiled(True):
        assert settings() == (True, True, False)
        raise RuntimeError("stop")
    assert settings() == before
