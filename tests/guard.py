"""Every test leaves the process as it found it, in an order that can be shuffled and replayed.

- **Leak guard.** A test that changes process-wide state and does not restore it fails: environment variables,
  the working directory, signal handlers, the root and ``llmpipe`` loggers, torch's threads and global modes,
  inductor/dynamo config (the next test on the same worker would inherit it).
- **Shuffled order.** ``--shuffle-seed SEED`` runs test files, and the tests in each file, in an order shuffled by
  SEED (``random`` for a new one, printed so that a failing order can be replayed), on every xdist worker alike.

Loaded by ``tests/conftest.py`` for every test.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
from typing import Any

import pytest

# ---------------------------------------------------------------------------------------------- leak guard


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Variables that pytest, or a library on its first use in the process, sets once and for good.
_SET_ONCE = {"PYTEST_CURRENT_TEST", "TOKENIZERS_PARALLELISM", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
             "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"}
_LOGGERS = ("", "llmpipe")  # the root logger and ours; third-party loggers configure themselves on import
_CONFIG_MODULES = ("torch._inductor.config", "torch._dynamo.config")


def process_state() -> dict[str, Any]:
    """What a test must leave as it found it: environment, working directory, signal handlers, our and the
    root logger's handlers and level, torch's threads and global modes, and inductor/dynamo config."""
    state: dict[str, Any] = {
        "cwd": os.getcwd(),
        "environ": {k: v for k, v in os.environ.items() if k not in _SET_ONCE},
        "signals": {s.name: signal.getsignal(s) for s in _SIGNALS},
    }
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        handlers = tuple(h for h in lg.handlers if not type(h).__module__.startswith("_pytest"))  # per test phase
        state[f"logger {name or 'root'}"] = (lg.level, handlers, lg.propagate, lg.disabled)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        state["torch"] = {"threads": torch.get_num_threads(), "default_dtype": torch.get_default_dtype(),
                          "grad_enabled": torch.is_grad_enabled(),
                          "deterministic": torch.are_deterministic_algorithms_enabled(),
                          "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                          "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory}
    for module in _CONFIG_MODULES:
        config = sys.modules.get(module)
        if config is not None:  # values, and entries hidden by a delattr (monkeypatch's undo of one it created)
            hidden = {f"{k} (hidden)" for k, v in getattr(config, "_config", {}).items() if getattr(v, "hide", False)}
            state[module] = {**config.get_config_copy(), **dict.fromkeys(hidden, True)}
    return state


def state_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences between two ``process_state()`` snapshots (keys present in both)."""
    changes = []
    for key in before.keys() & after.keys():
        old, new = before[key], after[key]
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            names = sorted(k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING))
            changes.append(f"{key}: {', '.join(map(str, names[:10]))}" + (" ..." if len(names) > 10 else ""))
        else:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return sorted(changes)


_MISSING = object()


@pytest.fixture(scope="session", autouse=True)
def _configured_once():
    """What libraries configure once per process, done before the first test, so that every test starts from
    the same state whatever ran before it: Prefect replaces the root logger's handlers on its first flow run.
    Torch's compiler configs are imported here so that the guard below watches them from the first test on."""
    import importlib

    from prefect.logging.configuration import setup_logging

    setup_logging()
    for module in _CONFIG_MODULES:
        importlib.import_module(module)


@pytest.fixture(autouse=True)
def _leaves_process_state_as_found(request, _configured_once):
    """Fail a test that changes process-wide state and does not restore it (the next test on the same worker
    would inherit it): change it through monkeypatch, a library's own patch() or a subprocess instead."""
    before = process_state()
    yield
    changes = state_changes(before, process_state())
    if changes:
        pytest.fail(f"{request.node.nodeid} left process-wide state changed: " + "; ".join(changes), pytrace=False)


# ---------------------------------------------------------------------------------------------- shuffled order


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle-seed", default=None, metavar="SEED",
                     help="run test files, and the tests in each file, in an order shuffled by SEED (an integer, "
                          "or 'random' for a new one, printed in the header so a failing order can be replayed)")


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--shuffle-seed")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker takes the controller's seed, so all collect the same order
        seed = workerinput.get("shuffle_seed")
    elif seed == "random":
        seed = str(random.SystemRandom().randrange(10**6))
    if seed is not None and not str(seed).isdigit():
        raise pytest.UsageError(f"--shuffle-seed expects an integer or 'random', got {seed!r}")
    config.stash[_SHUFFLE_SEED] = None if seed is None else int(seed)


_SHUFFLE_SEED = pytest.StashKey[int | None]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist hook: hand the seed to each worker
    seed = node.config.stash[_SHUFFLE_SEED]
    if seed is not None:
        node.workerinput["shuffle_seed"] = str(seed)


def _shuffle_note(config: pytest.Config) -> str | None:
    seed = config.stash[_SHUFFLE_SEED]
    return None if seed is None else f"shuffled order: --shuffle-seed={seed} replays it"


def pytest_report_header(config: pytest.Config) -> str | None:
    return _shuffle_note(config)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if note := _shuffle_note(config):  # at the end too, where a failure is read (the header is hidden by -q)
        terminalreporter.write_line(note)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.stash[_SHUFFLE_SEED]
    if seed is None:
        return
    rng = random.Random(seed)
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = sorted(files)
    rng.shuffle(order)
    items[:] = [item for name in order for item in rng.sample(files[name], len(files[name]))]
