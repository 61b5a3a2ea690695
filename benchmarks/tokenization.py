"""Benchmark: the tokenize stage against the run_clm.py recipe, on real text, with peak memory.

On the same text and with the same fast tokenizer, in this process:

- ours: ``tasks.tokenize.tokenize_corpus`` (read the corpus artifact's JSONL, encode, write token
  shards, pack them with index and checksums), with 1 and with 2 worker processes;
- baseline: the run_clm.py recipe, ``datasets.map`` with the tokenizer (batched), then ``group_texts``
  into blocks of 1024, with ``num_proc`` 1 and 2 (``load_dataset`` itself is not timed, as our ingest
  stage is not).

The text (``--text``): ``imdb`` (default), every review of the Large Movie Review Dataset (train, test and
unlabeled: 100,000 documents, about 130 MB) with a byte-level BPE trained on the training reviews; or
``shakespeare``, Tiny Shakespeare repeated ``--repeat`` times (repeated text keeps the tokenizer's word cache hot
for both sides); or ``waimai``, Chinese food-delivery reviews, which measures something else: ``tokenizer.split``.

``--text waimai`` trains a BPE per split (``gpt2``, ``cjk``; ``--vocab``, 4,096 by default, the library's
defaults otherwise) on the training reviews and reports for each: tokens per character on the test reviews;
tokens/s on every review (train and test) of llmpipe's encoder (``tasks.encoding``, what the tokenize stage runs,
in batches of ``BATCH_CHARS``; a fresh encoder, so a cold piece cache, then the same text again, warm) and of
the tokenizer's own ``encode_batch`` (and ``encode_batch_fast``), medians of ``--rounds`` rounds that alternate
the order; the share of documents that took the split path and the piece cache's hit rate. The ids are checked
equal. Peak memory is sampled (RSS of this process plus its worker processes, an upper bound since
forked workers share pages) while each one runs. With ``--corpus-mb`` a corpus of that size (Tiny Shakespeare
repeated, no deduplication) is also ingested in one fresh process and tokenized with 2 workers in another, each
reporting its peak RSS (``ru_maxrss``).

    python benchmarks/tokenization.py [--text imdb|shakespeare] [--repeat 8] [--corpus-mb 0] [--vocab 8192]
    python benchmarks/tokenization.py --text waimai [--vocab 4096] [--rounds 5]

Progress goes to stderr; the last line of stdout is one JSON object (``speedup`` and ``peak_rss_mb`` are ours
with 2 workers against the recipe with 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLMPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
BLOCK = 1024


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_SAMPLER = """
import sys, time, psutil
parent, me = psutil.Process(int(sys.argv[1])), psutil.Process()
def total():
    n = 0
    for p in [parent, *parent.children(recursive=True)]:
        if p.pid != me.pid:
            try:
                n += p.memory_info().rss
            except psutil.Error:
                pass
    return n
print(total(), flush=True)
import select
peak = 0
while not select.select([sys.stdin], [], [], 0.005)[0]:
    peak = max(peak, total())
