"""The champion/challenger gate: its paired tests (exact McNemar, paired bootstrap), its decision, and the
quality floor against the baselines."""

from __future__ import annotations

import json
import math
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tasks import gate, metrics
from tasks.artifacts import LabeledRef, Workspace
from tasks.config import LabeledConfig, LabeledFiles, RegistryConfig
from tasks.tracking import FP_TAG


def test_mcnemar_is_the_exact_one_sided_binomial_test() -> None:
    # 10 rows only the candidate gets right, 2 only the champion: P(X >= 10 | n=12, p=1/2).
    cand = np.array([True] * 10 + [False] * 2 + [True] * 30)
    champ = np.array([False] * 10 + [True] * 2 + [True] * 30)
    p, counts = gate.mcnemar_p(cand, champ)
    assert counts == {"only_candidate_right": 10, "only_champion_right": 2}
    assert p == pytest.approx(sum(math.comb(12, k) for k in range(10, 13)) / 2**12)
    assert gate.mcnemar_p(champ, champ)[0] == 1.0


def _paired(n_both: int, only_cand: int, only_champ: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary labels and two prediction vectors with the given agreement pattern."""
    n = n_both + only_cand + only_champ
    y = np.arange(n) % 2
    cand, champ = y.copy(), y.copy()
    champ[n_both : n_both + only_cand] ^= 1
    cand[n_both + only_cand :] ^= 1
    return y, cand, champ


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_gate_promotes_clear_improvements_only(test: str) -> None:
    kw = dict(metric="accuracy", n_labels=2, test=test, alpha=0.05, margin=0.0, samples=500, seed=0)
    clear = gate.compare(*_paired(30, 12, 1), **kw)
    assert clear.promote and clear.p_value < 0.05 and clear.delta == pytest.approx(11 / 43)
    worse = gate.compare(*_paired(30, 1, 12), **kw)
    assert not worse.promote and worse.reason.startswith("not better")
    slight = gate.compare(*_paired(30, 3, 2), **kw)  # better by one row in 35
    assert not slight.promote and slight.delta > 0 and slight.p_value >= 0.05
    assert slight.reason.startswith("improvement not significant")
    tie = gate.compare(*_paired(30, 0, 0), **kw)
    assert not tie.promote and tie.delta == 0
    # Significant but below the margin: refused.
    margin = gate.compare(*_paired(30, 12, 1), **{**kw, "margin": 0.3})
    assert not margin.promote and "margin" in margin.reason


def test_bootstrap_is_deterministic_under_a_seed_and_tests_macro_f1() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    cand = np.where(rng.random(200) < 0.8, y, rng.integers(0, 3, 200))
    champ = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
    a = gate.bootstrap_p(y, cand, champ, "macro_f1", 3, 300, seed=7)
    assert a == gate.bootstrap_p(y, cand, champ, "macro_f1", 3, 300, seed=7)
    assert a < 0.01
    assert gate.bootstrap_p(y, champ, cand, "macro_f1", 3, 300, seed=7) > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_macro_f1_matches_the_evaluation_report(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, pred = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    pred[pred == 3] = 2  # one class never predicted
    expected = metrics.classification_metrics(y, pred, ["a", "b", "c", "d"])["macro_f1"]
    assert metrics.macro_f1(y, pred, 4) == expected  # scikit-learn's number, to the last bit


def test_gate_refuses_unknown_labels_by_name() -> None:
    with pytest.raises(ValueError, match=r"version 3 predicts labels \['spam'\]"):
        gate.label_ids(["ham", "spam"], {"ham": 0, "eggs": 1}, "version 3")


def test_registry_config_validates_the_gate_settings() -> None:
    from tasks.config import load_config
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=r"registry.alpha") as err:
        load_config(None, ["registry.alpha=0", "registry.significance_test=ttest", "registry.margin=-0.1"])
    assert "registry.significance_test" in str(err.value) and "registry.margin" in str(err.value)
    with pytest.raises(ConfigError, match="champion_alias and challenger_alias must differ"):
        load_config(None, ["registry.challenger_alias=champion"])
    assert load_config(None, ["registry.model_name=m"]).registry.lm_name == "m-lm"


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_the_quality_floor_needs_a_significant_win_over_the_baselines(tmp_path: Path, test: str) -> None:
    """The floor a version must clear before it can be champion: the majority class always, TF-IDF + LR on
    request; the gate's test at a fixed alpha that no run parameter changes (registry.alpha=0.9 here)."""
    from tasks import ingest
    from tasks.config import RegistryConfig
    from tasks.sample_data import sentiment_dataset

    data = sentiment_dataset(seed=3, n_train=200, n_validation=40, n_test=60)
    paths = {}
    for split, rows in data.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    labeled = ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(paths["train"]),
                                                                      validation=str(paths["validation"]),
                                                                      test=str(paths["test"]))), Workspace(tmp_path / "ws"))
    _, y_true, label2id = gate.held_out_split(labeled)
    y_true = np.array(y_true)
    reg = RegistryConfig(significance_test=test, alpha=0.9)
    majority_like = np.zeros_like(y_true)  # one class for every row, as the majority baseline predicts
    result, baseline = gate.quality_floor(reg, labeled, majority_like)
    assert not result.promote and baseline == "majority" and result.alpha == gate.FLOOR_ALPHA
    assert "the majority baseline" in result.reason
    near_perfect = y_true.copy()
    near_perfect[:3] = 1 - near_perfect[:3]
    result, baseline = gate.quality_floor(reg, labeled, near_perfect)
    assert result.promote and baseline == "majority" and result.p_value < gate.FLOOR_ALPHA

    # Asked for, TF-IDF + LR is a second, higher floor: a model right on 70% of the rows clears the majority
    # class but not TF-IDF + LR, which gets most of these reviews right.
    tfidf = reg.model_copy(update={"baseline_floor": "tfidf_logreg"})
    fair = y_true.copy()
    fair[: int(0.3 * len(fair))] = 1 - fair[: int(0.3 * len(fair))]
    assert gate.quality_floor(reg, labeled, fair)[0].promote
    result, baseline = gate.quality_floor(tfidf, labeled, fair)
    assert not result.promote and baseline == "tfidf_logreg" and "the tfidf_logreg baseline" in result.reason
    assert gate.quality_floor(tfidf, labeled, y_true)[0].promote


