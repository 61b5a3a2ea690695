"""Sequence-classification fine-tuning: from the pipeline's LM or any Hugging Face checkpoint, full or LoRA.

The classifier itself (loading, LoRA, encoding, prediction) is ``tasks.classifier``. Batches are padded only to
their longest text and, by default, grouped by length; the loss can weight classes by inverse
frequency. Validation macro-F1 is measured every ``eval_every`` steps: training can stop when it
stops improving, and the weights of the best pass are the ones kept. Training runs on the shared
engine (``tasks.training``), so checkpoints, exact resume and the metric history work as in
pretraining.
"""

from __future__ import annotations

import functools
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks import checkpoints
from tasks.artifacts import CheckpointRef, LabeledRef, Workspace, fingerprint, write_json
from tasks.classifier import (
    apply_lora,
    check_source,
    encode_texts,
    is_causal,
    load_classifier,
    load_tokenizer,
    no_cache,
    pad_batch,
    predict_proba,
)
from tasks.config import TRAIN_EXECUTION_ONLY, FinetuneConfig
from tasks.curves import plot_curve
from tasks.errors import ConfigError, DataError
from tasks.ingest import load_id2label, load_split
from tasks.metrics import classification_metrics

if TYPE_CHECKING:  # torch, and the modules that import it, only where a model is trained (not on reuse)
    import torch

log = logging.getLogger("llmpipe")

STAGE_VERSION = "finetune-4"
BEST_FILE = "best.safetensors"
CURVE_FILE = "training_curve.png"  # train loss and validation scores by step


# ---------------------------------------------------------------------------------------------- batches


class LengthGroupedIndices:
    """Micro-batches of texts of similar length, in random order, the same steps whatever the micro-batch split.

    The plan is made of global batches of ``batch_size x accum`` texts (one optimizer step). Each epoch is a
    permutation from (seed, epoch), topped up from its own start to a whole number of global batches (so that
    every step has all its texts, however it is split), cut into windows of ``group`` global batches; each
    window is sorted by length and cut into global batches, and all the epoch's global batches are shuffled.
    A global batch is handed out as ``accum`` micro-batches of ``batch_size`` in turn, so half the micro-batch
    and twice the accumulation give every step the same texts. The position is (epoch, global batch, texts of
    it handed out), so the order survives a restart exactly, and at a step boundary (where checkpoints are
    written) under another split of the same global batch too.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int, accum: int = 1):
        if not lengths:
            raise ValueError("cannot draw batches from an empty set")
        self.lengths, self.batch_size, self.seed, self.group = np.asarray(lengths), batch_size, seed, group
        self.global_size = batch_size * accum
        self.epoch, self.pos, self.offset = 0, 0, 0
        self._batches = self._plan(0)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        from tasks.training import epoch_permutation

        n, size = len(self.lengths), self.global_size
        # Whole global batches: the last is completed with the epoch's first texts (cyclically, if the set is
        # smaller than one global batch).
        perm = np.resize(epoch_permutation(n, self.seed, epoch), -(-n // size) * size)
        window = size * self.group
        batches = []
        for start in range(0, len(perm), window):
            chunk = perm[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return [batches[i] for i in order]

    def next_indices(self) -> np.ndarray:
        batch = self._batches[self.pos][self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        if self.offset >= self.global_size:
            self.pos, self.offset = self.pos + 1, 0
            if self.pos >= len(self._batches):
                self.epoch, self.pos = self.epoch + 1, 0
                self._batches = self._plan(self.epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        offset = int(state.get("offset", 0))
        if offset % self.batch_size or offset >= self.global_size:
            raise ValueError(f"cannot resume {offset} texts into a global batch of {self.global_size} with "
                             f"micro-batches of {self.batch_size}")
        self.epoch, self.pos, self.offset = int(state["epoch"]), int(state["pos"]), offset
        self._batches = self._plan(self.epoch)


class ClassificationBatches:
    """Shuffled, dynamically padded micro-batches of (text, label) pairs; length-grouped when ``group`` is given.

    ``accum`` micro-batches in a row make one step's global batch, which is the same whatever the split: the
    shuffled order is one stream cut into global batches, and length grouping plans global batches.
    """

    def __init__(self, seqs: list[list[int]], labels: list[int], batch_size: int, pad_id: int, seed: int,
                 group: int | None = None, accum: int = 1):
        from tasks.training import ShuffledIndices

        self.seqs, self.labels, self.pad_id = seqs, labels, pad_id
        self.order = (LengthGroupedIndices([len(s) for s in seqs], batch_size, seed, group, accum) if group
                      else ShuffledIndices(len(seqs), batch_size, seed))

    def next_batch(self) -> dict[str, torch.Tensor]:
        import torch

        idx = self.order.next_indices()
        batch = pad_batch([self.seqs[i] for i in idx], self.pad_id)
        batch["labels"] = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def class_weights(labels: list[int], n_classes: int) -> list[float]:
    """Inverse-frequency weights n / (classes x count), as scikit-learn's 'balanced'."""
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise DataError(f"finetune.class_weights='balanced': class id(s) {np.flatnonzero(counts == 0).tolist()} "
                        "have no training examples")
    return (len(labels) / (n_classes * counts)).tolist()


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        weight: torch.Tensor | None = None, lm_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the model's logits, optionally class-weighted, plus ``lm_weight`` x the next-token loss
    of the input texts while training (``finetune.lm_loss_weight``)."""
    import torch.nn.functional as F

    aux = lm_weight > 0 and model.training
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=aux,
                **no_cache(model))
    if weight is not None:
        weight = weight.to(out.logits.device)
    loss = F.cross_entropy(out.logits.float(), batch["labels"], weight=weight)
    if aux:
        loss = loss + lm_weight * auxiliary_lm_loss(model, out.hidden_states[-1], batch)
    return loss


def auxiliary_lm_loss(model: torch.nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of the (right-padded) input texts from a causal classifier's last hidden states,
    through the input embeddings as the output layer (the LM's head is tied to them)."""
    import torch.nn.functional as F

    logits = hidden[:, :-1] @ model.get_input_embeddings().weight.T
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------------------- best weights