print(max(peak, total()), flush=True)
"""


class PeakRSS:
    """Peak RSS of this process plus its workers while the block runs, sampled every few milliseconds.

    The sampler is a separate process, so this one keeps a single thread (and can fork its workers).
    """

    def __enter__(self) -> PeakRSS:
        self._proc = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid())], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.start_mb = int(self._proc.stdout.readline()) / 2**20
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self._proc.communicate("stop\n")
        self.peak_mb = int(out.split()[-1]) / 2**20


def prepare(work: Path, text: str, repeat: int, vocab: int):
    """(the benchmark text as one file, its tokenizer, its corpus artifact)."""
    from tasks import ingest, tokenize
    from tasks.artifacts import Workspace
    from tasks.config import CorpusConfig, FilesSource, TokenizerConfig

    ws = Workspace(work / "ws")
    if text == "imdb":
        # One JSONL of every review's text, read alike by both sides; the tokenizer learns the training reviews.
        path = work / "imdb.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for name in ("train", "test", "unsup"):
                with open(DATA / "imdb" / f"{name}.jsonl", encoding="utf-8") as f:
                    for line in f:
                        out.write(json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n")
        tok_source = FilesSource(paths=[str(DATA / "imdb" / "train.jsonl")], text_columns=["text"])
        source = FilesSource(paths=[str(path)], text_columns=["text"])
    else:
        body = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        once, path = work / "once.txt", work / f"x{repeat}.txt"
        once.write_text(body, encoding="utf-8")
        path.write_text("\n\n".join([body.strip()] * repeat) + "\n", encoding="utf-8")
        # The tokenizer is trained on Tiny Shakespeare once; the benchmark corpus keeps every repeat.
        tok_source, source = FilesSource(paths=[str(once)]), FilesSource(paths=[str(path)])
    tok = tokenize.train_tokenizer(ingest.ingest_corpus(CorpusConfig(sources=[tok_source]), ws),
                                   TokenizerConfig(vocab_size=vocab), ws)
    corpus = ingest.ingest_corpus(CorpusConfig(sources=[source], dedup=False, validation_fraction=0.01), ws)
    return path, tok, corpus


def run_ours(corpus, tok, work: Path, workers: int, shard_mb: float) -> dict:
    from tasks import tokenize
    from tasks.artifacts import Workspace

    ws = Workspace(work / f"ours-{workers}")
    with PeakRSS() as mem:
        started = time.perf_counter()
        ref = tokenize.tokenize_corpus(corpus, tok, ws, workers=workers, shard_mb=shard_mb)
        seconds = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in ref.meta["splits"].values())
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mb": mem.peak_mb, "start_rss_mb": mem.start_mb,
            "shards": sum(len(s["shards"]) for s in ref.meta["splits"].values())}


def run_baseline(path: Path, tok, work: Path, num_proc: int) -> dict:
    """run_clm.py: tokenize with ``datasets.map`` (batched), then ``group_texts`` into blocks."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok.path)
    cache = str(work / f"hf-{num_proc}")
    raw = (datasets.load_dataset("json", data_files={"train": str(path)}, cache_dir=cache) if path.suffix == ".jsonl"
           else datasets.load_dataset("text", data_files={"train": str(path)}, sample_by="paragraph", cache_dir=cache))

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated["input_ids"]) // BLOCK * BLOCK
        result = {k: [t[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    nproc = num_proc if num_proc > 1 else None
    with PeakRSS() as mem:
        started = time.perf_counter()
        tokenized = raw.map(tokenize_function, batched=True, num_proc=nproc, remove_columns=["text"],
                            load_from_cache_file=False, desc="baseline tokenize")
        tokenize_seconds = time.perf_counter() - started
        grouped = tokenized.map(group_texts, batched=True, num_proc=nproc, load_from_cache_file=False,
                                desc="baseline group_texts")
        seconds = time.perf_counter() - started
    lengths = tokenized["train"].map(lambda b: {"n": [len(x) for x in b["input_ids"]]}, batched=True,
                                     remove_columns=tokenized["train"].column_names)["n"]
    return {"seconds": seconds, "tokenize_seconds": tokenize_seconds, "tokens": int(sum(lengths)),
            "blocks": len(grouped["train"]), "peak_rss_mb": mem.peak_mb, "start_rss_mb": mem.start_mb}


def _peak_mb(who: int) -> float:
    """Peak RSS in MB: this process's high-water mark (VmHWM, which starts afresh at exec, unlike ru_maxrss),
    or the largest child's ru_maxrss."""
    if who == resource.RUSAGE_SELF:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024


def child_ingest(work: Path, mb: float) -> None:
    """In a fresh process: write a corpus of about ``mb`` megabytes and ingest it (no deduplication)."""
    from tasks import ingest
    from tasks.artifacts import Workspace
    from tasks.config import CorpusConfig, FilesSource

    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").strip()
    path = work / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < mb * 1e6:
            f.write(text + "\n\n")
    before = _peak_mb(resource.RUSAGE_SELF)
    started = time.perf_counter()
    corpus = ingest.ingest_corpus(CorpusConfig(sources=[FilesSource(paths=[str(path)])], dedup=False,
                                               validation_fraction=0.01), Workspace(work / "ws"))
    (work / "corpus.json").write_text(corpus.model_dump_json())
    print(json.dumps({"corpus_mb": path.stat().st_size / 1e6, "ingest_seconds": time.perf_counter() - started,
                      "ingest_peak_rss_mb": _peak_mb(resource.RUSAGE_SELF), "ingest_rss_mb_after_imports": before}))


def child_tokenize(work: Path, tokenizer_json: str) -> None:
    """In a fresh process: tokenize the ingested corpus with 2 workers; peak RSS of this process and a worker."""
    from tasks import tokenize
    from tasks.artifacts import CorpusRef, TokenizerRef, Workspace

    corpus = CorpusRef.model_validate_json((work / "corpus.json").read_text())
    tok = TokenizerRef.model_validate_json(tokenizer_json)
    before = _peak_mb(resource.RUSAGE_SELF)
    started = time.perf_counter()
    ref = tokenize.tokenize_corpus(corpus, tok, Workspace(work / "ws"), workers=2, shard_mb=16)
    seconds = time.perf_counter() - started
    main_mb, worker_mb = _peak_mb(resource.RUSAGE_SELF), _peak_mb(resource.RUSAGE_CHILDREN)
    tokens = sum(s["tokens"] for s in ref.meta["splits"].values())
    print(json.dumps({"tokens": tokens, "tokenize_seconds": seconds, "tokens_per_s": tokens / seconds,
                      "tokenize_rss_mb_after_imports": before, "tokenize_peak_rss_mb_main": main_mb,
                      "tokenize_peak_rss_mb_worker": worker_mb,
                      # Forked workers share the parent's pages; the sum counts those twice: an upper bound.
                      "tokenize_peak_rss_mb_total_bound": main_mb + 2 * worker_mb}))


def _child(*args: str) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _reviews(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_split_comparison(work: Path, vocab: int, rounds: int) -> dict:
    """--text waimai: tokenizer.split gpt2 against cjk on Chinese reviews (see the module's docstring)."""
    from tokenizers import Tokenizer

    from tasks import encoding, ingest, tokenize
    from tasks.artifacts import Workspace
    from tasks.config import CorpusConfig, FilesSource, TokenizerConfig

    folder = DATA / "waimai"
    train, test = _reviews(folder / "train.jsonl"), _reviews(folder / "test.jsonl")
    texts = train + test
    ws = Workspace(work / "ws")
    corpus = ingest.ingest_corpus(CorpusConfig(sources=[FilesSource(paths=[str(folder / "train.jsonl")])]), ws)
    batches, batch, size = [], [], 0  # as the stage reads a shard: about BATCH_CHARS characters a batch
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= tokenize.BATCH_CHARS:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    chars = sum(map(len, texts))
    out: dict = {}
    tokenizers: dict = {}
    for split in ("gpt2", "cjk"):
        say(f"training a {vocab}-token BPE with split={split} on {len(train):,} waimai training reviews ...")
        ref = tokenize.train_tokenizer(corpus, TokenizerConfig(vocab_size=vocab, split=split), ws)
        tok = Tokenizer.from_file(str(ref.dir / "tokenizer.json"))
        tok.encode_special_tokens = True
        test_tokens = sum(len(e.ids) for e in tok.encode_batch(test, add_special_tokens=False))
        tokenizers[split] = (ref, tok)
        out[split] = {"vocab_size": ref.meta["vocab_size"], "tokens_per_char_test": test_tokens / sum(map(len, test)),
                      "test_tokens": test_tokens, "rounds": []}
    for r in range(rounds):
        for split in (("gpt2", "cjk") if r % 2 == 0 else ("cjk", "gpt2")):
            ref, tok = tokenizers[split]
            say(f"round {r + 1}/{rounds}: {split} ...")
            row: dict = {}
            started = time.perf_counter()
            base = tok.encode_batch(texts, add_special_tokens=False)
            row["tokenizers_encode_batch_s"] = time.perf_counter() - started
            expected = np.fromiter((i for e in base for i in [*e.ids, ref.meta["eos_id"]]), dtype=np.int64)
            tokens = len(expected) - len(texts)  # without the EOS our encoder adds after each document
            started = time.perf_counter()
            tok.encode_batch_fast(texts, add_special_tokens=False)
            row["tokenizers_encode_batch_fast_s"] = time.perf_counter() - started
            started = time.perf_counter()
            enc = encoding.Encoder(ref.dir / "tokenizer.json", ref.meta["eos_id"])
            row["encoder_start_s"] = time.perf_counter() - started
            for temp in ("cold", "warm"):
                started = time.perf_counter()
                ids = np.concatenate([enc.encode(b)[0] for b in batches])
                row[f"ours_{temp}_s"] = time.perf_counter() - started
                if not np.array_equal(ids, expected):
                    raise SystemExit(f"split={split}: llmpipe's encoder and the tokenizer disagree")
                if temp == "cold":
                    learned = len(enc._piece) - 1  # pieces encoded by the tokenizer; the rest came from the cache
            on_split = [t for t, ok in zip(texts, enc._take_split(texts), strict=True) if ok]
            pieces = sum(len((encoding._ASCII_SPLIT if t.isascii() else enc._unicode_split).findall(t))
                         for t in on_split)
            row.update(tokens=tokens, split_path_docs=len(on_split) / len(texts), pieces=pieces, pieces_learned=learned,
                       cache_hit_rate=1 - learned / pieces if pieces else None)
            out[split]["rounds"].append(row)
    result: dict = {"text": f"waimai reviews (train and test: {len(texts):,} documents, {chars:,} characters)",
                    "cpu_count": os.cpu_count(), "rounds": rounds}
    for split, info in out.items():
        rows = info["rounds"]
        tokens = rows[0]["tokens"]
        summary = {
            "tokens_per_char_test": round(info["tokens_per_char_test"], 4),
            "tokens": tokens, "tokens_per_char_all": round(tokens / chars, 4),
            **{f"{k}_tokens_per_s": round(tokens / _median([row[f"{k}_s"] for row in rows]))
               for k in ("ours_cold", "ours_warm", "tokenizers_encode_batch", "tokenizers_encode_batch_fast")},
            "encoder_start_s": round(_median([row["encoder_start_s"] for row in rows]), 3),
            "split_path_docs": round(rows[0]["split_path_docs"], 4),
            "pieces": rows[0]["pieces"], "cache_hit_rate_cold": round(rows[0]["cache_hit_rate"] or 0, 4),
        }
        summary["speedup_cold"] = round(summary["ours_cold_tokens_per_s"]
                                        / summary["tokenizers_encode_batch_tokens_per_s"], 2)
        summary["speedup_warm"] = round(summary["ours_warm_tokens_per_s"]
                                        / summary["tokenizers_encode_batch_tokens_per_s"], 2)
        summary["all_rounds"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                                 for row in rows]
        result[split] = summary
    result["cjk_tokens_vs_gpt2"] = round(result["cjk"]["tokens_per_char_test"] / result["gpt2"]["tokens_per_char_test"],
                                         3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", choices=["imdb", "shakespeare", "waimai"], default="imdb",
                        help="the IMDB reviews (default), Tiny Shakespeare repeated, or the waimai reviews "
                        "(tokenizer.split gpt2 against cjk)")
    parser.add_argument("--repeat", type=int, default=8, help="copies of Tiny Shakespeare (default 8)")
    parser.add_argument("--corpus-mb", type=float, default=0,
                        help="size of a further memory run's corpus (Tiny Shakespeare repeated); 0 (default) skips it")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary size (8192; 4096 for waimai)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds for --text waimai (default 5)")
    parser.add_argument("--shard-mb", type=float, default=1.0, help="shard size for our stage")
    parser.add_argument("--child-ingest", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-tokenize", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vocab is None:
        args.vocab = 4096 if args.text == "waimai" else 8192
    if args.child_ingest:
        return child_ingest(Path(args.child_ingest), args.corpus_mb)
    if args.child_tokenize:
        return child_tokenize(Path(args.child_tokenize[0]), args.child_tokenize[1])
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets
    import tqdm

    datasets.disable_progress_bars()
    tqdm.tqdm.monitor_interval = 0  # no monitor thread: this process stays single-threaded, so workers can fork
    if args.text == "waimai":
        if not (DATA / "waimai" / "train.jsonl").is_file():
            raise SystemExit(f"{DATA / 'waimai'} not found: the benchmark reads its text from the shared data folder "
                             "(LLMPIPE_SHARED_DATA)")
        with tempfile.TemporaryDirectory(prefix="llmpipe-bench-") as tmp:
            print(json.dumps(run_split_comparison(Path(tmp), args.vocab, args.rounds)))
        return
    with tempfile.TemporaryDirectory(prefix="llmpipe-bench-") as tmp:
        work = Path(tmp)
        name = "IMDB reviews (train, test, unsup)" if args.text == "imdb" else f"Tiny Shakespeare x{args.repeat}"
        need = DATA / ("imdb" if args.text == "imdb" else "tinyshakespeare")
        if not need.is_dir():
            raise SystemExit(f"{need} not found: the benchmark reads its text from the shared data folder "
                             "(LLMPIPE_SHARED_DATA)")
        say(f"preparing {name} and a {args.vocab}-token BPE ...")
        path, tok, corpus = prepare(work, args.text, args.repeat, args.vocab)
        mb = path.stat().st_size / 1e6
        results: dict = {"ours": {}, "baseline": {}}
        for workers in (1, 2):
            say(f"ours, {workers} worker(s) ...")
            results["ours"][workers] = run_ours(corpus, tok, work, workers, args.shard_mb)
        for workers in (1, 2):
            say(f"baseline (run_clm recipe), num_proc={workers} ...")
            results["baseline"][workers] = run_baseline(path, tok, work, workers)
        memory = None
        if args.corpus_mb > 0:
            say(f"memory: ingest, then tokenize, a {args.corpus_mb:g} MB corpus in fresh processes ...")
            (work / "big").mkdir()
            memory = _child("--child-ingest", str(work / "big"), "--corpus-mb", str(args.corpus_mb))
            memory |= _child("--child-tokenize", str(work / "big"), tok.model_dump_json())

    for side in ("ours", "baseline"):
        for r in results[side].values():
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["mb_per_s"] = mb / r["seconds"]
    ours, base = results["ours"], results["baseline"]
    out = {
        "text": name, "text_mb": round(mb, 2), "vocab_size": tok.meta["vocab_size"],
        "cpu_count": os.cpu_count(),
        "ours_tokens_per_s": round(ours[2]["tokens_per_s"]),
        "baseline_tokens_per_s": round(base[2]["tokens_per_s"]),
        "speedup": round(ours[2]["tokens_per_s"] / base[2]["tokens_per_s"], 2),
        "ours_mb_per_s": round(ours[2]["mb_per_s"], 2),
        "baseline_mb_per_s": round(base[2]["mb_per_s"], 2),
        "speedup_1_worker": round(ours[1]["tokens_per_s"] / base[1]["tokens_per_s"], 2),
        "peak_rss_mb": round(ours[2]["peak_rss_mb"], 1),
        "baseline_peak_rss_mb": round(base[2]["peak_rss_mb"], 1),
        "workers": {side: {str(w): {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                           for w, r in results[side].items()} for side in results},
        "memory_run": memory and {k: (round(v, 2) if isinstance(v, float) else v) for k, v in memory.items()},
    }
    if memory:
        out["memory_run_peak_rss_mb"] = round(memory["tokenize_peak_rss_mb_total_bound"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
