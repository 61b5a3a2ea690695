"""The bad-input and fault matrix of benchmarks/faults.py, every case checked (marked slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

CASES = [
    "empty corpus", "corpus of only duplicates", "binary file", "wrong encoding (latin-1)",
    "CSV without the text column", "labeled set with a single class", "validation/test label unseen in training",
    "sequence length above the model's context", "vocabulary too small for the special tokens",
    "corrupted token shard", "partial checkpoint directory", "CUDA-style out of memory at step 15",
    "kill -9 during pretraining",
]


@pytest.fixture(scope="module")
def matrix() -> dict[str, dict]:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py")], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert (proc.returncode == 0) == all(r["ok"] for r in rows)
    return {r["case"]: r for r in rows}


@pytest.mark.parametrize("case", CASES)
def test_case_behaves_as_expected(matrix: dict[str, dict], case: str) -> None:
    row = matrix[case]
    assert row["ok"], f"{case}: expected {row['expected']}, observed {row['observed']}"
