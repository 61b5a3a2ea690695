"""Fine-tuning throughput on SST-2: llmpipe's fine-tune stage against the run_glue.py recipe, in one process.

Same model (the GPT-2 of configs/sst2.yaml with a fresh two-class head, identical initial weights), same
tokenizer (a byte-level BPE trained by the pipeline on the SST-2 training sentences), same texts, same
micro-batch, truncation and optimizer settings, both fp32 on the CPU with the same torch threads.

- ours: the finetune stage's batches (dynamic padding, length-grouped) through the shared training engine.
- baseline: run_glue.py's default recipe: every text padded to max_length=128, ``default_data_collator``,
  Hugging Face ``Trainer``.

Samples/s is measured after warm-up steps; the engines alternate (``--repeats``) so drift on a shared
machine hits both alike, and each side's best run counts. The last line printed is one JSON object.

    python benchmarks/finetune.py [--data ../shared/data/sst2/train.tsv] [--steps 30] [--warmup 5] [--threads 2]
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

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sst2" / "train.tsv"
MAX_LENGTH = 128  # run_glue.py's max_seq_length


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


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


def run_glue_recipe(model, tokenizer, texts: list[str], labels: list[int], ft, steps: int, warmup: int) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    enc = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True)

    class Padded(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> dict[str, list[int] | int]:
            return {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}

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
            dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=Padded(), data_collator=default_data_collator,
                callbacks=[Clock()]).train()
    return steps * ft.batch_size / (stamps[1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 train.tsv (GLUE layout)")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per engine")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"benchmarks/finetune.py: {args.data} not found (pass --data PATH/TO/sst2/train.tsv)")
    torch.set_num_threads(args.threads)

    cfg = load_config("sst2", [f"corpus.sources=[{{kind: files, paths: ['{args.data}'], text_columns: [sentence]}}]"])
    ft = cfg.finetune.model_copy(update={"max_length": MAX_LENGTH})
    texts, labels = read_sst2(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        tok_ref = train_tokenizer(ingest_corpus(cfg.corpus, ws, cfg.seed), cfg.tokenizer, ws)
        torch.manual_seed(cfg.seed)
        lm_dir = Path(tmp) / "lm"
        build_lm(cfg.model, tok_ref.meta["vocab_size"], tok_ref.meta["eos_id"], tok_ref.meta["pad_id"]).save_pretrained(
            str(lm_dir))
        tokenizer = load_tokenizer(tok_ref.dir, ft)
        tokenizer.save_pretrained(str(lm_dir))
        seqs = encode_texts(tokenizer, texts, MAX_LENGTH)
        id2label = {0: "negative", 1: "positive"}

        def fresh():
            torch.manual_seed(cfg.seed)
            return load_classifier(lm_dir, id2label, tokenizer.pad_token_id, MAX_LENGTH)

        ours_runs, glue_runs = [], []
        for _ in range(args.repeats):
            ours_runs.append(run_ours(fresh(), seqs, labels, tokenizer.pad_token_id, ft, args.steps, args.warmup))
            glue_runs.append(run_glue_recipe(fresh(), tokenizer, texts, labels, ft, args.steps, args.warmup))
        n_params = sum(p.numel() for p in fresh().parameters())
    ours, glue = max(ours_runs), max(glue_runs)
    lengths = np.array([len(s) for s in seqs])
    result = {
        "benchmark": "finetune",
        "data": str(args.data), "rows": len(texts),
        "model": f"gpt2 n_layer={cfg.model.n_layer} n_embd={cfg.model.n_embd} vocab={tok_ref.meta['vocab_size']}",
        "parameters": n_params, "micro_batch": ft.batch_size, "max_length": MAX_LENGTH,
        "mean_tokens_per_text": round(float(lengths.mean()), 2), "max_tokens_per_text": int(lengths.max()),
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
        "ours_samples_per_s": round(ours, 2), "baseline_samples_per_s": round(glue, 2),
        "ours_runs": [round(x, 2) for x in ours_runs], "baseline_runs": [round(x, 2) for x in glue_runs],
        "speedup": round(ours / glue, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
