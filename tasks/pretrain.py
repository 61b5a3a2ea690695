"""Causal-LM pretraining: a GPT-2 or Llama model built from config (or continued from a checkpoint),
trained on packed token blocks, in one process or data-parallel under torchrun (``torchrun_worker`` is what
each worker runs)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks import checkpoints
from tasks.artifacts import CheckpointRef, TokenizerRef, TokensRef, Workspace, fingerprint, write_json
from tasks.config import TRAIN_EXECUTION_ONLY, ModelConfig, PretrainConfig, is_local
from tasks.curves import plot_curve
from tasks.distributed import run_torchrun
from tasks.errors import ConfigError, DataError
from tasks.tokenize import open_tokens

if TYPE_CHECKING:  # torch, and the modules that import it, only where a model is built or run (not on reuse)
    import torch

log = logging.getLogger("llmpipe")

STAGE_VERSION = "pretrain-4"
# Left out of a pretrained model's fingerprint besides TRAIN_EXECUTION_ONLY: validation (it only watches),
# where and how the processes run, and what changes only rounding (compile).
EXECUTION_ONLY = TRAIN_EXECUTION_ONLY | {"eval_every", "eval_batches", "rdzv_endpoint", "node_rank",
                                            "distributed_timeout_s", "global_batch_tokens", "device", "compile"}


def check_init_tokenizer(init_from: str, tokenizer_dir: str | Path) -> None:
    """A checkpoint continued from must come with its own tokenizer, and it must be the pipeline's: the same
    strings must map to the same ids, or every embedding row would mean another token."""
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(checkpoints.local_dir(init_from, "model.init_from")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init_from={init_from}: it has no tokenizer of its own to check against the "
                          f"pipeline's ({type(exc).__name__}); save the tokenizer it was trained with beside it") from None
    if not checkpoints.same_vocabulary(own, AutoTokenizer.from_pretrained(str(tokenizer_dir))):
        raise ConfigError(f"model.init_from={init_from}: its tokenizer differs from the pipeline's; set "
                          "tokenizer.pretrained to the checkpoint's tokenizer (for example the same folder)")


def build_lm(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int):
    """A causal LM from config (SDPA attention), or loaded from ``cfg.init_from``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if cfg.init_from:
        source = str(checkpoints.local_dir(cfg.init_from, "model.init_from"))
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=cfg.trust_remote_code,
                                                     attn_implementation="sdpa")
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"model.init_from={cfg.init_from}: its vocabulary ({model.config.vocab_size}) is smaller "
                              f"than the tokenizer's ({vocab_size})")
        return model
    if cfg.family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.n_positions, tie_word_embeddings=True,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding-lookup parameters + attention (PaLM appendix B).

    The tied output projection is a real matmul and counts; position-embedding lookups do not.
    """
    import torch

    c = model.config
    n_params = count_parameters(model)
    lookup_only = sum(m.weight.numel() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Embedding) and ("wpe" in name or "position" in name))
    n_layer = getattr(c, "n_layer", None) or c.num_hidden_layers
    d_model = getattr(c, "n_embd", None) or c.hidden_size
    return 6.0 * (n_params - lookup_only) + 12.0 * n_layer * seq_len * d_model


class BlockBatches:
    """Random contiguous blocks of ``block_size + 1`` tokens from a flat token stream (nanoGPT-style)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.tokens, self.block_size = tokens, block_size
        n_blocks = (len(tokens) - 1) // block_size
        if n_blocks < batch_size * world:
            raise DataError(f"the training split has {len(tokens)} tokens: {n_blocks} blocks of "
                            f"pretrain.block_size={block_size}, fewer than one global batch ({batch_size * world})")
        from tasks.training import ShuffledIndices

        self.order = ShuffledIndices(n_blocks, batch_size, seed, rank, world)

    def next_batch(self) -> dict[str, torch.Tensor]:
        import torch

        b = self.block_size
        rows = [np.asarray(self.tokens[i * b : i * b + b + 1], dtype=np.int64) for i in self.order.next_indices()]
        x = torch.from_numpy(np.stack(rows))
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from tasks.kernels import next_token_loss

    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # no key/value cache in training
    return next_token_loss(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1))


