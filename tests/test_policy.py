"""What a run created through the Prefect API may reach (tasks/policy.py): the operator's folders and
capabilities, resolved paths, artifact references of the run's own workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.artifacts import CheckpointRef, Workspace
from tasks.errors import ConfigError
from tasks.policy import Policy, PolicyError, check_config
from tests.support import tiny_config


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
