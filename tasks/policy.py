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
  rendezvous with other hosts, ``pretrain.nnodes`` > 1).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.checkpoints import is_local
from tasks.errors import ConfigError, PolicyError
from tasks.redact import redact

DATA_DIRS_ENV = "LLMPIPE_DATA_DIRS"
WORKSPACE_DIRS_ENV = "LLMPIPE_WORKSPACE_DIRS"
ALLOW_ENV = "LLMPIPE_ALLOW"
CAPABILITIES = {
    "hub": "downloads from the Hugging Face Hub by name",
    "urls": "data files given as URLs",
    "remote_code": "model.trust_remote_code (the checkpoint's own Python code runs on the worker)",
    "multinode": "torchrun rendezvous with other hosts (pretrain.nnodes > 1)",
}
# Work-pool job variables that decide what runs and where: a run may never set them (the pools llmpipe creates
# do not even accept them; this also covers a pool created from Prefect's default template).
PROTECTED_JOB_VARIABLES = ("command", "env", "working_dir", "image", "service_account_name", "namespace")
_FINGERPRINT = re.compile(r"^[0-9a-f]{20}$")


@dataclass(frozen=True)
class Policy:
    """The operator's settings: what untrusted runs may read, write and reach."""

    data_dirs: tuple[Path, ...] = ()
    workspace_dirs: tuple[Path, ...] = ()
    allow: frozenset[str] = frozenset()

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
        return cls(data_dirs=dirs(DATA_DIRS_ENV), workspace_dirs=dirs(WORKSPACE_DIRS_ENV) or (base / ".llmpipe",),
                   allow=allow)


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def is_url(value: str) -> bool:
    return "://" in value


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
        """A local path, or every file a glob pattern matches, inside the data folders."""
        where = f"the worker's operator allows folders with {DATA_DIRS_ENV}"
        roots = self.policy.data_dirs
        if not roots:
            self.refuse(field, "reading local files is not allowed (no data folders are set)", where)
            return
        path = Path(value).expanduser()
        if glob.has_magic(value) and not path.exists():
            fixed = Path(*[part for part in path.parts[: next(i for i, p in enumerate(path.parts)
                                                               if glob.has_magic(p))]] or ["."])
            if not _inside(fixed.resolve(), roots):
                self.refuse(field, f"{value} is outside the allowed data folders", where)
                return
            matches = [Path(m) for m in glob.glob(value, recursive=True)]
        else:
            matches = [path]
        for match in matches:
            if not _inside(match.resolve(), roots):  # symlinks are followed: a link out of the folder is refused
                self.refuse(field, f"{match} is outside the allowed data folders", where)
                return

    def source(self, field: str, name: str, what: str) -> None:
        """A name that is either a local path (data folders) or a Hub name (capability 'hub')."""
        if is_url(name):
            self.capability(field, f"{what} from a URL", "urls")
        elif is_local(name):
            self.readable(field, name)
        else:
            self.capability(field, f"{what} from the Hugging Face Hub", "hub")


def check_config(cfg: Any, policy: Policy, refs: Mapping[str, Any] | None = None,
                 job_variables: Mapping[str, Any] | None = None) -> None:
    """Refuse an untrusted run's config (a ``PipelineConfig``) that reaches beyond ``policy``.

    ``refs`` are artifact references passed as run parameters (the finetune flow's ``lm`` and ``lm_report``):
    each must name a complete artifact of the run's own workspace. ``job_variables`` are the run's work-pool
    overrides. Raises ``PolicyError`` listing every field refused and the setting that would allow it.
    """
    c = _Check(policy)
    workspace = Path(cfg.workspace).expanduser().resolve()
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
    for name, ref in (refs or {}).items():
        if ref is None:
            continue
        expected = workspace / ref.kind / ref.fingerprint
        if not _FINGERPRINT.match(ref.fingerprint) or Path(ref.path).expanduser().resolve() != expected \
                or not (expected / "manifest.json").is_file():
            c.refuse(name, f"must name a complete {ref.kind} artifact of the run's workspace ({workspace})",
                     "artifacts are passed between runs by fingerprint within one workspace")
    for key in sorted(set(job_variables or {}) & set(PROTECTED_JOB_VARIABLES)):
        c.refuse(f"job_variables.{key}", "a run may not override what the worker starts or its environment",
                 "the operator sets it in the work pool's base job template")
    if c.problems:
        raise PolicyError(redact(
            "refused before any stage ran: this run was created through the Prefect API (the UI form, a "
            "deployment run, a schedule or an event), and its parameters reach beyond what the worker's operator "
            f"allows ({len(c.problems)} field{'s' if len(c.problems) > 1 else ''}):\n  " + "\n  ".join(c.problems)))
