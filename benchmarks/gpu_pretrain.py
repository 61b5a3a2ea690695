"""GPU pretraining throughput: GPT-2 124M in bf16 through llmpipe's engine.

For a machine with a CUDA GPU. Trains the gpt2-124m preset on random token ids (throughput does not
depend on what the tokens say) with the engine's own loop: bf16 autocast, fused AdamW, optional
torch.compile. Reports tokens/s after warm-up and MFU against a bf16 matmul peak measured in this
same run. The last line printed is one JSON object.

    python benchmarks/gpu_pretrain.py [--steps 300] [--batch 16] [--block 1024] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks.config import load_config
from tasks.pretrain import BlockBatches, build_lm, flops_per_token, lm_loss
from tasks.training import measure_peak_flops, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 50257


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch (sequences)")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_pretrain.py needs a CUDA GPU; on CPU use benchmarks/pretrain.py")

    cfg = load_config(None, ["model.preset=gpt2-124m", f"pretrain.block_size={args.block}",
                             f"pretrain.batch_size={args.batch}", f"pretrain.max_steps={args.warmup + args.steps}",
                             f"pretrain.log_every={args.warmup}", "pretrain.eval_every=1000000000",
                             "pretrain.checkpoint_every=1000000000", "pretrain.device=cuda", "pretrain.lr=6e-4",
                             f"pretrain.compile={str(args.compile).lower()}", "pretrain.resume=false"])
    rng = np.random.default_rng(0)
    n_tokens = (args.warmup + args.steps) * args.batch * (args.block + 1)
    tokens = rng.integers(0, VOCAB, size=n_tokens, dtype=np.int64).astype(np.uint16)
    torch.manual_seed(0)
    model = build_lm(cfg.model, VOCAB, 0, 0)
    fpt = flops_per_token(model, args.block)
    device = torch.device("cuda")
    peak = max(measure_peak_flops(device, n, repeats=20) for n in (4096, 8192))
    stamps: list[tuple[int, float]] = []

    def clock(step: int, total: int, row: dict) -> None:
        torch.cuda.synchronize()
        stamps.append((step, time.perf_counter()))

    with tempfile.TemporaryDirectory() as work:
        result = train(model, BlockBatches(tokens, args.block, args.batch, 0), cfg.pretrain, Path(work),
                       loss_fn=lm_loss, tokens_in=lambda b: int(b["targets"].numel()), on_progress=clock)
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    tps = (s1 - s0) * args.batch * args.block / (t1 - t0)
    print(json.dumps({
        "benchmark": "gpu_pretrain", "device": torch.cuda.get_device_name(), "model": "gpt2-124m",
        "parameters": sum(p.numel() for p in model.parameters()), "precision": "bf16", "compile": args.compile,
        "micro_batch": args.batch, "block_size": args.block, "measured_steps": s1 - s0,
        "tokens_per_s": round(tps, 1), "flops_per_token": fpt, "peak_flops": round(peak),
        "mfu": round(tps * fpt / peak, 4), "final_loss": result.history[-1]["loss"],
        "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }))


if __name__ == "__main__":
    main()
