"""Pretraining throughput: llmpipe's engine against Hugging Face Trainer, in one process.

Same model (GPT-2 built from the quickstart config, same initial weights), same data (the sample
corpus tokenized by our tokenizer), same micro-batch, same number of steps, both in fp32 on the
CPU. Our engine runs as a user would run it for anything longer than a few minutes: with
``pretrain.compile=true`` (and its default fast kernels); ``--no-compile`` measures it eager. Trainer
runs with its defaults (``--trainer-compile`` adds a run with its ``torch_compile=True`` for
reference). Throughput is measured after warm-up steps, so compilation time is not in it (it is
reported as ``ours_warmup_s``).

Shared machines drift by tens of percent over seconds to minutes, so the engines run in alternating
rounds and a fp32 matmul peak is measured right before and after each run: each round gives its own
speedup and MFU from measurements taken close together, and the headline figures are the medians
over rounds. The last line printed is one JSON object.

    python benchmarks/pretrain.py [--rounds 3] [--steps 60] [--warmup 10] [--threads 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks.artifacts import Workspace
from tasks.config import PipelineConfig
from tasks.ingest import ingest_corpus
from tasks.pretrain import BlockBatches, build_lm, flops_per_token, lm_loss
from tasks.tokenize import open_tokens, tokenize_corpus, train_tokenizer
from tasks.training import measure_peak_flops, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def peak_flops() -> float:
    """The fp32 matmul peak now: the better of two large square sizes."""
    return max(measure_peak_flops(torch.device("cpu"), n, repeats=6) for n in (1024, 2048))


def run_ours(model, tokens, cfg, steps: int, warmup: int, compile_model: bool) -> tuple[float, float]:
    """(tokens/s after warm-up, seconds of warm-up including compilation)."""
    pre = cfg.pretrain.model_copy(update={"max_steps": warmup + steps, "log_every": warmup, "eval_every": 10**9,
                                          "checkpoint_every": 10**9, "compile": compile_model, "resume": False})
    source = BlockBatches(tokens, pre.block_size, pre.batch_size, cfg.seed)
    stamps: list[float] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        train(model, source, pre, Path(work), loss_fn=lm_loss, tokens_in=lambda b: int(b["targets"].numel()),
              on_progress=lambda step, total, row: stamps.append(time.perf_counter()))
    # The first stamp is at the end of warm-up; the last at the final step.
    return steps * pre.batch_size * pre.block_size / (stamps[-1] - stamps[0]), stamps[0] - start


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, tokens: np.ndarray, block: int):
        self.tokens, self.block = tokens, block
        self.n = (len(tokens) - 1) // block

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.asarray(self.tokens[i * self.block : (i + 1) * self.block], dtype=np.int64))
        return {"input_ids": x, "labels": x}


def run_trainer(model, tokens, cfg, steps: int, warmup: int, compile_model: bool = False) -> float:
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
            disable_tqdm=True, torch_compile=compile_model,
        )
        Trainer(model=model, args=args, train_dataset=_Blocks(tokens, pre.block_size),
                callbacks=[Clock()]).train()
    return steps * pre.batch_size * pre.block_size / (stamps[1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both engines")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run our engine eager (pretrain.compile=false)")
    parser.add_argument("--trainer-compile", action="store_true",
                        help="also time Trainer with torch_compile=True (reported, not in the speedup)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = PipelineConfig()
    rounds = []
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
        for _ in range(args.rounds):
            row: dict[str, float] = {"peak_0": peak_flops()}
            row["ours"], row["ours_warmup_s"] = run_ours(fresh(), tokens, cfg, args.steps, args.warmup, args.compile)
            row["peak_1"] = peak_flops()
            row["trainer"] = run_trainer(fresh(), tokens, cfg, args.steps, args.warmup)
            row["peak_2"] = peak_flops()
            if args.trainer_compile:
                row["trainer_compiled"] = run_trainer(fresh(), tokens, cfg, args.steps, args.warmup, True)
                row["peak_3"] = peak_flops()
            row["speedup"] = row["ours"] / row["trainer"]
            row["mfu"] = row["ours"] * fpt / max(row["peak_0"], row["peak_1"])
            row["trainer_mfu"] = row["trainer"] * fpt / max(row["peak_1"], row["peak_2"])
            rounds.append(row)
            print(json.dumps({k: round(v, 4 if k in ("speedup", "mfu", "trainer_mfu") else 1)
                              for k, v in row.items()}), flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    peaks = [r[k] for r in rounds for k in r if k.startswith("peak_")]
    result = {
        "benchmark": "pretrain",
        "model": f"gpt2 n_layer={cfg.model.n_layer} n_embd={cfg.model.n_embd} vocab={tokens_ref.meta['vocab_size']}",
        "micro_batch": cfg.pretrain.batch_size, "block_size": cfg.pretrain.block_size, "steps": args.steps,
        "rounds": args.rounds, "threads": args.threads, "compile": args.compile,
        "ours_tokens_per_s": round(med("ours"), 1), "trainer_tokens_per_s": round(med("trainer"), 1),
        "speedup": round(med("speedup"), 3),
        "flops_per_token": fpt, "peak_flops": round(statistics.median(peaks)),
        "peak_flops_range": [round(min(peaks)), round(max(peaks))],
        "mfu": round(med("mfu"), 4), "trainer_mfu": round(med("trainer_mfu"), 4),
        # The strictest reading: the best round's throughput over the highest peak seen at any time.
        "mfu_vs_highest_peak": round(max(r["ours"] for r in rounds) * fpt / max(peaks), 4),
        "ours_warmup_s": round(rounds[0]["ours_warmup_s"], 1),
        "ours_runs": [round(r["ours"], 1) for r in rounds], "trainer_runs": [round(r["trainer"], 1) for r in rounds],
    }
    if args.trainer_compile:
        result["trainer_compiled_tokens_per_s"] = round(med("trainer_compiled"), 1)
        result["speedup_vs_trainer_compiled"] = round(med("ours") / med("trainer_compiled"), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
