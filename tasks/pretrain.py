"""Causal-LM pretraining: a GPT-2-style model built from config, trained on packed token blocks."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tasks.artifacts import CheckpointRef, TokenizerRef, TokensRef, Workspace, fingerprint, write_json
from tasks.config import ModelConfig, PretrainConfig
from tasks.errors import DataError
from tasks.tokenize import open_tokens
from tasks.training import ShuffledIndices, seed_everything, train

log = logging.getLogger("llmpipe")

STAGE_VERSION = "pretrain-1"
# Settings that change how training is observed, not the weights it produces.
OBSERVE_ONLY = {"log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"}


def build_lm(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


class BlockBatches:
    """Random contiguous blocks of ``block_size + 1`` tokens from a flat token stream (nanoGPT-style)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size = tokens, block_size
        n_blocks = (len(tokens) - 1) // block_size
        if n_blocks < 1:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one block of "
                            f"pretrain.block_size={block_size}")
        self.order = ShuffledIndices(n_blocks, batch_size, seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        b = self.block_size
        rows = [np.asarray(self.tokens[i * b : i * b + b + 1], dtype=np.int64) for i in self.order.next_indices()]
        x = torch.from_numpy(np.stack(rows))
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1))


@torch.no_grad()
def lm_eval_loss(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
                 max_batches: int | None = None) -> tuple[float, int]:
    """Mean next-token loss (nats) over consecutive blocks of ``tokens``; returns (loss, tokens scored)."""
    model.eval()
    n_blocks = (len(tokens) - 1) // block_size
    if n_blocks < 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than one block of {block_size}")
    total, count = 0.0, 0
    for start in range(0, n_blocks, batch_size):
        if max_batches is not None and start // batch_size >= max_batches:
            break
        idx = range(start, min(start + batch_size, n_blocks))
        x = torch.from_numpy(np.stack([np.asarray(tokens[i * block_size : i * block_size + block_size + 1],
                                                  dtype=np.int64) for i in idx]))
        logits = model(input_ids=x[:, :-1]).logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return total / count, count


def pretrain_fingerprint(tokens: TokensRef, tokenizer: TokenizerRef, model_cfg: ModelConfig,
                         cfg: PretrainConfig, seed: int) -> str:
    return fingerprint(STAGE_VERSION, tokens.fingerprint, tokenizer.fingerprint, model_cfg,
                       cfg.model_dump(exclude=OBSERVE_ONLY), seed)


def pretrain(
    tokens: TokensRef,
    tokenizer: TokenizerRef,
    model_cfg: ModelConfig,
    cfg: PretrainConfig,
    workspace: Workspace,
    seed: int = 0,
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> CheckpointRef:
    """Train a causal LM from scratch; the artifact is a ``save_pretrained`` directory plus tokenizer."""
    fp = pretrain_fingerprint(tokens, tokenizer, model_cfg, cfg, seed)
    work_dir = workspace.work_dir("checkpoints", fp)

    def build(out: Path) -> dict[str, Any]:
        seed_everything(seed)
        model = build_lm(model_cfg, tokens.meta["vocab_size"], tokenizer.meta["eos_id"], tokenizer.meta["pad_id"])
        n_params = sum(p.numel() for p in model.parameters())
        log.info("pretrain: GPT-2 with %.2fM parameters, %d train tokens", n_params / 1e6,
                 tokens.meta["splits"]["train"]["tokens"])
        train_tokens = open_tokens(tokens, "train", verify=True)
        val_tokens = open_tokens(tokens, "validation", verify=True)
        source = BlockBatches(train_tokens, cfg.block_size, cfg.batch_size, seed)

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            loss, _ = lm_eval_loss(m, val_tokens, cfg.block_size, cfg.batch_size, cfg.eval_batches)
            return {"val_loss": loss, "val_ppl": float(np.exp(loss))}

        result = train(model, source, cfg, work_dir, loss_fn=lm_loss, evaluate=evaluate,
                       tokens_in=lambda b: int(b["targets"].numel()), on_progress=on_progress, name="pretrain")
        model.save_pretrained(str(out), safe_serialization=True)
        for f in tokenizer.dir.iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, out / f.name)
        write_json(out / "training.json", {"history": result.history, "evals": result.evals})
        final = result.evals[-1] if result.evals else {}
        return {"task": "causal-lm", "parameters": n_params, "steps": result.steps,
                "tokens_seen": result.tokens_seen, "train_seconds": round(result.train_seconds, 2),
                "resumed_from": result.resumed_from, "final_train_loss": result.history[-1]["loss"],
                **{k: v for k, v in final.items() if k != "step"}}

    ref = workspace.materialize(CheckpointRef, fp, build, stage="pretrain",
                                config={"model": model_cfg.model_dump(), "pretrain": cfg.model_dump(), "seed": seed},
                                inputs={"tokens": tokens.fingerprint, "tokenizer": tokenizer.fingerprint})
    shutil.rmtree(work_dir, ignore_errors=True)
    return ref


def load_training_log(ref: CheckpointRef) -> dict[str, Any]:
    return json.loads((ref.dir / "training.json").read_text())
