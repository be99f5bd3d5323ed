"""Summary of a ``benchmarks/gpu_check.sh`` run: reads what the steps left in its output folder and writes
``summary.json`` and ``summary.md`` there.

Inputs (any may be missing: a step that failed or ran out of time is reported as such):
``env.json``, ``steps.jsonl`` (one line a step: name, rc, seconds, limit), ``pytest-gpu.xml`` (JUnit),
``bench.json`` (``benchmarks/bench.py --json``), ``quality/metrics.json`` (train.py's).

    python benchmarks/gpu_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# bench.py figures worth a line in the summary: key -> label
BENCH_KEYS = {
    "lora/train_tokens_per_s": "LoRA training, non-padding tokens/s (target 100,000 on the 0.5B shape)",
    "lora/train_examples_per_s": "LoRA training, examples/s",
    "lora/mfu": "LoRA training MFU",
    "lora/train_throughput_ratio": "LoRA module / plain loop, training throughput",
    "lora/eval_throughput_ratio": "LoRA module / plain loop, evaluation throughput",
    "lora/train_peak_mib": "LoRA training peak memory above weights (MiB)",
    "shared/head_train_speedup": "shared-prompt training speedup, head scoring (x per-candidate)",
    "shared/likelihood_train_speedup": "shared-prompt training speedup, likelihood (x per-candidate)",
    "shared/head_flex_over_sdpa": "shared prompt: flex_attention over sdpa block mask, head",
    "shared/likelihood_flex_over_sdpa": "shared prompt: flex_attention over sdpa block mask, likelihood",
    "likelihood/speedup_vs_batched": "likelihood scoring, shared KV cache vs batched full prompts (target 3x)",
    "xcross/train_ratio_to_n_lora": "X-Cross training step / n LoRA steps (target <= 1.15)",
    "xcross/infer_ratio_to_n_lora": "X-Cross inference / n LoRA (target <= 1.1)",
    "xcross/train_peak_mib": "X-Cross training peak memory above weights (MiB)",
    "weaverec/train_ratio_2_branches": "WeaveRec weave step, 2 branches / 2 LoRA steps (target <= 1.1)",
    "weaverec/train_ratio_3_branches": "WeaveRec weave step, 3 branches / 3 LoRA steps (target <= 1.1)",
    "weaverec/infer_ratio_merged1": "merged inference (1 adapter) / LoRA",
    "weaverec/infer_ratio_merged3": "merged inference (3 adapters) / LoRA",
    "weaverec/infer_ratio_dense": "dense fold / LoRA",
}
QUALITY_KEYS = ("test/hr@1", "test/hr@5", "test/hr@10", "test/ndcg@5", "test/ndcg@10", "test/mrr",
                "popularity/test/hr@1", "popularity/test/ndcg@10", "random/test/ndcg@10")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def summarize(out: Path) -> dict:
    steps = []
    if (out / "steps.jsonl").is_file():
        steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    bench = _load(out / "bench.json") or {}
    figures = bench.get("figures", {})
    quality = _load(out / "quality" / "metrics.json") or {}
    return {
        "env": _load(out / "env.json"),
        "steps": steps,
        "pytest_gpu": pytest_counts(out / "pytest-gpu.xml"),
        "bench": {k: figures[k] for k in BENCH_KEYS if k in figures},
        "bench_parts_done": figures.get("bench/parts_done", []),
        "bench_device": bench.get("device"),
        "quality": {k: quality[k] for k in quality if k in QUALITY_KEYS or k.startswith(("params/", "data/", "time/"))},
        "ok": bool(steps) and all(s["rc"] == 0 for s in steps),
    }


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def markdown(s: dict) -> str:
    env = s["env"] or {}
    lines = ["# GPU check", "", f"all steps passed: **{'yes' if s['ok'] else 'NO'}**", ""]
    lines += ["## Environment", ""] + [f"- {k}: `{v}`" for k, v in env.items()] + [""]
    lines += ["## Steps", "", "| step | exit | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {x['name']} | {x['rc']}{' (time limit)' if x['rc'] in (124, 137) else ''} | {x['seconds']:.0f} "
              f"| {x['limit']} |" for x in s["steps"]]
    p = s["pytest_gpu"]
    lines += ["", "## pytest -m gpu", ""]
    lines += [f"{p['passed']} passed, {p['failures'] + p['errors']} failed, {p['skipped']} skipped"
              + (": " + ", ".join(p["failed"]) if p["failed"] else "")] if p else ["no report"]
    lines += ["", "## Benchmark (bench.json)", "", f"parts done: {', '.join(s['bench_parts_done']) or 'none'}", "",
              "| figure | value |", "|---|---|"]
    lines += [f"| {BENCH_KEYS[k]} | {fmt(v)} |" for k, v in s["bench"].items()]
    lines += ["", "## Real-data quality run (quality/metrics.json)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in s["quality"].items()] or ["| (no metrics.json) | |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    out = Path((argv or sys.argv[1:])[0])
    s = summarize(out)
    (out / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    (out / "summary.md").write_text(markdown(s))
    print(markdown(s))
    return s


if __name__ == "__main__":
    main()
