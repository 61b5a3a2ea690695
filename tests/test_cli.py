"""Tests for the ``llmpipe`` command line, in-process and as a real ``python -m flows.cli`` process."""

from __future__ import annotations

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
