"""Pretraining throughput: llmpipe's engine against Hugging Face Trainer, in one process.

Same model (GPT-2 built from the quickstart config, same initial weights), same data (the sample
corpus tokenized by our tokenizer), same micro-batch, same number of steps, both in fp32 on the
CPU. Throughput is measured after warm-up steps. MFU is against a matmul peak measured in this
same run. The last line printed is one JSON object.

    python benchmarks/pretrain.py [--steps 60] [--warmup 10] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The repository, not this folder, on the path: benchmarks/tokenize.py must not shadow the standard library.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tasks.artifacts import Workspace  # noqa: E402
from tasks.config import PipelineConfig  # noqa: E402
from tasks.ingest import ingest_corpus  # noqa: E402
from tasks.pretrain import BlockBatches, build_lm, flops_per_token, lm_loss  # noqa: E402
from tasks.tokenize import open_tokens, tokenize_corpus, train_tokenizer  # noqa: E402
from tasks.training import measure_peak_flops, train  # noqa: E402


def peak_flops() -> float:
    """Best of a few square fp32 matmul sizes: the denominator for MFU."""
    return max(measure_peak_flops(torch.device("cpu"), n, repeats=6) for n in (512, 1024, 2048))


def run_ours(model, tokens, cfg, steps: int, warmup: int, compile_model: bool) -> float:
    pre = cfg.pretrain.model_copy(update={"max_steps": warmup + steps, "log_every": warmup, "eval_every": 10**9,
                                          "checkpoint_every": 10**9, "compile": compile_model, "resume": False})
    source = BlockBatches(tokens, pre.block_size, pre.batch_size, cfg.seed)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as work:
        train(model, source, pre, Path(work), loss_fn=lm_loss, tokens_in=lambda b: int(b["targets"].numel()),
              on_progress=lambda step, total, row: stamps.append(time.perf_counter()))
    # The first stamp is at the end of warm-up; the last at the final step.
    return steps * pre.batch_size * pre.block_size / (stamps[-1] - stamps[0])


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, tokens: np.ndarray, block: int):
        self.tokens, self.block = tokens, block
        self.n = (len(tokens) - 1) // block

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.asarray(self.tokens[i * self.block : (i + 1) * self.block], dtype=np.int64))
        return {"input_ids": x, "labels": x}


def run_trainer(model, tokens, cfg, steps: int, warmup: int) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                stamps.append(time.perf_counter())

    pre = cfg.pretrain
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=pre.batch_size,
            learning_rate=pre.lr, weight_decay=pre.weight_decay, adam_beta2=0.95, warmup_steps=pre.warmup_steps,
            lr_scheduler_type="cosine", max_grad_norm=pre.grad_clip, logging_steps=10**9, save_strategy="no",
            eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=cfg.seed,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=_Blocks(tokens, pre.block_size),
                callbacks=[Clock()]).train()
    return steps * pre.batch_size * pre.block_size / (stamps[1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="measured steps per engine")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--compile", action="store_true", help="compile the model in our engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = PipelineConfig()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        corpus = ingest_corpus(cfg.corpus, ws, cfg.seed)
        tok = train_tokenizer(corpus, cfg.tokenizer, ws)
        tokens_ref = tokenize_corpus(corpus, tok, ws)
        tokens = np.array(open_tokens(tokens_ref, "train"))

        def fresh():
            torch.manual_seed(cfg.seed)
            return build_lm(cfg.model, tokens_ref.meta["vocab_size"], tok.meta["eos_id"], tok.meta["pad_id"])

        fpt = flops_per_token(fresh(), cfg.pretrain.block_size)
        peak = peak_flops()
        # Alternate engines so that drift on a shared machine hits both alike.
        ours_runs, trainer_runs = [], []
        for _ in range(2):
            ours_runs.append(run_ours(fresh(), tokens, cfg, args.steps, args.warmup, args.compile))
            trainer_runs.append(run_trainer(fresh(), tokens, cfg, args.steps, args.warmup))
        peak = max(peak, peak_flops())
    ours, trainer = max(ours_runs), max(trainer_runs)
    result = {
        "benchmark": "pretrain",
        "model": f"gpt2 n_layer={cfg.model.n_layer} n_embd={cfg.model.n_embd} vocab={tokens_ref.meta['vocab_size']}",
        "micro_batch": cfg.pretrain.batch_size, "block_size": cfg.pretrain.block_size, "steps": args.steps,
        "threads": args.threads, "compile": args.compile,
        "ours_tokens_per_s": round(ours, 1), "trainer_tokens_per_s": round(trainer, 1),
        "ours_runs": [round(x, 1) for x in ours_runs], "trainer_runs": [round(x, 1) for x in trainer_runs],
        "speedup": round(ours / trainer, 3),
        "flops_per_token": fpt, "peak_flops": round(peak), "mfu": round(ours * fpt / peak, 4),
        "trainer_mfu": round(trainer * fpt / peak, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
