"""Tests for the ``llmpipe`` command line, in-process and as a real ``python -m flows.cli`` process."""

from __future__ import annotations

import os
import re
import signal
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="start times come from /proc (Linux)")
def test_temporary_api_guard_stops_the_server_it_was_given_and_nothing_else() -> None:
    # `python -m flows.runtime guard PARENT SERVER START`: a PARENT that is not our parent counts as dead.
    from flows.runtime import _start_time

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        guard = [sys.executable, "-m", "flows.runtime", "guard", "0", str(victim.pid)]
        # A later process reusing the number (another start time) is left alone.
        subprocess.run([*guard, "1"], check=True, timeout=60)
        assert victim.poll() is None
        subprocess.run([*guard, _start_time(victim.pid)], check=True, timeout=60)
        assert victim.wait(timeout=5) == -signal.SIGTERM
    finally:
        victim.kill()
        victim.wait()


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


def test_find_registry_takes_the_store_llmpipe_run_writes(tmp_path: Path) -> None:
    from flows import runtime

    with pytest.raises(runtime.NoRegistry, match=r"\./mlflow\.db does not exist \(looked in "):
        runtime.find_registry({}, tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mlflow.db").write_bytes(b"")  # what `llmpipe run` leaves in its folder
    here = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runtime.find_registry({}, tmp_path) == here
    assert runtime.find_registry({"MLFLOW_TRACKING_URI": runtime.DEFAULT_TRACKING_URI}, tmp_path) == here
    assert runtime.find_registry({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, tmp_path) == "http://127.0.0.1:5000"
    with pytest.raises(runtime.NoRegistry, match="MLFLOW_REGISTRY_URI=sqlite:///elsewhere.db names no existing"):
        runtime.find_registry({"MLFLOW_REGISTRY_URI": "sqlite:///elsewhere.db"}, tmp_path)


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


# ================================================================ the live display (rendering, no pipeline)


def test_live_display_rows_show_step_loss_speed_time_left_and_stages_done() -> None:
    import io
    import time

    from rich.console import Console

    from flows import progress

    console = Console(file=io.StringIO(), width=120, height=40, force_terminal=False)
    display = progress.LiveDisplay(console, "llm_pipeline")
    display.started("ingest-corpus")
    display.finished("ingest-corpus", ok=True)
    display.started("train-tokenizer")
    display.finished("train-tokenizer", ok=True, reused=True)
    for task in ("tokenize-plan", "tokenize-shard", "tokenize-shard"):
        display.started(task)
        display.finished(task, ok=True)
    assert display.stages["tokenize"].state == "running"  # the plan and the shards do not end the stage
    display.started("tokenize")
    display.finished("tokenize", ok=True)
    display.started("pretrain")
    display.advanced("pretrain", 50, 600, {"loss": 5.91, "tokens_per_s": 44656.0})
    time.sleep(0.05)
    display.advanced("pretrain", 100, 600, {"loss": 5.59, "tokens_per_s": 44180.0})
    display.started("evaluate-lm")
    display.finished("evaluate-lm", ok=False)

    console.print(display.render())
    lines = {line[2:].split()[0]: line for line in console.file.getvalue().splitlines()}  # by stage, after the status
    assert "3 stages done" in lines["llm_pipeline"]
    assert lines["ingest-corpus"].startswith("✓") and lines["train-tokenizer"].split()[2] == "reused"
    assert list(lines)[1:] == ["ingest-corpus", "train-tokenizer", "tokenize", "pretrain", "evaluate-lm"]
    running = lines["pretrain"]
    assert "step 100/600" in running and "loss 5.5900" in running and "44.2k tok/s" in running
    assert re.search(r"\d+\.\ds, \d+\.\ds left$", running), running  # 500 steps at the pace of the last 50
    assert lines["evaluate-lm"].startswith("✗") and "failed" in lines["evaluate-lm"]
    display.finished("pretrain", ok=True)
    console.file.truncate(0)
    console.print(display.render())
    assert re.search(r"✓ pretrain\s+100 steps, final loss 5\.5900\s+\d", console.file.getvalue())


def test_stages_report_to_nothing_without_a_display() -> None:
    from flows import progress

    assert progress.current() is progress._NOTHING
    progress.stage_started("pretrain")  # no display: nothing happens, nothing fails
    progress.stage_advanced("pretrain", 1, 2, {"loss": 1.0})
    progress.stage_finished("pretrain", ok=True)


# ================================================================ whole runs, on a terminal and off one (slow)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _run_in_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal (120 x 40) as its stdin, stdout and stderr; (exit status, raw output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, stdin=terminal,
                            stdout=terminal, stderr=terminal, close_fds=True, start_new_session=True)
    os.close(terminal)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 1 << 16)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        return proc.wait(timeout=60), out.decode("utf-8", "replace")
    finally:
        os.close(controller)


