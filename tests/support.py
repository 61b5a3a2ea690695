"""What tests build with: configs, the chain of stages (corpus -> tokenizer -> tokens -> LM -> classifier) made by
the stage functions, and small data sets and checkpoints made on the spot. ``conftest.py`` keeps built chains as
session fixtures; this module is plain functions, importable from a test's subprocess too."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks import evaluate, finetune, ingest, pretrain, tokenize
from tasks.artifacts import (
    CheckpointRef,
    CorpusRef,
    LabeledRef,
    ReportRef,
    TokenizerRef,
    TokensRef,
    Workspace,
    fingerprint,
)
from tasks.config import CorpusConfig, FilesSource, LabeledConfig, LabeledFiles, PipelineConfig, load_config

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LLMPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_config(workspace: Path, *overrides: str) -> PipelineConfig:
    """A config small enough that the whole chain runs in seconds (its classifier stays at the majority baseline,
    so it is registered below the quality floor, without an alias)."""
    return load_config("tiny", [f"workspace={workspace}", *overrides])


def mini_config(workspace: Path, *overrides: str) -> PipelineConfig:
    """The smallest config whose classifier clears the quality floor and becomes champion (about 20 s)."""
    return load_config("mini", [f"workspace={workspace}", *overrides])


def with_registry(cfg: PipelineConfig, **fields: Any) -> PipelineConfig:
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update=fields)})


def weights(ref: CheckpointRef) -> dict[str, Any]:
    """A checkpoint artifact's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(ref.dir / "model.safetensors"))


def training_log(ref: CheckpointRef) -> dict[str, Any]:
    """What a training stage's artifact records of its run: the logged rows (``history``) and the validation passes."""
    return json.loads((ref.dir / "training.json").read_text())


def wait_until(check: Callable[[], Any], what: str, timeout: float = 300, every: float = 0.1,
               log: Path | None = None) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; fail naming ``what`` (and the tail of
    ``log``) when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}\n{tail}")


