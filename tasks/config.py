"""The one configuration: pydantic models, one per stage, composed into ``PipelineConfig``.

Every field has a type, a default and a description, so the same models serve the CLI (`--set`),
YAML presets and the Prefect UI's parameter form. The defaults are the quickstart.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _weight() -> Any:
    return Field(
        1.0, gt=0, le=100,
        description="Mixing weight: each training document of this source is written floor(weight) times, plus once "
        "more for a share (the fractional part) of documents chosen by content hash; held-out splits are not weighted.",
    )


def _text_columns() -> Any:
    return Field(["text"], min_length=1,
                 description="Columns (JSON keys) holding the text; several are joined with a newline.")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------- local paths
# Every path a config names is normalised once, here, when the config is validated: the user's home expanded, made
# absolute against the working directory, symbolic links resolved. The operator's policy checks that value and the
# stages read and write that value, so nothing is interpreted two ways ("~/x" checked as one folder, written as
# another).


def is_local(name: str) -> bool:
    """Whether a checkpoint, tokenizer or data set name is a local path rather than a Hugging Face Hub name."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def is_url(value: str) -> bool:
    return "://" in value


def local_path(value: str) -> str:
    """``value`` as an absolute path with ``~`` expanded and links resolved."""
    return os.path.realpath(os.path.expanduser(value))


def local_pattern(value: str) -> str:
    """A path or glob pattern: an existing path (taken literally) or the folders before the first wildcard
    normalised as ``local_path``; the wildcard part is kept as written (the reader checks it)."""
    path = Path(os.path.expanduser(value))
    if path.exists() or not glob.has_magic(value):
        return local_path(value)
    parts = path.parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return os.path.join(local_path(os.path.join(*parts[:first]) if first else "."), *parts[first:])


def _local_name(value: str | None) -> str | None:
    """A name that is a local path (not a Hub name or a URL), normalised; any other name as it is."""
    return local_path(value) if value and not is_url(value) and is_local(value) else value


def _local_paths(values: list[str]) -> list[str]:
    return [local_pattern(v) for v in values]


def _local_files(values: list[str]) -> list[str]:
    return [v if is_url(v) else local_pattern(v) for v in values]


def _local(value: str | None) -> str | None:
    return None if value is None else local_path(value)


class SampleSource(Section):
    """The built-in generated English corpus."""

    kind: Literal["sample"] = Field("sample", description="The built-in generated English corpus.")
    documents: int = Field(3000, ge=10, description="Documents generated (from the pipeline seed).")
    weight: float = _weight()


class FilesSource(Section):
    """Local files or glob patterns."""

    kind: Literal["files"] = Field("files", description="Local files or glob patterns.")
    paths: list[str] = Field(
        ..., min_length=1,
        description="Files or glob patterns ('**' recurses); a path that exists is taken literally, even with [ ] * ?.",
    )
    format: Literal["auto", "txt", "jsonl", "json", "csv", "tsv", "parquet"] = Field(
        "auto", description="File format; 'auto' goes by suffix (.jsonl, .json, .csv, .tsv, .parquet; anything else is "
        "text).",
    )
    text_unit: Literal["file", "line", "paragraph"] = Field(
        "paragraph", description="How a text file splits into documents: whole file, each line, or blank-line-separated "
        "blocks.",
    )
    text_columns: list[str] = _text_columns()
    has_header: bool = Field(True, description="Whether CSV/TSV files start with a header row (else columns are 0, 1, ...).")
    weight: float = _weight()

    _columns = field_validator("text_columns", mode="before")(_as_list)
    _paths = field_validator("paths")(_local_paths)


