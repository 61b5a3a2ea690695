"""Exact resume: what a training checkpoint holds, written so that a directory named ``step-N`` is always complete,
and read back into the model, optimizer, scheduler, batch source and every RNG.

A checkpoint holds the weights (safetensors), the optimizer and scheduler state, every RNG state (python, numpy,
torch, CUDA), the batch source's position, the step, the tokens seen and the metric history; it is written to
``step-N.tmp-*`` and renamed. Under FSDP the weights and optimizer state are gathered from every rank's shards
first, and each rank keeps its own shard when one is read back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

STATE_FILE = "state.json"


class BatchSource(Protocol):
    """Yields training batches in a deterministic order that can be saved and restored."""

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; ``.tmp-*`` leftovers of a crash are ignored."""
    if not work_dir.is_dir():
        return []
    found = [p for p in work_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


def save_checkpoint(work_dir: Path, model: torch.nn.Module, optimizer, scheduler, source: BatchSource,
                    state: dict[str, Any], keep: int, gathered: FullState | None = None) -> Path:
    """Write ``step-N`` atomically. ``gathered``: the full weights and optimizer state that FSDP gathered
    from every rank's shards (the model's own parameters hold only this rank's shard)."""
    from safetensors.torch import save_file, save_model

    final = work_dir / f"step-{state['step']:08d}"
    tmp = work_dir / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    if gathered is not None:
        aliases = tied_aliases(model)
        save_file({k: v.contiguous() for k, v in gathered.weights.items() if k not in aliases},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_model(model, str(tmp / "model.safetensors"))
    trainer = {"optimizer": gathered.optimizer if gathered is not None else optimizer.state_dict(),
               "scheduler": scheduler.state_dict(),
               "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        trainer["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "source": source.state_dict(), "rng": _rng_state()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, source: BatchSource) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` (sharded by FSDP or not), ``optimizer``, ``scheduler`` and
    ``source``, and every RNG. Under FSDP every rank reads the full state and keeps its own shard."""
    from safetensors.torch import load_file, load_model

    trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        weights = load_file(str(path / "model.safetensors"))
        for alias, name in tied_aliases(model).items():
            weights[alias] = weights[name]
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optimizer, trainer["optimizer"], options=full)
    else:
        load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["torch_rng"])
    if "cuda_rng" in trainer and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    state = json.loads((path / STATE_FILE).read_text())
    source.load_state_dict(state["source"])
    _set_rng_state(state["rng"])
    return state


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP (``fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Parameter names that share a tensor with an earlier name (GPT-2's output layer and token
    embedding), mapped to that name; a checkpoint stores each shared tensor once."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


@dataclass
class FullState:
    """The full (unsharded) weights and optimizer state, keyed by parameter name, on CPU."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> FullState:
    """Gather FSDP shards into full tensors on rank 0 (other ranks get empty dicts); a collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else {}
    return FullState(weights, optim)
