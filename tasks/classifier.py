"""The sequence classifier: loaded from the pipeline's LM or any Hugging Face checkpoint (LoRA optional), texts
encoded for it, and its class probabilities.

Decoders (GPT-2, Llama) classify from the last real token (``AutoModelForSequenceClassification`` with the pad
token set); encoders (BERT and kin) from their own pooler. Fine-tuning trains it (``tasks.finetune``), evaluation
scores it (``tasks.evaluate``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks import checkpoints
from tasks.config import FinetuneConfig
from tasks.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a model runs: a reused stage needs none of it
    import torch

log = logging.getLogger("llmpipe")


# ---------------------------------------------------------------------------------------------- texts


CHARS_PER_TOKEN = 6  # ``encode_texts(cut_long=True)`` first tokenizes this many characters per kept token


def encode_texts(tokenizer, texts: list[str], max_length: int, cut_long: bool = False) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` on the tokenizer's ``truncation_side``, with the
    model's special tokens (none for the pipeline's byte-level BPE; [CLS] ... [SEP] for BERT).

    ``cut_long``: a text far longer than ``max_length`` tokens is tokenized from its head alone where that gives the
    same ids (``_head_ids``): scoring a long review then tokenizes a few hundred characters, not all of it."""
    ids: list[list[int] | None] = [None] * len(texts)
    if cut_long and tokenizer.truncation_side == "right" and _cuttable(tokenizer):
        ids = _head_ids(tokenizer, texts, max_length)
    rest = [i for i, seq in enumerate(ids) if seq is None]
    if rest:
        enc = tokenizer([texts[i] for i in rest], truncation=True, max_length=max_length)
        for i, seq in zip(rest, enc["input_ids"], strict=True):
            ids[i] = seq
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.unk_token_id
    return [seq or [fallback] for seq in ids]


def _cuttable(tokenizer) -> bool:
    """Whether ``_head_ids`` applies: a fast tokenizer with no normaliser that adds no special tokens (the
    pipeline's byte-level BPE, either split)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (backend is not None and backend.normalizer is None and backend.pre_tokenizer is not None
            and tokenizer.num_special_tokens_to_add() == 0)


def _head_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int] | None]:
    """The first ``max_length`` ids of each text longer than ``CHARS_PER_TOKEN * max_length`` characters, from that
    head of it, where they are provably the full text's; None for the others. Pre-tokens are cut from left to right,
    each depending on at most one character past its end, so every pre-token of the head but its last is the
    text's too, and BPE encodes pre-tokens one by one: kept tokens that all come from pre-tokens before the head's
    last two (the tokenizer's own ``word_ids``) are the text's."""
    head = CHARS_PER_TOKEN * max_length
    long = [i for i, t in enumerate(texts) if len(t) > head]
    out: list[list[int] | None] = [None] * len(texts)
    if not long:
        return out
    # Heads are longer than the model's context on purpose (cut below): not the warning's case.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    enc = tokenizer([texts[i][:head] for i in long], truncation=False)
    for k, i in enumerate(long):
        words = enc.word_ids(k)
        if len(words) > max_length and words[max_length - 1] is not None and words[-1] is not None \
                and words[max_length - 1] < words[-1] - 1:
            out[i] = enc["input_ids"][k][:max_length]
    return out


def no_cache(model: torch.nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for a model that keeps a key/value cache (decoders such as GPT-2 and Llama, whose
    configs turn it on for generation): scoring and training whole texts only pay for it in time and memory.
    Encoders that take no such argument get nothing."""
    return {"use_cache": False} if getattr(model.config, "use_cache", False) else {}


def pad_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (dynamic padding)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}