def processes_mentioning(needle: str) -> list[int]:
    """Other processes whose command line contains ``needle`` (Linux)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# ---------------------------------------------------------------------------------------------- the chain


@dataclass
class Chain:
    """corpus -> tokenizer -> tokens, built by the stage functions into ``ws``."""

    cfg: PipelineConfig
    ws: Workspace
    corpus: CorpusRef
    tokenizer: TokenizerRef
    tokens: TokensRef

    def pretrain(self, cfg: PipelineConfig | None = None, ws: Workspace | None = None) -> CheckpointRef:
        """The LM pretrained on these tokens with ``cfg``'s model and pretraining settings (default: the chain's),
        into ``ws`` (default: the chain's)."""
        cfg = cfg or self.cfg
        return pretrain.pretrain(self.tokens, self.tokenizer, cfg.model, cfg.pretrain, ws or self.ws, cfg.seed)

    def labeled(self) -> LabeledRef:
        return ingest.ingest_labeled(self.cfg.labeled, self.ws, self.cfg.seed)


def build_chain(workspace: Path, *overrides: str, preset: str = "tiny") -> Chain:
    cfg = load_config(preset, [f"workspace={workspace}", *overrides])
    ws = Workspace(cfg.workspace)
    corpus = ingest.ingest_corpus(cfg.corpus, ws, cfg.seed)
    tok = tokenize.train_tokenizer(corpus, cfg.tokenizer, ws)
    return Chain(cfg, ws, corpus, tok, tokenize.tokenize_corpus(corpus, tok, ws))


def prepared(workspace: Path, *overrides: str) -> tuple[PipelineConfig, Workspace, TokenizerRef, TokensRef]:
    """``build_chain`` on the tiny preset as ``(config, workspace, tokenizer, tokens)``: what pretraining starts
    from."""
    chain = build_chain(workspace, *overrides)
    return chain.cfg, chain.ws, chain.tokenizer, chain.tokens


@dataclass
class Models:
    """The whole chain: an evaluated LM and classifier, plus head-swapped twins of the classifier."""

    cfg: PipelineConfig
    ws: Workspace
    lm: CheckpointRef
    lm_report: ReportRef
    labeled: LabeledRef
    classifier: CheckpointRef
    report: ReportRef

    def variant(self, tag: str, swap: bool) -> CheckpointRef:
        """A copy of the classifier under its own fingerprint; ``swap`` exchanges the two label rows of the
        head, so on every row exactly one of the classifier and its swapped twin is right."""
        from safetensors.torch import load_file, save_file

        src = self.classifier

        def build(out: Path) -> dict:
            for f in src.dir.iterdir():
                if f.name != "manifest.json":
                    shutil.copy2(f, out / f.name)
            if swap:
                weights = load_file(str(out / "model.safetensors"))
                weights["score.weight"] = weights["score.weight"].flip(0).contiguous()
                save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
            return {**src.meta, "variant": tag, "swapped": swap}

        return self.ws.materialize(CheckpointRef, fingerprint("variant", src.fingerprint, tag, swap), build,
                                   stage="variant", inputs={"lm": self.lm.fingerprint,
                                                            "labeled": self.labeled.fingerprint})

    def report_for(self, clf: CheckpointRef, labeled: LabeledRef) -> ReportRef:
        return evaluate.evaluate_classifier(clf, labeled, self.cfg.evaluate, self.ws, self.cfg.finetune.max_length,
                                            self.cfg.seed)

    def predictions(self, clf: CheckpointRef, texts: list[str]) -> np.ndarray:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tasks.classifier import encode_texts, predict_proba

        tok = AutoTokenizer.from_pretrained(str(clf.dir))
        model = AutoModelForSequenceClassification.from_pretrained(str(clf.dir))
        seqs = encode_texts(tok, texts, self.cfg.finetune.max_length)
        return predict_proba(model, seqs, tok.pad_token_id).argmax(-1)


def build_models(workspace: Path, *overrides: str, preset: str = "mini") -> Models:
    """Every stage on ``preset`` (mini: a classifier that clears the quality floor), no Prefect, no MLflow."""
    chain = build_chain(workspace, *overrides, preset=preset)
    cfg, ws = chain.cfg, chain.ws
    lm = chain.pretrain()
    lm_report = evaluate.evaluate_lm(lm, chain.tokens, cfg.evaluate, ws, cfg.pretrain.block_size, cfg.seed)
    labeled = chain.labeled()
    clf = finetune.finetune(lm, labeled, cfg.finetune, ws, cfg.seed)
    report = evaluate.evaluate_classifier(clf, labeled, cfg.evaluate, ws, cfg.finetune.max_length, cfg.seed)
    return Models(cfg, ws, lm, lm_report, labeled, clf, report)


# ---------------------------------------------------------------------------------------------- made on the spot


def texts(ref: CorpusRef | LabeledRef, split: str) -> list[str]:
    """The texts of an ingested split, in order."""
    return [r["text"] for r in ingest.load_split(ref, split)]


def jsonl_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` written to ``path`` as JSON lines; the path."""
    ingest.write_jsonl(path, rows)
    return path


def no_artifacts(ws: Workspace, kind: str) -> bool:
    """Whether the workspace holds no artifact (nor a leftover directory) of ``kind``."""
    folder = ws.root / kind
    return not folder.exists() or not [p for p in folder.iterdir() if p.is_dir()]


def paragraphs(n: int, start: int = 0) -> list[str]:
    """``n`` distinct two-line paragraphs about a few topics."""
    topics = ["weather", "market", "harbour", "library", "garden", "station", "bakery", "river"]
    return [f"Paragraph {i} is about the {topics[i % len(topics)]}.\nIt has a second line, number {i * 7}."
            for i in range(start, start + n)]


def files_corpus(path: Path, text_unit: str = "paragraph", **kw: Any) -> CorpusConfig:
    """A corpus of one file source (``path``, a file or a glob)."""
    return CorpusConfig(sources=[FilesSource(paths=[str(path)], text_unit=text_unit)], **kw)


def write_labeled_csvs(root: Path, counts: dict[str, dict[str, int]]) -> LabeledConfig:
    """Train/validation/test CSV files with ``counts[split][label]`` rows each; the word for the label is in
    the text, so the task is learnable."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, per_label in counts.items():
        paths[split] = root / f"{split}.csv"
        with open(paths[split], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for label, n in per_label.items():
                for i in range(n):
                    writer.writerow([f"{split} note {i} about the parcel: it was {label}, number {i * 13 % 97}", label])
    return LabeledConfig(source=LabeledFiles(train=str(paths["train"]), validation=str(paths["validation"]),
                                             test=str(paths["test"])))


def build_tiny_bert(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A one-layer BERT built from config, with a WordPiece tokenizer trained on ``texts``, saved like a hub
    checkpoint (config.json, model.safetensors, tokenizer files)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials,
                                                             show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(path))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(str(path))
    return path


def tiny_lm_dir(path: Path) -> Path:
    """A one-layer GPT-2 built from config and saved like a hub checkpoint (no tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)) \
        .save_pretrained(str(path))
    return path


def imbalanced_labeled(root: Path) -> tuple[Workspace, LabeledRef]:
    """Three classes, the majority ('meh') not the first id, ingested into a workspace of its own."""
    cfg = write_labeled_csvs(root / "data", {"train": {"bad": 10, "good": 14, "meh": 36},
                                             "validation": {"bad": 2, "good": 3, "meh": 5},
                                             "test": {"bad": 5, "good": 7, "meh": 18}})
    ws = Workspace(root / "ws")
    return ws, ingest.ingest_labeled(cfg, ws, 0)


def constant_classifier(ws: Workspace, labeled: LabeledRef, tmp: Path) -> CheckpointRef:
    """A BERT classifier whose head ignores its input: weights zero, bias the log of the training class
    frequencies, so every row gets exactly the majority baseline's probabilities."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train_texts = texts(labeled, "train")
    bert = build_tiny_bert(tmp / "bert", train_texts)
    id2label = ingest.load_id2label(labeled)
    prior = np.bincount([r["label"] for r in ingest.load_split(labeled, "train")], minlength=3) / len(train_texts)

    def build(out: Path) -> dict:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(bert), num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(bert)).save_pretrained(str(out))
        tensors = load_file(str(out / "model.safetensors"))
        tensors["classifier.weight"] = torch.zeros_like(tensors["classifier.weight"])
        tensors["classifier.bias"] = torch.tensor(np.log(prior), dtype=torch.float32)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return {"task": "text-classification"}

    return ws.materialize(CheckpointRef, "constant-classifier", build, stage="test")


def chinese_reviews(n: int, seed: int, positive_share: float = 0.4) -> list[dict[str, str]]:
    """Takeaway reviews in Chinese, written without spaces as real ones are: a clause or two of random filler
    characters around one sentiment word, so no two reviews share a whole clause (what word n-grams see: a clause
    is one "word") while their characters give the label away."""
    rng = np.random.default_rng(seed)
    filler = list("送餐米饭师傅今天外卖包装分量价格店家骑手这家菜品汤面")
    words = {"positive": ["好吃", "很快", "满意", "新鲜", "推荐"], "negative": ["难吃", "太慢", "失望", "变质", "差劲"]}
    rows = []
    for _ in range(n):
        label = "positive" if rng.random() < positive_share else "negative"
        clauses = ["".join(rng.choice(filler, rng.integers(2, 5))) + str(rng.choice(words[label]))
                   + "".join(rng.choice(filler, rng.integers(1, 3))) for _ in range(rng.integers(1, 3))]
        rows.append({"text": "，".join(clauses) + "。", "label": label})
    return rows


def chinese_labeled(root: Path, seed: int = 0) -> LabeledConfig:
    """``chinese_reviews`` as train/validation/test JSONL files (300/60/100 rows)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {split: jsonl_file(root / f"{split}.jsonl", chinese_reviews(n, seed + i))
             for i, (split, n) in enumerate({"train": 300, "validation": 60, "test": 100}.items())}
    return LabeledConfig(source=LabeledFiles(**{k: str(p) for k, p in paths.items()}))