class HubSource(Section):
    """A Hugging Face dataset through ``datasets.load_dataset`` (or a folder written by ``save_to_disk``)."""

    kind: Literal["hub"] = Field("hub", description="A Hugging Face dataset.")
    name: str = Field(
        ..., min_length=1, description="Hub dataset name, a builder such as 'json' or 'parquet' with data_files, a local "
        "folder of data files, or a folder written by Dataset.save_to_disk.",
    )
    config: str | None = Field(None, description="Dataset configuration (subset) name.")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); default: the main branch.")
    data_files: list[str] = Field(default_factory=list, description="Data files for builders such as 'json' or 'csv'.")
    text_columns: list[str] = _text_columns()
    weight: float = _weight()

    _columns = field_validator("text_columns", mode="before")(_as_list)
    _name = field_validator("name")(_local_name)
    _data_files = field_validator("data_files")(_local_files)


class DataFrameSource(Section):
    """A pandas DataFrame passed in from Python: ``ingest_corpus(cfg, ws, seed, frames={name: df})``."""

    kind: Literal["dataframe"] = Field("dataframe", description="A pandas DataFrame passed in from Python.")
    name: str = Field(..., min_length=1, description="Key of the DataFrame in the frames passed to ingest_corpus.")
    text_columns: list[str] = _text_columns()
    weight: float = _weight()

    _columns = field_validator("text_columns", mode="before")(_as_list)


CorpusSource = Annotated[SampleSource | FilesSource | HubSource | DataFrameSource, Field(discriminator="kind")]

# Unicode normalisation of text as it is read: NFC composes characters (an accent typed separately joins its
# letter); NFKC also folds compatibility forms, such as full-width ASCII letters, digits and punctuation (common in
# Chinese and Japanese text) to their ordinary forms and ligatures to their letters.
Normalization = Literal["none", "nfc", "nfkc"]


def _normalize(what: str, before: str) -> Any:
    return Field("none", description=f"Unicode normalisation of the {what} before {before}: 'none', 'nfc' "
                 "(composed characters) or 'nfkc' (also full-width letters, digits and punctuation to half-width, "
                 "ligatures to letters). Part of the data's identity when not 'none'.")


def _legacy_nfc(data: Any) -> Any:
    """``corpus.nfc: true``, the boolean of before, as ``normalize: nfc`` (with a warning); ``false`` is dropped."""
    if not isinstance(data, dict) or "nfc" not in data:
        return data
    data = dict(data)
    nfc = data.pop("nfc")
    if nfc not in (True, False, "true", "false", "True", "False"):
        raise ValueError(f"nfc: expected true or false, got {nfc!r} (deprecated: use normalize: nfc)")
    if nfc in (True, "true", "True"):
        if data.get("normalize", "none") not in ("none", "nfc"):
            raise ValueError(f"nfc: true contradicts normalize: {data['normalize']} (nfc is deprecated: set "
                             "normalize alone)")
        data["normalize"] = "nfc"
        warnings.warn("corpus.nfc is deprecated: use corpus.normalize: nfc (or nfkc) (docs/data.md)", FutureWarning,
                      stacklevel=2)
    return data


