"""Pretraining: the model built from config or continued from a checkpoint, FLOPs per token, learning, and exact
resume after a crash or SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import evaluate, tokenize
from tasks.artifacts import Workspace
from tasks.config import load_config
from tasks.ingest import ingest_corpus
from tasks.pretrain import (
    BlockBatches,
    build_lm,
    flops_per_token,
    lm_eval_loss,
    lm_loss,
    pretrain,
    pretrain_fingerprint,
)
from tasks.resume import list_checkpoints
from tasks.tokenize import train_tokenizer
from tasks.training import seed_everything, train
from tests.support import REPO, Chain, build_chain, prepared, tiny_config, training_log, wait_until, weights

STEPS = ["pretrain.max_steps=40", "pretrain.checkpoint_every=5", "pretrain.log_every=5", "pretrain.eval_every=20"]


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    cfg, ws, tok, tokens = prepared(tmp_path / "a", *STEPS)
    reference = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)

    cfg_b, ws_b, tok_b, tokens_b = prepared(tmp_path / "b", *STEPS)
    fp = pretrain_fingerprint(tokens_b, tok_b, cfg_b.model, cfg_b.pretrain, cfg_b.seed)
    work = ws_b.work_dir("checkpoints", fp)
    script = textwrap.dedent(f"""
        import sys, time; sys.path[:0] = [{str(REPO)!r}]
        from tests.support import tiny_config
        from tasks.artifacts import Workspace
        from tasks.ingest import ingest_corpus
        from tasks.tokenize import tokenize_corpus, train_tokenizer
        from tasks.pretrain import pretrain
        from tasks.training import set_threads
        set_threads(1)
        cfg = tiny_config({str(tmp_path / 'b')!r}, *{STEPS!r})
        ws = Workspace(cfg.workspace)
        c = ingest_corpus(cfg.corpus, ws, cfg.seed); t = train_tokenizer(c, cfg.tokenizer, ws)
        # A slow observer (it does not change the result) leaves time to kill the run mid-way.
        pretrain(tokenize_corpus(c, t, ws), t, cfg.model, cfg.pretrain, ws, cfg.seed,
                 on_progress=lambda *a: time.sleep(0.5))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: any(int(p.name.split("-")[1]) >= 15 for p in list_checkpoints(work)) or child.poll() is not None,
                   "a checkpoint at step 15", 240)
        assert child.poll() is None, "training finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    killed_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(work))
    assert 15 <= killed_at < 40

    resumed = pretrain(tokens_b, tok_b, cfg_b.model, cfg_b.pretrain, ws_b, cfg_b.seed)
    assert resumed.meta["resumed_from"] == killed_at
    assert resumed.fingerprint == reference.fingerprint
    a, b = weights(reference), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_llama_family_trains_and_generates(tmp_path: Path) -> None:
    from transformers import pipeline

    cfg, ws, tok, tokens = prepared(tmp_path / "ws", "model.family=llama", "pretrain.max_steps=30")
    ref = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    assert ref.meta["family"] == "llama"
    history = (ref.dir / "training.json").read_text()
    assert '"loss"' in history and (ref.dir / "loss_curve.png").stat().st_size > 1000
    assert ref.meta["final_train_loss"] < 6.0  # ln(400) = 5.99 is a uniform guess over the vocabulary
    out = pipeline("text-generation", model=str(ref.dir))("The", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The")


def test_model_presets_and_flops() -> None:
    cfg = load_config(None, ["model.preset=gpt2-124m"])
    model = build_lm(cfg.model, 50257, 0, 1)
    n = sum(p.numel() for p in model.parameters())
    assert 124e6 < n < 125e6  # GPT-2 small with a tied output layer
    fpt = flops_per_token(model, 1024)
    assert fpt == pytest.approx(6 * (n - 1024 * 768) + 12 * 12 * 1024 * 768)
    assert load_config(None, ["model.preset=small", "model.n_layer=3"]).model.n_layer == 3


def test_continue_from_a_checkpoint_directory(tmp_path: Path) -> None:
    import shutil

    from tasks.config import ConfigError

    cfg, ws, tok, tokens = prepared(tmp_path / "ws")
    first = pretrain(tokens, tok, cfg.model, cfg.pretrain, ws, cfg.seed)
    # A checkpoint continued from needs the tokenizer it was trained with, said before anything runs.
    with pytest.raises(ConfigError, match="model.init_from continues a checkpoint.*set tokenizer.pretrained"):
        tiny_config(tmp_path / "ws", f"model.init_from={first.dir}")
    start = tmp_path / "start"
    shutil.copytree(first.dir, start)
    model_cfg = cfg.model.model_copy(update={"init_from": str(start)})
    second = pretrain(tokens, tok, model_cfg, cfg.pretrain, ws, cfg.seed)
    assert second.fingerprint != first.fingerprint
    assert second.meta["final_train_loss"] < first.meta["final_train_loss"]
    # Named by its content: the same folder with one file changed is another start, another artifact.
    (start / "generation_config.json").write_text('{"max_new_tokens": 7}\n')
    assert pretrain_fingerprint(tokens, tok, model_cfg, cfg.pretrain, cfg.seed) != second.fingerprint
    # Its own tokenizer must be the pipeline's.
    other, *_ = prepared(tmp_path / "other-ws", "tokenizer.vocab_size=300")
    other_tok = train_tokenizer(ingest_corpus(other.corpus, Workspace(other.workspace), 0), other.tokenizer,
                                Workspace(other.workspace))
    for f in other_tok.dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, start / f.name)
    with pytest.raises(ConfigError, match="its tokenizer differs from the pipeline's"):
        pretrain(tokens, tok, model_cfg, cfg.pretrain, ws, cfg.seed)


