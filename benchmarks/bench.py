"""Throughput benchmark: LoRA, X-Cross and WeaveRec against plain loops, in one process, on the same batches.

Parts (``--parts``, comma-separated; default all that apply to the backbone):

- ``lora``: the LoRA LightningModule's training (examples/s, non-padding tokens/s, peak memory, MFU) and
  evaluation (users/s at 20 candidates) against a plain transformers + peft loop doing the same work on
  the same batches (same model and weights, same LoRA config and initial weights, AdamW + warm-up/cosine
  LambdaLR + gradient clipping at 1.0, the same pooled-token head and softmax cross-entropy), written
  here without Lightning or recsys code. ``--harness trainer`` (default) runs the module through a
  ``lightning.Trainer`` with a fixed number of steps (``max_steps``) and times it with a callback;
  ``--harness direct`` calls the module's ``training_step``, ``backward`` and the optimizer step itself.
- ``shared`` (decoders): LoRA training with the prompt shared across candidates (the default for decoders:
  one sequence a user, a block mask, ``recsys.models.scoring.pack_candidates``) against the per-candidate
  batch (each candidate after its own copy of the prompt, ``as_pairs``), examples/s, for the head and the
  likelihood scoring; two LoRA modules of the same initial weights, on the same batches.
- ``likelihood`` (decoders): ``likelihood_scores`` (prompt run once per user, its KV cache reused by the C
  candidates) against running each candidate's full prompt: ``likelihood_scores_naive`` (one sequence at a
  time) and a batched naive version (all B*C full sequences in one padded batch, LM head on the
  continuation positions only).
- ``xcross``: an X-Cross training step / inference with n source adapters (random, made on the fly)
  against n LoRA training steps / inferences of the same batch.
- ``weaverec``: a WeaveRec weave-training step of N+1 branches against N+1 LoRA steps; inference of
  a merged adapter (``merge_adapters``, 1, 2 and 3 adapters merged; the dense fold of the last; the
  WeaveRec module's own merged model) against one LoRA model.

Timing: every comparison alternates blocks of its variants (``--rounds`` rounds, the
order rotating every round), on the same pre-collated batches, so background load hits all variants alike;
each block is timed as a whole with device synchronisation at its ends. ``--warmup`` untimed steps precede
a variant's first block, ``--rewarm`` its later ones (default 1: a timed step never directly follows another
variant's step, whose caches and allocations it would inherit).
Ratios are of mean times; the per-round range of the ratio is printed beside it as a noise estimate.

Memory: the peak above the level at the start of a block (CPU: resident set size sampled every 5 ms;
CUDA: ``torch.cuda.max_memory_allocated``), i.e. activations, gradients and optimizer state, not the
resident weights (printed separately).

MFU (see :func:`lora_step_flops`): model FLOPs of the LoRA step on the non-padding tokens / step time /
``--peak-tflops`` (default 989 on CUDA: H100 SXM dense bf16; on CPU only if given).

Examples::

    python benchmarks/bench.py --backbone embedded:minilm-l6 --steps 8 --json out.json
    python benchmarks/bench.py --backbone tiny:decoder --parts likelihood
    python benchmarks/bench.py --qwen2-0.5b-shape --device cuda --precision bf16 --batch-size 32 --steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the parts and bench_tools beside this file

import torch  # noqa: E402

from bench_likelihood import LikelihoodPart  # noqa: E402
from bench_lora import LoRAPart  # noqa: E402
from bench_shared import SharedPromptPart  # noqa: E402
from bench_tools import (  # noqa: E402
    H100_BF16_TFLOPS, PARTS, DirectTrainer, Meter, Models, batches_needed, make_batches, make_optimizer, quiet,
    to_device,
)
from bench_weaverec import WeaveRecPart  # noqa: E402
from bench_xcross import XCrossPart  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="embedded:minilm-l6", help="recsys backbone name, HF name or local folder")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--qwen2-0.5b-shape", dest="shape", action="store_const", const="qwen2-0.5b",
                       help="random-weight Qwen2-0.5B-shaped decoder (hidden 896, 24 layers, 14/2 heads)")
    shape.add_argument("--1b-shape", dest="shape", action="store_const", const="llama-1b",
                       help="random-weight Llama-3.2-1B-shaped decoder (hidden 2048, 16 layers, 32/8 heads)")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count (smoke runs on a CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast on CPU (fp32 weights, Lightning bf16-mixed); bf16 weights on CUDA (bf16-true)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--harness", choices=("trainer", "direct"), default="trainer",
                   help="how the LoRA module is driven in part lora (the other parts call the modules directly)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per variant (over all rounds)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="timed evaluation batches per variant (default: --steps)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before a variant's first block")
    p.add_argument("--rewarm", type=int, default=1,
                   help="untimed steps before each later block (so that no timed step follows another variant's)")
    p.add_argument("--rounds", type=int, default=4, help="alternating blocks per variant")
    p.add_argument("--batch-size", type=int, default=16, help="training users a batch (1 + 4 candidates each)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="evaluation users a batch (20 candidates each)")
    p.add_argument("--max-history", type=int, default=5, help="history titles in a prompt")
    p.add_argument("--max-length", type=int, default=128, help="pair length cap in tokens")
    p.add_argument("--bucket-by-length", action="store_true", help="length-bucketed training batches")
    p.add_argument("--num-users", type=int, default=400, help="users of the synthetic domain")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--sources", type=int, default=2, help="X-Cross: number of source adapters n")
    p.add_argument("--xcross-normalize", choices=("layernorm", "none"), default="layernorm",
                   help="X-Cross: what W_concat reads (method.module.normalize)")
    p.add_argument("--xcross-compile", choices=("auto", "true", "false"), default="auto",
                   help="X-Cross: torch.compile the integrators' fused step (method.module.compile_integrators; "
                        "auto: on CUDA)")
    p.add_argument("--xcross-compare", choices=("peft", "unfused", "both"), default="peft",
                   help="X-Cross: the extra variant(s) timed beside the default model: peft's mixed-adapter routing "
                        "(inference), and/or the unfused reference integrators (Integrator.forward_reference: "
                        "training and inference)")
    p.add_argument("--weave-sources", default="1,2", help="WeaveRec: numbers of sources N (N+1 branches)")
    p.add_argument("--merged", default="1,2,3", help="numbers of adapters merged for the merged-inference rows")
    p.add_argument("--naive-loop-batches", type=int, default=1,
                   help="batches timed for the one-sequence-at-a-time likelihood reference (slow; 0: skip)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak dense bf16 TFLOP/s for MFU (default {H100_BF16_TFLOPS:g} on CUDA, none on CPU)")
    p.add_argument("--check-flops", action="store_true",
                   help="also count one plain LoRA step with torch's FlopCounterMode, beside the formula")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; known: {PARTS}")
    if args.warmup < 0 or args.rewarm < 0 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup and --rewarm must be >= 0, --steps and --rounds >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.sources < 2:
        p.error("--sources: X-Cross needs n >= 2")
    args.eval_steps = args.eval_steps or args.steps
    args.weave_sources = [int(x) for x in args.weave_sources.split(",") if x.strip()]
    args.merged = [int(x) for x in args.merged.split(",") if x.strip()]
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = H100_BF16_TFLOPS
    return args


# ============================================================================================ the parts


class Bench(LoRAPart, SharedPromptPart, LikelihoodPart, XCrossPart, WeaveRecPart):
    """The benchmark: the parts (``bench_<part>.py``, mixins) on shared models, batches and meter."""

    def __init__(self, args):
        self.args = args
        self.models = Models(args)
        self.device = self.models.device
        self.meter = Meter(self.device)
        self.kind = self.models.kind
        self.rows: list[dict] = []  # the printed table
        self.figures: dict[str, float] = {}  # the JSON figures
        self._train = self._test = None
        self._lora = None
        self._lora_trainer = None

    # ---------------------------------------------------------------- shared pieces
    def batches(self):
        if self._train is None:
            self._train, self._test = make_batches(self.args, self.models)
        return self._train, self._test

    def train_batch(self, i: int) -> dict:
        return to_device(self.batches()[0][i % len(self.batches()[0])], self.device)

    def test_batch(self, i: int) -> dict:
        return to_device(self.batches()[1][i % len(self.batches()[1])], self.device)

    def total_steps(self) -> int:
        return batches_needed(self.args, self.args.steps)

    def new_lora(self):
        from recsys.methods.lora import LoRAModule

        a = self.args
        torch.manual_seed(a.seed)
        return LoRAModule(self.models.fresh(), r=a.r, alpha=a.alpha, dropout=a.dropout,
                          optimizer=partial(make_optimizer, args=a, device=self.device), warmup_ratio=0.05)

    def lora(self):
        """The LoRA module every method is compared with, on the device."""
        if self._lora is None:
            self._lora = self.new_lora()
        self.models.place(self._lora)
        return self._lora

    def lora_direct(self) -> DirectTrainer:
        if self._lora_trainer is None:
            self._lora_trainer = DirectTrainer(self.lora(), self.args, self.device, self.total_steps(),
                                               self.train_batch)
        return self._lora_trainer

    def add(self, section: str, metric: str, value, baseline=None, ratio=None, target: str = "", ok=None,
            spread=None, key: str | None = None):
        self.rows.append({"section": section, "metric": metric, "value": value, "baseline": baseline,
                          "ratio": ratio, "spread": spread, "target": target, "ok": ok})
        if key:
            self.figures[key] = value if ratio is None else ratio
            if ok is not None:
                self.figures[key + "_met"] = ok
            if spread is not None:
                self.figures[key + "_round_range"] = list(spread)


    # ---------------------------------------------------------------- running
    def free(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, after_part=None):
        """Run the parts asked for, in PARTS order; ``after_part(name)`` after each (e.g. write the figures so
        far, so that a run killed by a time limit keeps its finished parts)."""
        a = self.args
        t0 = time.perf_counter()
        for part in PARTS:
            if part in a.parts:
                getattr(self, f"part_{part}")()
                self.figures["bench/parts_done"] = self.figures.get("bench/parts_done", []) + [part]
                if after_part is not None:
                    after_part(part)
        self.figures["bench/seconds"] = time.perf_counter() - t0
        self.figures["bench/load_average_at_end"] = os.getloadavg()[0]
        return self


# ============================================================================================ report


def device_info(args) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0]}
    if args.device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"{model}, {os.cpu_count()} logical cores"
    return info


def fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def table(bench: Bench) -> str:
    head = ["metric", "recsys", "baseline", "ratio", "per-round range", "target", "met"]
    lines, section = [], None
    rows = []
    order = {sec: i for i, sec in enumerate(dict.fromkeys(r["section"] for r in bench.rows))}
    for row in sorted(bench.rows, key=lambda r: (r["section"].split(".")[0], order[r["section"]])):
        spread = f"{row['spread'][0]:.2f}-{row['spread'][1]:.2f} (med {row['spread'][2]:.2f})" if row["spread"] else ""
        ratio = f"{row['ratio']:.3f}x" if isinstance(row["ratio"], float) else fmt(row["ratio"])
        rows.append((row["section"], [row["metric"], fmt(row["value"]), fmt(row["baseline"]), ratio, spread,
                                      row["target"], fmt(row["ok"])]))
    widths = [max(len(head[i]), *(len(r[1][i]) for r in rows)) if rows else len(head[i]) for i in range(len(head))]
    sep = "-+-".join("-" * w for w in widths)
    for sec, cells in rows:
        if sec != section:
            lines += ["", f"## {sec}", " | ".join(h.ljust(w) for h, w in zip(head, widths)), sep]
            section = sec
        lines.append(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bench = Bench(args)
    info = device_info(args)
    name = f"shape:{args.shape}" + (f" ({args.layers} layers)" if args.layers else "") if args.shape else args.backbone
    params = sum(p.numel() for p in bench.models.pristine.model.parameters())
    print(f"# recsys benchmark: {name} ({bench.kind}, {params / 1e6:.1f}M parameters), {args.device}, "
          f"{args.precision}, harness={args.harness}")
    print(f"# device: {info['device']}; torch {info['torch']}, {info['threads']} threads")
    print(f"# batches: {args.batch_size} users x 5 candidates (training), {args.eval_batch_size} users x 20 "
          f"candidates (evaluation); {args.steps} timed steps, {args.eval_steps} timed eval batches, "
          f"{args.rounds} rounds; {args.warmup} warm-up step(s) before a variant's first block, {args.rewarm} before "
          f"later ones; load average {info['load_average_at_start']:.1f}")
    def result() -> dict:
        return {"config": {k: v for k, v in vars(args).items()}, "device": info, "figures": bench.figures,
                "rows": bench.rows}

    def write(part=None):
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result(), indent=1, default=str))

    bench.run(after_part=write)
    print(table(bench))
    print(f"\n# {bench.figures['bench/seconds']:.0f}s, load average at the end "
          f"{bench.figures['bench/load_average_at_end']:.1f}. ratio: recsys vs baseline throughput in part 1-2 "
          "(>1: recsys faster); time ratios in parts 4-6 as labelled; per-round range: the lowest and highest "
          "ratio of one round of alternating blocks, and their median.")
    write()
    if args.json:
        print(f"# figures written to {args.json}")
    return result()


if __name__ == "__main__":
    main()