class CorpusConfig(Section):
    """Where pretraining text comes from, and how it is cleaned and split."""

    sources: list[CorpusSource] = Field(
        default_factory=lambda: [SampleSource()], min_length=1,
        description="Sources of documents, mixed by weight: each a 'kind' (sample, files, hub, dataframe) with its "
        "options.",
    )
    validation_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Share of documents held out for validation (chosen by a hash of each document)."
    )
    test_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Share of documents held out for a test split (0: no test split)."
    )
    min_chars: int = Field(1, ge=1, description="Documents shorter than this many characters are dropped.")
    max_chars: int | None = Field(None, ge=1, description="Documents longer than this many characters are dropped.")
    normalize: Normalization = _normalize("documents", "filtering and deduplication")
    dedup: bool = Field(True, description="Drop exact duplicate documents (by content hash).")
    invalid_utf8: Literal["fail", "replace"] = Field(
        "fail", description="Undecodable UTF-8 in a file: 'fail' names the file and byte offset; 'replace' substitutes "
        "U+FFFD and counts it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _nfc_alias(cls, data: Any) -> Any:
        return _legacy_nfc(data)

    @model_validator(mode="after")
    def _lengths(self) -> CorpusConfig:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


class LabeledSample(Section):
    """The built-in generated sentiment set."""

    kind: Literal["sample"] = Field("sample", description="The built-in generated sentiment set.")
    train_rows: int = Field(4000, ge=20, description="Training examples generated (from the pipeline seed).")
    eval_rows: int = Field(500, ge=10, description="Validation and test examples generated, each.")


class LabeledFiles(Section):
    """Local CSV, TSV, JSONL, JSON or Parquet files, one per split."""

    kind: Literal["files"] = Field("files", description="Local CSV, TSV, JSONL, JSON or Parquet files.")
    train: str = Field(..., min_length=1, description="Training file (CSV, TSV, JSONL, JSON or Parquet).")
    validation: str | None = Field(None, description="Validation file; split off train (stratified) when absent.")
    test: str | None = Field(None, description="Test file; split off train (stratified) when absent.")
    has_header: bool = Field(True, description="Whether CSV/TSV files start with a header row (else columns are 0, "
                             "1, ...).")

    _paths = field_validator("train", "validation", "test")(_local)


class LabeledHub(Section):
    """A Hugging Face dataset through ``datasets.load_dataset`` (or a folder written by ``save_to_disk``)."""

    kind: Literal["hub"] = Field("hub", description="A Hugging Face dataset.")
    name: str = Field(
        ..., min_length=1, description="A hub dataset name, or a local folder (save_to_disk output, or data files "
        "such as train.csv and test.csv).",
    )
    config: str | None = Field(None, description="Dataset configuration (subset) name.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); default: the main branch.")
    train_split: str = Field("train", description="The dataset's split used for training.")
    validation_split: str | None = Field(
        "validation", description="The dataset's validation split; when null or absent, one is split off train.",
    )
    test_split: str | None = Field(
        "test", description="The dataset's test split; when null or absent, one is split off train.",
    )

    _name = field_validator("name")(_local_name)


class LabeledDataFrames(Section):
    """pandas DataFrames passed in from Python: ``ingest_labeled(cfg, ws, seed, frames={'train': df, ...})``."""

    kind: Literal["dataframe"] = Field("dataframe", description="pandas DataFrames passed in from Python.")


LabeledSource = Annotated[LabeledSample | LabeledFiles | LabeledHub | LabeledDataFrames, Field(discriminator="kind")]

# The flat keys of the labeled section before its source kinds: (kind, field of that kind).
LEGACY_LABELED_KEYS = {
    "train_path": ("files", "train"), "validation_path": ("files", "validation"), "test_path": ("files", "test"),
    "has_header": ("files", "has_header"), "hub_name": ("hub", "name"), "hub_config": ("hub", "config"),
    "hub_revision": ("hub", "revision"), "hub_train_split": ("hub", "train_split"),
    "hub_validation_split": ("hub", "validation_split"), "hub_test_split": ("hub", "test_split"),
    "sample_train": ("sample", "train_rows"), "sample_eval": ("sample", "eval_rows"),
}


def _legacy_labeled(data: Any) -> Any:
    """Today's shape of a labeled section written in the flat form of before (``source: files`` with
    ``train_path``, ``hub_name``, ``sample_train`` ...), with a warning that shows the new shape. Keys of another
    kind than the section's were ignored then and are dropped now."""
    if not isinstance(data, dict):
        return data
    legacy = [k for k in data if k in LEGACY_LABELED_KEYS]
    source = data.get("source")
    if not legacy and not isinstance(source, str):
        return data
    data = dict(data)
    if isinstance(source, dict):
        new = dict(source)
    else:
        new = {"kind": source if isinstance(source, str) else "sample"}
    kind = new.get("kind", "sample")
    for key in legacy:
        owner, field = LEGACY_LABELED_KEYS[key]
        value = data.pop(key)
        if owner == kind:
            new.setdefault(field, value)
    data["source"] = new
    old = (["source"] if isinstance(source, str) else []) + legacy
    shown = yaml.safe_dump(new, default_flow_style=True, sort_keys=False).strip()
    warnings.warn(f"labeled: the flat keys {', '.join(old)} are deprecated; the same settings in today's shape: "
                  f"labeled.source: {shown} (docs/data.md#labeled-data)", FutureWarning, stacklevel=2)
    return data


class LabeledConfig(Section):
    """Where labeled text for fine-tuning comes from, and how it is split."""

    source: LabeledSource = Field(
        default_factory=LabeledSample, description="Where the labeled rows come from: a 'kind' (sample: the built-in "
        "sentiment set; files: local files; hub: a Hugging Face dataset; dataframe: pandas DataFrames passed to "
        "ingest_labeled from Python) with its options.",
    )
    text_column: str | list[str] = Field(
        "text", description="Column holding the text; a list of columns is joined with a newline."
    )
    label_column: str = Field("label", description="Column holding the label (string or integer).")
    label_names: list[str] = Field(
        default_factory=list, description="Names for integer labels 0, 1, ... in order, e.g. [negative, positive]; "
        "when given, every label must be one of those integers.",
    )
    labels: list[str] = Field(
        default_factory=list, description="The label set in id order; when given, any other label is an error "
        "(default: discovered from the training split).",
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of train split off (stratified) for validation when none is given."
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of train split off (stratified) for test when none is given."
    )
    max_train_examples: int | None = Field(
        None, ge=2, description="Label budget: at most this many rows of the training split, drawn stratified by "
        "label with the seed, before validation and test are split off them (when the source gives none, they come "
        "out of the budget). Unset: every row.",
    )
    max_test_examples: int | None = Field(
        None, ge=2, description="Score on at most this many test rows: a fixed subset drawn stratified by label "
        "with the seed, the same in every run. Unset: every row.",
    )
    normalize: Normalization = _normalize("texts", "empty rows are dropped and splits are drawn")
    split_groups: Literal["none", "duplicate_text", "contained_text"] = Field(
        "none", description="How rows split off train for validation/test are drawn. 'none': single rows. "
        "'duplicate_text': rows with the same text (whitespace aside) go together and a held-out text is scored "
        "once, so no held-out text is also a training text. "
        "'contained_text': a row whose text occurs, at word boundaries, inside a longer training text joins that "
        "text's group (the phrases of one sentence, as in SST-2); whole groups are held out, each scored by its "
        "longest text, and the rest of a held-out group leaves training, so validation measures unseen sentences "
        "rather than memorised parts of them.",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, data: Any) -> Any:
        return _legacy_labeled(data)

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)


