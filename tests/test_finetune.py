"""Fine-tuning: length-grouped batches, class weights, the auxiliary next-token loss, LoRA, encoder checkpoints,
early stopping with the best weights kept, exact resume, out of memory and divergence."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks import classifier, evaluate, faults, finetune, ingest, metrics
from tasks.artifacts import CheckpointRef, LabeledRef, Workspace, fingerprint
from tasks.config import TRAIN_EXECUTION_ONLY, FinetuneConfig, LabeledConfig, LabeledFiles, PipelineConfig
from tasks.errors import ConfigError, DataError
from tasks.resume import list_checkpoints
from tasks.training import ShuffledIndices, train
from tests.support import Chain, build_tiny_bert, texts, tiny_lm_dir, write_labeled_csvs


@dataclass
class Setup:
    cfg: PipelineConfig
    ws: Workspace
    lm: CheckpointRef
    labeled: LabeledRef


@pytest.fixture
def setup(chain: Chain, lm: CheckpointRef, labeled: LabeledRef) -> Setup:
    """The tiny chain's pretrained LM and the built-in sentiment set (200 train, 40 validation, 40 test)."""
    return Setup(chain.cfg, chain.ws, lm, labeled)


def _ft(setup: Setup, **changes: Any) -> FinetuneConfig:
    return FinetuneConfig.model_validate({**setup.cfg.finetune.model_dump(), **changes})


# ================================================================ batching and truncation


def test_length_grouped_batches_cover_each_epoch_pad_little_and_restore() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=203).tolist()
    a = finetune.LengthGroupedIndices(lengths, batch_size=8, seed=3, group=5)
    epoch = []
    while a.epoch == 0:
        epoch.append(a.next_indices())
    # Every text at least once per epoch, in whole batches: the last one is completed with 5 repeated texts.
    assert len(epoch) == 26 and all(len(b) == 8 for b in epoch)
    seen = np.concatenate(epoch)
    assert set(seen.tolist()) == set(range(203)) and len(seen) - len(set(seen.tolist())) == 5

    def padding(batches: list[np.ndarray]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random_order = ShuffledIndices(203, 8, seed=3)
    shuffled = [random_order.next_indices() for _ in range(len(epoch))]
    assert padding(epoch) < padding(shuffled) / 4
    # The batches come in random order, not shortest first.
    means = [np.mean([lengths[i] for i in b]) for b in epoch]
    assert means != sorted(means) and means != sorted(means, reverse=True)

    for _ in range(7):
        a.next_indices()
    b = finetune.LengthGroupedIndices(lengths, batch_size=8, seed=3, group=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(40):  # across the next epoch boundary too
        assert np.array_equal(a.next_indices(), b.next_indices())


def test_length_grouped_steps_are_the_same_whatever_the_micro_batch_split() -> None:
    lengths = np.random.default_rng(1).integers(1, 60, size=203).tolist()

    def steps(order: finetune.LengthGroupedIndices, accum: int, n: int) -> list[np.ndarray]:
        return [np.concatenate([order.next_indices() for _ in range(accum)]) for _ in range(n)]

    whole = steps(finetune.LengthGroupedIndices(lengths, 8, seed=3, group=5), 1, 60)  # across two epoch ends
    for micro, accum in ((4, 2), (2, 4), (1, 8)):
        split = finetune.LengthGroupedIndices(lengths, micro, seed=3, group=5, accum=accum)
        assert all(np.array_equal(x, y) for x, y in zip(whole, steps(split, accum, 60), strict=True))
    # Micro-batches are slices of their step's length-sorted global batch: each pads little on its own.
    order = finetune.LengthGroupedIndices(lengths, 4, seed=3, group=5, accum=2)
    first, second = order.next_indices(), order.next_indices()
    assert min(lengths[i] for i in first) >= max(lengths[i] for i in second)

    # A checkpoint is written at a step boundary: a run that halves its micro-batch resumes the same steps.
    before = finetune.LengthGroupedIndices(lengths, 8, seed=3, group=5)
    steps(before, 1, 31)
    after = finetune.LengthGroupedIndices(lengths, 4, seed=3, group=5, accum=2)
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert all(np.array_equal(x, y) for x, y in zip(steps(before, 1, 10), steps(after, 2, 10), strict=True))
    # Mid-step, a position that the new micro-batch does not divide cannot be resumed.
    odd = finetune.LengthGroupedIndices(lengths, 2, seed=3, group=5, accum=4)
    odd.next_indices()
    with pytest.raises(ValueError, match="cannot resume 2 texts into a global batch of 8 with micro-batches of 4"):
        finetune.LengthGroupedIndices(lengths, 4, seed=3, group=5, accum=2).load_state_dict(odd.state_dict())


def test_batches_pad_to_their_longest_text() -> None:
    seqs = [[5] * n for n in (3, 9, 4, 9, 2, 3)]
    source = finetune.ClassificationBatches(seqs, [0, 1, 0, 1, 0, 1], batch_size=2, pad_id=0, seed=0, group=3)
    for _ in range(3):
        batch = source.next_batch()
        real = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(real.max())  # dynamic padding: no wider than the longest
        assert torch.equal(batch["input_ids"] != 0, batch["attention_mask"].bool())
    widths = []
    for _ in range(3):
        widths.append(source.next_batch()["input_ids"].shape[1])
    assert sorted(widths) == [3, 4, 9]  # grouped by length: (2, 3), (3, 4), (9, 9)


# ================================================================ class weights


def test_balanced_class_weights_match_sklearn_and_weight_the_loss() -> None:
    from sklearn.utils.class_weight import compute_class_weight
    from transformers import GPT2Config, GPT2ForSequenceClassification

    labels = [0] * 30 + [1] * 6 + [2] * 4
    weights = finetune.class_weights(labels, 3)
    assert weights == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=labels).tolist())
    with pytest.raises(DataError, match=r"class id\(s\) \[1\] have no training examples"):
        finetune.class_weights([0, 0, 2], 3)

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                                     num_labels=3, pad_token_id=0)).eval()
    batch = classifier.pad_batch([[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]], pad_id=0)
    batch["labels"] = torch.tensor([0, 1, 2, 2])
    w = torch.tensor(weights)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_row = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        expected = float((w[batch["labels"]] * per_row).sum() / w[batch["labels"]].sum())
        assert float(finetune.classification_loss(model, batch, w)) == pytest.approx(expected, rel=1e-6)
        assert float(finetune.classification_loss(model, batch)) == pytest.approx(float(per_row.mean()), rel=1e-6)


