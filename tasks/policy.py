"""What a run's parameters may reach: the worker operator's settings, checked against an untrusted config.

Two roles. The **operator** runs the command line or the worker and sets its environment: trusted. Anyone
who can **create a run** (the Prefect UI form, ``prefect deployment run``, the API, a schedule someone
edits, an event that triggers a deployment) is not: such a run's config may not make the worker run
foreign code, read files outside the folders the operator named, write outside the workspace folders the
operator named, or reach the network. ``llmpipe run`` on the command line is the operator and is not
checked at all.

The operator's settings, read from the worker's environment:

- ``LLMPIPE_DATA_DIRS``: folders (``os.pathsep``-separated) that runs may read data, tokenizers and
  checkpoints from. Default: none, so runs use the built-in sample data.
- ``LLMPIPE_WORKSPACE_DIRS``: folders a run's ``workspace`` may be in. Default: ``./.llmpipe`` of the
  worker's working directory (the default workspace).
- ``LLMPIPE_ALLOW``: a comma-separated list of capabilities: ``hub`` (data sets, tokenizers and models
  downloaded from the Hugging Face Hub by name), ``urls`` (data files given as URLs), ``remote_code``
  (``model.trust_remote_code``: the checkpoint's own Python code runs), ``multinode`` (torchrun
  rendezvous with other hosts, ``pretrain.nnodes`` > 1), ``quote_data`` (error messages and reports may quote
  what was read from the run's files).
- ``LLMPIPE_REGISTRY``: the registry settings that decide what is registered, loaded and crowned
  (``REGISTRY_FIELDS``), as ``key=value`` pairs separated by commas; a setting not given is the deployment's own
  parameter (what the operator deployed with ``llmpipe deploy --config``), else the default. A run that asks for
  another value is refused.
- ``LLMPIPE_LIMITS``: caps on what a run may ask for, ``key=value`` pairs separated by commas over ``LIMITS``'
  defaults.

The check is by value, before any stage; what the stages then read is confined too (``tasks.confine``): every
stage attempt re-runs this check and reads local files only inside the data folders, without following links.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import confine
from tasks.artifacts import MANIFEST, ArtifactRef, Workspace
from tasks.config import PipelineConfig, RegistryConfig, is_local, is_url
from tasks.errors import ConfigError, DataError, PolicyError
from tasks.redact import redact

DATA_DIRS_ENV = "LLMPIPE_DATA_DIRS"
WORKSPACE_DIRS_ENV = "LLMPIPE_WORKSPACE_DIRS"
ALLOW_ENV = "LLMPIPE_ALLOW"
REGISTRY_ENV = "LLMPIPE_REGISTRY"
LIMITS_ENV = "LLMPIPE_LIMITS"
CAPABILITIES = {
    "hub": "downloads from the Hugging Face Hub by name",
    "urls": "data files given as URLs",
    "remote_code": "model.trust_remote_code (the checkpoint's own Python code runs on the worker)",
    "multinode": "torchrun rendezvous with other hosts (pretrain.nnodes > 1)",
    "quote_data": "error messages and reports quote what was read from the run's files",
}
# The registry settings that decide which model is registered under which name, which one is loaded to be compared,
# and which one is crowned: the operator's, never a run's.
REGISTRY_FIELDS = ("model_name", "lm_model_name", "champion_alias", "challenger_alias", "metric",
                   "significance_test", "alpha", "margin", "bootstrap_samples", "baseline_floor")
# Caps on what one run may ask for: name -> (default, what it caps). ``threads``' default is the worker's cores.
LIMITS: dict[str, tuple[float, str]] = {
    "devices": (8, "pretrain.devices (processes per node)"),
    "steps": (1_000_000, "pretrain.max_steps and finetune.max_steps"),
    "params": (2e9, "the LM's parameters, estimated as 12 x n_layer x n_embd^2 + (vocab_size + n_positions) x n_embd"),
    "seq_len": (8192, "model.n_positions, pretrain.block_size and finetune.max_length"),
    "documents": (10_000_000, "generated sample documents and labeled rows"),
    "threads": (os.cpu_count() or 1, "runtime.threads"),
    "stage_timeout_s": (7 * 86_400, "every stage's time limit (runtime.stage_timeout_s, runtime.training_timeout_s, "
                        "max_time_s + runtime.timeout_margin_s, pretrain.distributed_timeout_s)"),
    "examples": (20, "texts quoted in reports (evaluate.samples, evaluate.confident_mistakes)"),
}
# Work-pool job variables that decide what runs and where: a run may never set them (the pools llmpipe creates
# do not even accept them; this also covers a pool created from Prefect's default template).
PROTECTED_JOB_VARIABLES = ("command", "env", "working_dir", "image", "service_account_name", "namespace")
_FINGERPRINT = re.compile(r"^[0-9a-f]{20}$")


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """``key=value,key=value`` from an environment variable."""
    out = {}
    for item in env.get(name, "").split(","):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{name}: expected key=value pairs separated by commas, got {item.strip()!r}")
            out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class Policy:
    """The operator's settings: what untrusted runs may read, write, reach, register and ask for."""

    data_dirs: tuple[Path, ...] = ()
    workspace_dirs: tuple[Path, ...] = ()
    allow: frozenset[str] = frozenset()
    registry: Mapping[str, str] = field(default_factory=dict)  # from LLMPIPE_REGISTRY, checked against RegistryConfig
    limits: Mapping[str, float] = field(default_factory=lambda: {k: v for k, (v, _) in LIMITS.items()})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Policy:
        env = os.environ if environ is None else environ
        base = (cwd or Path.cwd()).resolve()

        def dirs(name: str) -> tuple[Path, ...]:
            return tuple((base / Path(p).expanduser()).resolve() for p in env.get(name, "").split(os.pathsep)
                         if p.strip())

        allow = frozenset(a.strip() for a in env.get(ALLOW_ENV, "").split(",") if a.strip())
        unknown = sorted(allow - CAPABILITIES.keys())
        if unknown:
            raise ConfigError(f"{ALLOW_ENV}: unknown capabilities {unknown}; known: {', '.join(sorted(CAPABILITIES))}")
        registry = _pairs(env, REGISTRY_ENV)
        unknown = sorted(registry.keys() - set(REGISTRY_FIELDS))
        if unknown:
            raise ConfigError(f"{REGISTRY_ENV}: unknown settings {unknown}; known: {', '.join(REGISTRY_FIELDS)}")
        _operator_registry(registry)  # the values are valid registry settings
        limits = {k: v for k, (v, _) in LIMITS.items()}
        for key, value in _pairs(env, LIMITS_ENV).items():
            if key not in LIMITS:
                raise ConfigError(f"{LIMITS_ENV}: unknown limit {key!r}; known: {', '.join(LIMITS)}")
            try:
                limits[key] = float(value)
            except ValueError:
                raise ConfigError(f"{LIMITS_ENV}: {key} must be a number, got {value!r}") from None
        return cls(data_dirs=dirs(DATA_DIRS_ENV), workspace_dirs=dirs(WORKSPACE_DIRS_ENV) or (base / ".llmpipe",),
                   allow=allow, registry=registry, limits=limits)

    def confinement(self, workspace: str | Path) -> confine.Confinement:
        """What a stage of an untrusted run may read: the data folders and the run's own workspace."""
        return confine.Confinement(roots=(*self.data_dirs, Path(workspace).resolve()),
                                   quote_data="quote_data" in self.allow)