class TokenizerConfig(Section):
    """The tokenizer (a byte-level BPE trained on the corpus, or an existing one) and how the corpus is encoded."""

    pretrained: str | None = Field(
        None, description="Use this tokenizer instead of training one: a local folder or a Hugging Face hub name "
        "(AutoTokenizer.from_pretrained).",
    )
    vocab_size: int = Field(2048, ge=260, le=1_000_000, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    eos_token: str = Field("<|endoftext|>", description="End-of-document token, also used as BOS and UNK.")
    pad_token: str = Field("<|pad|>", description="Padding token for classification batches.")
    special_tokens: list[str] = Field(
        default_factory=list, description="Further special tokens to reserve in the vocabulary."
    )
    split: Literal["gpt2", "cjk"] = Field(
        "gpt2",
        description="How a trained tokenizer cuts text into pre-tokens before BPE. 'gpt2': GPT-2's pattern (a run of "
        "letters is one pre-token, so a clause of Chinese is one). 'cjk': the same on spaced text, but each Han, "
        "Hiragana, Katakana, Thai, Lao, Khmer, Myanmar or Tibetan character (scripts written without spaces; "
        "their whole Unicode blocks, tasks/encoding.py CJK_RANGES) is a pre-token of its own. Hangul keeps GPT-2's "
        "split (Korean is spaced). Not for tokenizer.pretrained, which keeps its own.",
    )
    shard_mb: float = Field(
        16.0, gt=0, le=4096,
        description="Corpus megabytes per tokenize shard (one task per shard); changes parallelism, not the tokens.",
    )

    _pretrained = field_validator("pretrained")(_local_name)

    @model_validator(mode="after")
    def _split_is_for_training(self) -> TokenizerConfig:
        if self.pretrained and self.split != "gpt2":
            raise ValueError(f"tokenizer.split={self.split!r} applies to a trained tokenizer; tokenizer.pretrained "
                             "keeps its own pre-tokenizer (leave split unset)")
        return self


MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 128},
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 256},
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
}


