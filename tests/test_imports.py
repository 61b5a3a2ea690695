"""How the code is laid out: imports point one way (flows -> tasks; inside tasks, stages -> shared parts ->
artifacts and config), no module imports itself back through others, nothing in tasks/ imports Prefect, and no
module outgrows one job; loading the flows loads no deep-learning library (a re-run that reuses every stage needs
none)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

# tasks/ from the bottom up: a module may import only modules listed before it.
TASKS_LAYERS = [
    ("base", ["errors", "confine", "redact", "artifacts", "config", "sample_data"]),
    ("shared parts", ["interrupts", "faults", "sources", "encoding", "checkpoints", "curves", "kernels", "metrics", "resume", "training",
                      "distributed", "classifier", "tracking"]),
    ("stages", ["ingest", "tokenize", "pretrain", "finetune", "evaluate", "serving", "predict", "gate", "registry"]),
    ("operations", ["policy", "gc"]),
]
TASKS_ORDER = [f"tasks.{m}" for _, modules in TASKS_LAYERS for m in modules]
# Longer modules: the configuration models, and the sample data's word tables.
SIZE_EXEMPT = {"tasks/config.py", "tasks/sample_data.py"}
MAX_LINES = 600


def imports(path: Path) -> set[str]:
    """Every module of flows/ and tasks/ that ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module in ("flows", "tasks"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("flows", "tasks", "prefect") and name not in ("flows", "tasks")}


def graph() -> dict[str, set[str]]:
    modules = {f"{p.parent.name}.{p.stem}": p for pkg in ("flows", "tasks") for p in (REPO / pkg).glob("*.py")
               if p.stem != "__init__"}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_flows_and_tasks() -> None:
    assert cycles(graph()) == []


def test_tasks_never_import_flows_or_prefect() -> None:
    offending = {p.name: sorted(m for m in imports(p) if m.split(".")[0] in ("flows", "prefect"))
                 for p in (REPO / "tasks").glob("*.py")}
    assert {name: found for name, found in offending.items() if found} == {}


def test_tasks_import_downward_only() -> None:
    edges = graph()
    tasks = sorted(m for m in edges if m.startswith("tasks."))
    assert sorted(TASKS_ORDER) == tasks, "every tasks/ module has a place in TASKS_LAYERS"
    upward = [f"{m} imports {d}" for m in tasks for d in sorted(edges[m])
              if d.startswith("tasks.") and TASKS_ORDER.index(d) > TASKS_ORDER.index(m)]
    assert upward == []


@pytest.mark.parametrize("folder", ["flows", "tasks", "benchmarks", "tests", "tests/e2e"])
def test_no_module_over_600_lines(folder: str) -> None:
    long = {str(p.relative_to(REPO)): n for p in (REPO / folder).glob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
            and str(p.relative_to(REPO)) not in SIZE_EXEMPT}
    assert long == {}


def test_loading_the_flows_loads_no_deep_learning_library() -> None:
    # torch and transformers come in with the first stage that builds a model; an identical re-run builds none
    code = ("import sys, flows.cli, flows.pipeline, flows.deploy; "
            "print(' '.join(m for m in ('torch', 'transformers', 'datasets', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == []
