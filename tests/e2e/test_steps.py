"""Stage tasks in a flow on Prefect's test server: the tokenize shards on threads and on Dask give the same
bytes, and the evaluation publishes the classifier beside its baselines as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import constant_classifier, imbalanced_labeled, tiny_config

pytestmark = pytest.mark.slow


def test_the_evaluate_task_publishes_model_and_baselines_as_a_prefect_table(harness, tmp_path: Path) -> None:
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows import steps

    ws, labeled = imbalanced_labeled(tmp_path / "data")
    clf = constant_classifier(ws, labeled, tmp_path)
    cfg = tiny_config(ws.root)

    @flow
    def evaluate_only():
        return steps.evaluate_classifier(cfg, clf, labeled)

    async def artifacts(key: str):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    report = evaluate_only().load()
    (table,) = asyncio.run(artifacts("classifier-vs-baselines"))
    (markdown,) = asyncio.run(artifacts("classifier-report"))
    assert table.type == "table"
    rows = table.data if isinstance(table.data, list) else __import__("json").loads(table.data)
    assert [r["model"] for r in rows] == ["model", "majority", "tfidf_logreg"]
    assert rows[2]["macro_f1"] == round(report["baselines"]["tfidf_logreg"]["macro_f1"], 4)
    assert "Confusion matrix" in markdown.data


def _tokenize_flow():
    from prefect import flow

    from flows import steps

    @flow(name="tokenize-test")
    def tokenize_flow(cfg):
        corpus = steps.ingest_corpus(cfg)
        tokenizer = steps.train_tokenizer(cfg, corpus)
        return steps.tokenize_corpus(cfg, corpus, tokenizer)

    return tokenize_flow


def test_shard_map_on_threads_and_on_dask_gives_byte_identical_shards(harness, tmp_path: Path, monkeypatch,
                                                                      restore_environ) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect_dask import DaskTaskRunner

    monkeypatch.chdir(tmp_path)  # MLflow's SQLite store keeps its artifacts in ./mlartifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    flow = _tokenize_flow()
    threads = flow(tiny_config(tmp_path / "threads", "tokenizer.shard_mb=0.025"))
    dask_runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                                 "dashboard_address": None})
    on_dask = flow.with_options(task_runner=dask_runner)(tiny_config(tmp_path / "dask", "tokenizer.shard_mb=0.025"))
    assert threads.fingerprint == on_dask.fingerprint and on_dask.reused is False
    shards = threads.meta["splits"]["train"]["shards"]
    assert len(shards) >= 3
    assert on_dask.meta["splits"] == threads.meta["splits"]  # every shard's checksum, counts and the packed file's
    for split in ("train", "validation"):
        assert (threads.dir / f"{split}.bin").read_bytes() == (on_dask.dir / f"{split}.bin").read_bytes()
    # The corpus data report is a markdown artifact of the ingest task.
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["corpus-data-report"])))
    assert found and "| deduplicate |" in found[0].data
    # A second flow run reuses the artifact.
    assert flow(tiny_config(tmp_path / "threads", "tokenizer.shard_mb=0.025")).reused
