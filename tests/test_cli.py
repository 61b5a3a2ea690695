"""Tests for the ``llmpipe`` command line, in-process and as a real ``python -m flows.cli`` process."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.cli import EXIT_CONFIG, main
from tasks.config import PipelineConfig, load_config

CliResult = tuple[int, str, str]


@pytest.fixture(params=["in-process", "subprocess"])
def cli(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Callable[..., CliResult]:
    """Run the CLI with cwd = an empty tmp dir; returns (exit code, stdout, stderr)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def run_in_process(*args: str) -> CliResult:
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    def run_subprocess(*args: str) -> CliResult:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True,
                              text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr

    return run_in_process if request.param == "in-process" else run_subprocess


def _cwd_is_untouched() -> None:
    cwd = Path.cwd()
    assert not (cwd / ".llmpipe").exists()
    assert list(cwd.iterdir()) == []  # nothing at all was written: no stage, no mlflow.db, no Prefect home


def test_config_show_round_trips_with_overrides(cli) -> None:
    sets = ["pretrain.max_steps=5", "pretrain.lr=1e-3", "registry.model_name=demo", "seed=9"]
    rc, out, err = cli("config", "show", *[a for s in sets for a in ("--set", s)])
    assert rc == 0, err
    shown = PipelineConfig.model_validate(yaml.safe_load(out))
    assert shown == load_config(None, sets)
    assert shown.pretrain.max_steps == 5 and shown.pretrain.lr == pytest.approx(1e-3)
    assert shown.registry.model_name == "demo" and shown.seed == 9
    _cwd_is_untouched()


def test_config_show_defaults_to_quickstart(cli) -> None:
    rc, out, err = cli("config", "show")
    assert rc == 0, err
    assert PipelineConfig.model_validate(yaml.safe_load(out)) == PipelineConfig()
    rc, out2, _ = cli("config", "show", "-c", "quickstart")
    assert rc == 0 and out2 == out


def test_run_with_invalid_value_exits_2_before_any_stage(cli) -> None:
    rc, out, err = cli("run", "--set", "pretrain.lr=-1")
    assert rc == EXIT_CONFIG == 2
    assert "pretrain.lr" in err
    assert "greater than 0" in err
    assert "Traceback" not in err
    _cwd_is_untouched()


def test_run_with_unknown_key_exits_2(cli) -> None:
    rc, _, err = cli("run", "--set", "pretrain.bogus=1")
    assert rc == 2
    assert "pretrain.bogus" in err and "unknown key" in err
    _cwd_is_untouched()


def test_set_without_equals_exits_2(cli) -> None:
    rc, _, err = cli("run", "--set", "pretrain.max_steps")
    assert rc == 2
    assert "KEY=VALUE" in err and "pretrain.max_steps" in err
    _cwd_is_untouched()


def test_config_show_reports_every_bad_field(cli) -> None:
    rc, out, err = cli("config", "show", "-s", "pretrain.lr=-1", "-s", "model.n_layer=abc", "-s", "pretrain.bogus=1")
    assert rc == 2
    assert out == ""
    for field in ("pretrain.lr", "model.n_layer", "pretrain.bogus"):
        assert field in err


def test_unknown_preset_exits_2_and_lists_presets(cli) -> None:
    rc, _, err = cli("config", "show", "--config", "nope")
    assert rc == 2
    assert "'nope'" in err and "quickstart" in err
    _cwd_is_untouched()


# ================================================================ a command for people: help, version, exit codes


def test_version_prints_the_installed_version(cli) -> None:
    from importlib import metadata

    rc, out, err = cli("--version")
    assert rc == 0, err
    assert out == f"llmpipe {metadata.version('llmpipe')}\n"
    _cwd_is_untouched()


def test_help_is_written_for_users_with_examples(cli) -> None:
    rc, out, err = cli("--help")
    assert rc == 0, err
    assert out.startswith("usage: llmpipe")
    assert "Heavy imports" not in out and "``" not in out  # no note for developers, no reST
    for command in ("run", "predict", "promote", "rollback", "config", "gc", "deploy", "serve"):
        assert re.search(rf"^\s+{command}\s+\w", out, re.MULTILINE), command
    assert "examples:" in out and "llmpipe run --config tiny" in out and "llmpipe predict --model models:/" in out
    assert "2 usage or configuration error" in out
    rc, out, _ = cli("run", "--help")
    assert rc == 0 and "--flow {pipeline,pretrain,finetune}" in out and "--no-progress" in out and "--verbose" in out
    _cwd_is_untouched()