def _operator_registry(env_settings: Mapping[str, str], deployed: Mapping[str, Any] | None = None) -> RegistryConfig:
    """The operator's registry settings: the defaults, then the deployment's, then ``LLMPIPE_REGISTRY``."""
    from pydantic import ValidationError

    values = {k: v for k, v in (deployed or {}).items() if k in RegistryConfig.model_fields}
    values.update(env_settings)
    try:
        return RegistryConfig.model_validate(values)
    except ValidationError as exc:
        bad = ", ".join(".".join(map(str, e["loc"])) or "registry" for e in exc.errors())
        raise ConfigError(f"{REGISTRY_ENV} or the deployment's registry parameters: invalid ({bad})") from None


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def estimated_parameters(cfg: PipelineConfig) -> float:
    """The LM's parameters as ``LIMITS['params']`` counts them (blocks, embeddings and positions)."""
    m = cfg.model
    return 12 * m.n_layer * m.n_embd**2 + (cfg.tokenizer.vocab_size + m.n_positions) * m.n_embd


class _Check:
    def __init__(self, policy: Policy):
        self.policy = policy
        self.problems: list[str] = []

    def refuse(self, field: str, why: str, setting: str) -> None:
        self.problems.append(f"{field}: {why}; {setting}")

    def capability(self, field: str, what: str, capability: str) -> bool:
        if capability in self.policy.allow:
            return True
        self.refuse(field, f"{what} is not allowed", f"the worker's operator allows it with {ALLOW_ENV}={capability}")
        return False

    def readable(self, field: str, value: str) -> None:
        """A local path, or every file a glob pattern matches, inside the data folders: listed the way the stages
        list it (``tasks.confine``: no links followed, no ``..``, a time and entry budget)."""
        where = f"the worker's operator allows folders with {DATA_DIRS_ENV}"
        roots = self.policy.data_dirs
        if not roots:
            self.refuse(field, "reading local files is not allowed (no data folders are set)", where)
            return
        path = Path(value)
        if not _inside(path, roots) and not _inside(Path(os.path.normpath(path)), roots):
            self.refuse(field, f"{value} is outside the allowed data folders", where)
            return
        try:
            with confine.confined(confine.Confinement(roots)):
                confine.glob_files(value, field)
        except PolicyError as exc:
            self.problems.append(f"{exc}; {where}")
        except DataError:
            pass  # missing or empty: the stage says so, naming the field

    def source(self, field: str, name: str, what: str) -> None:
        """A name that is either a local path (data folders) or a Hub name (capability 'hub')."""
        if is_url(name):
            self.capability(field, f"{what} from a URL", "urls")
        elif is_local(name):
            self.readable(field, name)
            if Path(name).is_dir():
                self.dataset_folder(field, Path(name))
        else:
            self.capability(field, f"{what} from the Hugging Face Hub", "hub")

    def dataset_folder(self, field: str, folder: Path) -> None:
        """A local data set folder whose README.md declares data files (``configs``: the ``datasets`` library
        would read them, wherever they are): refused. llmpipe reads only the folder's own files."""
        from huggingface_hub import RepoCard

        try:
            with confine.confined(confine.Confinement(self.policy.data_dirs)), \
                    confine.open_file(folder / "README.md", field) as f:
                card = RepoCard(f.read(1 << 20).decode("utf-8", errors="replace"), ignore_metadata_errors=True)
        except PolicyError as exc:  # a link, or outside
            self.problems.append(f"{exc}; the worker's operator allows folders with {DATA_DIRS_ENV}")
            return
        except (DataError, OSError):
            return  # no README
        if card.data.to_dict().get("configs"):
            self.refuse(field, f"{folder}'s README.md declares data files (configs), which a run may not choose",
                        "llmpipe reads a data set folder's own files; name files with kind: files instead")

    def registry(self, cfg: PipelineConfig, deployed: Mapping[str, Any] | None) -> None:
        operator = _operator_registry(self.policy.registry, (deployed or {}).get("registry"))
        for name in REGISTRY_FIELDS:
            asked, fixed = getattr(cfg.registry, name), getattr(operator, name)
            if asked != fixed:
                self.refuse(f"registry.{name}", f"set by the worker's operator, not by a run (asked {asked!r}, the "
                            f"operator's is {fixed!r})", f"the operator sets it with {REGISTRY_ENV} or the deployment")

    def limits(self, cfg: PipelineConfig) -> None:
        cap = self.policy.limits
        timeouts = {"runtime.stage_timeout_s": cfg.runtime.stage_timeout_s,
                    "runtime.training_timeout_s": cfg.runtime.training_timeout_s,
                    "pretrain.distributed_timeout_s": cfg.pretrain.distributed_timeout_s or 0,
                    **{f"{s}.max_time_s": getattr(cfg, s).max_time_s + cfg.runtime.timeout_margin_s
                       for s in ("pretrain", "finetune") if getattr(cfg, s).max_time_s}}
        labeled = cfg.labeled.source
        asked: list[tuple[str, str, float]] = [
            ("pretrain.devices", "devices", cfg.pretrain.devices),
            ("pretrain.max_steps", "steps", cfg.pretrain.max_steps),
            ("finetune.max_steps", "steps", cfg.finetune.max_steps),
            ("model", "params", estimated_parameters(cfg)),
            ("model.n_positions", "seq_len", cfg.model.n_positions),
            ("pretrain.block_size", "seq_len", cfg.pretrain.block_size),
            ("finetune.max_length", "seq_len", cfg.finetune.max_length),
            ("runtime.threads", "threads", cfg.runtime.threads),
            ("evaluate.samples", "examples", cfg.evaluate.samples),
            ("evaluate.confident_mistakes", "examples", cfg.evaluate.confident_mistakes),
            *((f"corpus.sources[{i}].documents", "documents", s.documents)
              for i, s in enumerate(cfg.corpus.sources) if s.kind == "sample"),
            *((f"labeled.source.{k}", "documents", getattr(labeled, k))
              for k in ("train_rows", "eval_rows") if labeled.kind == "sample"),
            *((name, "stage_timeout_s", value) for name, value in timeouts.items()),
        ]
        for name, limit, value in asked:
            if value > cap[limit]:
                self.refuse(name, f"{value:g} is over the operator's limit {limit}={cap[limit]:g}",
                            f"the worker's operator sets it with {LIMITS_ENV}")