class ModelConfig(Section):
    """The causal language model: built from config, or continued from a Hugging Face checkpoint."""

    family: Literal["gpt2", "llama"] = Field("gpt2", description="Architecture: GPT-2 or Llama.")
    preset: Literal["custom", "tiny", "small", "gpt2-124m"] = Field(
        "custom", description="Size preset (tiny, small, gpt2-124m); fields set explicitly win over the preset."
    )
    n_layer: int = Field(2, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: int = Field(128, ge=8, description="Hidden size; must be divisible by n_head.")
    n_positions: int = Field(128, ge=8, description="Maximum context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings, attention and residuals (GPT-2).")
    init_from: str | None = Field(
        None, description="Continue from this Hugging Face checkpoint (local directory or hub name) instead of "
        "building from config; it needs tokenizer.pretrained set to its own tokenizer. Named by its files' content."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from init_from (off: safer).")

    _init_from = field_validator("init_from")(_local_name)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in MODEL_PRESETS:
            return {**MODEL_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


# Settings of a training stage that change how training is observed, resumed, split into micro-batches or computed
# (rounding; which dropout masks are drawn), not what it trains: the stage's fingerprint leaves them out. The global
# batch (micro-batch x accumulation) stays in, so a run that halves its micro-batch after running out of memory
# resumes its own checkpoints and finishes the same artifact.
TRAIN_EXECUTION_ONLY = {"log_every", "checkpoint_every", "keep_checkpoints", "resume", "peak_flops",
                        "fast_kernels", "batch_size", "grad_accum_steps"}


class TrainConfig(Section):
    """Settings shared by pretraining and fine-tuning loops."""

    max_steps: int = Field(600, ge=1, description="Optimizer steps to train for.")
    max_tokens: int | None = Field(None, ge=1, description="Also stop once this many training tokens were seen.")
    max_time_s: float | None = Field(None, gt=0, description="Also stop after this many seconds of training.")
    batch_size: int = Field(32, ge=1, description="Sequences per micro-batch (per device).")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    lr: float = Field(3e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="After warmup: cosine decay, or warmup-stable-decay (constant, then linear decay)."
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="Share of steps spent decaying, for schedule='wsd'.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on weight matrices (not biases, norms).")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping; 0 disables.")
    max_skipped_steps: int = Field(
        0, ge=0, description="Steps whose loss or gradient norm is not finite (NaN or inf) that may be skipped (no "
        "weight update; the step is tried again on the next batch) before training stops with an error; 0 stops at "
        "the first. A stopped run saves no model.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto picks CUDA when present.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slow on most CPUs)."
    )
    compile: bool = Field(
        False, description="Compile the model and its loss with torch.compile (worth it for runs longer than a few "
        "minutes; needs a C++ compiler on CPU).")
    fast_kernels: bool = Field(
        True, description="While training, swap tanh-GELU activations for an equivalent, faster form and, on the "
        "CPU, dropout (attention dropout included) for one that draws its masks four times faster (other masks of the "
        "same distribution; see tasks/kernels.py); the saved model is unchanged.")
    log_every: int = Field(50, ge=1, description="Steps between progress log lines and metric points.")
    eval_every: int = Field(200, ge=1, description="Steps between validation passes.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept on disk.")
    resume: bool = Field(True, description="Continue from the newest complete checkpoint of the same run if one exists.")
    peak_flops: float | None = Field(
        None, gt=0, description="Peak FLOP/s of one device for MFU; measured with a matmul at start when unset."
    )

    @property
    def accum_steps(self) -> int:
        return self.grad_accum_steps


class PretrainConfig(TrainConfig):
    """Causal-LM pretraining."""

    block_size: int = Field(64, ge=8, description="Tokens per training sequence (packed blocks).")
    global_batch_tokens: int | None = Field(
        None, ge=1, description="Tokens per optimizer step across all devices; sets grad_accum_steps when given."
    )
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    devices: int = Field(1, ge=1, description="Processes per node; above 1 runs data-parallel under torchrun.")
    nnodes: int = Field(1, ge=1, description="Nodes for multi-node training under torchrun.")
    node_rank: int = Field(0, ge=0, description="This node's rank when nnodes > 1.")
    rdzv_endpoint: str = Field("127.0.0.1:29500", description="torchrun rendezvous host:port (node 0) when nnodes > 1.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Data parallelism: DDP (a full model per process) or FSDP (fully_shard: weights, gradients and "
        "optimizer state sharded across processes, for models that don't fit one device; gloo on CPU, NCCL on CUDA)."
    )
    distributed_timeout_s: float | None = Field(
        None, gt=0, description="Kill the torchrun process group if distributed training runs longer than this."
    )

    @model_validator(mode="after")
    def _global_batch(self) -> PretrainConfig:
        if self.global_batch_tokens is not None:
            per_step = self.batch_size * self.block_size * self.devices * self.nnodes
            if self.global_batch_tokens % per_step:
                raise ValueError(
                    f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of batch_size x block_size x "
                    f"devices x nnodes ({per_step})"
                )
        return self

    @property
    def accum_steps(self) -> int:
        if self.global_batch_tokens is None:
            return self.grad_accum_steps
        return self.global_batch_tokens // (self.batch_size * self.block_size * self.devices * self.nnodes)


class FinetuneConfig(TrainConfig):
    """Sequence-classification fine-tuning from the pretrained LM."""

    max_steps: int = Field(300, ge=1, description="Optimizer steps to train for.")
    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    max_length: int = Field(64, ge=4, description="Texts are truncated to this many tokens.")
    truncation_side: Literal["right", "left"] = Field(
        "right", description="Which end of a text longer than max_length is cut: 'right' keeps the beginning, 'left' "
        "keeps the end.",
    )
    eval_every: int = Field(100, ge=1, description="Steps between validation passes.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between resumable checkpoints.")
    init_from: str | None = Field(
        None, description="Fine-tune this Hugging Face checkpoint (a local directory or hub name; decoders and "
        "encoders such as BERT) with its own tokenizer instead of the pipeline's pretrained LM.",
    )
    method: Literal["full", "lora"] = Field(
        "full", description="'full': train every weight; 'lora': train low-rank adapters (peft) and the "
        "classification head, then merge them into the saved model.",
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    lora_target_modules: list[str] = Field(
        default_factory=list, description="Module names that get adapters; empty: peft's default for the "
        "architecture (GPT-2: c_attn; Llama: q_proj, v_proj; BERT: query, value).",
    )
    group_by_length: bool = Field(
        True, description="Batch texts of similar length together (less padding); batches are still drawn in "
        "random order.",
    )
    length_group_batches: int = Field(
        50, ge=1, description="With group_by_length: texts are sorted by length within windows of this many batches.",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="'balanced': weight each class's loss by n / (classes x count), for imbalanced sets.",
    )
    lm_loss_weight: float = Field(
        0.0, ge=0, description="Weight of an auxiliary next-token loss on the training texts, added to the "
        "classification loss (GPT-1's fine-tuning objective); 0 turns it off. Causal LMs only.",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validation passes without a better macro-F1 (null: never).",
    )
    dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout while fine-tuning, on the model's embeddings, attention and hidden "
        "states (null: the checkpoint's own, as it was pretrained).",
    )
    restore_best: bool = Field(
        True, description="Keep the weights of the validation pass with the best macro-F1, not the last step's.",
    )

    _init_from = field_validator("init_from")(_local_name)


class EvaluateConfig(Section):
    """Evaluation settings."""

    samples: int = Field(3, ge=0, description="Text samples generated from the LM for the report.")
    sample_tokens: int = Field(40, ge=1, description="New tokens per generated sample.")
    sample_prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(
        None, max_length=20, description="Prompts the LM samples continue, in the corpus' language (default: three "
                                         "English prompts: 'The', 'I thought the film', 'In the morning').")
    batch_size: int = Field(64, ge=1, description="Batch size for evaluation passes.")
    calibration_bins: int = Field(15, ge=1, le=1000, description="Equal-width confidence bins for the expected "
                                  "calibration error.")
    confident_mistakes: int = Field(10, ge=0, description="Most confident wrong test predictions listed in the report.")
    lm_heldout_paths: list[str] = Field(
        default_factory=list, description="UTF-8 text files scored by the LM as external held-out sets (perplexity "
        "and bits per byte), e.g. WikiText-2 valid.txt and test.txt.",
    )
    lm_heldout_max_tokens: int | None = Field(
        200_000, ge=1, description="Score at most this many tokens of each held-out file (null: all of it).",
    )

    _paths = field_validator("lm_heldout_paths")(_local_paths)


class RegistryConfig(Section):
    """MLflow tracking and model registry."""

    model_name: str = Field(
        "llmpipe-sentiment", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="Registered model name for the classifier.",
    )
    experiment: str = Field("llmpipe", min_length=1, description="MLflow experiment name.")
    metric: Literal["accuracy", "macro_f1"] = Field(
        "accuracy", description="Test metric that decides whether a new version becomes champion."
    )
    champion_alias: str = Field("champion", description="Alias given to the best version.")
    challenger_alias: str = Field("challenger", description="Alias given to a new version that did not win.")
    lm_model_name: str | None = Field(
        None, min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="Registered model name for the language model; default: '<model_name>-lm'.",
    )
    significance_test: Literal["bootstrap", "mcnemar"] = Field(
        "bootstrap", description="Gate test on the paired test-set predictions: 'bootstrap' resamples the metric, "
        "'mcnemar' is the exact test on the rows only one model gets right.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="A new version replaces the champion only if the test's p-value is below this."
    )
    margin: float = Field(
        0.0, ge=0, lt=1, description="A new version replaces the champion only if its metric is higher by more than this."
    )
    bootstrap_samples: int = Field(2000, ge=100, le=100_000, description="Resamples for the paired bootstrap test.")
    baseline_floor: Literal["majority", "tfidf_logreg"] = Field(
        "majority", description="The quality floor: before it can become champion, a version must beat the majority "
        "class ('majority'), or the majority class and TF-IDF + logistic regression ('tfidf_logreg'), on the test "
        "split, significantly (the gate's test at alpha 0.05). A version below it is registered without an alias.",
    )
    ui_url: str | None = Field(
        None, pattern=r"^https?://", description="MLflow UI address (http or https) for links in Prefect artifacts; "
        "default: the tracking URI when it is http(s), else http://127.0.0.1:5000 (`mlflow ui`).",
    )

    @model_validator(mode="after")
    def _distinct_aliases(self) -> RegistryConfig:
        if self.champion_alias == self.challenger_alias:
            raise ValueError(f"champion_alias and challenger_alias must differ (both {self.champion_alias!r})")
        return self

    @property
    def lm_name(self) -> str:
        return self.lm_model_name or f"{self.model_name}-lm"


class RuntimeConfig(Section):
    """Process-level settings."""

    threads: int = Field(0, ge=0, description="torch threads per training process; 0 means all cores.")
    stage_timeout_s: float = Field(
        3600, gt=0, description="Time limit of each stage other than training (ingestion, tokenizer, tokenize, "
        "evaluation, registration): past it the stage fails as timed out, and is retried.",
    )
    training_timeout_s: float = Field(
        86400, gt=0, description="Time limit of a training stage whose max_time_s is not set; past it the stage "
        "fails as timed out, and is not retried.",
    )
    timeout_margin_s: float = Field(
        900, ge=0, description="Added to pretrain.max_time_s or finetune.max_time_s for that stage's time limit: "
        "room for start-up, compilation, evaluation and saving.",
    )

    def stage_timeout(self, stage: str, train: TrainConfig | None = None) -> float:
        """The time limit of ``stage``: training stages from their time budget plus the margin."""
        if train is None:
            return self.stage_timeout_s
        return train.max_time_s + self.timeout_margin_s if train.max_time_s else self.training_timeout_s


class PipelineConfig(Section):
    """Everything one pipeline run needs; defaults are the quickstart."""

    seed: int = Field(0, ge=0, description="Seed for data generation, splits, initialisation and batch order.")
    workspace: str = Field(".llmpipe", validate_default=True, description="Folder for content-addressed artifacts "
                           "and Prefect's home (made absolute against the working directory, links resolved).")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="Pretraining corpus.")
    labeled: LabeledConfig = Field(default_factory=LabeledConfig, description="Labeled data for fine-tuning.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer training.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Language-model architecture.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining loop.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tuning loop.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow registry.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Runtime.")

    _workspace = field_validator("workspace")(local_path)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        problems = []
        if self.pretrain.block_size > self.model.n_positions:
            problems.append(f"pretrain.block_size ({self.pretrain.block_size}) exceeds model.n_positions "
                            f"({self.model.n_positions})")
        if self.finetune.init_from is None and self.finetune.max_length > self.model.n_positions:
            problems.append(f"finetune.max_length ({self.finetune.max_length}) exceeds model.n_positions "
                            f"({self.model.n_positions})")
        if self.model.init_from and not self.tokenizer.pretrained:
            problems.append("model.init_from continues a checkpoint, which needs the tokenizer it was trained with: "
                            "set tokenizer.pretrained to it (for example the same folder); a tokenizer trained on "
                            "the corpus would give its embeddings other meanings")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _is_text_field(dotted: str) -> bool:
    """Whether the dotted path names a plain string field (whose value must not be read as YAML)."""
    model: Any = PipelineConfig
    field = None
    for key in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return False
        field = fields[key]
        model = field.annotation
    return field is not None and field.annotation in (str, str | None)


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """Parse ``KEY=VALUE`` strings. Values of text fields are taken as written; others are read as YAML
    (``100``, ``1e-3``, ``true``, ``null``, ``[a.txt, b.txt]``)."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        if _is_text_field(key):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
        out.append((key, value))
    return out


def resolve_preset(name_or_path: str) -> Path:
    """A preset name from ``configs/`` (``quickstart``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {', '.join(known) or 'none'}")


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        shown = "" if isinstance(given, dict) or e["type"] == "extra_forbidden" else f" (got {given!r})"
        lines.append(f"  {field}: {msg}{shown}")
    return f"invalid config ({len(lines)} error{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines)


def load_config(config: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Build the effective config: defaults, then a YAML preset or file, then ``--set`` overrides.

    Raises ``ConfigError`` naming every bad field.
    """
    data: dict[str, Any] = {}
    if config:
        path = resolve_preset(config)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to scalar values, for MLflow params."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