def test_on_chinese_text_the_floor_is_tfidf_over_character_ngrams(tmp_path: Path) -> None:
    """The floor chooses the baseline's features as the evaluation does, on the validation split: on Chinese, character
    n-grams, a real floor (word n-grams would put it near the majority class)."""
    from tasks import evaluate, ingest
    from tests.support import chinese_labeled

    labeled = ingest.ingest_labeled(chinese_labeled(tmp_path / "data"), Workspace(tmp_path / "ws"))
    texts, y_true, label2id = gate.held_out_split(labeled)
    split = {s: evaluate.split_texts(ingest.load_split(labeled, s)) for s in ("train", "validation")}
    proba, info = evaluate.fit_baselines(*split["train"], texts, len(label2id), 0, split["validation"])
    assert info["chosen"] == "char"
    expected = metrics.macro_f1(np.array(y_true), proba["tfidf_logreg"].argmax(1), len(label2id))
    reg = RegistryConfig(baseline_floor="tfidf_logreg", metric="macro_f1")
    fair = np.array(y_true)
    fair[:20] = 1 - fair[:20]  # 80% right: clears the majority class, not character n-grams
    result, baseline = gate.quality_floor(reg, labeled, fair)
    assert not result.promote and baseline == "tfidf_logreg" and result.champion_score == expected > 0.95
    assert "the tfidf_logreg baseline (char_wb 1-3-grams)" in result.reason


# ---------------------------------------------------------------------------------------------- registered versions
# Tiny BERT classifiers that predict one class for every text, saved in the layout register_classifier logs (the
# transformers flavor), registered on the session's SQLite store from a folder, and two labeled sets in one
# workspace: on "bad" the always-bad model wins, on "meh" the always-meh model does. Both train splits have "good"
# as their majority class, so each model clears the quality floor on its own set.


TRAIN = {"train": {"bad": 10, "good": 30, "meh": 10}, "validation": {"bad": 2, "good": 2, "meh": 2}}
TESTS = {"bad": {"bad": 20, "good": 1, "meh": 1}, "meh": {"bad": 8, "good": 1, "meh": 20}}


