"""Registered models for their consumers: the folder a version is logged from, and the classifier's pyfunc flavor.

- **A self-contained model folder.** ``prepare`` readies a checkpoint for its consumers: config with label names
  and pad token id, tokenizer with its pad token, the maximum length and the truncation side the model was trained
  with (padding on the left for a language model, so batched generation works); ``save_model`` writes the tokenizer
  beside the weights. ``transformers.pipeline(task, model=<version>/model, batch_size=32)`` and
  ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` load it as it is, with no llmpipe installed.
- **The pyfunc flavor** (this module is its loader: ``mlflow.pyfunc.load_model``, ``mlflow models serve``). It
  scores texts in batches sorted by length, under ``torch.inference_mode``, truncated as the model was trained,
  so a long list is never padded to its longest text. ``save_model`` is the flavor's writer: MLflow's transformers
  flavor (which ``mlflow.transformers.load_model`` and the gate read) with this pyfunc loader in place of
  MLflow's own, which scores one text at a time.

``TextClassifier`` is the one way llmpipe scores texts with a registered classifier: the pyfunc model, ``llmpipe
predict`` and the registry's gate.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("llmpipe")

# transformers builds models on the meta device through process-wide hooks, so two threads loading models
# at once (two registrations in one worker's thread pool) can corrupt each other: model work takes turns.
MODEL_WORK = threading.RLock()  # re-entrant: logging a model loads it again to check it

# Texts per forward pass, by device: on CPU, 16 scored 1.2x (64-token texts) to 1.65x (256 tokens) as many texts a
# second as 64 did (GPT-2 4 x 256, 2 cores); a GPU wants wide batches. The pyfunc ``batch_size`` parameter overrides.
BATCH_SIZE = {"cpu": 16, "cuda": 64}
# A pyfunc call with at least this many texts scores through torch.compile's kernels: building them took 10-25 s
# on 2 CPU cores, once per process, and they then scored 1.2x as fast as eager (benchmarks/serving.py), which pays
# back after about 6,000 texts at the imdb preset's shape and 60,000 at the quickstart's; smaller calls (a served
# request, a short list) score eagerly.
COMPILE_MIN_TEXTS = 20_000
# init arguments transformers records in tokenizer_config.json that describe how it was loaded here, not the tokenizer
LOAD_KWARGS = ("is_local", "local_files_only", "name_or_path", "trust_remote_code")


# ---------------------------------------------------------------------------------------------- the model folder


def prepare(checkpoint: Path, task: str, max_length: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Checkpoint ``checkpoint`` (a classifier or a causal LM) as the model and tokenizer a consumer gets: the pad
    token set in both, the maximum length and truncation side it was trained with, padding on the left for a
    language model. Returns ``(model, tokenizer, metadata)``: the metadata is what a consumer needs to know."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    classifier = task == "text-classification"
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with MODEL_WORK:
        model = auto.from_pretrained(str(checkpoint), use_safetensors=True, trust_remote_code=False,
                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token is None:  # a checkpoint from before pad tokens were always added
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    settings = {"model_max_length": max_length or context or tokenizer.model_max_length,
                "padding_side": "right" if classifier else "left",  # generation continues from the last real token
                "truncation_side": tokenizer.truncation_side}
    for key, value in settings.items():  # the attribute for now, the init argument for tokenizer_config.json
        setattr(tokenizer, key, value)
        tokenizer.init_kwargs[key] = value
    for key in LOAD_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    model.config.pad_token_id = tokenizer.pad_token_id
    if not classifier and model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    meta = {"max_length": int(tokenizer.model_max_length), "truncation_side": tokenizer.truncation_side,
            "padding_side": tokenizer.padding_side, "pad_token": str(tokenizer.pad_token)}
    if classifier:
        meta["labels"] = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    return model, tokenizer, meta


# ---------------------------------------------------------------------------------------------- scoring


class NoPadToken(ValueError):
    """A model folder whose tokenizer has no pad token: its texts cannot be batched."""


class TextClassifier:
    """A registered classifier's model folder, loaded by transformers alone (safetensors, no remote code, no
    download), scoring texts in length-sorted batches truncated to ``max_length`` on the tokenizer's side.

    ``compile_min_texts``: a call with at least this many texts scores through ``torch.compile``'s kernels, built
    once (on first such call) and reused; None never compiles. A machine where compiling fails scores eagerly."""

    def __init__(self, model_dir: Path | str, tokenizer_dir: Path | str | None = None, max_length: int | None = None,
                 batch_size: int | None = None, compile_min_texts: int | None = None, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        with MODEL_WORK:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), use_safetensors=True, trust_remote_code=False, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir), trust_remote_code=False,
                                                           local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            raise NoPadToken(f"{model_dir}: the tokenizer has no pad token")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(device)
        self.max_length = max_length or self.tokenizer.model_max_length
        self.batch_size = batch_size or BATCH_SIZE[torch.device(device).type]
        self.compile_min_texts = compile_min_texts
        self.compiled: Any = None
        self.labels = [str(self.model.config.id2label[i]) for i in range(self.model.config.num_labels)]

    def proba(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Class probabilities, one row per text, in the texts' order."""
        import torch

        from tasks.classifier import encode_texts, predict_proba

        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        seqs = encode_texts(self.tokenizer, texts, self.max_length, cut_long=True)
        pad_id, size = self.tokenizer.pad_token_id, batch_size or self.batch_size
        with torch.inference_mode():
            if self.compile_min_texts is not None and len(texts) >= self.compile_min_texts:
                try:
                    if self.compiled is None:
                        self.compiled = torch.compile(self.model, dynamic=True)
                    return predict_proba(self.compiled, seqs, pad_id, size)
                except Exception as exc:  # no C++ compiler, or a backend error: score eagerly from now on
                    log.warning("serving: torch.compile failed (%s); scoring without it", type(exc).__name__)
                    self.compile_min_texts = None
            return predict_proba(self.model, seqs, pad_id, size)

    def predict(self, texts: list[str], batch_size: int | None = None) -> list[tuple[str, float]]:
        """``(label, probability)`` of the most likely label, per text."""
        proba = self.proba(texts, batch_size)
        best = proba.argmax(axis=1)
        return [(self.labels[int(i)], float(proba[row, i])) for row, i in enumerate(best)]