def lm_eval_loss(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
                 max_batches: int | None = None) -> tuple[float, int]:
    """Mean next-token loss (nats) over consecutive blocks of ``tokens``; returns (loss, tokens scored)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    n_blocks = (len(tokens) - 1) // block_size
    if n_blocks < 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than one block of {block_size}")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n_blocks, batch_size):
            if max_batches is not None and start // batch_size >= max_batches:
                break
            idx = range(start, min(start + batch_size, n_blocks))
            x = torch.from_numpy(np.stack([np.asarray(tokens[i * block_size : i * block_size + block_size + 1],
                                                      dtype=np.int64) for i in idx])).to(device)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += x[:, 1:].numel()
    return total / count, count


def pretrain_fingerprint(tokens: TokensRef, tokenizer: TokenizerRef, model_cfg: ModelConfig,
                         cfg: PretrainConfig, seed: int) -> str:
    global_batch = cfg.batch_size * cfg.accum_steps
    # A checkpoint continued from is named by its files' content: a changed folder is a different start.
    start = [checkpoints.identity(model_cfg.init_from, "model.init_from")] if model_cfg.init_from else []
    return fingerprint(STAGE_VERSION, tokens.fingerprint, tokenizer.fingerprint, model_cfg,
                       cfg.model_dump(exclude=EXECUTION_ONLY), global_batch, seed, *start)


def train_lm(tokens: TokensRef, tokenizer: TokenizerRef, model_cfg: ModelConfig, cfg: PretrainConfig, seed: int,
             work_dir: Path, out: Path,
             on_progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train and save to ``out`` (rank 0); runs the same in one process and in each torchrun worker."""
    from tasks.resume import tied_aliases
    from tasks.training import dist_info, seed_everything, train

    rank, world = dist_info()
    seed_everything(seed)
    if model_cfg.init_from:
        check_init_tokenizer(model_cfg.init_from, tokenizer.dir)
    vocab_size = tokens.meta["vocab_size"]
    model = build_lm(model_cfg, vocab_size, tokenizer.meta["eos_id"], tokenizer.meta["pad_id"])
    n_params = count_parameters(model)
    fpt = flops_per_token(model, cfg.block_size)
    train_tokens = open_tokens(tokens, "train", verify=rank == 0)
    val_tokens = open_tokens(tokens, "validation", verify=rank == 0)
    split = tokens.meta["splits"]["validation"]
    bytes_per_token = split["bytes_text"] / max(1, split["tokens"])
    if rank == 0:
        log.info("pretrain: %s with %.2fM parameters, %.2f MFLOP/token, %d train tokens, %d process(es), "
                 "%d micro-batch(es) per step", model.config.model_type, n_params / 1e6, fpt / 1e6,
                 tokens.meta["splits"]["train"]["tokens"], world, cfg.accum_steps)
    source = BlockBatches(train_tokens, cfg.block_size, cfg.batch_size, seed, rank, world)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        loss, _ = lm_eval_loss(m, val_tokens, cfg.block_size, cfg.batch_size, cfg.eval_batches)
        return {"val_loss": loss, "val_ppl": float(np.exp(loss)),
                "val_bits_per_byte": loss / np.log(2) / bytes_per_token}

    result = train(model, source, cfg, work_dir, loss_fn=lm_loss, evaluate=evaluate,
                   tokens_in=lambda b: int(b["targets"].numel()), flops_per_token=fpt,
                   on_progress=on_progress, strategy=cfg.strategy, name="pretrain")
    meta = {"task": "causal-lm", "family": model.config.model_type, "parameters": n_params,
            "flops_per_token": fpt, "steps": result.steps, "tokens_seen": result.tokens_seen,
            "stop_reason": result.stop_reason, "processes": world, "micro_batch": cfg.batch_size,
            "grad_accum_steps": cfg.accum_steps, "skipped_steps": result.skipped_steps,
            "train_seconds": round(result.train_seconds, 2), "resumed_from": result.resumed_from,
            "peak_flops": result.peak_flops, "final_train_loss": result.history[-1]["loss"],
            **{k: v for k, v in (result.evals[-1] if result.evals else {}).items() if k != "step"}}
    if rank == 0:
        if result.full_weights is not None:  # FSDP: the model holds shards; save the gathered weights
            model = build_lm(model_cfg, vocab_size, tokenizer.meta["eos_id"], tokenizer.meta["pad_id"])
            missing, unexpected = model.load_state_dict(result.full_weights, strict=False)
            if unexpected or set(missing) - set(tied_aliases(model)):
                raise RuntimeError(f"FSDP gathered weights do not fit the model: missing {missing}, "
                                   f"unexpected {unexpected}")
        model.to("cpu").save_pretrained(str(out), safe_serialization=True)
        for f in tokenizer.dir.iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, out / f.name)
        write_json(out / "training.json", {"history": result.history, "evals": result.evals})
        write_json(out / "train_meta.json", meta)
        plot_curve(out / "loss_curve.png", result.history, result.evals, {"val_loss": "validation loss"})
    return meta


