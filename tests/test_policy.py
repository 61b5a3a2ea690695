"""What a run created through the Prefect API may reach (tasks/policy.py), which failures are retried, and the
work-pool templates that keep a run from choosing what the worker starts."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import tiny_config

from flows import deploy
from flows.retries import StageTimeout, is_transient
from tasks.artifacts import CheckpointRef, Workspace
from tasks.errors import ConfigError, DataError
from tasks.policy import Policy, PolicyError, check_config


def _refused(cfg, policy: Policy, **kw) -> str:
    with pytest.raises(PolicyError) as refused:
        check_config(cfg, policy, **kw)
    return str(refused.value)


@pytest.fixture
def place(tmp_path: Path) -> dict[str, Path]:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (data / "a.txt").write_text("some text\n")
    (outside / "secret.txt").write_text("HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123\n")
    return {"root": tmp_path, "data": data, "outside": outside, "ws": tmp_path / "ws"}


def test_the_default_policy_admits_the_built_in_sample_in_the_default_workspace(place) -> None:
    check_config(tiny_config(place["root"] / ".llmpipe"), Policy.from_env({}, cwd=place["root"]))


def test_every_field_that_reaches_out_is_refused_naming_it_and_the_setting(place) -> None:
    cfg = tiny_config(place["ws"], f"corpus.sources=[{{kind: files, paths: [{place['outside'] / 'secret.txt'}]}}, "
                      "{kind: hub, name: wikitext, data_files: ['https://203.0.113.9/x.csv']}]",
                      f"labeled.source={{kind: files, train: {place['outside'] / 'secret.txt'}}}",
                      "tokenizer.pretrained=gpt2", "model.trust_remote_code=true", "finetune.init_from=bert-base-cased",
                      f"evaluate.lm_heldout_paths=[{place['outside'] / 'secret.txt'}]", "pretrain.nnodes=2")
    message = _refused(cfg, Policy.from_env({}, cwd=place["root"]), job_variables={"command": "sh", "env": {}})
    for field, setting in [("workspace", "LLMPIPE_WORKSPACE_DIRS"), ("corpus.sources[0].paths", "LLMPIPE_DATA_DIRS"),
                           ("corpus.sources[1].name", "LLMPIPE_ALLOW=hub"),
                           ("corpus.sources[1].data_files", "LLMPIPE_ALLOW=urls"),
                           ("labeled.source.train", "LLMPIPE_DATA_DIRS"), ("tokenizer.pretrained", "LLMPIPE_ALLOW=hub"),
                           ("model.trust_remote_code", "LLMPIPE_ALLOW=remote_code"),
                           ("finetune.init_from", "LLMPIPE_ALLOW=hub"),
                           ("evaluate.lm_heldout_paths", "LLMPIPE_DATA_DIRS"),
                           ("pretrain.nnodes", "LLMPIPE_ALLOW=multinode"), ("job_variables.command", "job template"),
                           ("job_variables.env", "job template")]:
        line = next((x for x in message.splitlines() if x.strip().startswith(field + ":")), None)
        assert line is not None and setting in line, (field, message)
    assert "hf_abcdefghij" not in message  # a refusal reads no file


def test_the_operator_widens_what_runs_may_reach(place) -> None:
    cfg = tiny_config(place["ws"], f"corpus.sources=[{{kind: files, paths: ['{place['data']}/*.txt']}}]",
                      "tokenizer.pretrained=gpt2", "model.trust_remote_code=true")
    policy = Policy.from_env({"LLMPIPE_DATA_DIRS": str(place["data"]), "LLMPIPE_WORKSPACE_DIRS": str(place["ws"]),
                              "LLMPIPE_ALLOW": "hub,remote_code"}, cwd=place["root"])
    check_config(cfg, policy)
    with pytest.raises(ConfigError, match="LLMPIPE_ALLOW: unknown capabilities"):
        Policy.from_env({"LLMPIPE_ALLOW": "everything"})


def test_paths_are_resolved_so_dots_and_symlinks_cannot_leave_the_data_folder(place) -> None:
    data = place["data"]
    (data / "link.txt").symlink_to(place["outside"] / "secret.txt")
    policy = Policy.from_env({"LLMPIPE_DATA_DIRS": str(data), "LLMPIPE_WORKSPACE_DIRS": str(place["ws"])},
                             cwd=place["root"])
    for paths in ([str(data / ".." / "outside" / "secret.txt")], [str(data / "link.txt")], [f"{data}/*.txt"],
                  [f"{place['root']}/**/*.txt"]):
        cfg = tiny_config(place["ws"], f"corpus.sources=[{{kind: files, paths: {json.dumps(paths)}}}]")
        assert "outside the allowed data folders" in _refused(cfg, policy), paths
    cfg = tiny_config(place["root"] / "ws-sibling")  # a sibling whose name starts like the allowed folder's
    assert "workspace:" in _refused(cfg, Policy.from_env({"LLMPIPE_WORKSPACE_DIRS": str(place["ws"])}))


def test_artifact_references_must_be_complete_artifacts_of_the_runs_workspace(place) -> None:
    ws = Workspace(place["ws"])
    lm = ws.materialize(CheckpointRef, "0123456789abcdef0123", lambda out: {}, stage="test")
    cfg = tiny_config(place["ws"])
    policy = Policy.from_env({"LLMPIPE_WORKSPACE_DIRS": str(place["ws"])})
    check_config(cfg, policy, refs={"lm": lm})
    elsewhere = lm.model_copy(update={"path": str(place["outside"])})
    assert "lm: must name a complete checkpoints artifact" in _refused(cfg, policy, refs={"lm": elsewhere})
    traversal = lm.model_copy(update={"fingerprint": "../../outside"})
    assert "lm:" in _refused(cfg, policy, refs={"lm": traversal})


@pytest.mark.parametrize(("exc", "training", "retried"), [
    (OSError(errno.EIO, "I/O error"), False, True),
    (OSError(errno.ESTALE, "stale file handle"), False, True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), False, True),
    (TimeoutError("read timed out"), False, True),
    (OSError(errno.ENOSPC, "No space left on device"), False, False),
    (OSError(errno.EROFS, "read-only file system"), False, False),
    (FileNotFoundError(errno.ENOENT, "missing"), False, False),
    (ValueError("bad value"), False, False),
    (RuntimeError("torchrun exited with code 1"), False, False),
    (DataError("bad row"), False, False),
    (StageTimeout("stage evaluate-lm ran past its time limit"), False, True),
    (StageTimeout("stage pretrain ran past its time limit"), True, False),
])
def test_only_what_can_succeed_is_retried(exc: BaseException, training: bool, retried: bool) -> None:
    assert is_transient(exc, training) is retried


def test_library_errors_are_classified_by_what_they_wrap() -> None:
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    assert is_transient(torch.OutOfMemoryError("CUDA out of memory")) is False
    assert is_transient(MlflowException("API request failed", error_code=INTERNAL_ERROR)) is True
    assert is_transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)) is False
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("the hub could not be reached") from inner
    except RuntimeError as outer:
        assert is_transient(outer) is True


def test_llmpipe_process_pools_accept_no_command_env_or_working_dir() -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = deploy.process_job_template()
    assert not {"command", "env", "working_dir"} & set(template["variables"]["properties"])
    assert not {"command", "env", "working_dir"} & set(template["job_configuration"])
    assert template["variables"]["additionalProperties"] is False
    WorkPoolCreate(name="cpu", type="process", base_job_template=template)  # Prefect's own template checks
    assert deploy.overridable(ProcessWorker.get_default_base_job_template()) == ["command", "env", "working_dir"]
    assert deploy.overridable(template) == []


def test_kubernetes_template_fixes_what_starts_where_and_with_which_credentials() -> None:
    template = json.loads((deploy.DEPLOY_DIR / "kubernetes-gpu-job-template.json").read_text())
    variables = template["variables"]
    fixed = {"image", "command", "env", "namespace", "service_account_name", "cluster_config", "workspace_claim"}
    assert not fixed & set(variables["properties"]) and variables["additionalProperties"] is False
    job = template["job_configuration"]
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/llmpipe:latest"
    assert job["namespace"] == job["job_manifest"]["metadata"]["namespace"] == "llmpipe"
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert job["command"] is None and job["cluster_config"] is None
    assert "{{" not in json.dumps([job["env"], pod["volumes"], pod["containers"][0]["image"]])