@dataclass
class Registered:
    ws: Workspace
    sets: dict[str, LabeledRef]  # "bad", "meh"
    models: dict[str, Path]  # "bad", "meh": saved MLflow models of a classifier that always predicts that label


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Registered:
    import mlflow
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks import ingest
    from tests.support import build_tiny_bert, texts, write_labeled_csvs

    root = tmp_path_factory.mktemp("registered")
    ws = Workspace(root / "ws")
    sets = {name: ingest.ingest_labeled(write_labeled_csvs(root / name, {**TRAIN, "test": test}), ws)
            for name, test in TESTS.items()}
    bert = build_tiny_bert(root / "bert", texts(sets["bad"], "train"))
    id2label = ingest.load_id2label(sets["bad"])
    models = {}
    for label in ("bad", "meh"):
        model = AutoModelForSequenceClassification.from_pretrained(
            str(bert), num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([5.0 if id2label[i] == label else -5.0
                                                      for i in range(len(id2label))]))
        models[label] = root / f"always-{label}"
        mlflow.transformers.save_model({"model": model, "tokenizer": AutoTokenizer.from_pretrained(str(bert))},
                                       str(models[label]), task="text-classification", pip_requirements=[],
                                       model_config={"truncation": True, "max_length": 32})
    return Registered(ws, sets, models)


def _register(name: str, folder: Path, tags: dict[str, str] | None = None) -> int:
    """A new version of ``name`` holding the files of ``folder``, with ``tags``."""
    from tasks.registry import _ensure_registered_model
    from tasks.tracking import ensure_experiment, mlflow_client

    client = mlflow_client()
    run = client.create_run(ensure_experiment("gate-tests"))
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    _ensure_registered_model(client, name, "gate tests")
    return int(client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id,
                                           tags=tags).version)


def _lineage(labeled: LabeledRef, fp: str) -> dict[str, str]:
    return {FP_TAG: fp, gate.TEST_SET_TAG: labeled.fingerprint, "llmpipe.version": "0.1.0"}


def _new_name() -> str:
    return f"gate-{uuid.uuid4().hex[:8]}"


def _champion(name: str) -> int:
    from tasks.tracking import mlflow_client

    return int(mlflow_client().get_model_version_by_alias(name, "champion").version)


MCNEMAR = RegistryConfig(significance_test="mcnemar")


def test_the_gate_never_loads_a_pyfunc_champion(registered: Registered, tmp_path: Path) -> None:
    """Someone gave the champion alias to a pyfunc model whose loading and prediction run code (here: write a
    marker file). The gate does not load it, with or without llmpipe's lineage tags: the candidate is challenger,
    and nothing ran. Loaded by pyfunc, as the gate once did, it would have run."""
    import mlflow

    from tasks import registry
    from tasks.tracking import mlflow_client

    marker = tmp_path / "ran"

    class Marker(mlflow.pyfunc.PythonModel):
        def __init__(self, path: str):
            self.path = path

        def load_context(self, context):
            Path(self.path).write_text("load_context")

        def predict(self, context, model_input):
            Path(self.path).write_text("predict")
            return ["bad"] * len(model_input)

    mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), python_model=Marker(str(marker)), pip_requirements=[])
    name, client, labeled = _new_name(), mlflow_client(), registered.sets["bad"]
    pyfunc = _register(name, tmp_path / "pyfunc")
    client.set_registered_model_alias(name, "champion", str(pyfunc))
    candidate = _register(name, registered.models["bad"], _lineage(labeled, "candidate"))
    alias, result, floor = registry.decide_alias(client, MCNEMAR, name, candidate, labeled)
    assert floor.promote and alias == "challenger" and _champion(name) == pyfunc
    assert result.reason == (f"not comparable: version {pyfunc} of {name} carries no llmpipe lineage "
                             f"({FP_TAG}, {gate.TEST_SET_TAG}, llmpipe.version)")
    assert not marker.exists()

    # With the lineage tags copied onto it, it is still not loaded: it holds a pickle.
    tagged = _register(name, tmp_path / "pyfunc", _lineage(labeled, "pyfunc"))
    client.set_registered_model_alias(name, "champion", str(tagged))
    result = gate.against_champion(MCNEMAR, name, candidate, client.get_model_version(name, str(tagged)), labeled,
                                   gate.candidate_ids(name, candidate, labeled))
    assert not result.promote
    assert result.reason == f"not comparable: version {tagged} of {name} has pickle files (python_model.pkl)"
    assert not marker.exists()

    mlflow.pyfunc.load_model(f"models:/{name}/{pyfunc}")
    assert marker.read_text() == "load_context"


def _pickle_weights(model: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(model / "model.safetensors")), str(model / "pytorch_model.bin"))
    (model / "model.safetensors").unlink()


def _add_auto_map(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))


def _without_flavor(root: Path) -> None:
    import yaml

    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    del mlmodel["flavors"]["transformers"]
    (root / "MLmodel").write_text(yaml.safe_dump(mlmodel))


