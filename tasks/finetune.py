"""Sequence-classification fine-tuning from the pretrained causal LM (last-token pooling)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.artifacts import CheckpointRef, LabeledRef, Workspace, fingerprint, write_json
from tasks.config import FinetuneConfig
from tasks.ingest import load_id2label, load_split
from tasks.training import ShuffledIndices, seed_everything, train

log = logging.getLogger("llmpipe")

STAGE_VERSION = "finetune-1"
OBSERVE_ONLY = {"log_every", "eval_every", "checkpoint_every", "keep_checkpoints"}


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)
    return [ids or [tokenizer.eos_token_id] for ids in enc["input_ids"]]


def pad_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (dynamic padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class ClassificationBatches:
    """Shuffled, dynamically padded batches of (text, label) pairs."""

    def __init__(self, seqs: list[list[int]], labels: list[int], batch_size: int, pad_id: int, seed: int):
        self.seqs, self.labels, self.pad_id = seqs, labels, pad_id
        self.order = ShuffledIndices(len(seqs), batch_size, seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = self.order.next_indices()
        batch = pad_batch([self.seqs[i] for i in idx], self.pad_id)
        batch["labels"] = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def predict_proba(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for each sequence; batches sorted by length to pad little."""
    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(seqs), batch_size):
        idx = order[start : start + batch_size]
        logits = model(**pad_batch([seqs[i] for i in idx], pad_id)).logits
        out[idx] = torch.softmax(logits.float(), dim=-1).numpy()
    return out


def load_classifier_from_lm(lm_dir: Path, id2label: dict[int, str], pad_id: int):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(lm_dir), num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()}, pad_token_id=pad_id,
    )


def finetune(
    lm: CheckpointRef,
    labeled: LabeledRef,
    cfg: FinetuneConfig,
    workspace: Workspace,
    seed: int = 0,
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> CheckpointRef:
    """Fine-tune a sequence classifier starting from the pretrained LM checkpoint."""
    from transformers import AutoTokenizer

    fp = fingerprint(STAGE_VERSION, lm.fingerprint, labeled.fingerprint, cfg.model_dump(exclude=OBSERVE_ONLY), seed)
    work_dir = workspace.work_dir("checkpoints", fp)

    def build(out: Path) -> dict[str, Any]:
        seed_everything(seed)
        tokenizer = AutoTokenizer.from_pretrained(str(lm.dir))
        id2label = load_id2label(labeled)
        model = load_classifier_from_lm(lm.dir, id2label, tokenizer.pad_token_id)
        train_rows, val_rows = load_split(labeled, "train"), load_split(labeled, "validation")
        train_seqs = encode_texts(tokenizer, [r["text"] for r in train_rows], cfg.max_length)
        val_seqs = encode_texts(tokenizer, [r["text"] for r in val_rows], cfg.max_length)
        val_labels = np.array([r["label"] for r in val_rows])
        source = ClassificationBatches(train_seqs, [r["label"] for r in train_rows], cfg.batch_size,
                                       tokenizer.pad_token_id, seed)

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            pred = predict_proba(m, val_seqs, tokenizer.pad_token_id).argmax(-1)
            return {"val_accuracy": float((pred == val_labels).mean())}

        result = train(model, source, cfg, work_dir, loss_fn=classification_loss, evaluate=evaluate,
                       tokens_in=lambda b: int(b["attention_mask"].sum()), on_progress=on_progress,
                       name="finetune")
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        write_json(out / "training.json", {"history": result.history, "evals": result.evals})
        final = result.evals[-1] if result.evals else {}
        return {"task": "text-classification", "id2label": {str(k): v for k, v in id2label.items()},
                "steps": result.steps, "tokens_seen": result.tokens_seen,
                "train_seconds": round(result.train_seconds, 2), "resumed_from": result.resumed_from,
                "final_train_loss": result.history[-1]["loss"],
                **{k: v for k, v in final.items() if k != "step"}}

    ref = workspace.materialize(CheckpointRef, fp, build, stage="finetune",
                                config={"finetune": cfg.model_dump(), "seed": seed},
                                inputs={"lm": lm.fingerprint, "labeled": labeled.fingerprint})
    shutil.rmtree(work_dir, ignore_errors=True)
    return ref
