"""Pretraining throughput: llmpipe's engine against Hugging Face Trainer, in one process, at several shapes.

Same model (GPT-2 built from the shape's config, same initial weights), same data (the sample corpus
tokenized by our tokenizer at the shape's vocabulary), same micro-batch, same number of steps, both in
fp32 on the CPU. Our engine runs as a user would run it for anything longer than a few minutes: with
``pretrain.compile=true`` (and its default fast kernels); ``--no-compile`` measures it eager. Trainer
runs with its defaults (``--trainer-compile`` adds a run with its ``torch_compile=True`` for
reference). Throughput is measured after warm-up steps, so compilation time is not in it (it is
reported as ``ours_warmup_s``).

Shapes (``--shapes``, default all three): ``quickstart`` (the default config: 2 x 128, vocabulary
2,048, 32 x 64-token micro-batches), ``sst2`` (the sst2 preset: 4 x 256, vocabulary 4,096, 32 x 64) and
``gpt2-124m`` (12 x 768, vocabulary 50,257, one 1,024-token sequence a step: a few steps, one round).
``--config NAME --set KEY=VALUE ...`` adds a shape named ``custom`` from any preset and overrides.

Shared machines drift by tens of percent over seconds to minutes, so the engines run in alternating
rounds and a fp32 matmul peak is measured right before and after each run: each round gives its own
speedup and MFU from measurements taken close together, and the headline figures are the medians
over rounds. The last line printed is one JSON object, with ``shapes.<name>.speedup`` and
``shapes.<name>.mfu``.

    python benchmarks/pretrain.py [--shapes quickstart,sst2,gpt2-124m] [--rounds 3] [--threads 2]
                                  [--no-compile] [--config NAME --set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks.artifacts import Workspace
from tasks.config import PipelineConfig, load_config
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


# name: (preset, overrides, measured steps, warm-up steps, rounds, vocabulary of the model or None for the tokenizer's:
# the sample corpus is too small for the BPE to reach the presets' vocabularies, so their models get them as set)
SHAPES: dict[str, tuple[str | None, list[str], int, int, int | None, int | None]] = {
    "quickstart": (None, [], 60, 10, None, None),
    "sst2": ("sst2", [], 40, 10, None, 4096),
    "gpt2-124m": (None, ["model.preset=gpt2-124m", "pretrain.block_size=1024", "pretrain.batch_size=1",
                         "tokenizer.vocab_size=8192"], 4, 2, 1, 50257),
}


def measure_shape(name: str, cfg: PipelineConfig, steps: int, warmup: int, rounds: int, vocab: int | None,
                  args: argparse.Namespace) -> dict:
    """Alternating rounds of both engines at one shape; medians and every round."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        sample = PipelineConfig()  # the built-in sample corpus, whatever the shape's preset reads
        corpus = ingest_corpus(sample.corpus, ws, cfg.seed)
        tok = train_tokenizer(corpus, cfg.tokenizer, ws)
        tokens_ref = tokenize_corpus(corpus, tok, ws)
        tokens = np.array(open_tokens(tokens_ref, "train"))
        n_vocab = vocab or tokens_ref.meta["vocab_size"]

        def fresh():
            torch.manual_seed(cfg.seed)
            return build_lm(cfg.model, n_vocab, tok.meta["eos_id"], tok.meta["pad_id"])

        fpt = flops_per_token(fresh(), cfg.pretrain.block_size)
        runs = []
        for _ in range(rounds):
            row: dict[str, float] = {"peak_0": peak_flops()}
            row["ours"], row["ours_warmup_s"] = run_ours(fresh(), tokens, cfg, steps, warmup, args.compile)
            row["peak_1"] = peak_flops()
            row["trainer"] = run_trainer(fresh(), tokens, cfg, steps, warmup)
            row["peak_2"] = peak_flops()
            if args.trainer_compile:
                row["trainer_compiled"] = run_trainer(fresh(), tokens, cfg, steps, warmup, True)
                row["peak_3"] = peak_flops()
            row["speedup"] = row["ours"] / row["trainer"]
            row["mfu"] = row["ours"] * fpt / max(row["peak_0"], row["peak_1"])
            row["trainer_mfu"] = row["trainer"] * fpt / max(row["peak_1"], row["peak_2"])
            runs.append(row)
            print(json.dumps({"shape": name, **{k: round(v, 4 if k in ("speedup", "mfu", "trainer_mfu") else 1)
                                               for k, v in row.items()}}), file=sys.stderr, flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    peaks = [r[k] for r in runs for k in r if k.startswith("peak_")]
    m = cfg.model
    result = {
        "model": f"{m.family} n_layer={m.n_layer} n_head={m.n_head} n_embd={m.n_embd} vocab={n_vocab}",
        "micro_batch": cfg.pretrain.batch_size, "block_size": cfg.pretrain.block_size, "steps": steps,
        "rounds": rounds, "ours_tokens_per_s": round(med("ours"), 1), "trainer_tokens_per_s": round(med("trainer"), 1),
        "speedup": round(med("speedup"), 3), "flops_per_token": fpt, "peak_flops": round(statistics.median(peaks)),
        "peak_flops_range": [round(min(peaks)), round(max(peaks))],
        "mfu": round(med("mfu"), 4), "trainer_mfu": round(med("trainer_mfu"), 4),
        # The strictest reading: the best round's throughput over the highest peak seen at any time.
        "mfu_vs_highest_peak": round(max(r["ours"] for r in runs) * fpt / max(peaks), 4),
        "ours_warmup_s": round(runs[0]["ours_warmup_s"], 1),
        "ours_runs": [round(r["ours"], 1) for r in runs], "trainer_runs": [round(r["trainer"], 1) for r in runs],
        "speedup_runs": [round(r["speedup"], 3) for r in runs],
    }
    if args.trainer_compile:
        result["trainer_compiled_tokens_per_s"] = round(med("trainer_compiled"), 1)
        result["speedup_vs_trainer_compiled"] = round(med("ours") / med("trainer_compiled"), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both engines (gpt2-124m: 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--config", default=None, help="measure a shape 'custom' from this preset or YAML file too")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of the custom shape (repeatable)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps of the custom shape")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps first, for the custom shape")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run our engine eager (pretrain.compile=false)")
    parser.add_argument("--trainer-compile", action="store_true",
                        help="also time Trainer with torch_compile=True (reported, not in the speedup)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shapes = dict(SHAPES)
    names = [n for n in args.shapes.split(",") if n]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.config or args.overrides:
        shapes["custom"] = (args.config, args.overrides, args.steps, args.warmup, None, None)
        names.append("custom")
    results = {}
    for name in names:
        preset, overrides, steps, warmup, rounds, vocab = shapes[name]
        cfg = load_config(preset, overrides)
        print(f"{name}: {cfg.model.n_layer} x {cfg.model.n_embd}, micro-batch {cfg.pretrain.batch_size} x "
              f"{cfg.pretrain.block_size} ...", file=sys.stderr, flush=True)
        results[name] = measure_shape(name, cfg, steps, warmup, rounds or args.rounds, vocab, args)
    print(json.dumps({"benchmark": "pretrain", "threads": args.threads, "compile": args.compile, "shapes": results}))


if __name__ == "__main__":
    main()
