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
    "deployment run: a job-variable override of command", "deployment run: naming a pyfunc model for the gate",
    "deployment run: a README's data_files outside the folder",
    # what one who can only create runs, or only write inside an allowed data folder, tries (benchmarks/attacks.py)
    "attack: a run names another registered model", "attack: champion alias moved to a pyfunc model",
    "attack: challenger alias set to 'champion'", "attack: alpha 0.99 to crown a coin flip",
    "attack: the floor turned off (margin, floor)", "attack: README data_files with an absolute path",
    "attack: README data_files with '..'", "attack: README data_files with an http URL",
    "attack: a symlink to an outside file in the data folder", "attack: a tokenizer folder with a symlinked vocabulary",
    "attack: save_to_disk state.json naming outside arrow files", "attack: a file swapped for a symlink after the check",
    "attack: hub README resolving to local files", "attack: a label error quoting what it read",
    "attack: an lm ref with an absolute kind", "attack: workspace '~/x'", "attack: a glob with '..' after a wildcard",
    "attack: '**' repeated to make admission slow", "attack: 4,096 processes per node", "attack: a billion steps",
    "attack: a 100-billion-parameter model", "attack: a context of a million tokens",
    "attack: a billion generated documents", "attack: 100,000 threads", "attack: a time limit of years",
    "attack: 10,000 quoted examples",
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