class BestWeights:
    """The weights of the best validation pass so far, in one safetensors file under the run's work dir.

    The score and step travel in the file's metadata, and the file is replaced atomically, so a
    restarted run knows what it has to beat.
    """

    def __init__(self, work_dir: Path, fresh: bool):
        self.path = work_dir / BEST_FILE
        if fresh:
            self.path.unlink(missing_ok=True)

    def info(self) -> dict[str, float] | None:
        from safetensors import safe_open

        if not self.path.is_file():
            return None
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata()
        return {"step": int(meta["step"]), "val_macro_f1": float(meta["val_macro_f1"])}

    def offer(self, model: torch.nn.Module, step: int, score: float) -> None:
        from safetensors.torch import save_model

        best = self.info()
        if best is not None and score <= best["val_macro_f1"]:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        save_model(model, str(tmp), metadata={"step": str(step), "val_macro_f1": repr(score)})
        tmp.replace(self.path)

    def restore(self, model: torch.nn.Module) -> dict[str, float] | None:
        from safetensors.torch import load_model

        best = self.info()
        if best is not None:
            load_model(model, str(self.path), device=str(next(model.parameters()).device))
        return best


def patience_exhausted(evals: list[dict[str, float]], patience: int) -> bool:
    """True once ``patience`` validation passes in a row brought no better macro-F1 than the best before them."""
    scores = [e["val_macro_f1"] for e in evals]
    return len(scores) - 1 - int(np.argmax(scores)) >= patience


# ---------------------------------------------------------------------------------------------- the stage


