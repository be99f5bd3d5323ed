"""benchmarks/gpu_check.sh --cpu-smoke: the GPU acceptance run's steps (offline wheel install, environment,
pytest -m gpu, the benchmark, the real-data LoRA run) at toy size on the CPU, so that the script is known to
work before a minute of GPU time is spent. Builds .gpu/ with gpu_prepare.sh first when it is missing
(that needs PyPI and ../shared/data/amazon)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREP = REPO / ".gpu"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"),
           "LIMIT_QUALITY": "600", "LIMIT_PYTEST": "600"}  # the limits keep a GPU run in its minutes; a loaded CPU is slower
    if not all((PREP / p / ".complete").is_file() for p in ("wheels", "minilm-fp16", "data/toys")):
        p = subprocess.run(["bash", "benchmarks/gpu_prepare.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert folder_bytes(PREP) < 64 * 2**20  # what travels with the working tree to the GPU machine
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    out = tmp_path / "out"
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [s["name"] for s in summary["steps"]] == ["install", "env", "pytest_gpu", "plan", "bench",
                                                                         "quality"]
    assert summary["env"]["torch"] and summary["env"]["hydra"] == "1.3.8"
    assert summary["pytest_gpu"]["tests"] >= 8 and summary["pytest_gpu"]["failures"] == 0  # collected, skipped here
    assert summary["bench_parts_done"] == ["lora", "shared", "likelihood", "xcross", "weaverec"]
    assert summary["bench"]["shared/head_train_speedup"] > 0
    metrics = json.loads((out / "quality" / "metrics.json").read_text())
    assert metrics["data/train_examples"] == 64 and 0 <= metrics["test/ndcg@10"] <= 1
    assert "installed from" in (out / "install.log").read_text()
    md = (out / "summary.md").read_text()
    assert "## Real-data quality run" in md and "test/ndcg@10" in md
    assert folder_bytes(out) < 5 * 2**20  # caches, checkpoints and the adapter store stay out of $OUT