def is_causal(config: Any) -> bool:
    """Whether a checkpoint is a decoder-only LM (GPT-2, Llama, ...), by the architectures it was saved with."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def predict_proba(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for each sequence; batches sorted by length to pad little."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out: np.ndarray | None = None
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in pad_batch([seqs[i] for i in idx], pad_id).items()}
            proba = torch.softmax(model(**batch, **no_cache(model)).logits.float(), dim=-1).cpu().numpy()
            if out is None:
                out = np.zeros((len(seqs), proba.shape[1]), dtype=np.float32)
            out[idx] = proba
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- models


def check_source(init_from: str) -> None:
    """A local directory must be a ``save_pretrained`` folder; anything else is taken as a hub name."""
    path = Path(init_from).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"finetune.init_from={init_from}: {path} has no config.json; expected a Hugging Face "
                              "checkpoint directory (save_pretrained output)")
    elif init_from.startswith(("/", ".", "~")) or init_from.count("/") > 1:
        raise ConfigError(f"finetune.init_from={init_from}: no such directory")


def loadable(source: str | Path) -> str:
    """The folder ``transformers`` loads ``source`` from: a checkpoint named in the config (``finetune.init_from``,
    a string) through ``checkpoints.local_dir`` (a local folder through ``confine.staged``: for a run created through
    the API, a private copy of its checked files; a Hub name, its snapshot); an artifact of the workspace (a
    ``Path``) as it is."""
    return str(checkpoints.local_dir(source, "finetune.init_from") if isinstance(source, str) else source)


def _context_length(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_tokenizer(source: str | Path, cfg: FinetuneConfig):
    """The source's tokenizer, truncating as configured, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(loadable(source), truncation_side=cfg.truncation_side,
                                              model_max_length=cfg.max_length)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{source}: the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_head(name: str, base_prefix: str) -> bool:
    """Whether a parameter belongs to the classification head: outside the base model (GPT-2's and Llama's
    ``score``, BERT's ``classifier``), or the pooler that a BERT-style head reads."""
    return not name.startswith(f"{base_prefix}.") or ".pooler." in name


# Where each family keeps its dropout probabilities (GPT-2; Llama and kin; BERT and kin).
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "classifier_dropout")


def dropout_overrides(source: str | Path, dropout: float | None) -> dict[str, float]:
    """Config overrides that set every dropout probability ``source``'s architecture has to ``dropout``."""
    if dropout is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(source))
    return {k: dropout for k in DROPOUT_KEYS if hasattr(config, k)}


def load_classifier(source: str | Path, id2label: dict[int, str], pad_id: int, max_length: int,
                    dropout: float | None = None):
    """A sequence classifier with a fresh head of ``len(id2label)`` classes on top of ``source``'s weights
    (``dropout``, when set, replaces the checkpoint's dropout probabilities).

    Only the classification head may be missing from ``source`` or differ in shape (it is initialised afresh);
    any other missing or mismatched weight is a ``ConfigError`` that lists them, since training would start from
    random weights where the checkpoint was meant to be.
    """
    from transformers import AutoModelForSequenceClassification

    folder = loadable(source)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        pad_token_id=pad_id, ignore_mismatched_sizes=True, output_loading_info=True,
        **dropout_overrides(folder, dropout),
    )
    prefix = model.base_model_prefix
    missing = sorted(k for k in info.get("missing_keys", ()) if not is_head(k, prefix))
    mismatched = sorted(f"{k} (checkpoint {tuple(old)}, model {tuple(new)})"
                        for k, old, new in info.get("mismatched_keys", ()) if not is_head(k, prefix))
    if missing or mismatched:
        listed = [*(f"missing {k}" for k in missing), *(f"mismatched {k}" for k in mismatched)]
        raise ConfigError(f"{source}: {len(listed)} weight(s) outside the classification head do not load into a "
                          f"{model.config.model_type} classifier: " + "; ".join(listed[:20])
                          + (f"; and {len(listed) - 20} more" if len(listed) > 20 else ""))
    fresh = sorted({k for k in info.get("missing_keys", ())} | {k for k, *_ in info.get("mismatched_keys", ())})
    log.info("finetune: classification head initialised afresh (%s); %d checkpoint weights not used (%s)",
             ", ".join(fresh) or "none", len(info.get("unexpected_keys", ())),
             ", ".join(sorted(info.get("unexpected_keys", ()))[:5]) or "none")
    model.config.pad_token_id = pad_id
    context = _context_length(model.config)
    if context is not None and max_length > context:
        raise ConfigError(f"finetune.max_length ({max_length}) exceeds the context of {source} ({context} tokens)")
    return model


def apply_lora(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; the classification head is trained in full (peft's modules_to_save)."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules or None,
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's layers are Conv1D (in x out)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"finetune.lora_target_modules={cfg.lora_target_modules or '(peft default)'}: {exc}") from None