def test_the_auxiliary_next_token_loss_is_the_lms_own_loss(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=0))
    lm.save_pretrained(str(tmp_path / "lm"))
    clf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "lm"), num_labels=2, pad_token_id=0)
    assert classifier.is_causal(clf.config)
    lm.eval(), clf.eval()  # no dropout: both see the same activations
    batch = classifier.pad_batch([[3, 4, 5, 6], [7, 8], [9, 10, 11]], pad_id=0)
    batch["labels"] = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = clf(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        ours = finetune.auxiliary_lm_loss(clf, out.hidden_states[-1], batch)
        theirs = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
        # Added while training only, with its weight; evaluation scores the classification loss alone.
        plain = float(finetune.classification_loss(clf, batch))
        assert float(finetune.classification_loss(clf, batch, lm_weight=0.5)) == pytest.approx(plain, rel=1e-6)
        clf.train()
        torch.manual_seed(1)
        train_plain = float(finetune.classification_loss(clf, batch))
        torch.manual_seed(1)
        out = clf(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        torch.manual_seed(1)
        combined = float(finetune.classification_loss(clf, batch, lm_weight=0.5))
        assert combined == pytest.approx(train_plain + 0.5 * float(finetune.auxiliary_lm_loss(clf, out.hidden_states[-1],
                                                                                             batch)), rel=1e-5)


def test_finetune_adds_the_next_token_loss_to_what_it_trains_on(setup: Setup) -> None:
    plain = finetune.finetune(setup.lm, setup.labeled, _ft(setup, max_steps=6), setup.ws, 0)
    aux = finetune.finetune(setup.lm, setup.labeled, _ft(setup, max_steps=6, lm_loss_weight=1.0), setup.ws, 0)
    assert aux.fingerprint != plain.fingerprint
    # The logged training loss is classification + next-token loss: far above the classification loss alone
    # (two labels start near ln 2; the tiny LM's next-token loss over its 400 tokens is about 5).
    first = [json.loads((c.dir / "training.json").read_text())["history"][0]["loss"] for c in (plain, aux)]
    assert first[0] < 1.0 and first[1] - first[0] > 3.0


def test_fine_tuning_dropout_replaces_the_checkpoints_own(setup: Setup) -> None:
    from transformers import AutoConfig

    from tasks.classifier import load_classifier

    assert AutoConfig.from_pretrained(str(setup.lm.dir)).resid_pdrop == setup.cfg.model.dropout == 0.0
    model = load_classifier(setup.lm.dir, {0: "negative", 1: "positive"}, 0, 32, dropout=0.25)
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.25, 0.25, 0.25)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}
    # unset, it keeps the checkpoint's and the fingerprint of a fine-tune made before the setting existed
    assert finetune.finetune_fingerprint(setup.lm, setup.labeled, _ft(setup), 0) == fingerprint(
        finetune.STAGE_VERSION, setup.lm.fingerprint, setup.labeled.fingerprint,
        _ft(setup).model_dump(exclude={*TRAIN_EXECUTION_ONLY, "dropout"}), setup.cfg.finetune.batch_size, 0)
    assert finetune.finetune_fingerprint(setup.lm, setup.labeled, _ft(setup, dropout=0.1), 0) \
        != finetune.finetune_fingerprint(setup.lm, setup.labeled, _ft(setup), 0)
    trained = finetune.finetune(setup.lm, setup.labeled, _ft(setup, max_steps=4, dropout=0.1), setup.ws, 0)
    assert json.loads((trained.dir / "config.json").read_text())["resid_pdrop"] == 0.1


