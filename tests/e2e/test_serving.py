"""Consumers of the registry: `mlflow models serve` for the champion answers like in-process prediction, and
`llmpipe predict` labels a file, all against a real `mlflow server` on loopback (slow)."""

from __future__ import annotations

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
