"""Tests for the configuration models, presets, ``--set`` overrides and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tasks.config import (
    CONFIG_DIR,
    LabeledFiles,
    LabeledHub,
    LabeledSample,
    PipelineConfig,
    flatten,
    load_config,
    parse_overrides,
    resolve_preset,
    to_yaml,
)
from tasks.errors import ConfigError, LlmpipeError


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted names of every scalar field, read from the model classes themselves (not from flatten); a section
    that is one of several kinds (``labeled.source``) has the fields of its default kind."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)) and info.discriminator:
            ann = type(info.get_default(call_default_factory=True))
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _leaf_fields(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


# ---------------------------------------------------------------- defaults and presets


def test_defaults_are_valid_and_consistent() -> None:
    cfg = PipelineConfig()
    # Re-validating the dumped defaults must succeed and give the same config.
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg
    assert load_config() == cfg
    assert load_config(None, []) == cfg
    assert cfg.pretrain.block_size <= cfg.model.n_positions
    assert cfg.finetune.max_length <= cfg.model.n_positions
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert cfg.tokenizer.vocab_size >= 258
    assert cfg.workspace == str(Path.cwd().resolve() / ".llmpipe")  # normalised once, when validated


def test_every_local_path_is_normalised_once_expanded_absolute_and_resolved(tmp_path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("tiny", [
        "workspace=~/ws", "corpus.sources=[{kind: files, paths: ['link/*.txt', 'link/../data/a.txt']}, "
        "{kind: hub, name: json, data_files: [link/b.jsonl, 'https://203.0.113.9/c.csv']}, {kind: hub, name: imdb}]",
        "labeled.source={kind: files, train: ./link/t.csv}", "tokenizer.pretrained=./link", "finetune.init_from=gpt2",
        "evaluate.lm_heldout_paths=[~/link/v.txt]"])
    data = str(tmp_path.resolve() / "data")
    assert cfg.workspace == str(tmp_path.resolve() / "ws")  # checked and written as the same folder
    assert cfg.corpus.sources[0].paths == [f"{data}/*.txt", f"{data}/a.txt"]
    assert cfg.corpus.sources[1].name == "json"  # a builder's name is no path
    assert cfg.corpus.sources[1].data_files == [f"{data}/b.jsonl", "https://203.0.113.9/c.csv"]
    assert cfg.corpus.sources[2].name == "imdb" and cfg.finetune.init_from == "gpt2"  # Hub names stay names
    assert cfg.labeled.source.train == f"{data}/t.csv" and cfg.tokenizer.pretrained == data
    assert cfg.evaluate.lm_heldout_paths == [f"{data}/v.txt"]
    assert load_config(None, [f"workspace={cfg.workspace}"]).workspace == cfg.workspace  # idempotent


def test_quickstart_preset_equals_defaults() -> None:
    path = CONFIG_DIR / "quickstart.yaml"
    assert resolve_preset("quickstart") == path
    assert load_config("quickstart") == PipelineConfig()
    assert load_config(str(path)) == PipelineConfig()
    # The preset spells out every default, so it is a complete record of the quickstart.
    spelled = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert PipelineConfig.model_validate(spelled).model_dump(mode="json") == PipelineConfig().model_dump(mode="json")
    assert spelled["workspace"] == ".llmpipe"  # as written; validated, it is the absolute folder


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["seed=3", "pretrain.max_steps=11", "registry.model_name=abc"])
    path = tmp_path / "mine.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(str(path)) == cfg


# ---------------------------------------------------------------- overrides


def test_set_overrides_apply_with_correct_types() -> None:
    cfg = load_config(None, ["pretrain.max_steps=5", "pretrain.lr=1e-3"])
    assert cfg.pretrain.max_steps == 5 and type(cfg.pretrain.max_steps) is int
    assert cfg.pretrain.lr == pytest.approx(1e-3) and type(cfg.pretrain.lr) is float
    # Nothing else moved.
    changed = {k for k, v in flatten(cfg).items() if flatten(PipelineConfig())[k] != v}
    assert changed == {"pretrain.max_steps", "pretrain.lr"}
    # The fine-tuning loop keeps its own (different) defaults.
    assert cfg.finetune.max_steps == PipelineConfig().finetune.max_steps
    assert cfg.finetune.lr == PipelineConfig().finetune.lr


def test_overrides_apply_on_top_of_a_preset_and_last_one_wins() -> None:
    cfg = load_config("quickstart", ["seed=1", "seed=2", "model.n_layer=3"])
    assert cfg.seed == 2
    assert cfg.model.n_layer == 3
    assert cfg.model.n_head == PipelineConfig().model.n_head


@pytest.mark.parametrize(
    ("dotted", "raw", "expected"),
    [
        ("seed", "7", 7),
        ("workspace", "runs/ws-a", str(Path.cwd().resolve() / "runs/ws-a")),
        ("tokenizer.vocab_size", "512", 512),
        ("pretrain.max_steps", "42", 42),
        ("pretrain.lr", "0.0005", 0.0005),
        ("pretrain.batch_size", "4", 4),
        ("finetune.max_steps", "9", 9),
        ("finetune.lr", "2e-4", 2e-4),
        ("registry.model_name", "my-model_v1.2", "my-model_v1.2"),
    ],
)
def test_documented_dotted_paths_are_accepted(dotted: str, raw: str, expected: object) -> None:
    cfg = load_config(None, [f"{dotted}={raw}"])
    value = flatten(cfg)[dotted]
    assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected
    assert type(value) is type(expected)
    # Every other field keeps its default.
    defaults = flatten(PipelineConfig())
    assert {k for k, v in flatten(cfg).items() if defaults[k] != v} == {dotted}


def test_parse_overrides_reads_yaml_scalars() -> None:
    assert parse_overrides(["a=1", "b=1.5", "c=true", "d=null", "e=", "f=x=y", " g = word"]) == [
        ("a", 1), ("b", 1.5), ("c", True), ("d", None), ("e", ""), ("f", "x=y"), ("g", "word"),
    ]


@pytest.mark.parametrize("bad", ["pretrain.max_steps", "=5", " =5"])
def test_parse_overrides_rejects_pairs_without_key_or_equals(bad: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides([bad])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, [bad])


# ---------------------------------------------------------------- errors


def test_invalid_config_names_every_bad_field_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["pretrain.lr=-1", "model.n_layer=abc", "pretrain.bogus=1"])
    msg = str(info.value)
    assert "3 errors" in msg
    lines = {line.strip().split(":")[0] for line in msg.splitlines()[1:]}
    assert lines == {"pretrain.lr", "model.n_layer", "pretrain.bogus"}
    assert "pretrain.bogus: unknown key" in msg
    assert "-1" in msg and "'abc'" in msg  # the offending values are shown
    # ConfigError is a user error (never retried) and a ValueError.
    assert isinstance(info.value, LlmpipeError) and isinstance(info.value, ValueError)


def test_unknown_section_and_unknown_key_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pretrian:\n  lr: 0.1\nmodel:\n  n_layers: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    msg = str(info.value)
    assert "pretrian: unknown key" in msg
    assert "model.n_layers: unknown key" in msg


def test_block_size_larger_than_context_is_refused_naming_both_fields() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["pretrain.block_size=256"])
    msg = str(info.value)
    assert "pretrain.block_size" in msg and "model.n_positions" in msg
    assert "256" in msg and "128" in msg
    # Raising the context length makes the same block size valid.
    assert load_config(None, ["pretrain.block_size=256", "model.n_positions=256"]).pretrain.block_size == 256


def test_finetune_max_length_larger_than_context_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"finetune\.max_length.*model\.n_positions"):
        load_config(None, ["finetune.max_length=64", "model.n_positions=32", "pretrain.block_size=32"])


def test_heads_must_divide_hidden_size() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.n_head=3"])
    assert "n_embd" in str(info.value) and "n_head" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["corpus.sources=[{kind: files}]"], "corpus.sources.0.files.paths"),
        (["labeled.source={kind: files}"], "labeled.source.files.train"),
        (["corpus.sources=[{kind: web}]"], "corpus.sources.0"),
        (["tokenizer.vocab_size=257"], "tokenizer.vocab_size"),
        (["registry.model_name=-bad name"], "registry.model_name"),
        (["seed=-1"], "seed"),
    ],
)
def test_other_invalid_values_name_their_field(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, overrides)


def test_yaml_file_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(listing))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_unknown_preset_lists_known_presets() -> None:
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "quickstart" in known
    with pytest.raises(ConfigError) as info:
        load_config("no-such-preset")
    msg = str(info.value)
    assert "'no-such-preset'" in msg
    for name in known:
        assert name in msg


# ---------------------------------------------------------------- flatten


def test_flatten_gives_dotted_scalar_keys() -> None:
    cfg = load_config(None, ["pretrain.lr=0.01", "corpus.sources=[{kind: files, paths: [a.txt, b.txt]}]"])
    flat = flatten(cfg)
    assert set(flat) == _leaf_fields(PipelineConfig)
    assert flat["pretrain.lr"] == 0.01
    assert flat["model.n_layer"] == cfg.model.n_layer
    assert flat["registry.model_name"] == "llmpipe-sentiment"
    assert flat["seed"] == 0
    assert flat["corpus.sources"][0]["paths"] == [str(Path.cwd().resolve() / n) for n in ("a.txt", "b.txt")]  # leaves
    assert not any(isinstance(v, dict) for v in flat.values())
    # A plain dict flattens the same way, with a prefix.
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}, "p.") == {"p.a.b": 1, "p.a.c.d": "x", "p.e": None}


# ---------------------------------------------------------------- values and cross-field checks


@pytest.mark.parametrize(("dotted", "raw"), [("registry.model_name", "2024"), ("workspace", "off")])
def test_set_string_field_to_number_like_value(dotted: str, raw: str) -> None:
    cfg = load_config(None, [f"{dotted}={raw}"])
    assert Path(flatten(cfg)[dotted]).name == raw


def test_every_cross_field_problem_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["pretrain.block_size=256", "finetune.max_length=256"])
    msg = str(info.value)
    assert "pretrain.block_size" in msg and "finetune.max_length" in msg


# ---------------------------------------------------------------- labeled data: kinds of source


def test_labeled_source_is_one_of_four_kinds_each_with_its_options() -> None:
    cfg = load_config(None, ["labeled.source={kind: files, train: a.csv, test: b.csv, has_header: false}"])
    assert cfg.labeled.source == LabeledFiles(train="a.csv", test="b.csv", has_header=False)
    assert load_config("sst2").labeled.source == LabeledHub(name="stanfordnlp/sst2", validation_split=None,
                                                            test_split="validation")
    assert PipelineConfig().labeled.source == LabeledSample(train_rows=4000, eval_rows=500)
    with pytest.raises(ConfigError, match=r"labeled\.source\.files\.train: Field required"):
        load_config(None, ["labeled.source={kind: files}"])
    with pytest.raises(ConfigError, match=r"labeled\.source\.hub\.train: unknown key"):
        load_config(None, ["labeled.source={kind: hub, name: x, train: a.csv}"])


def test_flat_labeled_keys_of_before_still_work_with_a_warning_that_shows_the_new_shape() -> None:
    with pytest.warns(FutureWarning, match=r"labeled\.source: \{kind: files, train: a\.csv, has_header: false\}"):
        cfg = load_config(None, ["labeled.source=files", "labeled.train_path=a.csv", "labeled.has_header=false",
                                 "labeled.hub_name=ignored, as before"])
    assert cfg.labeled.source == LabeledFiles(train="a.csv", has_header=False)
    with pytest.warns(FutureWarning, match="hub_name, hub_test_split"):
        hub = load_config(None, ["labeled.source=hub", "labeled.hub_name=x/y", "labeled.hub_test_split=validation"])
    assert hub.labeled.source == LabeledHub(name="x/y", test_split="validation")
    with pytest.warns(FutureWarning, match="sample_train"):
        assert load_config(None, ["labeled.sample_train=100"]).labeled.source == LabeledSample(train_rows=100)


def test_presets_read_hub_datasets_by_default() -> None:
    sst2, sms = load_config("sst2"), load_config("sms-spam")
    assert sst2.labeled.source.kind == "hub" and sst2.labeled.source.name == "stanfordnlp/sst2"
    assert sst2.labeled.source.test_split == "validation"  # GLUE dev: the usual SST-2 evaluation split
    assert sst2.labeled.split_groups == "contained_text"  # validation holds out whole sentences
    assert [s.kind for s in sst2.corpus.sources] == ["hub"] and sst2.corpus.sources[0].split == "train"
    assert sms.labeled.source.kind == "hub" and sms.labeled.test_fraction == 0.2
    assert sms.corpus.sources[0].kind == "hub"
    imdb = load_config("imdb")
    # Pretraining reads the unlabeled and the training reviews, never the test reviews.
    assert [(s.kind, s.split) for s in imdb.corpus.sources] == [("hub", "unsupervised"), ("hub", "train")]
    assert imdb.labeled.source.test_split == "test" and imdb.labeled.source.validation_split is None
    assert (imdb.labeled.max_train_examples, imdb.labeled.max_test_examples) == (1000, 5000)


def test_sample_prompts_are_bounded() -> None:
    assert load_config("waimai").evaluate.sample_prompts == ["这家店", "味道很", "送餐"]
    assert load_config("tiny").evaluate.sample_prompts is None  # the English prompts, fingerprints as before
    for bad, field in (('evaluate.sample_prompts=[""]', "evaluate.sample_prompts.0"),
                       ("evaluate.sample_prompts=[" + ",".join(["a"] * 21) + "]", "evaluate.sample_prompts"),
                       (f"evaluate.sample_prompts=[{'x' * 201}]", "evaluate.sample_prompts.0")):
        with pytest.raises(ConfigError, match=field):
            load_config("tiny", [bad])