def test_class_weights_reach_training_on_an_imbalanced_set(setup: Setup, tmp_path: Path) -> None:
    labeled_cfg = write_labeled_csvs(tmp_path / "data", {"train": {"fine": 48, "broken": 8, "lost": 4},
                                                         "validation": {"fine": 6, "broken": 2, "lost": 2},
                                                         "test": {"fine": 6, "broken": 2, "lost": 2}})
    labeled = ingest.ingest_labeled(labeled_cfg, setup.ws, 0)
    id2label = ingest.load_id2label(labeled)
    clf = finetune.finetune(setup.lm, labeled, _ft(setup, class_weights="balanced", max_steps=6), setup.ws, 0)
    counts = {name: {"fine": 48, "broken": 8, "lost": 4}[name] for name in id2label.values()}
    expected = [60 / (3 * counts[id2label[i]]) for i in range(3)]
    assert clf.meta["class_weights"] == pytest.approx(expected)
    plain = finetune.finetune(setup.lm, labeled, _ft(setup, max_steps=6), setup.ws, 0)
    assert plain.meta["class_weights"] is None and plain.fingerprint != clf.fingerprint


# ================================================================ LoRA and encoders


def test_lora_trains_adapters_and_the_head_and_saves_a_merged_classifier(setup: Setup) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = _ft(setup, method="lora", lora_r=4, max_steps=30, lr=1e-2)
    clf = finetune.finetune(setup.lm, setup.labeled, cfg, setup.ws, 0)
    assert clf.meta["method"] == "lora"
    assert 0 < clf.meta["trainable_parameters"] < clf.meta["parameters"] / 4

    adapter = load_file(str(clf.dir / "adapter" / "adapter_model.safetensors"))
    assert any("c_attn.lora_A" in k for k in adapter) and any("c_attn.lora_B" in k for k in adapter)
    assert "base_model.model.score.weight" in adapter  # the head is trained and saved with the adapter

    merged, base = load_file(str(clf.dir / "model.safetensors")), load_file(str(setup.lm.dir / "model.safetensors"))
    for name in base:
        if name in merged and "c_attn.weight" not in name:
            assert torch.equal(merged[name], base[name]), f"{name} is frozen under LoRA"
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])

    # The saved model is the LM + adapter + head, exactly as peft assembles them.
    tok = AutoTokenizer.from_pretrained(clf.path)
    id2label = ingest.load_id2label(setup.labeled)
    assembled = PeftModel.from_pretrained(classifier.load_classifier(setup.lm.dir, id2label, tok.pad_token_id, 32),
                                          str(clf.dir / "adapter"))
    saved = AutoModelForSequenceClassification.from_pretrained(clf.path)
    seqs = classifier.encode_texts(tok, texts(setup.labeled, "test"), 32)
    np.testing.assert_allclose(classifier.predict_proba(assembled, seqs, tok.pad_token_id),
                               classifier.predict_proba(saved, seqs, tok.pad_token_id), atol=1e-5)