def finetune_fingerprint(lm: CheckpointRef | None, labeled: LabeledRef, cfg: FinetuneConfig, seed: int) -> str:
    execution_only = set(TRAIN_EXECUTION_ONLY)
    if not (cfg.restore_best or cfg.early_stopping_patience):
        execution_only.add("eval_every")  # validation then only watches; otherwise it picks the weights
    if cfg.dropout is None:
        execution_only.add("dropout")  # unset, it leaves the fingerprints of fine-tunes made before it existed
    base = checkpoints.identity(cfg.init_from, "finetune.init_from") if cfg.init_from else lm.fingerprint if lm else None
    global_batch = cfg.batch_size * cfg.accum_steps
    return fingerprint(STAGE_VERSION, base, labeled.fingerprint, cfg.model_dump(exclude=execution_only), global_batch,
                       seed)


def finetune(
    lm: CheckpointRef | None,
    labeled: LabeledRef,
    cfg: FinetuneConfig,
    workspace: Workspace,
    seed: int = 0,
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
    threads: int | None = None,
) -> CheckpointRef:
    """Fine-tune a sequence classifier from the pipeline's LM ``lm`` (or ``cfg.init_from``) on ``labeled``.

    The artifact is a ``save_pretrained`` classifier (LoRA merged in) with its tokenizer, ``training.json``,
    ``training_curve.png`` and, for LoRA, the adapter and head under ``adapter/``. ``threads``: torch's intra-op
    threads while training (0: one per core; None: as they are).
    """
    if cfg.init_from:
        check_source(cfg.init_from)
    elif lm is None:
        raise ConfigError("finetune: no pretrained LM given and finetune.init_from is not set")
    source = cfg.init_from or lm.dir
    fp = finetune_fingerprint(lm, labeled, cfg, seed)
    work_dir = workspace.work_dir("checkpoints", fp)

    def build(out: Path) -> dict[str, Any]:
        from tasks.training import set_threads, train_halving_on_oom

        set_threads(threads)
        # Out of memory: half the micro-batch, twice the accumulation, resumed from the newest checkpoint.
        return train_halving_on_oom(cfg, lambda current: train_and_save(current, out), "finetune")

    def train_and_save(cfg: FinetuneConfig, out: Path) -> dict[str, Any]:
        # ``cfg`` is the stage's config, or a copy of it with a smaller micro-batch after running out of memory.
        import torch

        from tasks.resume import list_checkpoints
        from tasks.training import seed_everything, train

        seed_everything(seed)
        id2label = load_id2label(labeled)
        train_rows, val_rows = load_split(labeled, "train"), load_split(labeled, "validation")
        for split, rows in (("train", train_rows), ("validation", val_rows)):
            if not rows:
                raise DataError(f"{labeled.dir / (split + '.jsonl')}: the {split} split is empty")
        train_labels = [int(r["label"]) for r in train_rows]
        weights = class_weights(train_labels, len(id2label)) if cfg.class_weights == "balanced" else None
        try:
            tokenizer = load_tokenizer(source, cfg)
            model = load_classifier(source, id2label, tokenizer.pad_token_id, cfg.max_length, cfg.dropout)
        except OSError as exc:
            if cfg.init_from:
                raise ConfigError(f"finetune.init_from={cfg.init_from}: cannot load it ({exc})") from None
            raise DataError(f"{source}: cannot load the pretrained LM ({exc})") from None
        if cfg.lm_loss_weight and not is_causal(model.config):
            raise ConfigError(f"finetune.lm_loss_weight={cfg.lm_loss_weight}: {source} is not a causal LM "
                              f"(architectures {model.config.architectures}); the next-token loss needs one")
        n_params = sum(p.numel() for p in model.parameters())
        if cfg.method == "lora":
            model = apply_lora(model, cfg)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train_seqs = encode_texts(tokenizer, [r["text"] for r in train_rows], cfg.max_length)
        val_seqs = encode_texts(tokenizer, [r["text"] for r in val_rows], cfg.max_length)
        val_labels = np.array([int(r["label"]) for r in val_rows])
        labels = [id2label[i] for i in range(len(id2label))]
        pad_id = tokenizer.pad_token_id
        batches = ClassificationBatches(train_seqs, train_labels, cfg.batch_size, pad_id, seed,
                                        cfg.length_group_batches if cfg.group_by_length else None, cfg.accum_steps)
        truncated = sum(len(s) >= cfg.max_length for s in train_seqs)
        log.info("finetune: %s (%s) from %s, %.2fM parameters (%.2fM trained), %d train / %d validation texts, "
                 "%d labels, %d train texts at max_length=%d", model.config.model_type, cfg.method, source,
                 n_params / 1e6, n_trainable / 1e6, len(train_rows), len(val_rows), len(labels), truncated,
                 cfg.max_length)
        best = BestWeights(work_dir, fresh=not (cfg.resume and list_checkpoints(work_dir)))

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            pred = predict_proba(m, val_seqs, pad_id, 2 * cfg.batch_size).argmax(-1)
            metrics = classification_metrics(val_labels, pred, labels)
            return {"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"]}

        def should_stop(evals: list[dict[str, float]]) -> bool:
            # Called right after a validation pass, while the model still holds the weights it scored.
            if cfg.restore_best:
                best.offer(model, int(evals[-1]["step"]), evals[-1]["val_macro_f1"])
            patience = cfg.early_stopping_patience
            return patience is not None and patience_exhausted(evals, patience)

        weight = torch.tensor(weights, dtype=torch.float32) if weights else None
        result = train(model, batches, cfg, work_dir, loss_fn=functools.partial(classification_loss, weight=weight,
                                                                     lm_weight=cfg.lm_loss_weight),
                       evaluate=evaluate, should_stop=should_stop, tokens_in=lambda b: int(b["attention_mask"].sum()),
                       on_progress=on_progress, name="finetune")
        kept = _kept_eval(result.evals, best.restore(model) if cfg.restore_best else None)
        if cfg.method == "lora":
            model.save_pretrained(str(out / "adapter"))
            model = model.merge_and_unload()
        model.to("cpu").save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        write_json(out / "training.json", {"history": result.history, "evals": result.evals})
        plot_curve(out / CURVE_FILE, result.history, result.evals,
                   {"val_macro_f1": "validation macro-F1", "val_accuracy": "validation accuracy"}, "validation score",
                   kept.get("step"))
        log.info("finetune: stopped at step %d (%s); kept the weights of step %s (validation macro-F1 %s)",
                 result.steps, result.stop_reason, kept.get("step"), kept.get("val_macro_f1"))
        return {"task": "text-classification", "id2label": {str(k): v for k, v in id2label.items()},
                "base": str(cfg.init_from or f"checkpoints/{lm.fingerprint}"), "model_type": model.config.model_type,
                "method": cfg.method, "parameters": n_params, "trainable_parameters": n_trainable,
                "class_weights": weights, "steps": result.steps, "stop_reason": result.stop_reason,
                "micro_batch": cfg.batch_size, "grad_accum_steps": cfg.accum_steps,
                "skipped_steps": result.skipped_steps,
                "tokens_seen": result.tokens_seen, "train_seconds": round(result.train_seconds, 2),
                "resumed_from": result.resumed_from,
                "final_train_loss": result.history[-1]["loss"] if result.history else None,
                "kept_step": kept.get("step"), **{k: v for k, v in kept.items() if k != "step"}}

    inputs = {"labeled": labeled.fingerprint} if cfg.init_from else {"lm": lm.fingerprint, "labeled": labeled.fingerprint}
    ref = workspace.materialize(CheckpointRef, fp, build, stage="finetune",
                                config={"finetune": cfg.model_dump(), "seed": seed}, inputs=inputs)
    shutil.rmtree(work_dir, ignore_errors=True)
    return ref


def _kept_eval(evals: list[dict[str, float]], best: dict[str, float] | None) -> dict[str, float]:
    """The validation pass whose weights were kept: the best one when restored, else the last."""
    if best is not None:
        return next((e for e in evals if e["step"] == best["step"]), best)
    return evals[-1] if evals else {}
