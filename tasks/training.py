"""The training engine shared by pretraining and fine-tuning.

One readable loop: AdamW (decay on matrices only), linear warmup then cosine decay, gradient
clipping, periodic validation and resumable checkpoints. A checkpoint holds everything needed to
continue exactly: weights (safetensors), optimizer and scheduler state, the torch RNG state, the
batch source's position, the step, the tokens seen and the metric history. Checkpoints are written
to ``step-N.tmp-*`` and renamed, so a directory named ``step-N`` is always complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tasks.config import TrainConfig

log = logging.getLogger("llmpipe")

STATE_FILE = "state.json"


class BatchSource(Protocol):
    """Yields training batches in a deterministic order that can be saved and restored."""

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class ShuffledIndices:
    """Batches of indices over ``n`` items, reshuffled each epoch from (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise ValueError("cannot draw batches from an empty set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = epoch_permutation(n, seed, 0)

    def next_indices(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            take = self._perm[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._perm = epoch_permutation(self.n, self.seed, self.epoch)
        return np.concatenate(out)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = epoch_permutation(self.n, self.seed, self.epoch)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads; 0 means one per core."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    resumed_from: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; ``.tmp-*`` leftovers of a crash are ignored."""
    if not work_dir.is_dir():
        return []
    found = [p for p in work_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(work_dir: Path, model: torch.nn.Module, optimizer, scheduler, source: BatchSource,
                    state: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_model

    final = work_dir / f"step-{state['step']:08d}"
    tmp = work_dir / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "source": source.state_dict()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, source: BatchSource) -> dict[str, Any]:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["torch_rng"])
    state = json.loads((path / STATE_FILE).read_text())
    source.load_state_dict(state["source"])
    return state


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def train(
    model: torch.nn.Module,
    source: BatchSource,
    cfg: TrainConfig,
    work_dir: Path,
    *,
    loss_fn: LossFn,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    tokens_in: Callable[[dict[str, torch.Tensor]], int] = lambda b: int(b["input_ids"].numel()),
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
    name: str = "train",
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps, resuming from ``work_dir`` if it holds a checkpoint."""
    work_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    result = TrainResult(steps=0, tokens_seen=0, resumed_from=None)
    checkpoints = list_checkpoints(work_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, source)
        result.steps, result.tokens_seen = state["step"], state["tokens_seen"]
        result.history, result.evals = state["history"], state["evals"]
        result.resumed_from = result.steps
        log.info("%s: resuming from checkpoint at step %d (%s)", name, result.steps, checkpoints[-1])

    model.train()
    window_start, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
    t0 = time.perf_counter()
    while result.steps < cfg.max_steps:
        batch = source.next_batch()
        loss = loss_fn(model, batch)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip
                     else torch.tensor(0.0))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        result.steps += 1
        n_tok = tokens_in(batch)
        result.tokens_seen += n_tok
        window_tokens += n_tok
        window_loss += float(loss.detach())
        window_n += 1
        step = result.steps
        last = step == cfg.max_steps

        if step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            result.history.append(row)
            log.info("%s step %d/%d  loss %.4f  lr %.2e  %.0f tok/s", name, step, cfg.max_steps, row["loss"],
                     row["lr"], row["tokens_per_s"])
            window_start, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
            if on_progress:
                on_progress(step, cfg.max_steps, row)
        if evaluate and (step % cfg.eval_every == 0 or last):
            metrics = {"step": step, **evaluate(model)}
            model.train()
            result.evals.append(metrics)
            log.info("%s eval at step %d: %s", name, step,
                     "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
        if step % cfg.checkpoint_every == 0 or last:
            save_checkpoint(work_dir, model, optimizer, scheduler, source,
                            {"step": step, "tokens_seen": result.tokens_seen, "history": result.history,
                             "evals": result.evals}, cfg.keep_checkpoints)
    result.train_seconds = time.perf_counter() - t0
    model.eval()
    return result
