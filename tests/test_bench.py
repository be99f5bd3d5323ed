"""Smoke test of the benchmark script (benchmarks/bench.py) on tiny models: it runs and reports its ratios."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
SMALL = ["--steps", "2", "--eval-steps", "1", "--rounds", "1", "--warmup", "0", "--num-users", "40",
         "--batch-size", "2", "--eval-batch-size", "2"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("recsys_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_encoder_prints_ratios(bench, tmp_path, capsys):
    out = bench.main(["--backbone", "tiny:encoder", *SMALL, "--merged", "1,2", "--weave-sources", "1",
                      "--check-flops", "--json", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    for section in ("1. LoRA training", "2. LoRA evaluation", "5. X-Cross", "6. WeaveRec", "7. Model FLOPs"):
        assert section in printed
    figures = out["figures"]
    for key in ("lora/train_throughput_ratio", "lora/eval_throughput_ratio", "xcross/train_ratio_to_n_lora",
                "xcross/infer_ratio_to_n_lora", "weaverec/train_ratio_2_branches", "weaverec/infer_ratio_merged1",
                "weaverec/infer_ratio_merged2", "weaverec/infer_ratio_dense", "weaverec/infer_ratio_module1"):
        assert figures[key] > 0, key
        assert f"{figures[key]:.3f}x" in printed, key
    assert figures["flops/check_ratio"] == pytest.approx(1.0, abs=1e-6)  # the FLOP formula counts what runs
    assert json.loads((tmp_path / "b.json").read_text())["figures"]["lora/train_throughput_ratio"] > 0


def test_bench_decoder_likelihood(bench, capsys):
    out = bench.main(["--backbone", "tiny:decoder", *SMALL, "--parts", "likelihood"])
    printed = capsys.readouterr().out
    assert "4. Decoder likelihood scoring" in printed
    figures = out["figures"]
    for key in ("likelihood/speedup_vs_batched", "likelihood/speedup_vs_loop"):
        assert f"{figures[key]:.3f}x" in printed, key
    assert figures["likelihood/max_abs_diff"] < 1e-4  # shared cache, batched and one-at-a-time agree
