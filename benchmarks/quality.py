"""The presets' quality against the figures recorded in the repository: exit 1 when one falls outside its band.

For each preset (default ``sst2`` and ``sms-spam``, on the local copies of their data in the shared data folder,
``LLMPIPE_SHARED_DATA``, read as ``tests/e2e/test_presets.py`` reads them), this runs the preset's stages as
``llmpipe run`` does, from an empty workspace: ingestion, tokenizer, tokens, pretraining at the preset's seed, the
labeled splits; then fine-tunes and evaluates the classifier with ``--seeds`` fine-tuning seeds (the preset's seed
and the next ones: fine-tuning is the cheap part, and the part that moves most from seed to seed). It reports each
seed's test accuracy and macro-F1, their mean, TF-IDF + LR on the same splits, and the preset's recorded figure
and band (``benchmarks/quality.json``: the mean of the preset's metric over the recorded seeds, and a band of
twice the standard error of that mean, at least one point). A mean outside the band fails: below, a regression to
find; above, a change to explain (then record again).

Run it before changes to training, fine-tuning or tokenization land. It took 35.8 min on the 2-core CPU on
2026-12-07 (sst2 24.7 min: pretraining 8.5, 4.7-6.0 a seed; sms-spam 11.1 min: pretraining 5.6, under 2 a seed). ``--record`` writes the measured figures
and bands into ``benchmarks/quality.json`` (with the date and commit). The last line printed is one JSON object.

    python benchmarks/quality.py [--presets sst2 sms-spam sst2-short] [--seeds 3] [--threads N] [--record]

``sst2-short`` (not run by default) is the sst2 preset cut to 400 pretraining steps and at most 1,200 fine-tuning
steps, validated every 100: the short-text configuration of the drift bisect in docs/experiments.md. To measure an
older checkout, put it first on the path (``PYTHONPATH=<checkout> python benchmarks/quality.py``): the stages come
from it, and checkouts from before the nested ``labeled.source`` get its flat keys.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLMPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
RECORD = Path(__file__).with_name("quality.json")
MIN_BAND = 0.01


# A short-text configuration like the presets (4 x 256 GPT-2, vocabulary 4,096, 64-token blocks, 400 pretraining
# steps, fine-tuning up to 1,200 steps with early stopping) on the SST-2 sentences: not run by default.
VARIANTS = {"sst2-short": ("sst2", ["pretrain.max_steps=400", "finetune.max_steps=1200", "finetune.eval_every=100"])}


def overrides(preset: str, flat: bool = False) -> list[str]:
    """The preset's data read from the shared folder instead of the Hugging Face Hub.

    ``flat``: the labeled source in the flat keys that checkouts before the nested ``labeled.source`` read (to
    bisect: ``PYTHONPATH=<checkout> python benchmarks/quality.py``)."""
    if preset in VARIANTS:
        base, extra = VARIANTS[preset]
        return overrides(base, flat) + extra
    if preset == "sst2":
        d = DATA / "sst2"
        labeled = (["labeled.source=files", f"labeled.train_path={d / 'train.tsv'}", f"labeled.test_path={d / 'dev.tsv'}"]
                   if flat else [f"labeled.source={{kind: files, train: '{d / 'train.tsv'}', test: '{d / 'dev.tsv'}'}}"])
        return [f"corpus.sources=[{{kind: files, paths: ['{d / 'train.tsv'}'], text_columns: [sentence]}}]", *labeled]
    if preset == "sms-spam":
        f = DATA / "sms_spam" / "SMSSpamCollection"
        labeled = (["labeled.source=files", f"labeled.train_path={f}", "labeled.has_header=false"] if flat
                   else [f"labeled.source={{kind: files, train: '{f}', has_header: false}}"])
        return [f"corpus.sources=[{{kind: files, paths: ['{f}'], format: tsv, has_header: false, text_columns: ['1']}}]",
                *labeled, "labeled.text_column='1'", "labeled.label_column=0"]
    raise SystemExit(f"benchmarks/quality.py: no local data known for preset {preset!r}")


def base_preset(preset: str) -> str:
    return VARIANTS[preset][0] if preset in VARIANTS else preset


def needed_files(preset: str) -> list[Path]:
    return {"sst2": [DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv"],
            "sms-spam": [DATA / "sms_spam" / "SMSSpamCollection"]}[base_preset(preset)]


def preset_config(preset: str):
    from tasks.config import load_config
    from tasks.errors import ConfigError

    try:
        return load_config(base_preset(preset), overrides(preset))
    except ConfigError as nested:
        try:  # a checkout from before the nested labeled.source
            return load_config(base_preset(preset), overrides(preset, flat=True))
        except ConfigError:
            raise nested from None  # not that: the error of the current form


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(preset: str, seeds: int, root: Path) -> dict[str, Any]:
    from tasks import evaluate, finetune, ingest, pretrain, tokenize
    from tasks.artifacts import Workspace

    cfg = preset_config(preset)
    ws = Workspace(root / preset)
    started = time.perf_counter()
    corpus = ingest.ingest_corpus(cfg.corpus, ws, cfg.seed)
    tok = tokenize.train_tokenizer(corpus, cfg.tokenizer, ws)
    tokens = tokenize.tokenize_corpus(corpus, tok, ws)
    lm = pretrain.pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    labeled = ingest.ingest_labeled(cfg.labeled, ws, cfg.seed)
    pretrain_s = time.perf_counter() - started
    say(f"{preset}: pretrained in {pretrain_s:.0f} s")
    runs = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        t0 = time.perf_counter()
        clf = finetune.finetune(lm, labeled, cfg.finetune, ws, seed)
        report = evaluate.evaluate_classifier(clf, labeled, cfg.evaluate, ws, cfg.finetune.max_length, seed).load()
        runs.append({"seed": seed, "accuracy": round(report["model"]["accuracy"], 4),
                     "macro_f1": round(report["model"]["macro_f1"], 4), "kept_step": clf.meta.get("kept_step"),
                     "seconds": round(time.perf_counter() - t0, 1)})
        tfidf = report["baselines"]["tfidf_logreg"]
        say(f"{preset}: seed {seed}: {json.dumps(runs[-1])}")
    metric = cfg.registry.metric
    values = [r[metric] for r in runs]
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {
        "metric": metric, "mean": round(mean, 4), "sem": round(sem, 4), "runs": runs,
        "mean_accuracy": round(statistics.fmean(r["accuracy"] for r in runs), 4),
        "mean_macro_f1": round(statistics.fmean(r["macro_f1"] for r in runs), 4),
        "tfidf": {"accuracy": round(tfidf["accuracy"], 4), "macro_f1": round(tfidf["macro_f1"], 4)},
        "test_rows": labeled.meta["rows"]["test"], "seconds": round(time.perf_counter() - started, 1),
    }


def judge(measured: dict[str, Any], recorded: dict[str, Any] | None) -> dict[str, Any]:
    if not recorded:
        return {"verdict": "not recorded"}
    low, high = recorded["figure"] - recorded["band"], recorded["figure"] + recorded["band"]
    inside = low <= measured["mean"] <= high
    verdict = "inside" if inside else ("below" if measured["mean"] < low else "above")
    return {"verdict": verdict, "figure": recorded["figure"], "band": recorded["band"],
            "low": round(low, 4), "high": round(high, 4)}


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["sst2", "sms-spam"])
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds a preset (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--record", action="store_true", help="write the measured figures as the recorded ones")
    args = parser.parse_args()
    for preset in args.presets:
        missing = [str(p) for p in needed_files(preset) if not p.is_file()]
        if missing:
            raise SystemExit(f"benchmarks/quality.py: {', '.join(missing)} not found (set LLMPIPE_SHARED_DATA)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from tasks.training import set_threads

    set_threads(args.threads)
    recorded = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmpipe-quality-") as tmp:
        for preset in args.presets:
            measured = measure(preset, args.seeds, Path(tmp))
            results[preset] = {**measured, **judge(measured, recorded.get(preset))}
    print(f"{'preset':<10} {'metric':<9} {'seeds':>5} {'mean':>7} {'band':>17} {'verdict':<12} {'TF-IDF':>7}")
    for preset, r in results.items():
        band = f"{r['low']:.4f}-{r['high']:.4f}" if "low" in r else "-"
        print(f"{preset:<10} {r['metric']:<9} {len(r['runs']):>5} {r['mean']:>7.4f} {band:>17} {r['verdict']:<12} "
              f"{r['tfidf'][r['metric']]:>7.4f}")
    if args.record:
        for preset, r in results.items():
            recorded[preset] = {"metric": r["metric"], "figure": r["mean"],
                                "band": round(max(2 * r["sem"], MIN_BAND), 4),
                                "seeds": [x["seed"] for x in r["runs"]], "values": [x[r["metric"]] for x in r["runs"]],
                                "measured": f"{datetime.date.today().isoformat()} at {commit()}"}
        RECORD.write_text(json.dumps(recorded, indent=2) + "\n")
        say(f"recorded in {RECORD}")
    ok = all(r["verdict"] in ("inside", "not recorded") for r in results.values()) or args.record
    print(json.dumps({"benchmark": "quality", "ok": ok, "seeds": args.seeds, "threads": args.threads,
                      "wall_s": round(time.perf_counter() - started, 1), "presets": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
