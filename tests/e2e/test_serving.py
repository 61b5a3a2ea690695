"""Consumers of the registry: `mlflow models serve` for the champion answers like in-process prediction, and
`llmpipe predict` labels a file, all against a real `mlflow server` on loopback (slow)."""

from __future__ import annotations

import csv
import json
import sys
import urllib.request
from pathlib import Path

import pytest

from benchmarks.servers import MlflowServer, free_port, process
from flows.cli import main as cli
from tasks import predict, registry
from tests.support import build_models, with_registry

pytestmark = pytest.mark.slow

TEXTS = [
    "a wonderful, moving film",
    "a dull and tedious mess",
    "the soup was cold",
    "Très bien ! 🎬 " + "an endless review that goes on and on " * 60,  # far past the model's context: truncated
]


def test_models_serve_answers_with_the_labels_of_in_process_prediction(tmp_path: Path, monkeypatch, capsys) -> None:
    models = build_models(tmp_path / "models" / "ws")
    name = "served-model"
    cfg = with_registry(models.cfg, model_name=name)
    with MlflowServer(tmp_path / "mlflow") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        ref = registry.register_classifier(cfg, models.lm, models.lm_report, models.classifier, models.report,
                                        models.labeled)
        assert ref.aliases == ["champion"]
        expected = predict.predict(f"models:/{name}@champion", TEXTS)
        assert {r["label"] for r in expected} <= {"negative", "positive"}

        port = free_port()
        serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        with process(serve, tmp_path / "serve.log", f"http://127.0.0.1:{port}/ping",
                             env={"MLFLOW_TRACKING_URI": url}):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                             data=json.dumps({"inputs": TEXTS}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as resp:
                served = json.loads(resp.read())["predictions"]
        assert [p["label"] for p in served] == [r["label"] for r in expected]
        assert [p["score"] for p in served] == pytest.approx([r["score"] for r in expected], abs=1e-5)
        assert all(0 < p["score"] <= 1 for p in served)

        # `llmpipe predict` on a JSONL file: predictions written next to it, the same labels, other keys kept.
        texts_file = tmp_path / "reviews.jsonl"
        texts_file.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
        monkeypatch.chdir(tmp_path)
        assert cli(["predict", "--model", f"{name}@champion", "--input", str(texts_file)]) == 0
        out = tmp_path / "reviews.predictions.jsonl"
        assert f"written to {out}" in capsys.readouterr().out
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == list(range(len(TEXTS)))
        assert [r["label"] for r in rows] == [r["label"] for r in expected]

        # Read a chunk at a time, the file gets the same rows, in order.
        path, counts = predict.predict_file(f"models:/{name}@champion", texts_file, "text", len(TEXTS), chunk=3)
        assert [json.loads(line) for line in path.read_text().splitlines()] == rows
        assert sum(counts.values()) == len(TEXTS) and not list(tmp_path.glob(".*.tmp-*"))


def test_a_registered_model_loads_and_batches_with_plain_transformers_and_pyfunc(tmp_path: Path, monkeypatch,
                                                                                capsys) -> None:
    """What a consumer without llmpipe does with the champion's files: `transformers.pipeline` with batching, and
    `AutoModelForSequenceClassification` + `AutoTokenizer` with padding, give `llmpipe predict`'s labels; the
    language model generates for a batch of prompts; the pyfunc model takes a batch size per call."""
    import mlflow
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    models = build_models(tmp_path / "models" / "ws")
    name = "consumed-model"
    cfg = with_registry(models.cfg, model_name=name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ref = registry.register_classifier(cfg, models.lm, models.lm_report, models.classifier, models.report,
                                       models.labeled)
    texts_file = tmp_path / "reviews.csv"
    with open(texts_file, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text"], *([t] for t in TEXTS)])
    monkeypatch.chdir(tmp_path)
    assert cli(["predict", "--model", f"{name}@champion", "--input", str(texts_file)]) == 0
    capsys.readouterr()
    with open(tmp_path / "reviews.predictions.csv", newline="", encoding="utf-8") as f:
        labels = [row["label"] for row in csv.DictReader(f)]
    assert len(labels) == len(TEXTS) and set(labels) <= {"negative", "positive"}

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl")))
    pipe = pipeline("text-classification", model=str(root / "model"), batch_size=8)
    assert [p["label"] for p in pipe(TEXTS, truncation=True)] == labels

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForSequenceClassification.from_pretrained(root / "model")
    batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] == cfg.finetune.max_length  # the long text, cut to the trained length
    with torch.inference_mode():
        ids = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in ids] == labels

    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    assert mlmodel["metadata"] == {"labels": ["negative", "positive"], "max_length": cfg.finetune.max_length,
                                   "truncation_side": "right", "padding_side": "right", "pad_token": "<|pad|>"}
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "tasks.serving"
    assert json.loads((root / "input_example.json").read_text()) == registry.EXAMPLE_TEXTS
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert [p.name for p in pyfunc.metadata.get_params_schema().params] == ["batch_size"]
    assert pyfunc.predict(TEXTS, params={"batch_size": 2})["label"].tolist() == labels
    # The transformers flavor, for those who load it as MLflow's own pipeline.
    flavored = mlflow.transformers.load_model(f"models:/{name}@champion")
    assert [p["label"] for p in flavored(TEXTS, batch_size=8, truncation=True)] == labels

    lm_root = Path(mlflow.artifacts.download_artifacts(ref.lm_uri, dst_path=str(tmp_path / "lm")))
    generate = pipeline("text-generation", model=str(lm_root / "model"), batch_size=2)
    prompts = ["The", "a wonderful, moving"]
    outs = generate(prompts, max_new_tokens=5, do_sample=False)
    assert [o[0]["generated_text"][: len(p)] for o, p in zip(outs, prompts, strict=True)] == prompts
    assert AutoTokenizer.from_pretrained(lm_root / "model").padding_side == "left"