def test_encoder_checkpoint_fine_tunes_with_its_own_tokenizer(setup: Setup, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    # A set a one-layer BERT from scratch learns every time: the word for the label is in each text, at a
    # position that varies alike in every split (the built-in sentiment set, 200 rows, left it between 0.6
    # and 0.75 accuracy depending on rounding).
    paths = {}
    for split, (start, n) in {"train": (0, 60), "validation": (1000, 10), "test": (2000, 20)}.items():
        paths[split] = tmp_path / "data" / f"{split}.csv"
        paths[split].parent.mkdir(exist_ok=True)
        with open(paths[split], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(start, start + n):
                for label in ("negative", "positive"):
                    writer.writerow([f"{'so ' * (i % 4)}the parcel {i} was {label} today", label])
    labeled = ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(paths["train"]),
                                                                      validation=str(paths["validation"]),
                                                                      test=str(paths["test"]))), setup.ws, 0)
    bert = build_tiny_bert(tmp_path / "bert", texts(labeled, "train"))
    with pytest.raises(ConfigError, match=r"finetune\.lm_loss_weight=0\.2: .* is not a causal LM"):
        finetune.finetune(None, labeled, _ft(setup, init_from=str(bert), lm_loss_weight=0.2), setup.ws, 0)
    cfg = _ft(setup, init_from=str(bert), max_steps=200, lr=3e-3, warmup_steps=10, eval_every=50)
    clf = finetune.finetune(None, labeled, cfg, setup.ws, 0)
    assert clf.meta["model_type"] == "bert" and clf.meta["base"] == str(bert)
    loaded = AutoModelForSequenceClassification.from_pretrained(clf.path)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    assert loaded.config.label2id == {"negative": 0, "positive": 1}

    tok = AutoTokenizer.from_pretrained(clf.path)
    ids = classifier.encode_texts(tok, ["a fine film"], 32)[0]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id  # BERT's own special tokens

    report = evaluate.evaluate_classifier(clf, labeled, setup.cfg.evaluate, setup.ws, 32, 0).load()
    assert report["model"]["accuracy"] > report["baselines"]["majority"]["accuracy"] + 0.3
    # A transformers pipeline over the artifact (what MLflow serves) predicts what the evaluation scored.
    test_texts = texts(labeled, "test")
    served = pipeline("text-classification", model=clf.path, tokenizer=clf.path)(test_texts, truncation=True,
                                                                                   max_length=32)
    assert [p["label"] for p in served] == [report["labels"][i] for i in report["predictions"]]


