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
    for paths in ([str(data / ".." / "outside" / "secret.txt")], [str(data / "link.txt")],
                  [f"{place['root']}/**/*.txt"]):
        cfg = tiny_config(place["ws"], f"corpus.sources=[{{kind: files, paths: {json.dumps(paths)}}}]")
        assert "outside the allowed data folders" in _refused(cfg, policy), paths
    # A glob lists the folder without following links: the link it meets is refused, its target never named.
    cfg = tiny_config(place["ws"], f"corpus.sources=[{{kind: files, paths: ['{data}/*.txt']}}]")
    message = _refused(cfg, policy)
    assert "links are not followed" in message and "secret" not in message
    cfg = tiny_config(place["root"] / "ws-sibling")  # a sibling whose name starts like the allowed folder's
    assert "workspace:" in _refused(cfg, Policy.from_env({"LLMPIPE_WORKSPACE_DIRS": str(place["ws"])}))


def test_artifact_references_are_rebuilt_from_the_runs_workspace_by_fingerprint(place) -> None:
    ws = Workspace(place["ws"])
    lm = ws.materialize(CheckpointRef, "0123456789abcdef0123", lambda out: {"n": 1}, stage="test")
    other = Workspace(place["outside"]).materialize(CheckpointRef, "0123456789abcdef0124", lambda out: {},
                                                    stage="test")
    cfg = tiny_config(place["ws"])
    policy = Policy.from_env({"LLMPIPE_WORKSPACE_DIRS": str(place["ws"])})
    assert check_config(cfg, policy, refs={"lm": lm}) == {"lm": lm.model_copy(update={"reused": True})}
    # Nothing of a ref but its type and fingerprint is used: its path, kind and meta are rebuilt from the workspace.
    forged = CheckpointRef(kind=str(place["outside"]), fingerprint=lm.fingerprint, path=str(other.dir),
                           meta={"forged": True})
    rebuilt = check_config(cfg, policy, refs={"lm": forged})["lm"]
    assert (rebuilt.kind, rebuilt.path, rebuilt.meta) == ("checkpoints", str(lm.dir), {"n": 1})
    # Another workspace's artifact (an absolute kind used to reach it) is not in this one: refused.
    absolute_kind = CheckpointRef(kind=str(place["outside"] / "checkpoints"), fingerprint=other.fingerprint,
                                  path=str(other.dir))
    assert "lm: must name a complete checkpoints artifact" in _refused(cfg, policy, refs={"lm": absolute_kind})
    traversal = lm.model_copy(update={"fingerprint": "../../outside"})
    assert "lm:" in _refused(cfg, policy, refs={"lm": traversal})


def test_registry_settings_are_the_operators_not_a_runs(place) -> None:
    policy = Policy.from_env({"LLMPIPE_WORKSPACE_DIRS": str(place["ws"])})
    check_config(tiny_config(place["ws"]), policy)  # the defaults are the operator's when nothing else is said
    message = _refused(tiny_config(place["ws"], "registry.model_name=someone-elses-model", "registry.alpha=0.99",
                                   "registry.champion_alias=x", "registry.challenger_alias=champion"), policy)
    for field in ("registry.model_name", "registry.alpha", "registry.champion_alias", "registry.challenger_alias"):
        assert f"{field}: set by the worker's operator, not by a run" in message, field
    assert "LLMPIPE_REGISTRY" in message
    # The deployment's own parameters are the operator's; LLMPIPE_REGISTRY wins over them.
    deployed = {"registry": {"model_name": "team-model", "alpha": 0.01}}
    cfg = tiny_config(place["ws"], "registry.model_name=team-model", "registry.alpha=0.01")
    check_config(cfg, policy, deployed=deployed)
    assert "registry.model_name" in _refused(tiny_config(place["ws"]), policy, deployed=deployed)
    env = {"LLMPIPE_WORKSPACE_DIRS": str(place["ws"]), "LLMPIPE_REGISTRY": "model_name=night,margin=0.01"}
    check_config(tiny_config(place["ws"], "registry.model_name=night", "registry.margin=0.01",
                             "registry.alpha=0.01"), Policy.from_env(env), deployed=deployed)
    with pytest.raises(ConfigError, match="LLMPIPE_REGISTRY: unknown settings"):
        Policy.from_env({"LLMPIPE_REGISTRY": "ui_url=http://x"})
    with pytest.raises(ConfigError, match=r"LLMPIPE_REGISTRY .*invalid \(alpha\)"):
        Policy.from_env({"LLMPIPE_REGISTRY": "alpha=2"})


def test_operator_limits_refuse_runs_that_ask_for_too_much(place) -> None:
    policy = Policy.from_env({"LLMPIPE_WORKSPACE_DIRS": str(place["ws"])})
    greedy = tiny_config(place["ws"], "pretrain.devices=4096", "pretrain.max_steps=100000000",
                         "model.n_layer=200", "model.n_embd=8192", "model.n_head=64", "runtime.threads=100000",
                         "runtime.training_timeout_s=3e9", "corpus.sources=[{kind: sample, documents: 100000000}]",
                         "evaluate.confident_mistakes=100000")
    message = _refused(greedy, policy)
    for field, limit in [("pretrain.devices", "devices=8"), ("pretrain.max_steps", "steps="), ("model", "params="),
                         ("runtime.threads", "threads="), ("runtime.training_timeout_s", "stage_timeout_s="),
                         ("corpus.sources[0].documents", "documents="), ("evaluate.confident_mistakes", "examples=")]:
        line = next((x for x in message.splitlines() if x.strip().startswith(field + ":")), "")
        assert f"over the operator's limit {limit}" in line and "LLMPIPE_LIMITS" in line, (field, message)
    generous = Policy.from_env({"LLMPIPE_WORKSPACE_DIRS": str(place["ws"]), "LLMPIPE_LIMITS": "devices=4096"})
    assert "pretrain.devices" not in _refused(greedy, generous)
    with pytest.raises(ConfigError, match="LLMPIPE_LIMITS: unknown limit"):
        Policy.from_env({"LLMPIPE_LIMITS": "gpus=2"})
