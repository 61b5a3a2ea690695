"""The bad-input and fault matrix of benchmarks/faults.py, every case checked (marked slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow

CASES = [
    "empty corpus", "corpus of only duplicates", "binary file", "wrong encoding (latin-1)",
    "CSV without the text column", "labeled set with a single class", "validation/test label unseen in training",
    "sequence length above the model's context", "vocabulary too small for the special tokens",
    "corrupted token shard", "partial checkpoint directory", "CUDA-style out of memory at step 15",
    "kill -9 during pretraining", "ragged CSV row (an unquoted comma)", "unbalanced quote",
    "JSONL row without the label key", "secret in a file read as a table", "NaN loss injected at step 12",
    "truncated weight file in a complete artifact", "fine-tuning out of memory at step 6",
    "full disk (ENOSPC) while tokenizing", "kill -9 while tokenizing", "kill -9 while fine-tuning",
    "kill -9 while registering", "first model at the majority baseline", "MLflow tracking server down at start",
    "MLflow tracking server down mid-run", "deployment run: a path outside the allowed folders",
    "deployment run: a URL data file", "deployment run: trust_remote_code",
    "deployment run: a job-variable override of command",
]


@pytest.fixture(scope="module")
def matrix() -> dict[str, dict]:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py")], capture_output=True, text=True,
                          timeout=2400, cwd=REPO)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert (proc.returncode == 0) == all(r["ok"] for r in rows)
    return {r["case"]: r for r in rows}


@pytest.mark.parametrize("case", CASES)
def test_case_behaves_as_expected(matrix: dict[str, dict], case: str) -> None:
    row = matrix[case]
    assert row["ok"], f"{case}: expected {row['expected']}, observed {row['observed']}"