def test_unusable_sources_fail_before_training(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"finetune\.init_from=.*missing: no such directory"):
        finetune.finetune(None, setup.labeled, _ft(setup, init_from=str(tmp_path / "missing")), setup.ws, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        finetune.finetune(None, setup.labeled, _ft(setup, init_from=str(tmp_path / "empty")), setup.ws, 0)
    with pytest.raises(ConfigError, match="no pretrained LM given and finetune.init_from is not set"):
        finetune.finetune(None, setup.labeled, _ft(setup), setup.ws, 0)
    with pytest.raises(ConfigError, match=r"finetune\.lora_target_modules=\['q_proj'\]"):
        finetune.finetune(setup.lm, setup.labeled, _ft(setup, method="lora", lora_target_modules=["q_proj"]),
                          setup.ws, 0)
    with pytest.raises(ConfigError, match=r"finetune\.max_length \(100\) exceeds the context"):
        finetune.finetune(setup.lm, setup.labeled, _ft(setup, max_length=100), setup.ws, 0)


# ================================================================ early stopping, best weights, resume


def test_early_stopping_keeps_the_best_validation_weights(setup: Setup) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = _ft(setup, max_steps=400, eval_every=4, early_stopping_patience=2, lr=3e-3)
    clf = finetune.finetune(setup.lm, setup.labeled, cfg, setup.ws, 0)
    evals = json.loads((clf.dir / "training.json").read_text())["evals"]
    scores = [e["val_macro_f1"] for e in evals]
    best = int(np.argmax(scores))
    assert clf.meta["stop_reason"] == "early_stop" and clf.meta["steps"] == evals[-1]["step"] < 400
    assert len(scores) - 1 - best == 2  # two passes without a better macro-F1, then stop
    assert max(scores[:-2]) >= max(scores[-2:])
    assert clf.meta["kept_step"] == evals[best]["step"] and clf.meta["val_macro_f1"] == scores[best]

    # The saved classifier is the best pass's: it scores that pass's validation macro-F1 again.
    tok = AutoTokenizer.from_pretrained(clf.path)
    model = AutoModelForSequenceClassification.from_pretrained(clf.path)
    val = ingest.load_split(setup.labeled, "validation")
    pred = classifier.predict_proba(model, classifier.encode_texts(tok, [r["text"] for r in val], cfg.max_length),
                                  tok.pad_token_id).argmax(-1)
    labels = list(ingest.load_id2label(setup.labeled).values())
    assert metrics.classification_metrics(np.array([r["label"] for r in val]), pred, labels)["macro_f1"] == scores[best]


def test_an_early_stop_is_kept_by_a_restarted_run(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return GPT2ForSequenceClassification(GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                                        num_labels=2, pad_token_id=0))

    def source() -> finetune.ClassificationBatches:
        seqs = [[1 + i % 7] * (1 + i % 5) for i in range(40)]
        return finetune.ClassificationBatches(seqs, [i % 2 for i in range(40)], 4, 0, seed=0, group=2)

    cfg = FinetuneConfig(max_steps=50, eval_every=3, checkpoint_every=100, warmup_steps=0)
    kw = {"loss_fn": finetune.classification_loss, "evaluate": lambda m: {"val_macro_f1": 0.5},
          "should_stop": lambda evals: len(evals) >= 2, "tokens_in": lambda b: int(b["attention_mask"].sum())}
    first = train(model(), source(), cfg, tmp_path / "work", **kw)
    assert (first.steps, first.stop_reason) == (6, "early_stop")
    assert [p.name for p in list_checkpoints(tmp_path / "work")] == ["step-00000006"]
    again = train(model(), source(), cfg, tmp_path / "work", **kw)
    assert (again.steps, again.resumed_from, again.stop_reason) == (6, 6, "early_stop")


def test_finetune_resumes_exactly_after_a_crash(setup: Setup, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _ft(setup, max_steps=16, eval_every=4, checkpoint_every=5, log_every=1)
    full = finetune.finetune(setup.lm, setup.labeled, cfg, setup.ws, 0)

    class Crash(Exception):
        pass

    def crash_at_12(step: int, total: int, row: dict) -> None:
        if step == 12:
            raise Crash

    ws = Workspace(tmp_path / "ws")
    with pytest.raises(Crash):
        finetune.finetune(setup.lm, setup.labeled, cfg, ws, 0, on_progress=crash_at_12)
    resumed = finetune.finetune(setup.lm, setup.labeled, cfg, ws, 0)
    assert resumed.fingerprint == full.fingerprint and resumed.meta["resumed_from"] == 10
    assert resumed.meta["kept_step"] == full.meta["kept_step"]
    expected, got = load_file(str(full.dir / "model.safetensors")), load_file(str(resumed.dir / "model.safetensors"))
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_out_of_memory_halves_the_micro_batch_and_resumes(setup: Setup, tmp_path: Path, monkeypatch, caplog) -> None:
    from safetensors.torch import load_file

    cfg = _ft(setup, max_steps=12, eval_every=4, checkpoint_every=4, log_every=1)
    assert (cfg.batch_size, cfg.grad_accum_steps) == (8, 1)
    reference = finetune.finetune(setup.lm, setup.labeled, cfg, setup.ws, 0)
    # The micro-batch split is an execution detail: the global batch names the run.
    split = cfg.model_copy(update={"batch_size": 4, "grad_accum_steps": 2})
    assert finetune.finetune_fingerprint(setup.lm, setup.labeled, split, 0) == reference.fingerprint
    assert finetune.finetune_fingerprint(setup.lm, setup.labeled, _ft(setup, max_steps=12, batch_size=4), 0) \
        != reference.fingerprint

    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LLMPIPE_FAULT", "finetune:oom@6")
    with caplog.at_level("WARNING", logger="llmpipe"):
        survived = finetune.finetune(setup.lm, setup.labeled, cfg, Workspace(tmp_path / "ws"), 0)
    assert "finetune: out of memory; resuming with micro-batch 4 x 2 accumulation steps" in caplog.text
    assert survived.fingerprint == reference.fingerprint and survived.meta["resumed_from"] == 4
    assert (survived.meta["micro_batch"], survived.meta["grad_accum_steps"]) == (4, 2)
    assert (reference.meta["micro_batch"], reference.meta["grad_accum_steps"]) == (8, 1)
    assert survived.meta["steps"] == 12 and survived.meta["tokens_seen"] == reference.meta["tokens_seen"]
    assert survived.meta["kept_step"] == reference.meta["kept_step"]
    expected, got = load_file(str(reference.dir / "model.safetensors")), load_file(str(survived.dir / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5), name


def test_a_diverged_fine_tune_saves_nothing_unless_skipping_is_allowed(setup: Setup, tmp_path: Path,
                                                                      monkeypatch) -> None:
    from tasks.errors import TrainingDiverged

    ws = Workspace(tmp_path / "ws")
    cfg = _ft(setup, max_steps=8, eval_every=4, checkpoint_every=4)
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LLMPIPE_FAULT", "finetune:nan@6")
    with pytest.raises(TrainingDiverged, match=r"finetune: training diverged at step 6: the loss is nan"):
        finetune.finetune(setup.lm, setup.labeled, cfg, ws, 0)
    fp = finetune.finetune_fingerprint(setup.lm, setup.labeled, cfg, 0)
    assert not (ws.root / "checkpoints" / fp).exists()
    assert not list((ws.root / "checkpoints").glob(f"{fp}.tmp-*"))
    monkeypatch.setattr(faults, "_fired", set())  # a fresh process, as far as fault rules go
    monkeypatch.setenv("LLMPIPE_FAULT", "finetune:nan@6,finetune:nan@7")
    clf = finetune.finetune(setup.lm, setup.labeled, _ft(setup, max_steps=8, max_skipped_steps=2), ws, 0)
    assert clf.meta["skipped_steps"] == 2 and clf.meta["steps"] == 8


def test_init_from_is_named_by_its_content(tmp_path: Path, setup: Setup) -> None:
    source = tiny_lm_dir(tmp_path / "bert-like")
    cfg = _ft(setup, init_from=str(source))
    before = finetune.finetune_fingerprint(None, setup.labeled, cfg, 0)
    assert finetune.finetune_fingerprint(None, setup.labeled, cfg, 0) == before
    (source / "notes.txt").write_text("a changed folder is another checkpoint\n")
    assert finetune.finetune_fingerprint(None, setup.labeled, cfg, 0) != before