def _clean_env() -> dict[str, str]:
    """What a new user's shell has: none of the suite's Prefect or MLflow settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal (Linux)")
def test_run_shows_a_live_display_on_a_terminal_and_plain_lines_off_one(tmp_path: Path) -> None:
    import sqlite3

    env = {**_clean_env(), "TERM": "xterm-256color"}
    # 60 pretraining steps: a dozen reports, so a busy machine still shows several frames of it.
    rc, raw = _run_in_terminal(["run", "--config", "tiny", "--set", "pretrain.max_steps=60"], tmp_path, env,
                               timeout_s=900)
    text = ANSI.sub("", raw)
    assert rc == 0, text[-4000:]
    frames = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    # The display advances: the same stage seen at two of its steps (tiny: a report every 5 steps).
    for stage, total in (("pretrain", 60), ("finetune", 20)):
        steps = {int(m[1]) for line in frames if (m := re.search(rf"{stage} .*step (\d+)/{total}\b", line))}
        assert len(steps) >= 2 and steps <= set(range(5, total + 1, 5)), (stage, steps)
    assert any(re.search(r"pretrain .*step \d+/60 +loss \d\.\d{4} +[\d.]+k? tok/s .*left", f) for f in frames)
    # ...and ends with every stage done, with its time.
    for stage in ("start up", "ingest-corpus", "train-tokenizer", "tokenize", "pretrain", "evaluate-lm",
                  "register-lm", "ingest-labeled", "finetune", "evaluate-classifier", "register"):
        assert any(re.match(rf"✓ {stage} .*(\d\.\ds|\d:\d\d)$", f.rstrip()) for f in frames), stage
    assert "llm_pipeline finished in" in text and "Predict:    llmpipe predict --model" in text
    assert "Beginning flow run" not in text and "Finished in state" not in text  # INFO lines: in the Prefect UI
    assert "Started monitoring system metrics" not in text and "Creating initial MLflow" not in text
    assert "anonymous usage data" not in text  # analytics are off, so is Prefect's notice about them
    assert raw.count("\x1b[1A") > 10  # it redraws in place

    # Fine-tuning drew its curve: in the artifact, logged to MLflow, and as a Prefect artifact.
    assert len(list((tmp_path / ".llmpipe" / "checkpoints").glob("*/training_curve.png"))) == 1
    assert list((tmp_path / "mlartifacts").rglob("training_curve.png"))
    with sqlite3.connect(tmp_path / ".llmpipe" / "prefect" / "prefect.db") as db:
        curves = dict(db.execute("select key, data from artifact where key like '%curve'").fetchall())
    assert set(curves) == {"pretrain-loss-curve", "finetune-training-curve"}
    assert all("data:image/png;base64," in data for data in curves.values())

    # Not on a terminal (a pipe, as in CI or under a worker): Prefect's log lines, no control sequence at all.
    for flow, summary in (("finetune", "  classifier:     test accuracy"),
                          ("pretrain", "  language model: validation perplexity")):
        run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", "tiny", "--set",
                              "pretrain.max_steps=60", "--flow", flow],
                             cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "\x1b" not in run.stdout and "\x1b" not in run.stderr
        assert "Beginning flow run" in run.stderr and f"for flow '{flow}'" in run.stderr
        assert "Started monitoring system metrics" not in run.stderr  # MLflow's INFO lines are off
        assert f"\n{flow} finished in " in run.stdout and "(every artifact reused)" in run.stdout
        assert summary in run.stdout
        assert ("  language model:" in run.stdout) == (flow == "pretrain")
        assert ("Predict:" in run.stdout) == (flow == "finetune")
    assert "Fine-tune:  llmpipe run --flow finetune --config tiny" in run.stdout