LEARN_STEPS = 200


@pytest.fixture(scope="module")
def learned_lm(chain: Chain):
    """A tiny LM trained long enough to beat the unigram baseline (a few seconds on one thread)."""
    cfg = load_config(None, [f"pretrain.max_steps={LEARN_STEPS}", "pretrain.log_every=20", "pretrain.eval_every=50",
                             "pretrain.checkpoint_every=100", "pretrain.block_size=32", "pretrain.batch_size=8",
                             "pretrain.warmup_steps=10"]).pretrain
    ref = pretrain(chain.tokens, chain.tokenizer, chain.cfg.model, cfg, chain.ws, chain.cfg.seed)
    return cfg, ref


def test_pretrain_learns(chain: Chain, learned_lm) -> None:
    cfg, ref = learned_lm
    log = training_log(ref)
    assert ref.meta["steps"] == LEARN_STEPS and ref.meta["resumed_from"] is None
    assert ref.meta["tokens_seen"] == LEARN_STEPS * cfg.batch_size * cfg.block_size
    assert [e["step"] for e in log["evals"]] == [50, 100, 150, 200]
    report = evaluate.evaluate_lm(ref, chain.tokens, chain.cfg.evaluate, chain.ws, cfg.block_size).load()
    first_loss = log["history"][0]["loss"]
    initial = float(np.log(chain.tokens.meta["vocab_size"]))  # a fresh model is close to uniform
    assert first_loss > report["unigram_loss"]
    assert report["val_loss"] < report["unigram_loss"] - 0.3
    assert report["val_loss"] < initial - 1.0
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]
    assert report["val_ppl"] == pytest.approx(np.exp(report["val_loss"]))
    assert len(report["samples"]) == chain.cfg.evaluate.samples
    # The resumable work directory is gone once the artifact exists.
    assert not chain.ws.work_dir("checkpoints", ref.fingerprint).exists()


def test_pretrain_resumes_exactly_after_a_crash(chain: Chain, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    overrides = ("pretrain.max_steps=20", "pretrain.checkpoint_every=5")
    cfg_a = tiny_config(Path(chain.cfg.workspace), *overrides)
    full = pretrain(chain.tokens, chain.tokenizer, cfg_a.model, cfg_a.pretrain, chain.ws, cfg_a.seed)
    assert full.meta["resumed_from"] is None and full.meta["steps"] == 20

    # Second workspace; log every step so the callback sees step 11, after checkpoint 10 was written.
    b = build_chain(tmp_path / "ws", *overrides, "pretrain.log_every=1")
    cfg_b = b.cfg
    fp = pretrain_fingerprint(b.tokens, b.tokenizer, cfg_b.model, cfg_b.pretrain, cfg_b.seed)
    assert fp == full.fingerprint  # log_every only observes; the crashed run is the same artifact
    work_dir = b.ws.work_dir("checkpoints", fp)

    # What pretrain()'s build does, up to a crash at step 11.
    seed_everything(cfg_b.seed)
    model = build_lm(cfg_b.model, b.tokens.meta["vocab_size"], b.tokenizer.meta["eos_id"],
                              b.tokenizer.meta["pad_id"])
    source = BlockBatches(tokenize.open_tokens(b.tokens, "train"), cfg_b.pretrain.block_size,
                                   cfg_b.pretrain.batch_size, cfg_b.seed)
    val = tokenize.open_tokens(b.tokens, "validation")

    def evaluate_fn(m):
        loss, _ = lm_eval_loss(m, val, cfg_b.pretrain.block_size, cfg_b.pretrain.batch_size,
                                        cfg_b.pretrain.eval_batches)
        return {"val_loss": loss}

    class Crash(Exception):
        pass

    seen: list[int] = []

    def crash_at_11(step: int, total: int, row: dict) -> None:
        seen.append(step)
        if step == 11:
            raise Crash

    with pytest.raises(Crash):
        train(model, source, cfg_b.pretrain, work_dir, loss_fn=lm_loss, evaluate=evaluate_fn,
              tokens_in=lambda batch: int(batch["targets"].numel()), on_progress=crash_at_11)
    assert seen == list(range(1, 12))
    assert [p.name for p in list_checkpoints(work_dir)] == ["step-00000005", "step-00000010"]
    assert not b.ws.is_complete(b.ws.dir("checkpoints", fp))

    resumed = pretrain(b.tokens, b.tokenizer, cfg_b.model, cfg_b.pretrain, b.ws, cfg_b.seed)
    assert resumed.reused is False
    assert resumed.meta["resumed_from"] == 10
    assert resumed.meta["steps"] == 20 and resumed.meta["tokens_seen"] == full.meta["tokens_seen"]
    assert resumed.meta["val_loss"] == full.meta["val_loss"]
    expected = load_file(str(full.dir / "model.safetensors"))
    got = load_file(str(resumed.dir / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not work_dir.exists()
