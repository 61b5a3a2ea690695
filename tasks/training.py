"""The training engine shared by pretraining and fine-tuning.

One readable loop: AdamW (decay on matrices only, fused), transformers' learning-rate schedules (linear
warmup, then cosine to a floor or warmup-stable-decay), gradient accumulation, gradient clipping, bf16 autocast on CUDA and fp32 on
CPU, optional ``torch.compile``, periodic validation, and resumable checkpoints that hold everything
needed to continue bit-for-bit (``tasks.resume``). Under ``torch.distributed`` the model is wrapped in
DDP (or sharded with FSDP's ``fully_shard``), each rank draws its share of every global batch, and
only rank 0 writes (under FSDP after every rank has helped gather the full state).

Every step's loss and gradient norm must be finite: a step where either is NaN or inf changes no
weight and is tried again on the next batch, at most ``max_skipped_steps`` times in a run; the next
one stops training with ``TrainingDiverged``, so a diverged run never saves a model. Running out of
memory is handled by the stages around the engine (``train_halving_on_oom``): half the micro-batch,
twice the accumulation, the same global batch, resumed from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from tasks import faults
from tasks.config import TrainConfig
from tasks.errors import ConfigError, TrainingDiverged
from tasks.kernels import fast_modules
from tasks.resume import (
    BatchSource,
    gather_full_state,
    is_fsdp,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger("llmpipe")

def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShuffledIndices:
    """Batches of indices over ``n`` items, reshuffled each epoch from (seed, epoch).

    Every rank walks the same global order; rank r takes the r-th slice of each global batch of
    ``batch_size * world`` indices, so data parallelism sees exactly the batches one process would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("cannot draw batches from an empty set")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._perm = epoch_permutation(n, seed, 0)

    def next_indices(self) -> np.ndarray:
        out = []
        need = self.batch_size * self.world
        while need:
            take = self._perm[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._perm = epoch_permutation(self.n, self.seed, self.epoch)
        glob = np.concatenate(out)
        return glob[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = epoch_permutation(self.n, self.seed, self.epoch)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_compiled(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms while compiled training runs on the CPU; the process's settings after.

    Inductor lowers the embeddings' backward (``index_put`` with accumulation) to atomic adds in parallel loops,
    so the order of the additions, and with it the weights' last bits, changes from run to run; in deterministic
    mode it calls the eager kernel instead, which sums in a fixed order. Eager training is deterministic without
    it. ``warn_only``: an operation without a deterministic form warns rather than stopping the run;
    uninitialised memory is not filled (that is for debugging, and costs a pass over every new tensor).
    """
    if not enabled:
        yield
        return
    import torch.utils.deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads; 0 means one per core, None leaves them as they are."""
    if threads is not None:
        torch.set_num_threads(threads or os.cpu_count() or 1)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 on CPU, where bf16 is 10-100x slower without AVX512-BF16."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then transformers' cosine decay to ``min_lr_ratio`` of the peak, or its warmup-stable-decay
    schedule (constant, then a linear decay over the last ``decay_fraction`` of the steps)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

    if cfg.schedule == "wsd":
        decay = max(1, int(cfg.decay_fraction * cfg.max_steps))
        return get_wsd_schedule(optimizer, num_warmup_steps=cfg.warmup_steps, num_decay_steps=decay,
                                num_stable_steps=max(0, cfg.max_steps - cfg.warmup_steps - decay),
                                decay_type="linear", min_lr_ratio=cfg.min_lr_ratio)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=cfg.warmup_steps,
                                                       num_training_steps=cfg.max_steps,
                                                       min_lr_rate=cfg.min_lr_ratio)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (FSDP's sharded parameters keep their full shapes)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel exists for CUDA and CPU; one pass over each tensor instead of several foreach ops.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def measure_peak_flops(device: torch.device, n: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a square fp32 (bf16 on CUDA) matmul on this device: the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    resumed_from: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    stop_reason: str = "max_steps"
    peak_flops: float | None = None
    skipped_steps: int = 0  # steps skipped because their loss or gradient norm was not finite
    full_weights: dict[str, torch.Tensor] | None = None  # FSDP: the gathered final weights (rank 0)


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class _LossModule(torch.nn.Module):
    """The model and its loss as one module: DDP/FSDP wrap it and ``torch.compile`` traces the loss too,
    so the loss fuses with the model's last layers. Checkpoints still hold the bare model's state."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _wrap_distributed(stepper: _LossModule, device: torch.device, strategy: str,
                      amp: torch.dtype | None) -> torch.nn.Module:
    """DDP around the loss module, or FSDP (``fully_shard``) over the model in place: each transformer
    block is its own shard group, the model is the root (so every forward, evaluation included,
    gathers and frees the blocks' weights in turn), and the loss module stays outside it."""
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist_info()[1],))
        # bf16: gather weights and compute in bf16, reduce gradients in fp32 (the master weights stay fp32).
        policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
        model = stepper.model
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return stepper
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(stepper, device_ids=[device.index] if device.type == "cuda" else None)


def train(
    model: torch.nn.Module,
    source: BatchSource,
    cfg: TrainConfig,
    work_dir: Path,
    *,
    loss_fn: LossFn,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    should_stop: Callable[[list[dict[str, float]]], bool] | None = None,
    tokens_in: Callable[[dict[str, torch.Tensor]], int] = lambda b: int(b["input_ids"].numel()),
    flops_per_token: float | None = None,
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
    strategy: str = "ddp",
    name: str = "train",
) -> TrainResult:
    """Train ``model`` until ``cfg.max_steps`` (or max_tokens / max_time_s), resuming from ``work_dir``.

    ``should_stop`` sees every evaluation so far after each validation pass; when it returns True training
    ends there (``stop_reason`` 'early_stop'), with a checkpoint that a resumed run also stops at.
    With ``cfg.fast_kernels`` some modules run in a faster equivalent form while training (tasks/kernels.py).
    Compiled on the CPU, training runs in torch's deterministic mode (``deterministic_compiled``), so two runs
    give the same weights bit for bit.
    """
    cpu = resolve_device(cfg).type == "cpu"
    with fast_modules(model, cfg.fast_kernels, dropout=cpu) as swapped, deterministic_compiled(cfg.compile and cpu):
        if swapped:
            log.debug("%s: %d activation or dropout module(s) in their fast form while training", name, swapped)
        return _train(model, source, cfg, work_dir, loss_fn=loss_fn, evaluate=evaluate, should_stop=should_stop,
                      tokens_in=tokens_in, flops_per_token=flops_per_token, on_progress=on_progress,
                      strategy=strategy, name=name)


def _train(model, source, cfg, work_dir, *, loss_fn, evaluate, should_stop, tokens_in, flops_per_token,
           on_progress, strategy, name) -> TrainResult:
    rank, world = dist_info()
    device = resolve_device(cfg)
    if cfg.compile and device.type == "cpu":
        _check_cpu_compiler(name)
    model.to(device)
    amp = autocast_dtype(cfg, device)
    accum = cfg.accum_steps
    work_dir.mkdir(parents=True, exist_ok=True)
    # Wrap first, then build the optimizer on the wrapped parameters (FSDP replaces them with sharded
    # DTensors of the same names and shapes), then restore a checkpoint into both.
    stepper = _LossModule(model, loss_fn)
    wrapped = _wrap_distributed(stepper, device, strategy, amp) if world > 1 else stepper
    fsdp = is_fsdp(model)
    optimizer = make_optimizer(stepper, cfg, device)
    scheduler = lr_scheduler(optimizer, cfg)
    result = TrainResult(steps=0, tokens_seen=0, resumed_from=None)
    checkpoints = list_checkpoints(work_dir) if cfg.resume else []
    early_stop = False
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, source)
        result.steps, result.tokens_seen = state["step"], state["tokens_seen"]
        result.history, result.evals = state["history"], state["evals"]
        result.skipped_steps = int(state.get("skipped_steps", 0))
        result.resumed_from = result.steps
        early_stop = bool(state.get("early_stop"))
        if rank == 0:
            log.info("%s: resuming from checkpoint at step %d (%s)", name, result.steps, checkpoints[-1])

    step_loss_fn = torch.compile(wrapped) if cfg.compile else wrapped
    if flops_per_token and rank == 0:
        # Best of two sizes and two trials: a peak measured while something else holds the cores would
        # inflate every MFU figure of the run.
        sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
        result.peak_flops = cfg.peak_flops or max(measure_peak_flops(device, n, repeats=4)
                                                  for n in sizes for _ in range(2))

    def sync_ctx(micro: int):
        """Reduce gradients across ranks only on the last micro-batch of a step."""
        last_micro = micro == accum - 1
        if fsdp:
            model.set_requires_gradient_sync(last_micro)
        elif world > 1 and not last_micro:
            return wrapped.no_sync()
        return contextlib.nullcontext()

    model.train()
    window_start, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
    t0 = time.perf_counter()
    while True:
        stop = "early_stop" if early_stop else _stop_reason(cfg, result, time.perf_counter() - t0)
        if stop:
            result.stop_reason = stop
            break
        step_no = result.steps + 1
        faults.check(name, step_no)
        poison = faults.poison_loss(name, step_no)  # LLMPIPE_FAULT=STAGE:nan@STEP
        step_loss = torch.zeros((), device=device)
        n_tok = 0
        for micro in range(accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in source.next_batch().items()}
            autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
            with sync_ctx(micro), autocast:
                loss = step_loss_fn(batch) / accum
            if poison and micro == 0:
                loss = loss * float("nan")
            loss.backward()
            step_loss += loss.detach()
            n_tok += tokens_in(batch)
        grad_norm = _grad_norm(stepper, cfg.grad_clip)
        # The step's one device sync: loss and gradient norm reach the host together. Averaged over ranks, a
        # value that is not finite on one rank is not finite on all, so every rank takes the same decision.
        stats = torch.stack([step_loss.float(), grad_norm.to(device=step_loss.device, dtype=torch.float32)])
        if world > 1:
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.AVG)
            n_tok *= world
        loss_value, norm_value = stats.tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            optimizer.zero_grad(set_to_none=True)
            _skip_or_stop(cfg, result, name, step_no, loss_value, norm_value, rank)
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        result.steps += 1
        result.tokens_seen += n_tok
        window_tokens += n_tok
        window_loss += loss_value
        window_n += 1
        step = result.steps
        last = _stop_reason(cfg, result, time.perf_counter() - t0) is not None

        if step % cfg.log_every == 0 or last:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            row = {"step": step, "loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": norm_value, "tokens_per_s": window_tokens / elapsed,
                   "tokens_seen": result.tokens_seen}
            if flops_per_token and result.peak_flops:
                row["mfu"] = row["tokens_per_s"] * flops_per_token / (result.peak_flops * world)
            result.history.append(row)
            if rank == 0:
                log.info("%s step %d/%d  loss %.4f  lr %.2e  %.0f tok/s%s", name, step, cfg.max_steps, row["loss"],
                         row["lr"], row["tokens_per_s"], f"  mfu {row['mfu']:.1%}" if "mfu" in row else "")
                if on_progress:
                    on_progress(step, cfg.max_steps, row)
            window_start, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
        if evaluate and (step % cfg.eval_every == 0 or last):
            # Under FSDP every rank runs the evaluation (each forward gathers the shards); rank 0 keeps it.
            metrics = {"step": step, **evaluate(model)} if rank == 0 or fsdp else None
            if rank == 0:
                result.evals.append(metrics)
                log.info("%s eval at step %d: %s", name, step,
                         "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
                early_stop = bool(should_stop and should_stop(result.evals))
                if early_stop:
                    log.info("%s: early stop at step %d", name, step)
            if world > 1 and should_stop:
                flag = torch.tensor([float(early_stop)], device=device)
                torch.distributed.broadcast(flag, 0)
                early_stop = bool(flag.item())
            model.train()
        if step % cfg.checkpoint_every == 0 or last or early_stop:
            # FSDP: every rank takes part in gathering the full weights and optimizer state onto rank 0.
            gathered = gather_full_state(model, optimizer) if fsdp else None
            if rank == 0:
                save_checkpoint(work_dir, model, optimizer, scheduler, source,
                                {"step": step, "tokens_seen": result.tokens_seen, "history": result.history,
                                 "evals": result.evals, "early_stop": early_stop,
                                 "skipped_steps": result.skipped_steps}, cfg.keep_checkpoints, gathered)
            if world > 1:
                torch.distributed.barrier()
    result.train_seconds = time.perf_counter() - t0
    if fsdp:  # the trained weights, whole, for rank 0 to save (every rank takes part in gathering them)
        result.full_weights = gather_full_state(model).weights
    model.eval()
    return result


def _grad_norm(stepper: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """The total L2 norm of the gradients, clipping them to ``grad_clip`` unless it is 0 (measured either way,
    so the finite check sees it). Under FSDP the gradients are DTensor shards and this is the norm over all."""
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(stepper.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in stepper.parameters() if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _skip_or_stop(cfg: TrainConfig, result: TrainResult, name: str, step: int, loss: float, grad_norm: float,
                  rank: int) -> None:
    """A step whose loss or gradient norm is not finite: count it as skipped while ``max_skipped_steps`` allows,
    else stop training with ``TrainingDiverged``."""
    bad = " and ".join(f"the {what} is {value}" for what, value in (("loss", loss), ("gradient norm", grad_norm))
                       if not math.isfinite(value))
    if result.skipped_steps >= cfg.max_skipped_steps:
        raise TrainingDiverged(
            f"{name}: training diverged at step {step}: {bad}; {result.skipped_steps} step(s) skipped before, and "
            f"{name}.max_skipped_steps={cfg.max_skipped_steps} allows no more. Lower {name}.lr, lengthen "
            f"{name}.warmup_steps or clip gradients ({name}.grad_clip), or let a few bad batches be skipped by "
            f"raising {name}.max_skipped_steps; no model was saved")
    result.skipped_steps += 1
    if rank == 0:
        log.warning("%s: step %d skipped: %s; no weight changed, trying the step again on the next batch "
                    "(%d of %s.max_skipped_steps=%d skips used)", name, step, bad, result.skipped_steps, name,
                    cfg.max_skipped_steps)


C = TypeVar("C", bound=TrainConfig)
T = TypeVar("T")


def halve_micro_batch(cfg: C) -> C:
    """Half the micro-batch, twice the accumulation: the same global batch in less memory."""
    update: dict[str, Any] = {"batch_size": cfg.batch_size // 2, "grad_accum_steps": cfg.accum_steps * 2}
    if "global_batch_tokens" in type(cfg).model_fields:  # pretraining: it would set the accumulation again
        update["global_batch_tokens"] = None
    return cfg.model_copy(update=update)


def train_halving_on_oom(cfg: C, attempt: Callable[[C], T], name: str) -> T:
    """``attempt(cfg)``, and after each out-of-memory error ``attempt`` again with the micro-batch halved and the
    accumulation doubled (the same global batch): it resumes from the newest checkpoint of the same work dir, as
    the global batch, not its split, is what names the run. An odd micro-batch cannot be halved: re-raised."""
    current = cfg
    while True:
        try:
            return attempt(current)
        except torch.OutOfMemoryError:
            if current.batch_size % 2:
                raise
        # Out of the except block: the failed attempt's frames, and the tensors they held, are freed by now.
        current = halve_micro_batch(current)
        log.warning("%s: out of memory; resuming with micro-batch %d x %d accumulation steps (same global batch)",
                    name, current.batch_size, current.grad_accum_steps)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_cpu_compiler(name: str) -> None:
    """torch.compile on CPU builds C++ kernels: fail before training, not at its first step."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own error types for a missing or unusable compiler
        raise ConfigError(f"{name}.compile=true on CPU needs a C++ compiler for torch.compile ({exc}); "
                          f"install one (g++ or clang++, or point CXX at it) or set {name}.compile=false") from None


def _stop_reason(cfg: TrainConfig, result: TrainResult, elapsed: float) -> str | None:
    if result.steps >= cfg.max_steps:
        return "max_steps"
    if cfg.max_tokens is not None and result.tokens_seen >= cfg.max_tokens:
        return "max_tokens"
    if cfg.max_time_s is not None and elapsed >= cfg.max_time_s:
        return "max_time"
    return None