@pytest.mark.parametrize("args, message", [
    (("predict", "--model", "nonsense", "a text"), "expected models:/NAME@ALIAS or models:/NAME/VERSION, got 'nonsense'"),
    (("run", "--flow", "everything"), "invalid choice: 'everything'"),
    (("promote", "llmpipe-sentiment", "three"), "invalid int value: 'three'"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    ((), "the following arguments are required: COMMAND"),
])
def test_usage_errors_exit_2_with_the_usage_and_before_anything_runs(cli, args, message) -> None:
    rc, out, err = cli(*args)
    assert rc == EXIT_CONFIG == 2
    assert message in err and err.startswith("usage: llmpipe")
    assert out == "" and "Traceback" not in err
    _cwd_is_untouched()


def _empty_cwd_has_no_registry(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return Path.cwd().resolve()


@pytest.mark.parametrize("command", [
    ("predict", "--model", "models:/llmpipe-sentiment@champion", "a wonderful, moving film"),
    ("promote", "llmpipe-sentiment", "1"),
    ("rollback", "llmpipe-sentiment", "--config", "tiny"),
])
def test_registry_commands_in_an_empty_folder_say_where_they_looked_and_create_nothing(
        cli, monkeypatch: pytest.MonkeyPatch, command) -> None:
    cwd = _empty_cwd_has_no_registry(monkeypatch)
    rc, out, err = cli(*command)
    assert rc == 1, err
    assert err.strip() == (f"llmpipe: no MLflow registry found: MLFLOW_TRACKING_URI is not set and ./mlflow.db does "
                           f"not exist (looked in {cwd}); run llmpipe run here first or set MLFLOW_TRACKING_URI")
    assert out == ""
    _cwd_is_untouched()  # no mlflow.db, no .llmpipe


def test_predict_with_a_tracking_uri_to_a_missing_store_names_it_and_creates_nothing(
        cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _empty_cwd_has_no_registry(monkeypatch)
    nowhere = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{nowhere}")
    rc, _, err = cli("predict", "--model", "models:/m/1", "some text")
    assert rc == 1
    assert f"MLFLOW_TRACKING_URI=sqlite:///{nowhere} names no existing store" in err
    assert not nowhere.parent.exists()
    _cwd_is_untouched()


def _boom(*_args, **_kwargs):
    raise RuntimeError("the disk said no\nsecond line with api_key=s3cr3t-value")


ONE_LINE = re.compile(r"llmpipe: unexpected error: RuntimeError: the disk said no second line with api_key=\*\*\* "
                      r"\(traceback in (?P<path>/\S+\.log)\)\n")


def test_an_unexpected_error_is_one_line_naming_the_traceback_file_in_the_workspace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import flows.cli as cli_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".llmpipe").mkdir()  # the workspace exists: the traceback goes into its logs/
    monkeypatch.setattr(cli_module, "cmd_alias", _boom)
    capsys.readouterr()
    assert main(["promote", "llmpipe-sentiment", "2"]) == 1
    out, err = capsys.readouterr()
    m = ONE_LINE.fullmatch(err)
    assert m, err
    log = Path(m["path"])
    assert log.parent == tmp_path / ".llmpipe" / "logs" and log.name.startswith("llmpipe-error-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in _boom" in text and "RuntimeError" in text
    assert "llmpipe promote llmpipe-sentiment 2" in text
    assert "s3cr3t-value" not in text and "s3cr3t-value" not in err  # masked, as everywhere else
    assert out == ""


def test_an_unexpected_error_without_a_workspace_writes_the_traceback_to_the_temporary_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import tempfile

    import flows.cli as cli_module

    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(cli_module, "to_yaml", _boom)
    capsys.readouterr()
    assert main(["config", "show"]) == 1
    m = ONE_LINE.fullmatch(capsys.readouterr().err)
    assert m and Path(m["path"]).parent == tmp_path / "tmp" and Path(m["path"]).is_file()
    _cwd_is_untouched()  # no workspace is created to hold it


def _finetune_result(model: dict[str, float], tfidf: dict[str, float], aliases: list[str], below_floor: bool = False):
    from types import SimpleNamespace

    from tasks.registry import ModelVersionRef

    report = {"model": model, "baselines": {"tfidf_logreg": tfidf}, "tfidf_features": {"features": "char"}}
    mv = ModelVersionRef(name="m", version=2, uri="models:/m/2", created=True, aliases=aliases, below_floor=below_floor,
                         decision="version 2 becomes champion: it beats version 1")
    return SimpleNamespace(model_version=mv, report=SimpleNamespace(load=lambda: report, reused=False),
                           classifier=SimpleNamespace(reused=False))


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_the_summary_says_how_far_the_classifier_is_from_tfidf_and_warns_of_a_champion_below_it(
        metric: str, capsys) -> None:
    from flows.cli import print_summary

    cfg = load_config("tiny", [f"registry.metric={metric}"])
    env = {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "PREFECT_HOME": "/tmp/prefect"}
    trailing = _finetune_result({"accuracy": 0.85, "macro_f1": 0.80}, {"accuracy": 0.875, "macro_f1": 0.83},
                                ["champion"])
    print_summary("finetune", 10, cfg, env, trailing)
    out = capsys.readouterr().out
    points, name = (2.5, "accuracy") if metric == "accuracy" else (3.0, "macro-F1")
    assert f"; {points:.1f} points below TF-IDF+LR in {name}" in out
    assert (f"WARNING:        the new champion models:/m/2 trails TF-IDF+LR by {points:.1f} points of {name} on the "
            "test split") in out

    ahead = _finetune_result({"accuracy": 0.90, "macro_f1": 0.88}, {"accuracy": 0.875, "macro_f1": 0.83},
                             ["champion"])
    print_summary("finetune", 10, cfg, env, ahead)
    out = capsys.readouterr().out
    assert " points above TF-IDF+LR in " in out and "WARNING" not in out

    challenger = _finetune_result({"accuracy": 0.85, "macro_f1": 0.80}, {"accuracy": 0.875, "macro_f1": 0.83},
                                  ["challenger"])
    print_summary("finetune", 10, cfg, env, challenger)
    assert "WARNING" not in capsys.readouterr().out  # not crowned: nothing to warn of
