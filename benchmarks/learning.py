"""Does pretraining really learn? Tiny Shakespeare, a fixed wall-clock budget on the CPU.

Ingests ``../shared/data/tinyshakespeare/input.txt`` (a document per blank-line-separated speech),
trains a byte-level BPE, tokenizes, pretrains the quickstart-sized GPT-2 (compiled) on a cosine
schedule of ``--steps`` steps sized to fit ``--minutes`` here, capped at ``--minutes`` of training
time (``pretrain.max_time_s``; ``stop_reason`` says which ended it), and scores the whole validation
split. Reports validation loss,
perplexity and bits per byte beside the unigram entropy under the same tokenizer. The last line
printed is one JSON object.

    python benchmarks/learning.py [--minutes 10] [--steps 3600] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

from tasks.artifacts import Workspace
from tasks.config import load_config
from tasks.evaluate import evaluate_lm
from tasks.ingest import ingest_corpus
from tasks.pretrain import pretrain
from tasks.tokenize import tokenize_corpus, train_tokenizer
from tasks.training import set_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=3600, help="optimizer steps of the cosine schedule")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    text = Path(args.data) / "tinyshakespeare" / "input.txt"
    if not text.is_file():
        raise SystemExit(f"Tiny Shakespeare not found at {text} (pass --data)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(None, [
        f"corpus.sources=[{{kind: files, paths: [{text}], text_unit: paragraph}}]",
        "tokenizer.vocab_size=2048", "pretrain.block_size=128", "pretrain.batch_size=16",
        f"pretrain.max_steps={args.steps}", f"pretrain.max_time_s={args.minutes * 60}", "pretrain.lr=3e-3",
        "pretrain.warmup_steps=50", "pretrain.schedule=cosine", "pretrain.compile=true", "pretrain.log_every=50", "pretrain.eval_every=500",
        "pretrain.checkpoint_every=500", "evaluate.samples=2", *args.overrides,
    ])
    set_threads(cfg.runtime.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        corpus = ingest_corpus(cfg.corpus, ws, cfg.seed)
        tok = train_tokenizer(corpus, cfg.tokenizer, ws)
        tokens = tokenize_corpus(corpus, tok, ws)
        lm = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
        report = evaluate_lm(lm, tokens, cfg.evaluate, ws, cfg.pretrain.block_size, cfg.seed).load()
    split = tokens.meta["splits"]["validation"]
    bytes_per_token = split["bytes_text"] / split["tokens"]
    print(json.dumps({
        "benchmark": "learning", "data": "tinyshakespeare", "minutes": args.minutes,
        "parameters": lm.meta["parameters"], "steps": lm.meta["steps"], "tokens_seen": lm.meta["tokens_seen"],
        "stop_reason": lm.meta["stop_reason"], "val_loss": round(report["val_loss"], 4),
        "val_ppl": round(report["val_ppl"], 2), "val_bits_per_byte": round(report["val_bits_per_byte"], 4),
        "unigram_loss": round(report["unigram_loss"], 4), "unigram_ppl": round(report["unigram_ppl"], 2),
        "unigram_bits_per_byte": round(report["unigram_loss"] / math.log(2) / bytes_per_token, 4),
        "train_seconds": lm.meta["train_seconds"], "samples": report["samples"], "wall_s": round(time.time() - started, 1),
        "load_average": os.getloadavg(),
    }))


if __name__ == "__main__":
    main()