# ---------------------------------------------------------------------------------------------- the pyfunc flavor


def texts_of(model_input: Any) -> list[str]:
    """The texts in a pyfunc input: a string, a list of strings, a pandas Series, or a DataFrame (its ``text``
    column, else its only column), as ``mlflow models serve`` and ``pyfunc.predict`` pass them."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            model_input = model_input["text"]
        elif len(model_input.columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a 'text' column or a single column; got {len(model_input.columns)} columns")
    values = list(model_input.tolist() if hasattr(model_input, "tolist") else model_input)
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"input {bad}: expected a string, got {type(values[bad]).__name__}")
    return values


class PyfuncClassifier:
    """What ``mlflow.pyfunc.load_model`` returns for a registered classifier: ``predict`` takes texts and returns a
    DataFrame with ``label`` and ``score``."""

    def __init__(self, classifier: TextClassifier):
        self.classifier = classifier

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        batch_size = int((params or {}).get("batch_size") or self.classifier.batch_size)
        scored = self.classifier.predict(texts_of(model_input), batch_size)
        return pd.DataFrame({"label": [label for label, _ in scored], "score": [score for _, score in scored]})


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> PyfuncClassifier:
    """The pyfunc loader MLflow calls with the flavor's ``data`` folder (the model folder) and its config
    (``max_length``, ``batch_size`` (unset: the device's), ``compile_min_texts``:
    ``mlflow.pyfunc.load_model(uri, model_config=...)`` changes them). The model runs on a GPU where there is one."""
    config = model_config or {}
    return PyfuncClassifier(TextClassifier(path, max_length=config.get("max_length"),
                                           batch_size=config.get("batch_size") or None,
                                           compile_min_texts=config.get("compile_min_texts")))


def save_model(path: str, mlflow_model, transformers_model: dict[str, Any], task: str, model_config: dict[str, Any],
               **kwargs: Any) -> None:
    """The flavor's writer, for ``mlflow.models.Model.log``: MLflow's transformers flavor of the ``model`` and
    ``tokenizer`` components, the tokenizer also saved beside the weights (so that the ``model`` folder loads on its
    own), and, for a classifier, this module as the pyfunc loader of that folder."""
    import mlflow.transformers
    from mlflow import pyfunc

    mlflow.transformers.save_model(transformers_model=transformers_model, path=path, mlflow_model=mlflow_model,
                                   task=task, model_config=model_config, **kwargs)
    model_dir = Path(path) / mlflow_model.flavors[mlflow.transformers.FLAVOR_NAME]["model_binary"]
    transformers_model["tokenizer"].save_pretrained(str(model_dir))
    if task == "text-classification":
        env = mlflow_model.flavors[pyfunc.FLAVOR_NAME]["env"]
        pyfunc.add_to_model(mlflow_model, loader_module=__name__, data=model_dir.name, conda_env=env["conda"],
                            python_env=env["virtualenv"], model_config=model_config)
    mlflow_model.save(str(Path(path) / "MLmodel"))
