"""The one configuration: pydantic models, one per stage, composed into ``PipelineConfig``.

Every field has a type, a default and a description, so the same models serve the CLI (`--set`),
YAML presets and the Prefect UI's parameter form. The defaults are the quickstart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(Section):
    """Where pretraining text comes from."""

    source: Literal["sample", "files"] = Field(
        "sample", description="'sample': the built-in generated English corpus; 'files': local text files."
    )
    paths: list[str] = Field(
        default_factory=list, description="Files or glob patterns of UTF-8 text, used when source='files'."
    )
    text_unit: Literal["file", "line", "paragraph"] = Field(
        "paragraph", description="How a text file splits into documents: whole file, each line, or blank-line-separated blocks."
    )
    sample_documents: int = Field(3000, ge=10, description="Documents generated when source='sample'.")
    validation_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Share of documents held out for validation (chosen by a hash of each document)."
    )
    min_chars: int = Field(1, ge=1, description="Documents shorter than this many characters are dropped.")


class LabeledConfig(Section):
    """Where labeled text for fine-tuning comes from."""

    source: Literal["sample", "files"] = Field(
        "sample", description="'sample': the built-in generated sentiment set; 'files': local CSV/TSV/JSONL files."
    )
    train_path: str | None = Field(None, description="Training file (CSV, TSV or JSONL) when source='files'.")
    validation_path: str | None = Field(None, description="Validation file; split off train (stratified) when absent.")
    test_path: str | None = Field(None, description="Test file; split off train (stratified) when absent.")
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the label (string or integer).")
    has_header: bool = Field(True, description="Whether CSV/TSV files start with a header row.")
    sample_train: int = Field(4000, ge=20, description="Training examples generated when source='sample'.")
    sample_eval: int = Field(500, ge=10, description="Validation and test examples generated when source='sample'.")


class TokenizerConfig(Section):
    """Byte-level BPE tokenizer trained on the pretraining corpus."""

    vocab_size: int = Field(2048, ge=260, le=1_000_000, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    eos_token: str = Field("<|endoftext|>", description="End-of-document token, also used as BOS and UNK.")
    pad_token: str = Field("<|pad|>", description="Padding token for classification batches.")


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
        "building from config; its tokenizer must match the pipeline's."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from init_from (off: safer).")

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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto picks CUDA when present.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slow on most CPUs)."
    )
    compile: bool = Field(False, description="Compile the model with torch.compile before training.")
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
        "ddp", description="Data parallelism: DDP (replicated model) or FSDP (sharded, for models that don't fit)."
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
    eval_every: int = Field(100, ge=1, description="Steps between validation passes.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between resumable checkpoints.")


class EvaluateConfig(Section):
    """Evaluation settings."""

    samples: int = Field(3, ge=0, description="Text samples generated from the LM for the report.")
    sample_tokens: int = Field(40, ge=1, description="New tokens per generated sample.")
    batch_size: int = Field(64, ge=1, description="Batch size for evaluation passes.")


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


class RuntimeConfig(Section):
    """Process-level settings."""

    threads: int = Field(0, ge=0, description="torch threads per training process; 0 means all cores.")


class PipelineConfig(Section):
    """Everything one pipeline run needs; defaults are the quickstart."""

    seed: int = Field(0, ge=0, description="Seed for data generation, splits, initialisation and batch order.")
    workspace: str = Field(".llmpipe", description="Folder for content-addressed artifacts and Prefect's home.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="Pretraining corpus.")
    labeled: LabeledConfig = Field(default_factory=LabeledConfig, description="Labeled data for fine-tuning.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer training.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Language-model architecture.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining loop.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tuning loop.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow registry.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Runtime.")

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        problems = []
        if self.pretrain.block_size > self.model.n_positions:
            problems.append(f"pretrain.block_size ({self.pretrain.block_size}) exceeds model.n_positions "
                            f"({self.model.n_positions})")
        if self.finetune.max_length > self.model.n_positions:
            problems.append(f"finetune.max_length ({self.finetune.max_length}) exceeds model.n_positions "
                            f"({self.model.n_positions})")
        if self.corpus.source == "files" and not self.corpus.paths:
            problems.append("corpus.paths must list at least one file when corpus.source is 'files'")
        if self.labeled.source == "files" and not self.labeled.train_path:
            problems.append("labeled.train_path is required when labeled.source is 'files'")
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
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


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