def admitted_ref(ref: ArtifactRef, workspace: Path) -> ArtifactRef | None:
    """``ref`` rebuilt from ``workspace/<its type's kind>/<fingerprint>`` and the manifest there, or None when that
    is not a complete artifact of the workspace. Nothing of the given ref but its type and fingerprint is used."""
    kind = type(ref).model_fields["kind"].default
    if not _FINGERPRINT.match(ref.fingerprint):
        return None
    path = workspace / kind / ref.fingerprint
    if not (path / MANIFEST).is_file() or path.is_symlink():
        return None
    return Workspace._ref(type(ref), path, "admission", reused=True)


def check_config(cfg: Any, policy: Policy, refs: Mapping[str, Any] | None = None,
                 job_variables: Mapping[str, Any] | None = None,
                 deployed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Refuse an untrusted run's config (a ``PipelineConfig``) that reaches beyond ``policy``.

    ``refs`` are artifact references passed as run parameters (the finetune flow's ``lm`` and ``lm_report``):
    each must name a complete artifact of the run's own workspace, and is returned rebuilt from it (use those,
    never the given ones). ``job_variables`` are the run's work-pool overrides; ``deployed`` is the deployment's
    own ``config`` parameter (the operator's: its registry settings are the ones a run must keep).
    Raises ``PolicyError`` listing every field refused and the setting that would allow it.
    """
    c = _Check(policy)
    workspace = Path(cfg.workspace).resolve()
    if not _inside(workspace, policy.workspace_dirs):
        c.refuse("workspace", f"{workspace} is outside the allowed workspace folders "
                 f"({', '.join(map(str, policy.workspace_dirs))})",
                 f"the worker's operator allows folders with {WORKSPACE_DIRS_ENV}")
    for i, source in enumerate(cfg.corpus.sources):
        field = f"corpus.sources[{i}]"
        if source.kind == "files":
            for pattern in source.paths:
                c.readable(f"{field}.paths", pattern)
        elif source.kind == "hub":
            c.source(f"{field}.name", source.name, "a data set")
            for data_file in source.data_files:
                if is_url(data_file):
                    c.capability(f"{field}.data_files", "a data file given as a URL", "urls")
                else:
                    c.readable(f"{field}.data_files", data_file)
    labeled = cfg.labeled.source
    if labeled.kind == "files":
        for split in ("train", "validation", "test"):
            if getattr(labeled, split):
                c.readable(f"labeled.source.{split}", getattr(labeled, split))
    elif labeled.kind == "hub":
        c.source("labeled.source.name", labeled.name, "a data set")
    if cfg.tokenizer.pretrained:
        c.source("tokenizer.pretrained", cfg.tokenizer.pretrained, "a tokenizer")
    if cfg.model.init_from:
        c.source("model.init_from", cfg.model.init_from, "a checkpoint")
    if cfg.model.trust_remote_code:
        c.capability("model.trust_remote_code", "running a checkpoint's own code", "remote_code")
    if cfg.finetune.init_from:
        c.source("finetune.init_from", cfg.finetune.init_from, "a checkpoint")
    for path in cfg.evaluate.lm_heldout_paths:
        c.readable("evaluate.lm_heldout_paths", path)
    if cfg.pretrain.nnodes > 1:
        c.capability("pretrain.nnodes", "rendezvous with other hosts", "multinode")
    c.registry(cfg, deployed)
    c.limits(cfg)
    admitted: dict[str, Any] = {}
    for name, ref in (refs or {}).items():
        if ref is None:
            admitted[name] = None
            continue
        admitted[name] = admitted_ref(ref, workspace)
        if admitted[name] is None:
            kind = type(ref).model_fields["kind"].default
            c.refuse(name, f"must name a complete {kind} artifact of the run's workspace ({workspace}) by its "
                     "fingerprint", "artifacts are passed between runs by fingerprint within one workspace")
    for key in sorted(set(job_variables or {}) & set(PROTECTED_JOB_VARIABLES)):
        c.refuse(f"job_variables.{key}", "a run may not override what the worker starts or its environment",
                 "the operator sets it in the work pool's base job template")
    if c.problems:
        raise PolicyError(redact(
            "refused before any stage ran: this run was created through the Prefect API (the UI form, a "
            "deployment run, a schedule or an event), and its parameters reach beyond what the worker's operator "
            f"allows ({len(c.problems)} field{'s' if len(c.problems) > 1 else ''}):\n  " + "\n  ".join(c.problems)))
    return admitted
