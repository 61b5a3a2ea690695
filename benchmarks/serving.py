"""Serving a registered classifier: reviews per second and latency for each way a consumer scores texts.

On the same registered version and the same IMDB test reviews (``../shared/data/imdb/test.jsonl``, the first
``--texts``), this measures:

- ``llmpipe predict --input FILE`` (a process of its own: start, model load, a JSONL file in, predictions out);
- the pyfunc model (``mlflow.pyfunc.load_model(...).predict(texts)``: llmpipe's loader, length-sorted batches),
  as registered and with ``model_config={"compile_min_texts": 1}`` (``torch.compile``'s kernels for every call);
- a plain transformers pipeline on the version's ``model`` folder (``pipeline("text-classification", model=...,
  batch_size=32)`` called with ``truncation=True``), what a consumer without llmpipe writes;
- ``mlflow models serve`` (``--env-manager local``) under 8 concurrent clients, with single texts and with batches
  of 64: reviews/s and the p50/p99 latency of a request.

The pyfunc models and the pipeline run in alternating rounds in this process (``--rounds``; medians), the same
torch threads for all, after a first call each (timed apart: the compiled pyfunc model builds its kernels in it);
their labels are compared. The models are, by default, GPT-2 classifiers of the presets'
shapes, each registered as ``llmpipe run`` registers a classifier: ``quickstart`` (2 layers of 128, texts cut to 64
tokens: the model ``llmpipe run`` registers by default) and ``imdb`` (4 layers of 256, 256 tokens), with a byte-level
BPE trained here on the texts, untrained: speed does not depend on the weights. ``--model models:/NAME@ALIAS``
(with ``MLFLOW_TRACKING_URI``) measures a registered version instead. The last line printed is one JSON object.

    python benchmarks/serving.py [--data ../shared/data] [--texts 2000] [--rounds 3] [--requests 400]
                                 [--shapes quickstart imdb] [--threads N] [--model models:/NAME@ALIAS]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.servers import free_port, process  # noqa: E402

CLIENTS = 8
# The presets' classifier shapes: quickstart's (the model ``llmpipe run`` registers by default) and imdb's.
SHAPES = {
    "quickstart": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128, "vocab_size": 2048, "max_length": 64},
    "imdb": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256, "vocab_size": 8192, "max_length": 256},
}


def read_texts(data: Path, n: int) -> list[str]:
    """``n`` IMDB test reviews drawn at random (seed 0): the file lists every negative review first."""
    path = data / "imdb" / "test.jsonl"
    if not path.is_file():
        sys.exit(f"{path} not found: give --data, the folder that holds imdb/test.jsonl")
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [texts[i] for i in np.random.default_rng(0).choice(len(texts), size=min(n, len(texts)), replace=False)]


def build_classifier(texts: list[str], out: Path, shape: dict[str, int], seed: int = 0) -> Path:
    """An untrained GPT-2 classifier of ``shape`` with a BPE trained on ``texts``, as a checkpoint folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=shape["vocab_size"],
                                                       special_tokens=["<|endoftext|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        model_max_length=shape["max_length"], truncation_side="right")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=shape["n_positions"], n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def register(checkpoint: Path, name: str, max_length: int, threads: int) -> str:
    """Log ``checkpoint`` as llmpipe registers a classifier (``tasks.registry.log_model``) and register it."""
    from tasks import registry
    from tasks.tracking import mlflow_client

    client = mlflow_client()
    experiment_id = client.create_experiment(name)
    run_id = client.create_run(experiment_id).info.run_id
    info = registry.log_model(run_id, experiment_id, checkpoint, "classifier", "text-classification",
                              {"truncation": True, "max_length": max_length,
                               "compile_min_texts": registry.COMPILE_MIN_TEXTS},
                              registry.EXAMPLE_TEXTS, [("label", "string"), ("score", "double")], max_length, threads)
    client.create_registered_model(name)
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id)
    client.set_terminated(run_id)
    return f"models:/{name}/{mv.version}"


def timed(fn, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def predict_command(uri: str, texts: list[str], work: Path) -> dict[str, Any]:
    """``llmpipe predict --input`` on a JSONL file of the texts, as a process of its own."""
    path = work / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    cmd = [sys.executable, "-m", "flows.cli", "predict", "--model", uri, "--input", str(path)]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=work, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    labels = [json.loads(line)["label"] for line in (work / "reviews.predictions.jsonl").open(encoding="utf-8")]
    return {"seconds": round(seconds, 2), "reviews_per_s": round(len(texts) / seconds, 1), "labels": labels}


def served(url: str, texts: list[str], per_request: int, requests: int) -> dict[str, Any]:
    """``requests`` requests of ``per_request`` texts each from ``CLIENTS`` threads: reviews/s and latency."""
    bodies = [json.dumps({"inputs": [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]}).encode()
              for i in range(requests)]

    def call(body: bytes) -> float:
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"the served model answered {exc.code}: {exc.read()[:2000]!r}") from None
        return time.perf_counter() - start

    call(bodies[0])  # warm
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        latencies = sorted(pool.map(call, bodies))
    seconds = time.perf_counter() - start
    return {"requests": requests, "texts_per_request": per_request, "clients": CLIENTS,
            "reviews_per_s": round(requests * per_request / seconds, 1),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1)}