def torchrun_worker(spec: dict[str, Any]) -> None:
    """What each torchrun worker of a data-parallel pretraining runs (``tasks.distributed`` set up its process
    group): ``train_lm`` on the stage's inputs, as ``pretrain`` wrote them into ``spec``."""
    train_lm(TokensRef(**spec["tokens"]), TokenizerRef(**spec["tokenizer"]), ModelConfig(**spec["model"]),
             PretrainConfig(**spec["pretrain"]), spec["seed"], Path(spec["work_dir"]), Path(spec["out"]))


def pretrain(
    tokens: TokensRef,
    tokenizer: TokenizerRef,
    model_cfg: ModelConfig,
    cfg: PretrainConfig,
    workspace: Workspace,
    seed: int = 0,
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
    threads: int | None = None,
) -> CheckpointRef:
    """Train a causal LM; the artifact is a ``save_pretrained`` directory plus tokenizer and loss curve.
    ``threads``: torch's intra-op threads while training in this process (0: one per core; None: as they are)."""
    fp = pretrain_fingerprint(tokens, tokenizer, model_cfg, cfg, seed)
    work_dir = workspace.work_dir("checkpoints", fp)

    def build(out: Path) -> dict[str, Any]:
        from tasks.training import set_threads, train_halving_on_oom

        set_threads(threads)
        if cfg.devices > 1 or cfg.nnodes > 1:
            # A local init_from: the workers load the folder this process resolved (for a run created through the
            # API, its private copy of the checked files: the confinement does not cross into other processes).
            init_from = model_cfg.init_from
            if init_from and is_local(init_from):
                init_from = str(checkpoints.local_dir(init_from, "model.init_from"))
            spec = {"tokens": tokens.model_dump(mode="json"), "tokenizer": tokenizer.model_dump(mode="json"),
                    "model": {**model_cfg.model_dump(mode="json"), "init_from": init_from},
                    "pretrain": cfg.model_dump(mode="json"),
                    "seed": seed, "work_dir": str(work_dir), "out": str(out)}
            run_torchrun(torchrun_worker, spec, cfg, work_dir)
            return json.loads((out / "train_meta.json").read_text())
        # Out of memory: half the micro-batch, twice the accumulation, resumed from the newest checkpoint.
        return train_halving_on_oom(
            cfg, lambda current: train_lm(tokens, tokenizer, model_cfg, current, seed, work_dir, out, on_progress),
            "pretrain")

    ref = workspace.materialize(CheckpointRef, fp, build, stage="pretrain",
                                config={"model": model_cfg.model_dump(), "pretrain": cfg.model_dump(), "seed": seed},
                                inputs={"tokens": tokens.fingerprint, "tokenizer": tokenizer.fingerprint})
    shutil.rmtree(work_dir, ignore_errors=True)
    return ref


