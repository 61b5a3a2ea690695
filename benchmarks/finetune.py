"""Fine-tuning throughput on SST-2 and IMDB: llmpipe's fine-tune stage against two Trainer recipes, in one process.

Same model (the GPT-2 of configs/sst2.yaml with a fresh two-class head, identical initial weights), same
tokenizer (a byte-level BPE trained by the pipeline on the data set's training texts), same texts, same
micro-batch, truncation and optimizer settings, all fp32 on the CPU with the same torch threads.

- ours: the finetune stage's batches (dynamic padding, length-grouped) through the shared training engine, as the
  preset sets it (compiled, with its default fast kernels; ``--set finetune.compile=false`` measures it eager).
- dynamic: what a competent user picks: Hugging Face ``Trainer`` with ``DataCollatorWithPadding`` and
  length-grouped batches (``train_sampling_strategy="group_by_length"``, formerly ``group_by_length=True``).
- dynamic_compiled (``--trainer-compile``, for reference): the dynamic recipe with ``torch_compile=True``.
- run_glue: run_glue.py's default recipe: every text padded to max_length, ``default_data_collator``, ``Trainer``.

Data sets (``--datasets``): ``sst2`` (GLUE train.tsv, 67,349 short phrases, max_length 128) and ``imdb``
(25,000 training reviews of about 230 words, max_length 256, the model's context raised to 256), read from
the shared data folder (``LLMPIPE_SHARED_DATA``). Samples/s is measured after warm-up steps; the engines
alternate (``--repeats``) so drift on a shared machine hits all alike, and each side's best run counts. The
last line printed is one JSON object, with ``datasets.<name>.speedup_vs_dynamic`` and
``datasets.<name>.speedup_vs_run_glue``.

    python benchmarks/finetune.py [--datasets sst2,imdb] [--steps 30] [--warmup 5] [--repeats 2] [--threads 2]
                                  [--trainer-compile] [--set KEY=VALUE ...]

``--set`` overrides a field of the preset for our stage and, where they share it (``finetune.batch_size``, ``lr``,
...), for both recipes; the JSON names the overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks.artifacts import Workspace
from tasks.classifier import encode_texts, load_classifier, load_tokenizer
from tasks.config import load_config
from tasks.finetune import ClassificationBatches, classification_loss
from tasks.ingest import ingest_corpus
from tasks.pretrain import build_lm
from tasks.tokenize import train_tokenizer
from tasks.training import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DATA = Path(os.environ.get("LLMPIPE_SHARED_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def read_imdb(path: Path) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["text"] for r in rows], [int(r["label"] == "positive") for r in rows]


# name: (training file, reader, the corpus source's text column, max_length (run_glue's 128 for SST-2), overrides,
# measured steps). SST-2's phrases run from 1 to 81 tokens, so which texts a window of length-grouped batches draws
# moves its samples/s by 10% over 50 steps: 200 steps (four windows of 50 batches) hold that to a few percent.
# Most IMDB reviews fill max_length: 30 steps suffice. run_glue pads every text alike, so 30 steps of it suffice too.
DATASETS = {
    "sst2": ("sst2/train.tsv", read_sst2, "sentence", 128, [], 200),
    "imdb": ("imdb/train.jsonl", read_imdb, "text", 256, ["model.n_positions=256"], 30),
}
RUN_GLUE_STEPS = 30


class Counted:
    """A batch source that counts the rows it hands out."""

    def __init__(self, source: ClassificationBatches):
        self.source, self.rows = source, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.source.next_batch()
        self.rows += len(batch["labels"])
        return batch

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state) -> None:
        self.source.load_state_dict(state)


def run_ours(model, seqs: list[list[int]], labels: list[int], pad_id: int, ft, steps: int, warmup: int) -> float:
    cfg = ft.model_copy(update={"max_steps": warmup + steps, "log_every": 1, "eval_every": 10**9,
                                "checkpoint_every": 10**9, "resume": False})
    source = Counted(ClassificationBatches(seqs, labels, cfg.batch_size, pad_id, seed=0,
                                           group=cfg.length_group_batches if cfg.group_by_length else None))
    marks: dict[int, tuple[float, int]] = {}

    def clock(step: int, total: int, row: dict) -> None:
        if step in (warmup, warmup + steps):
            marks[step] = (time.perf_counter(), source.rows)

    with tempfile.TemporaryDirectory() as work:
        train(model, source, cfg, Path(work), loss_fn=classification_loss,
              tokens_in=lambda b: int(b["attention_mask"].sum()), on_progress=clock)
    (t0, rows0), (t1, rows1) = marks[warmup], marks[warmup + steps]
    return (rows1 - rows0) / (t1 - t0)


def run_trainer(model, tokenizer, texts: list[str], labels: list[int], ft, steps: int, warmup: int,
                max_length: int, recipe: str, compile_model: bool = False) -> float:
    """Samples/s of Trainer: ``run_glue`` pads every text to max_length; ``dynamic`` pads each batch to its longest
    text with DataCollatorWithPadding and groups texts of similar length into batches; ``compile_model`` sets its
    ``torch_compile=True``."""
    import datasets
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    glue = recipe == "run_glue"
    enc = tokenizer(texts, padding="max_length" if glue else False, max_length=max_length, truncation=True)
    data = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": labels, "length": [len(x) for x in enc["input_ids"]]})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=ft.batch_size,
            learning_rate=ft.lr, weight_decay=ft.weight_decay, warmup_steps=ft.warmup_steps, max_grad_norm=ft.grad_clip,
            logging_steps=10**9, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, seed=0, disable_tqdm=True, torch_compile=compile_model,
            train_sampling_strategy="random" if glue else "group_by_length",
        )
        collator = default_data_collator if glue else DataCollatorWithPadding(tokenizer)
        Trainer(model=model, args=args, train_dataset=data.remove_columns(["length"]) if glue else data,
                data_collator=collator, callbacks=[Clock()]).train()
    return steps * ft.batch_size / (stamps[1] - stamps[0])


def measure(name: str, args: argparse.Namespace) -> dict:
    rel, reader, column, max_length, overrides, default_steps = DATASETS[name]
    steps = args.steps or default_steps
    path = DATA / rel
    cfg = load_config("sst2", [f"corpus.sources=[{{kind: files, paths: ['{path}'], text_columns: [{column}]}}]",
                               *overrides, *args.overrides])
    ft = cfg.finetune.model_copy(update={"max_length": max_length})
    texts, labels = reader(path)
    runs: dict[str, list[float]] = {"ours": [], "dynamic": [], "run_glue": []}
    if args.trainer_compile:
        runs["dynamic_compiled"] = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        tok_ref = train_tokenizer(ingest_corpus(cfg.corpus, ws, cfg.seed), cfg.tokenizer, ws)
        torch.manual_seed(cfg.seed)
        lm_dir = Path(tmp) / "lm"
        build_lm(cfg.model, tok_ref.meta["vocab_size"], tok_ref.meta["eos_id"], tok_ref.meta["pad_id"]).save_pretrained(
            str(lm_dir))
        tokenizer = load_tokenizer(tok_ref.dir, ft)
        tokenizer.save_pretrained(str(lm_dir))
        seqs = encode_texts(tokenizer, texts, max_length)
        id2label = {0: "negative", 1: "positive"}

        def fresh():
            torch.manual_seed(cfg.seed)
            return load_classifier(lm_dir, id2label, tokenizer.pad_token_id, max_length)

        for _ in range(args.repeats):
            runs["ours"].append(run_ours(fresh(), seqs, labels, tokenizer.pad_token_id, ft, steps, args.warmup))
            for recipe in ("dynamic", "run_glue"):
                runs[recipe].append(run_trainer(fresh(), tokenizer, texts, labels, ft,
                                                min(steps, RUN_GLUE_STEPS) if recipe == "run_glue" else steps, args.warmup,
                                                max_length, recipe))
            if args.trainer_compile:
                runs["dynamic_compiled"].append(run_trainer(fresh(), tokenizer, texts, labels, ft, steps, args.warmup,
                                                            max_length, "dynamic", compile_model=True))
            say(f"{name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " samples/s")
        n_params = sum(p.numel() for p in fresh().parameters())
    best = {k: max(v) for k, v in runs.items()}
    lengths = np.array([len(s) for s in seqs])
    return {
        "data": str(path), "rows": len(texts),
        "model": f"gpt2 n_layer={cfg.model.n_layer} n_embd={cfg.model.n_embd} vocab={tok_ref.meta['vocab_size']}",
        "parameters": n_params, "micro_batch": ft.batch_size, "max_length": max_length, "steps": steps,
        "mean_tokens_per_text": round(float(lengths.mean()), 2), "max_tokens_per_text": int(lengths.max()),
        "truncated_share": round(float((lengths >= max_length).mean()), 3),
        **{f"{k}_samples_per_s": round(v, 2) for k, v in best.items()},
        **{f"{k}_runs": [round(x, 2) for x in v] for k, v in runs.items()},
        "speedup_vs_dynamic": round(best["ours"] / best["dynamic"], 3),
        "speedup_vs_run_glue": round(best["ours"] / best["run_glue"], 3),
        **({"speedup_vs_dynamic_compiled": round(best["ours"] / best["dynamic_compiled"], 3)}
           if args.trainer_compile else {}),
    }


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per engine (default: 200 on SST-2, 30 on IMDB; run_glue at most 30)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--trainer-compile", action="store_true",
                        help="also time the dynamic recipe with Trainer's torch_compile=True (reported, not in the "
                        "speedup)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the sst2 preset (repeatable)")
    args = parser.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown data set(s) {unknown}; choose from {', '.join(DATASETS)}")
    for name in names:
        if not (DATA / DATASETS[name][0]).is_file():
            sys.exit(f"benchmarks/finetune.py: {DATA / DATASETS[name][0]} not found (set LLMPIPE_SHARED_DATA)")
    torch.set_num_threads(args.threads)
    results = {name: measure(name, args) for name in names}
    print(json.dumps({"benchmark": "finetune", "warmup": args.warmup, "threads": args.threads, "overrides": args.overrides,
                      "datasets": results, "load_average": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