def measure(uri: str, texts: list[str], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every engine on registered version ``uri``."""
    import mlflow
    from transformers import pipeline

    root = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / "version")))
    pyfunc, pyfunc_load = timed(mlflow.pyfunc.load_model, uri)
    compiled = mlflow.pyfunc.load_model(uri, model_config={"compile_min_texts": 1})
    pipe, pipe_load = timed(lambda: pipeline("text-classification", model=str(root / "model"), batch_size=32))
    engines = {"pyfunc": lambda: pyfunc.predict(texts)["label"].tolist(),
               "pyfunc, compiled": lambda: compiled.predict(texts)["label"].tolist(),
               "pipeline": lambda: [o["label"] for o in pipe(texts, truncation=True)]}
    # A first call each, untimed in the rounds: the compiled pyfunc model builds its kernels in it.
    first = {name: timed(call)[1] for name, call in engines.items()}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    labels: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, call in engines.items():
            labels[name], seconds = timed(call)
            rates[name].append(len(texts) / seconds)
    command = predict_command(uri, texts, work)
    labels["llmpipe predict"] = command.pop("labels")

    port = free_port()
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with process(serve, work / "serve.log", f"{url}/ping", env={"PYTHONPATH": str(REPO)}):
        single = served(url, texts, 1, args.requests)
        batches = served(url, texts, 64, max(CLIENTS, len(texts) // 64))
    median = {k: statistics.median(v) for k, v in rates.items()}
    engines = {
        "llmpipe predict": command,
        "pyfunc": {"reviews_per_s": round(median["pyfunc"], 1), "load_s": round(pyfunc_load, 2),
                   "first_call_s": round(first["pyfunc"], 2)},
        "pyfunc, compiled": {"reviews_per_s": round(median["pyfunc, compiled"], 1),
                             "first_call_s": round(first["pyfunc, compiled"], 2)},
        "pipeline (batch 32)": {"reviews_per_s": round(median["pipeline"], 1), "load_s": round(pipe_load, 2),
                                "first_call_s": round(first["pipeline"], 2)},
        "mlflow models serve, single texts": single,
        "mlflow models serve, batches of 64": batches,
    }
    for name, row in engines.items():
        print(f"  {name:36s} {json.dumps(row)}", flush=True)
    agree = {k: float(np.mean([a == b for a, b in zip(v, labels["pipeline"], strict=True)]))
             for k, v in labels.items() if k != "pipeline"}
    return {"engines": engines, "pyfunc_vs_pipeline": round(median["pyfunc"] / median["pipeline"], 2),
            "compiled_pyfunc_vs_pipeline": round(median["pyfunc, compiled"] / median["pipeline"], 2),
            "labels_agree_with_pipeline": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--texts", type=int, default=2000, help="IMDB test reviews scored by each engine")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of pyfunc and pipeline")
    parser.add_argument("--requests", type=int, default=400, help="single-text requests to the served model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="classifier shapes to build and measure")
    parser.add_argument("--model", default=None, help="a registered version to measure instead (models:/NAME@ALIAS)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    texts = read_texts(args.data, args.texts)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmpipe-serving-") as tmp:
        work = Path(tmp)
        if args.model:
            print(args.model, flush=True)
            results[args.model] = measure(args.model, texts, work, args)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
            for shape in args.shapes:
                print(f"{shape}-shaped classifier {SHAPES[shape]}", flush=True)
                folder = work / shape
                folder.mkdir()
                checkpoint = build_classifier(texts, folder / "checkpoint", SHAPES[shape])
                uri = register(checkpoint, f"serving-{shape}", SHAPES[shape]["max_length"], args.threads)
                results[shape] = measure(uri, texts, folder, args)
    print(json.dumps({"benchmark": "serving", "texts": len(texts), "threads": args.threads, "rounds": args.rounds,
                      "models": results, "pyfunc_vs_pipeline": {k: v["pyfunc_vs_pipeline"] for k, v in results.items()},
                      "compiled_pyfunc_vs_pipeline": {k: v["compiled_pyfunc_vs_pipeline"] for k, v in results.items()}}))


if __name__ == "__main__":
    main()
