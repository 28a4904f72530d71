"""Smoke runs of the benchmark scripts (the measurements themselves are not in CI, only their plumbing)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_convergence_smoke_runs_the_recipe_and_reports_rauc(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--smoke", "--arms", "mae", "simmim_mto"]
    cmd += ["--seeds", "0", "--output_dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads((tmp_path / "convergence.json").read_text())["runs"]
    assert [run["arm"] for run in runs] == ["mae", "simmim_mto"]
    for run in runs:
        assert len(run["eval_knn_accuracy"]) == len(run["epochs"]) == 2  # evaluated at both smoke steps
        assert all(0 <= value <= 1 for value in run["eval_linear_probe_accuracy"])
        assert run["epoch_seconds"] and all(t > 0 for t in run["epoch_seconds"])
    assert (tmp_path / "convergence.png").stat().st_size > 0
    assert "| mae | 0 | 1 |" in result.stdout and "| simmim_mto | 0.1 | 1 |" in result.stdout