@pytest.mark.parametrize(("change", "refusal"), [
    (lambda root: _pickle_weights(root / "model"), "has pickle files (model/pytorch_model.bin)"),
    (lambda root: (root / "model" / "training_args.pkl").write_bytes(b"x"), "has pickle files (model/training_args.pkl)"),
    (lambda root: (root / "components" / "tokenizer" / "tokenization_x.py").write_text("x"),
     "has code files (components/tokenizer/tokenization_x.py)"),
    (lambda root: _add_auto_map(root / "model"), "names custom code (auto_map in model/config.json)"),
    (lambda root: (root / "model" / "model.safetensors").unlink(), "has no safetensors weights"),
    (_without_flavor, "is not a model of the transformers flavor"),
], ids=["pickle-weights", "pickle-file", "code-file", "auto-map", "no-safetensors", "no-transformers-flavor"])
def test_a_version_with_lineage_but_unsafe_files_is_never_loaded(registered: Registered, tmp_path: Path, change,
                                                                   refusal: str) -> None:
    """llmpipe's lineage tags are not enough: the files must be plain tensors and configs. The gate refuses such a
    version as candidate (an error) and as champion (not comparable), naming the check and no file content."""
    from tasks.tracking import mlflow_client

    folder = tmp_path / "model"
    shutil.copytree(registered.models["bad"], folder)
    change(folder)
    name, labeled = _new_name(), registered.sets["bad"]
    bad = _register(name, folder, _lineage(labeled, "unsafe"))
    with pytest.raises(gate.Refused) as refused:
        gate.candidate_ids(name, bad, labeled)
    assert str(refused.value) == f"version {bad} of {name} {refusal}"
    good = _register(name, registered.models["bad"], _lineage(labeled, "safe"))
    result = gate.against_champion(MCNEMAR, name, good, mlflow_client().get_model_version(name, str(bad)), labeled,
                                   gate.candidate_ids(name, good, labeled))
    assert not result.promote and result.reason == f"not comparable: version {bad} of {name} {refusal}"


def test_every_champion_move_is_recorded_and_rollback_restores_the_champion_the_gate_replaced(
        registered: Registered) -> None:
    from tasks import registry
    from tasks.tracking import mlflow_client

    name, client, labeled = _new_name(), mlflow_client(), registered.sets["meh"]
    first = _register(name, registered.models["bad"], _lineage(labeled, "first"))
    better = _register(name, registered.models["meh"], _lineage(labeled, "better"))
    assert registry.decide_alias(client, MCNEMAR, name, first, labeled, run_id="run-1")[0] == "champion"
    alias, result, _ = registry.decide_alias(client, MCNEMAR, name, better, labeled, run_id="run-2")
    assert alias == "champion" and result.p_value < 0.05 and result.test_sets == labeled.fingerprint
    assert _champion(name) == better

    assert registry.rollback(name) == f"{name} version {first} is champion again (was version {better})"
    assert _champion(name) == first
    assert registry.promote(name, better) == f"{name} version {better} is now champion (was version {first})"
    moves = registry.champion_moves(client, name)
    assert [(m["from"], m["to"], m["by"], m["run_id"], m["alias"]) for m in moves] == [
        (None, first, "gate", "run-1", "champion"), (first, better, "gate", "run-2", "champion"),
        (better, first, "rollback", None, "champion"), (first, better, "promote", None, "champion")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["at"]) for m in moves)
    assert registry.rollback(name) == f"{name} version {first} is champion again (was version {better})"
    assert len(registry.champion_moves(client, name)) == 5


def test_the_move_record_keeps_the_newest_moves_within_the_tag_limit() -> None:
    from tasks import registry

    class Registry:  # a registered model's tags, as the client's two calls see them
        tags: dict[str, str] = {}

        def get_registered_model(self, name):
            return self

        def set_registered_model_tag(self, name, key, value):
            self.tags = {**self.tags, key: value}

    client = Registry()
    for to in range(1, 151):
        registry._record_move(client, "m", "champion", to - 1 or None, to, "gate", "0" * 32)
    text = client.tags[registry.MOVES_TAG]
    moves = json.loads(text)
    assert len(text) <= registry.MAX_TAG_CHARS and len(moves) <= registry.MAX_MOVES
    assert [m["to"] for m in moves] == list(range(151 - len(moves), 151))


