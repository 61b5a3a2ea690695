"""The leak guard (tests/guard.py) finds the leak that once made CI pass or fail by file order: a compiler setting
patched by hand is not given back to torch's config module, and the next test on the worker breaks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEAKY = textwrap.dedent('''
    import torch._inductor.config as inductor_config


    def test_patches_through_the_config_module():
        with inductor_config.patch({"cpp.cxx": ("no-such-g++",)}):
            pass


    def test_sets_the_compiler_by_hand():
        inductor_config.cpp.cxx = ("no-such-g++",)


    def test_deletes_the_setting_as_a_monkeypatch_undo_can():
        # pytest >= 9.2's monkeypatch undoes a setattr on torch's config proxy with this delattr (pytest #10644):
        # the setting is then hidden from every later test in the process
        delattr(inductor_config.cpp, "cxx")


    def test_reads_the_setting():
        assert inductor_config.cpp.cxx
''')


def run_guarded(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.guard", "-p", "no:cacheprovider", "-n", "0",
                           "-q", "--rootdir", str(folder), *args, str(folder)],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=300)


def test_the_guard_names_a_test_that_leaves_compiler_config_changed(tmp_path: Path):
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    result = run_guarded(tmp_path, "-rA")
    out = result.stdout
    assert result.returncode == 1, out
    for name in ("test_sets_the_compiler_by_hand", "test_deletes_the_setting_as_a_monkeypatch_undo_can"):
        assert f"test_leaky.py::{name} left process-wide state changed: torch._inductor.config: cpp.cxx" in out
    assert "PASSED test_leaky.py::test_patches_through_the_config_module" in out  # patch() gives it back
    # the harm it prevents: a later test in the same process can no longer read the setting
    assert "torch._inductor.config.cpp.cxx does not exist" in out


def test_a_shuffled_order_is_printed_and_replays(tmp_path: Path):
    (tmp_path / "test_order.py").write_text("\n\n".join(f"def test_{i}():\n    print('ran {i}')" for i in range(8)))
    orders = []
    for _ in range(2):
        result = run_guarded(tmp_path, "--shuffle-seed", "7", "-vv")
        assert result.returncode == 0, result.stdout
        assert "shuffled order: --shuffle-seed=7 replays it" in result.stdout
        orders.append([line.split("::")[1].split()[0] for line in result.stdout.splitlines() if "::test_" in line])
    assert orders[0] == orders[1] and len(orders[0]) == 8
    assert orders[0] != sorted(orders[0], key=lambda name: int(name.split("_")[1]))
