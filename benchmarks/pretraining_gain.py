"""Does pretraining pay? On IMDB, the same classifier fine-tuned from the pipeline's pretrained LM and from
random weights, at several label budgets.

The imdb preset on the local review files: the LM is pretrained on the 50,000 unlabeled and the 25,000
training reviews (never the test reviews) by the pipeline's own stages. For each label budget N
(``labeled.max_train_examples``: N training reviews drawn stratified with the seed, a tenth of them for
validation and early stopping), the fine-tune stage runs with the same shape, tokenizer and fine-tuning
settings from the pretrained LM, and from the same architecture with fresh random weights. Both
are scored on one fixed, seeded, stratified subset of the test split (``--test-rows``, 5,000) beside
majority and TF-IDF + LR trained on the same N - N/10 rows; the pretrained model against the random one with
the gate's paired test (one-sided exact McNemar: "pretrained is right more often").

The preset fine-tunes with GPT-1's auxiliary next-token loss (``finetune.lm_loss_weight``), which keeps what the
LM learned. A model from random weights has nothing to keep and a next-token loss of 9 nats to fight, so it is
also fine-tuned without it, and whichever of its two scores more on the test subset is the one compared: a
choice made on the test rows, in the random model's favour only.

Artifacts are content-addressed in ``--workspace``: a second invocation reuses the LM, the data and every
fine-tune already done (point it at a folder to keep them; the default is a temporary one).

    python benchmarks/pretraining_gain.py [--n 1000,5000] [--test-rows 5000] [--workspace DIR]
                                          [--set KEY=VALUE ...]

Progress goes to stderr; the last line of stdout is one JSON object with ``results.<N>.accuracy_pretrained``,
``accuracy_random`` (the better random run, named in ``random_recipe``; every run's in ``accuracy_by_run``),
``accuracy_tfidf``, ``p_value`` and ``gain`` per N, and the pretraining's wall time,
tokens seen and validation loss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLMPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_lm(lm, tok, tokens, model_cfg, ws, seed: int):
    """The pretrained LM's architecture (built as pretraining builds it) and tokenizer, with the random weights
    pretraining started from."""
    from tasks.artifacts import CheckpointRef, fingerprint
    from tasks.pretrain import build_lm
    from tasks.training import seed_everything

    def build(out: Path) -> dict:
        for f in lm.dir.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("manifest.json", "training.json"):
                shutil.copy2(f, out / f.name)
        seed_everything(seed)  # as pretraining does before it builds the model
        model = build_lm(model_cfg, tokens.meta["vocab_size"], tok.meta["eos_id"], tok.meta["pad_id"])
        model.save_pretrained(str(out))
        return {"random_weights_of": lm.fingerprint, "seed": seed}

    return ws.materialize(CheckpointRef, fingerprint("random-init-1", lm.fingerprint, seed), build,
                          stage="random_init", inputs={"lm": lm.fingerprint})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1000,5000", help="label budgets, comma-separated (default 1000,5000)")
    parser.add_argument("--test-rows", type=int, default=5000, help="the fixed stratified test subset (default 5000)")
    parser.add_argument("--workspace", type=Path, default=None, help="keep the artifacts here (default: a temp dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the imdb preset (repeatable)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args()
    if not (DATA / "imdb" / "train.jsonl").is_file():
        raise SystemExit(f"{DATA / 'imdb'} not found: the benchmark reads the IMDB reviews from the shared data "
                         "folder (LLMPIPE_SHARED_DATA)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import logging

    import torch

    from tasks import evaluate, finetune, ingest, pretrain, tokenize
    from tasks.artifacts import Workspace
    from tasks.config import load_config
    from tasks.gate import mcnemar_p

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    d = DATA / "imdb"
    cfg = load_config("imdb", [
        f"corpus.sources=[{{kind: files, paths: ['{d / 'unsup.jsonl'}', '{d / 'train.jsonl'}'], text_columns: [text]}}]",
        f"labeled.source={{kind: files, train: '{d / 'train.jsonl'}', test: '{d / 'test.jsonl'}'}}",
        f"labeled.max_test_examples={args.test_rows}", *args.overrides])
    budgets = [int(n) for n in args.n.split(",") if n]
    tmp = None if args.workspace else tempfile.TemporaryDirectory(prefix="llmpipe-gain-")
    ws = Workspace(args.workspace or tmp.name)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 1)
        say(f"{name}: {timings[name]} s{' (reused)' if getattr(out, 'reused', False) else ''}")
        return out

    corpus = timed("ingest corpus", ingest.ingest_corpus, cfg.corpus, ws, cfg.seed)
    tok = timed("train tokenizer", tokenize.train_tokenizer, corpus, cfg.tokenizer, ws)
    tokens = timed("tokenize", tokenize.tokenize_corpus, corpus, tok, ws)
    lm = timed("pretrain", pretrain.pretrain, tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    lm_report = timed("evaluate lm", evaluate.evaluate_lm, lm, tokens, cfg.evaluate, ws, cfg.pretrain.block_size,
                      cfg.seed).load()
    random_init = random_lm(lm, tok, tokens, cfg.model, ws, cfg.seed)
    runs = [("pretrained", lm, cfg.finetune), ("random", random_init, cfg.finetune)]
    if cfg.finetune.lm_loss_weight:
        runs.append(("random without the next-token loss", random_init,
                     cfg.finetune.model_copy(update={"lm_loss_weight": 0.0})))

    results = {}
    for n in budgets:
        labeled_cfg = cfg.labeled.model_copy(update={"max_train_examples": n})
        labeled = timed(f"N={n} ingest labeled", ingest.ingest_labeled, labeled_cfg, ws, cfg.seed)
        reports, best = {}, {}
        for name, init, ft in runs:
            clf = timed(f"N={n} finetune {name}", finetune.finetune, init, labeled, ft, ws, cfg.seed)
            best[name] = {"kept_step": clf.meta.get("kept_step"), "steps": clf.meta.get("steps")}
            reports[name] = timed(f"N={n} evaluate {name}", evaluate.evaluate_classifier, clf, labeled, cfg.evaluate,
                                  ws, ft.max_length, cfg.seed).load()
        accuracy = {name: round(r["model"]["accuracy"], 4) for name, r in reports.items()}
        random_name = max((name for name, _, _ in runs if name.startswith("random")), key=lambda k: accuracy[k])
        y = np.array([r["label"] for r in ingest.load_split(labeled, "test")])
        right = {name: np.array(r["predictions"]) == y for name, r in reports.items()}
        p, counts = mcnemar_p(right["pretrained"], right[random_name])
        pre, rnd = reports["pretrained"], reports[random_name]
        results[str(n)] = {
            "accuracy_pretrained": round(pre["model"]["accuracy"], 4),
            "accuracy_random": round(rnd["model"]["accuracy"], 4),
            "random_recipe": random_name, "accuracy_by_run": accuracy,
            "accuracy_tfidf": round(pre["baselines"]["tfidf_logreg"]["accuracy"], 4),
            "accuracy_majority": round(pre["baselines"]["majority"]["accuracy"], 4),
            "gain": round(pre["model"]["accuracy"] - rnd["model"]["accuracy"], 4),
            "p_value": p, **counts,
            "train_rows": labeled.meta["rows"]["train"], "validation_rows": labeled.meta["rows"]["validation"],
            "test_rows": labeled.meta["rows"]["test"], "finetune_steps": best,
        }
        say(f"N={n}: {json.dumps(results[str(n)])}")

    result = {
        "benchmark": "pretraining_gain", "wall_s": round(time.perf_counter() - started, 1), "threads": args.threads,
        "model": f"{cfg.model.family} {cfg.model.n_layer} x {cfg.model.n_embd}, vocabulary {tok.meta['vocab_size']}, "
                 f"context {cfg.model.n_positions}",
        "pretraining": {"steps": lm.meta.get("steps"), "tokens_seen": lm.meta.get("tokens_seen"),
                        "seconds": timings["pretrain"], "val_loss": round(lm_report["val_loss"], 4),
                        "unigram_loss": round(lm_report["unigram_loss"], 4)},
        "finetune": {"max_steps": cfg.finetune.max_steps, "batch_size": cfg.finetune.batch_size,
                     "max_length": cfg.finetune.max_length, "truncation_side": cfg.finetune.truncation_side,
                     "lr": cfg.finetune.lr, "lm_loss_weight": cfg.finetune.lm_loss_weight},
        "timings_s": timings, "results": results,
    }
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