def test_the_challenger_alias_is_never_a_champion_alias(registered: Registered) -> None:
    from tasks import registry
    from tasks.errors import LlmpipeError
    from tasks.tracking import mlflow_client

    name, client, labeled = _new_name(), mlflow_client(), registered.sets["bad"]
    one, two = (_register(name, registered.models["bad"], _lineage(labeled, fp)) for fp in ("one", "two"))
    with pytest.raises(LlmpipeError, match="the challenger alias must differ from the champion alias"):
        registry.set_champion(client, name, one, "champion", "champion", "gate")
    with pytest.raises(LlmpipeError, match="the challenger alias must differ from the champion alias"):
        registry.set_challenger(client, name, one, "champion", "champion")
    with pytest.raises(LlmpipeError, match="the challenger alias must differ from the champion alias"):
        registry.rollback(name, "champion", "champion")
    # A run that names another champion alias cannot use the real one as its challenger alias...
    registry.promote(name, one)
    with pytest.raises(LlmpipeError, match="'champion' is a champion alias of this model"):
        registry.set_challenger(client, name, two, "x", "champion")
    # ...nor move another alias off the champion.
    client.set_registered_model_alias(name, "production", str(one))
    with pytest.raises(LlmpipeError, match=f"alias 'production' points at version {one}, which is champion"):
        registry.set_challenger(client, name, two, "champion", "production")
    assert _champion(name) == one and int(client.get_model_version_by_alias(name, "production").version) == one
    registry.set_challenger(client, name, two, "champion", "challenger")
    assert int(client.get_model_version_by_alias(name, "challenger").version) == two


def test_a_candidate_tested_on_another_set_must_also_beat_the_champion_on_the_champions_set(
        registered: Registered, tmp_path: Path) -> None:
    """The always-meh model beats the always-bad champion on its own "meh" test set, but the champion was tested
    on "bad", where the candidate loses: it is not crowned. With the champion's test set missing from the
    workspace, or of other labels, the two are not comparable."""
    from tasks import ingest, registry
    from tasks.tracking import mlflow_client
    from tests.support import write_labeled_csvs

    name, client = _new_name(), mlflow_client()
    bad, meh = registered.sets["bad"], registered.sets["meh"]
    champion = _register(name, registered.models["bad"], _lineage(bad, "champion"))
    assert registry.decide_alias(client, MCNEMAR, name, champion, bad)[0] == "champion"
    candidate = _register(name, registered.models["meh"], _lineage(meh, "candidate"))
    alias, result, floor = registry.decide_alias(client, MCNEMAR, name, candidate, meh)
    assert floor.promote and alias == "challenger" and _champion(name) == champion
    assert result.reason.startswith(f"on its own test set labeled/{meh.fingerprint}: significantly better")
    assert f"; on version {champion}'s labeled/{bad.fingerprint}: not better" in result.reason
    assert result.candidate_score == pytest.approx(1 / 22) and result.champion_score == pytest.approx(20 / 22)
    assert result.test_sets == f"{meh.fingerprint},{bad.fingerprint}"
    assert registry._gate_tags(alias, result, floor)["llmpipe.gate.test_sets"] == result.test_sets

    # A "meh" set in another workspace, where the champion's set is not.
    elsewhere = ingest.ingest_labeled(write_labeled_csvs(tmp_path / "meh", {**TRAIN, "test": TESTS["meh"]}),
                                      Workspace(tmp_path / "ws"))
    alias, result, _ = registry.decide_alias(client, MCNEMAR, name, candidate, elsewhere)
    assert alias == "challenger" and _champion(name) == champion and result.reason == (
        f"not comparable: version {champion} was tested on labeled/{bad.fingerprint}, which is not in the "
        f"workspace {tmp_path / 'ws'}")

    # A champion tested on a set of other labels.
    two = ingest.ingest_labeled(write_labeled_csvs(tmp_path / "two", {
        "train": {"bad": 10, "meh": 30}, "validation": {"bad": 2, "meh": 2}, "test": {"bad": 5, "meh": 5}}),
        registered.ws)
    other = _register(name, registered.models["bad"], _lineage(two, "two-labels"))
    client.set_registered_model_alias(name, "champion", str(other))
    alias, result, _ = registry.decide_alias(client, MCNEMAR, name, candidate, meh)
    assert alias == "challenger" and _champion(name) == other and result.reason == (
        f"not comparable: version {other} was tested on labeled/{two.fingerprint}, whose labels differ from those "
        f"of labeled/{meh.fingerprint}")
