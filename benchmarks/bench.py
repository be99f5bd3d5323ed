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
import contextlib
import copy
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's recsys

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

H100_BF16_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores

# Random-weight configs with the shapes of real models, for GPU speed runs (weights do not matter for speed).
SHAPES = {
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1_000_000.0, max_position_embeddings=32768),
    "llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500_000.0, max_position_embeddings=131072, head_dim=64),
}
Q_NAMES = {"query", "q_proj", "q_lin", "wq"}
K_NAMES = {"key", "k_proj", "k_lin", "wk"}
V_NAMES = {"value", "v_proj", "v_lin", "wv"}
FUSED_QKV = {"qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv"}
QKV_NAMES = Q_NAMES | K_NAMES | V_NAMES | FUSED_QKV  # the projections that read a block's input
PARTS = ("lora", "shared", "likelihood", "xcross", "weaverec")


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


# ============================================================================================ measurement


class Meter:
    """Device-synchronised wall clock and the peak memory of a block above its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self._peak = 0
        self._stop = None
        try:
            import psutil

            self._rss = psutil.Process().memory_info
        except ImportError:  # pragma: no cover - psutil is there with wandb
            self._rss = None

    def rss(self) -> int:
        if self._rss is not None:
            return self._rss().rss
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mem_start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        trim_malloc()  # hand freed heap pages back, so the peak counts this block's own needs
        self._base = self._peak = self.rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, self.rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def mem_stop(self) -> int:
        """Peak bytes above the level at :meth:`mem_start`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.rss())
        return self._peak - self._base


def trim_malloc() -> None:
    """glibc ``malloc_trim(0)``: return freed heap memory to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Block:
    """Times one block of steps: ``start()`` after the warm-up, ``stop(n)`` after the n timed steps."""

    def __init__(self, meter: Meter):
        self.meter = meter

    def start(self) -> None:
        self.meter.mem_start()
        self.t0 = self.meter.now()

    def stop(self, n: int) -> tuple[float, int, int]:
        elapsed = self.meter.now() - self.t0
        return elapsed, n, self.meter.mem_stop()


def split_steps(total: int, rounds: int) -> list[int]:
    """``total`` steps over ``rounds`` rounds, as evenly as possible (at least one a round)."""
    rounds = max(1, min(rounds, total))
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def alternate(variants: dict, total: int, rounds: int, warmup: int, rewarm: int, meter: Meter) -> dict[str, dict]:
    """Run every variant in blocks, alternating; the order rotates by one every round, so every variant takes
    every place in turn and none runs twice in a row.

    ``variants``: name -> ``run(first_index, w, n, block) -> (seconds, steps, peak_bytes)``, which runs
    ``w`` untimed then ``n`` timed steps on batches ``first_index, first_index + 1, ...`` and times them
    with ``block``; ``w`` is ``warmup`` in the first round, ``rewarm`` after. Returns
    name -> {"seconds": [...], "steps": [...], "peak": max bytes}.
    """
    out = {name: {"seconds": [], "steps": [], "peak": 0} for name in variants}
    first = 0
    for r, n in enumerate(split_steps(total, rounds)):
        w = warmup if r == 0 else rewarm
        names = list(variants)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            seconds, steps, peak = variants[name](first, w, n, Block(meter))
            out[name]["seconds"].append(seconds)
            out[name]["steps"].append(steps)
            out[name]["peak"] = max(out[name]["peak"], peak)
        first += w + n
    return out


def batches_needed(args, total: int) -> int:
    """Batches one variant goes through in :func:`alternate` (warm-ups included)."""
    return args.warmup + args.rewarm * (len(split_steps(total, args.rounds)) - 1) + total


def direct(step, first: int, warmup: int, n: int, block: Block):
    """A block of ``step(i)`` calls: ``warmup`` untimed, then ``n`` timed."""
    for i in range(first, first + warmup):
        step(i)
    block.start()
    for i in range(first + warmup, first + warmup + n):
        step(i)
    return block.stop(n)


def mem_ratio(a_mib: float, b_mib: float) -> float | None:
    """a / b, or None when either is below 1 MiB (CPU RSS sampling resolution: not meaningful)."""
    return a_mib / b_mib if min(a_mib, b_mib) >= 1 else None


def per_step(res: dict) -> float:
    return sum(res["seconds"]) / max(1, sum(res["steps"]))


def verdict(ratio: float, op: str, limit: float, rounds: list[float]) -> str:
    """Whether ``ratio`` meets ``op limit`` (``>=``, ``<=``, or ``~``: equal within noise, i.e. within 5% or
    inside the per-round range): "yes"; "no, within noise" when some round met it; else "NO"."""
    if op == "~":
        return "yes" if abs(ratio - limit) <= 0.05 or min(rounds) <= limit <= max(rounds) else "NO"
    met = (lambda x: x >= limit) if op == ">=" else (lambda x: x <= limit)
    if met(ratio):
        return "yes"
    return "no, within noise" if any(met(x) for x in rounds) else "NO"


def span(ratios: list[float]) -> tuple[float, float, float]:
    """(min, max, median) of per-round ratios."""
    r = sorted(ratios)
    mid = len(r) // 2
    return r[0], r[-1], (r[mid] if len(r) % 2 else 0.5 * (r[mid - 1] + r[mid]))


def round_ratios(a: dict, b: dict, scale: float = 1.0) -> list[float]:
    """Per-round (a's time a step) / (scale * b's time a step)."""
    return [(sa / na) / (scale * sb / nb) for sa, na, sb, nb in zip(a["seconds"], a["steps"], b["seconds"], b["steps"])]


# ============================================================================================ models and data


def quiet() -> None:
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import: import it first)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "peft", "recsys"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def shaped_backbone(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """A random-weight decoder of a real model's shape (``SHAPES``), built directly on ``device``.

    The tokenizer is MiniLM's WordPiece (ids < 30522, which any of these vocabularies covers): token
    counts differ a little from the real model's tokenizer, the compute a token does not.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from recsys.models.backbone import Backbone, build_tiny

    tok = build_tiny("tiny:decoder").tokenizer
    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False).eval()
    return Backbone(name=f"shape:{shape}", model=model, tokenizer=tok, kind="decoder")


class Models:
    """The pristine backbone (never wrapped) and fresh copies of it for each model under test."""

    def __init__(self, args):
        from recsys.models.backbone import load_backbone

        self.device = torch.device(args.device)
        self.weights_dtype = torch.bfloat16 if (args.precision == "bf16" and args.device == "cuda") else torch.float32
        if args.shape:
            self.pristine = shaped_backbone(args.shape, args.layers, self.device, self.weights_dtype)
        else:
            dtype = "bfloat16" if self.weights_dtype == torch.bfloat16 else "float32"
            self.pristine = load_backbone(args.backbone, dtype=dtype)
            self.pristine.model.to(self.device)
        self.kind = self.pristine.kind

    def fresh(self):
        """A Backbone with its own deep copy of the pristine weights (peft wraps models in place)."""
        from recsys.models.backbone import Backbone

        b = self.pristine
        return Backbone(name=b.name, model=copy.deepcopy(b.model), tokenizer=b.tokenizer, kind=b.kind)

    def place(self, module: nn.Module) -> nn.Module:
        """On the device, in the weights' dtype (bf16 on CUDA with --precision bf16, as Lightning's bf16-true)."""
        return module.to(self.device).to(self.weights_dtype)


def make_batches(args, models: Models, likelihood: bool = False) -> tuple[list[dict], list[dict]]:
    """(training batches, test batches) of the synthetic ``tools`` domain, collated once on the CPU."""
    from recsys.data.datamodule import RecDataModule

    need_train = batches_needed(args, args.steps)
    need_eval = batches_needed(args, args.eval_steps)
    dm = RecDataModule.from_config(
        domains={"tools": {"source": "synthetic", "num_users": args.num_users, "num_items": 300, "seed": 0}},
        target="tools", max_history=args.max_history, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, bucket_by_length=args.bucket_by_length, seed=args.seed,
        prompt={"max_length": args.max_length},
    ).attach(models.pristine.tokenizer, models.kind, likelihood=likelihood)
    dm.setup()
    train = take(dm.train_loaders()["train"], need_train)
    test = take(dm.test_dataloader(), need_eval, full=True)
    return train, test


def take(loader, n: int, full: bool = False) -> list[dict]:
    """The first ``n`` batches of ``loader``, cycling when it has fewer (only full-size ones if ``full``)."""
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) >= n:
            break
    if full and len(batches) > 1 and batches[-1]["labels"].numel() < batches[0]["labels"].numel():
        batches.pop()
    return [batches[i % len(batches)] for i in range(n)]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(args):
    if args.precision == "bf16" and args.device == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tokens(batch: dict) -> int:
    """Non-padding tokens of a pair batch (all B*C sequences)."""
    return int(batch["attention_mask"].sum())


def warmup_cosine_lambda(total: int, warmup_ratio: float = 0.05):
    """The plain loop's LR multiplier: linear warm-up then cosine (what the module's scheduler does)."""
    warm = max(1, round(warmup_ratio * total))
    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

    return f


def copy_modes(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst``'s submodules the train/eval flags of ``src``'s submodules of the same name."""
    flags = {n: m.training for n, m in src.named_modules()}
    for n, m in dst.named_modules():
        if n in flags:
            m.training = flags[n]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Every submodule in eval mode inside, each one's own flag restored after (as Lightning does)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


# ============================================================================================ the plain loop


class PlainLoRA:
    """The baseline: transformers + peft, written out, no Lightning and no recsys code.

    ``peft.get_peft_model`` on a copy of the backbone with the module's LoRA config; the transformer
    body (``base_model`` of the transformers model: the ``BertModel`` itself, the ``LlamaModel`` of a
    causal LM); the pooled token (first token for encoders, last non-pad for decoders); a
    dense -> GELU -> linear head; softmax cross-entropy over each user's candidates; AdamW with a
    warm-up/cosine LambdaLR and gradient clipping at 1.0.
    """

    def __init__(self, backbone, lora_config, args, total_steps: int, seed: int):
        from peft import get_peft_model

        torch.manual_seed(seed)  # the same draws as the module's construction: the same initial weights
        self.model = get_peft_model(backbone.model, copy.deepcopy(lora_config))
        d = backbone.model.config.hidden_size
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(0.0), nn.Linear(d, 1))
        self.kind, self.args = backbone.kind, args
        self.params = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
        self.opt = None
        self.total_steps = total_steps

    def to(self, device, dtype):
        self.model.to(device).to(dtype)
        self.head.to(device).to(dtype)
        fused = {"fused": True} if torch.device(device).type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=self.args.lr, **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine_lambda(self.total_steps))
        return self

    def scores(self, batch: dict) -> torch.Tensor:
        body = self.model.get_base_model().base_model
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            kw["token_type_ids"] = batch["token_type_ids"]
        h = body(**kw).last_hidden_state
        if self.kind == "encoder":
            pooled = h[:, 0]
        else:
            last = batch["attention_mask"].sum(1) - 1
            pooled = h[torch.arange(h.size(0), device=h.device), last]
        w = self.head[0].weight
        return self.head(pooled.to(w.dtype)).squeeze(-1).view(-1, batch["num_candidates"])

    def train_step(self, batch: dict) -> float:
        with autocast(self.args):
            loss = F.cross_entropy(self.scores(batch).float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.inference_mode()
    def eval_step(self, batch: dict) -> torch.Tensor:
        with autocast(self.args):
            s = self.scores(batch).float()
        return (s > s.gather(1, batch["labels"].unsqueeze(1))).sum(1)  # 0-based rank of the target


# ============================================================================================ method steps


def make_optimizer(params, args, device):
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=args.lr, **fused)


class DirectTrainer:
    """Drives a recsys LightningModule without a Trainer: ``training_step`` under the precision's
    autocast, ``backward``, clipping at 1.0 (the module's own ``configure_gradient_clipping`` where it
    overrides it, as WeaveRec's per-branch clipping), AdamW step and a warm-up/cosine LambdaLR."""

    def __init__(self, module, args, device, total_steps: int, batch_fn, score_fn=None):
        self.module, self.args, self.batch_fn, self.score_fn = module, args, batch_fn, score_fn
        module.trainer = None  # a module that has been through a Trainer keeps a reference to it
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, args, device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine_lambda(total_steps))
        from recsys.methods.base import RecModule

        self.own_clip = type(module).configure_gradient_clipping is not RecModule.configure_gradient_clipping

    def step(self, i: int):
        batch = self.batch_fn(i)
        with autocast(self.args):
            if self.score_fn is None:
                loss = self.module.training_step(batch, i)
            else:  # the module's loss on another scoring function (a baseline), nothing logged
                loss = self.module.objective(batch, self.score_fn)
        loss.backward()
        if self.own_clip:
            self.module.configure_gradient_clipping(self.opt, 1.0, "norm")
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.module.on_train_batch_end(loss, batch, i)


def infer_step(score_fn, args, batch_fn):
    """``i -> score_fn(batch i)`` under inference mode and the precision's autocast."""

    @torch.inference_mode()
    def step(i: int):
        with autocast(args):
            return score_fn(batch_fn(i))

    return step


def random_lora_b(peft_model, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero lora_B weights (a fresh LoRA is a no-op: B = 0); values do not matter for speed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))


# ============================================================================================ FLOPs


def lora_step_flops(model: nn.Module, kind: str, lora_targets, r: int, lengths: list[int]) -> dict[str, float]:
    """Model FLOPs of one LoRA training step with the scoring head, on sequences of ``lengths`` tokens.

    What the step really multiplies (matrix products only; norms, activations, softmax and residual
    additions are not counted; no FLOPs on padding tokens when ``lengths`` are the non-padding lengths):

    - every frozen linear weight W (d_in x d_out) of the transformer blocks, per token:
      forward 2 d_in d_out; backward, the input gradient only, 2 d_in d_out (frozen: no weight
      gradient), except in block 0 for the q/k/v projections, whose input (the embeddings) needs no
      gradient;
    - every LoRA pair A (d_in x r), B (r x d_out) on a target module, per token: forward 2r(d_in + d_out),
      weight gradients 2r(d_in + d_out), input gradients 2r d_out (B) + 2r d_in (A; not in block 0's q/k/v);
    - attention scores and the weighted sum, per block and sequence of length L: forward 4 L^2 d_attn
      (QK^T and PV over all heads, d_attn = heads * head_dim; the full L x L square, as the kernels with a
      padding mask compute it), backward 2 L^2 d_attn for each of dP, dV, dQ, dK: 8 L^2 d_attn; in block 0
      only those whose input needs a gradient (q/k/v need one only if they carry LoRA: an encoder with
      LoRA on q and v skips dK there);
    - the head on the pooled token of each sequence: 6 (d^2 + d) (forward, weight and input gradients);
      a BERT pooler (computed by the model, unused by the loss): forward 2 d^2 per sequence;
    - no LM head (the head reads the body's hidden states) and no embedding FLOPs (lookups).

    In short: FLOPs = T (4 N_frozen + 6 N_lora) - (block 0's q/k/v input gradients)
                      + 12 d_attn sum_s L_s^2 n_layers (- block 0's unneeded attention gradients) + 6 (d^2 + d) S
    with T = sum_s L_s tokens and S sequences. Returns the total and its parts.
    """
    from recsys.models.backbone import body, transformer_layers

    cfg = model.config
    d = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    d_attn = heads * head_dim
    layers = transformer_layers(model)
    targets = set(lora_targets)
    T = float(sum(lengths))
    sq = float(sum(L * L for L in lengths))
    S = float(len(lengths))
    parts = {"frozen_fwd": 0.0, "frozen_input_grad": 0.0, "lora": 0.0, "attention": 0.0, "head": 0.0, "pooler": 0.0}
    for li, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear) or any(p.startswith("lora_") for p in name.split(".")):
                continue
            leaf = [p for p in name.split(".") if p != "base_layer"][-1]
            din, dout = mod.in_features, mod.out_features
            reads_embeddings = li == 0 and leaf in QKV_NAMES
            parts["frozen_fwd"] += 2 * din * dout * T
            if not reads_embeddings:
                parts["frozen_input_grad"] += 2 * din * dout * T
            if leaf in targets:
                input_grads = 2 * r * dout + (0 if reads_embeddings else 2 * r * din)
                parts["lora"] += (2 * r * (din + dout) * 2 + input_grads) * T
        if li == 0:  # which of q, k, v need a gradient: those with a LoRA (their input, the embeddings, needs none)
            fused = bool(targets & FUSED_QKV)
            need_q, need_k, need_v = (fused or bool(targets & names) for names in (Q_NAMES, K_NAMES, V_NAMES))
            backward = 2 * (need_v + (need_q or need_k) + need_q + need_k)
        else:
            backward = 8
        parts["attention"] += (4 + backward) * d_attn * sq
    parts["head"] = 6 * (d * d + d) * S
    pooler = getattr(body(model), "pooler", None)
    if pooler is not None and isinstance(getattr(pooler, "dense", None), nn.Linear):
        parts["pooler"] = 2 * pooler.dense.in_features * pooler.dense.out_features * S
    parts["total"] = sum(parts.values())
    return parts


def batch_lengths(batch: dict, padded: bool = False) -> list[int]:
    m = batch["attention_mask"]
    return [m.size(1)] * m.size(0) if padded else m.sum(1).tolist()


# ============================================================================================ likelihood


def likelihood_scores_batched(model, batch: dict) -> torch.Tensor:
    """Each candidate's full prompt + title, all B*C sequences in one right-padded batch, the LM head only at
    the positions that predict the continuation tokens: ``recsys.models.scoring.likelihood_scores_per_candidate``."""
    from recsys.models.scoring import likelihood_scores_per_candidate

    return likelihood_scores_per_candidate(model, batch)


# ============================================================================================ the parts


class Bench:
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

    # ---------------------------------------------------------------- part 1-3, 7: LoRA vs plain
    def part_lora(self):
        a = self.args
        module = self.lora()
        plain = PlainLoRA(self.models.fresh(), module.lora, a, self.total_steps(), a.seed)
        plain.to(self.device, self.models.weights_dtype)
        copy_modes(module.model, plain.model)  # the module's flags: frozen backbone in eval, LoRA dropout on
        if a.harness == "trainer":
            module_train, module_eval = self._trainer_runs(module)
        else:
            dt = DirectTrainer(module, a, self.device, self.total_steps(), self.train_batch)
            module_train = partial(direct, dt.step)

            def module_eval(first, warmup, n, block):
                with eval_mode(module):
                    step = infer_step(lambda b: module.test_step(b, 0), a, self.test_batch)
                    return direct(step, first, warmup, n, block)

        def plain_train(first, warmup, n, block):
            return direct(lambda i: plain.train_step(self.train_batch(i)), first, warmup, n, block)

        def plain_eval(first, warmup, n, block):
            with eval_mode(plain.model, plain.head):
                return direct(lambda i: plain.eval_step(self.test_batch(i)), first, warmup, n, block)

        # same initial weights: the first losses agree (up to LoRA dropout's random draws)
        tr = alternate({"module": module_train, "plain": plain_train}, a.steps, a.rounds, a.warmup, a.rewarm,
                       self.meter)
        ev = alternate({"module": module_eval, "plain": plain_eval}, a.eval_steps, a.rounds, a.warmup, a.rewarm,
                       self.meter)
        self._lora_trainer = None
        self.models.place(module)  # Lightning moves the module to the CPU after fit/test

        train, test = self.batches()
        tok_step = sum(tokens(b) for b in train) / len(train)
        users_step = train[0]["labels"].numel()
        eval_users = test[0]["labels"].numel()
        t_m, t_p = per_step(tr["module"]), per_step(tr["plain"])
        spread = round_ratios(tr["plain"], tr["module"])
        sec = f"1. LoRA training ({a.harness} vs plain loop)"
        self.add(sec, "examples/s", users_step / t_m, users_step / t_p, t_p / t_m, ">= 1.0x (CPU)",
                 verdict(t_p / t_m, ">=", 1.0, spread) if self.device.type == "cpu" else None, span(spread),
                 key="lora/train_throughput_ratio")
        self.figures["lora/train_examples_per_s"] = users_step / t_m
        self.figures["plain/train_examples_per_s"] = users_step / t_p
        self.add(sec, "non-padding tokens/s", tok_step / t_m, tok_step / t_p, t_p / t_m,
                 ">= 100k tok/s (H100, 0.5B)" if self.device.type == "cuda" else "",
                 (tok_step / t_m >= 1e5) if (self.device.type == "cuda" and a.shape == "qwen2-0.5b") else None)
        self.figures["lora/train_tokens_per_s"] = tok_step / t_m
        self.figures["plain/train_tokens_per_s"] = tok_step / t_p
        self.add(sec, "step time (ms)", 1e3 * t_m, 1e3 * t_p)
        self.figures["lora/train_step_s"], self.figures["plain/train_step_s"] = t_m, t_p
        pm, pp = tr["module"]["peak"] / 2**20, tr["plain"]["peak"] / 2**20
        self.add(sec, "peak memory above weights (MiB)", pm, pp, mem_ratio(pm, pp))
        self.figures["lora/train_peak_mib"], self.figures["plain/train_peak_mib"] = pm, pp

        e_m, e_p = per_step(ev["module"]), per_step(ev["plain"])
        spread = round_ratios(ev["plain"], ev["module"])
        sec2 = "2. LoRA evaluation, 20 candidates"
        self.add(sec2, "users/s", eval_users / e_m, eval_users / e_p, e_p / e_m, ">= 1.0x (CPU)",
                 verdict(e_p / e_m, ">=", 1.0, spread) if self.device.type == "cpu" else None, span(spread),
                 key="lora/eval_throughput_ratio")
        self.figures["lora/eval_users_per_s"] = eval_users / e_m
        self.figures["plain/eval_users_per_s"] = eval_users / e_p
        pm, pp = ev["module"]["peak"] / 2**20, ev["plain"]["peak"] / 2**20
        self.add(sec2, "peak memory above weights (MiB)", pm, pp, mem_ratio(pm, pp))
        self.figures["lora/eval_peak_mib"], self.figures["plain/eval_peak_mib"] = pm, pp
        self._mfu(module, train, t_m, t_p, plain)
        del plain
        self.free()

    def _trainer_runs(self, module):
        """Block runners driving ``module`` through a lightning.Trainer (fit for training, test for evaluation)."""
        import lightning as L
        from torch.utils.data import DataLoader

        a = self.args
        precision = {"fp32": "32-true", "bf16": "bf16-mixed" if a.device == "cpu" else "bf16-true"}[a.precision]

        class Timer(L.Callback):
            def __init__(self, block, warmup, n):
                self.block, self.warmup, self.n, self.result = block, warmup, n, None

            # from the start of the first timed batch (on the device already) to the end of the last
            def _start(self, i):
                if i == self.warmup:
                    self.block.start()

            def _end(self, i):
                if i == self.warmup + self.n - 1:
                    self.result = self.block.stop(self.n)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self._start(batch_idx)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self._end(batch_idx)

            def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
                self._start(batch_idx)

            def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                self._end(batch_idx)

        def trainer(timer, **kw):
            return L.Trainer(accelerator="gpu" if a.device == "cuda" else "cpu", devices=1, precision=precision,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             gradient_clip_val=1.0, use_distributed_sampler=False, callbacks=[timer], **kw)

        def loader(batches, first, count):
            return DataLoader([batches[(first + i) % len(batches)] for i in range(count)], batch_size=None,
                              collate_fn=lambda x: x)

        def fit(first, warmup, n, block):
            timer = Timer(block, warmup, n)
            batches = loader(self.batches()[0], first, warmup + n)
            trainer(timer, max_steps=warmup + n, max_epochs=1).fit(module, train_dataloaders=batches)
            return timer.result

        def test(first, warmup, n, block):
            timer = Timer(block, warmup, n)
            trainer(timer).test(module, dataloaders=loader(self.batches()[1], first, warmup + n), verbose=False)
            return timer.result

        return fit, test

    def _mfu(self, module, train, t_m, t_p, plain):
        a = self.args
        base = self.models.pristine.model  # the same weights, without peft's wrappers
        targets = sorted(module.lora.target_modules)
        useful = sum(lora_step_flops(base, self.kind, targets, a.r, batch_lengths(b))["total"] for b in train)
        useful /= len(train)
        padded = [lora_step_flops(base, self.kind, targets, a.r, batch_lengths(b, padded=True)) for b in train]
        padded_total = sum(p["total"] for p in padded) / len(train)
        sec = "7. Model FLOPs (LoRA step, formula in the README)"
        self.add(sec, "TFLOP a step, non-padding tokens", useful / 1e12)
        self.add(sec, "TFLOP a step, incl. padding", padded_total / 1e12)
        self.add(sec, "achieved TFLOP/s (non-padding)", useful / t_m / 1e12, useful / t_p / 1e12, t_p / t_m)
        self.figures.update({"flops/step_nonpad": useful, "flops/step_padded": padded_total,
                             "flops/parts_padded_first_batch": padded[0],
                             "lora/achieved_tflops": useful / t_m / 1e12, "plain/achieved_tflops": useful / t_p / 1e12})
        if a.peak_tflops:
            mfu_m, mfu_p = useful / t_m / (a.peak_tflops * 1e12), useful / t_p / (a.peak_tflops * 1e12)
            self.add(sec, f"MFU (of {a.peak_tflops:g} TFLOP/s)", mfu_m, mfu_p, mfu_m / mfu_p)
            self.figures["lora/mfu"], self.figures["plain/mfu"] = mfu_m, mfu_p
        if a.check_flops:  # count one plain step (eager attention: its matmuls are visible to the counter)
            from torch.utils.flop_counter import FlopCounterMode

            batch = self.train_batch(0)
            configs = [m.config for m in plain.model.modules() if hasattr(m, "config")]
            saved = [c._attn_implementation for c in configs]
            try:
                for c in configs:
                    c._attn_implementation = "eager"
                with FlopCounterMode(display=False) as counter:
                    plain.train_step(batch)
            finally:
                for c, impl in zip(configs, saved):
                    c._attn_implementation = impl
            counted = counter.get_total_flops()
            formula = lora_step_flops(base, self.kind, targets, a.r, batch_lengths(batch, padded=True))["total"]
            self.add(sec, "TFLOP: FlopCounterMode vs formula (one padded batch)", counted / 1e12, formula / 1e12,
                     counted / formula, "1.0", abs(counted / formula - 1) < 0.01, key="flops/check_ratio")
            self.figures["flops/check_counted"], self.figures["flops/check_formula_padded"] = counted, formula

    # ---------------------------------------------------------------- part 3: shared-prompt training
    def part_shared(self):
        from recsys.methods.lora import LoRAModule
        from recsys.models.backbone import unwrap_peft
        from recsys.models.scoring import as_pairs, likelihood_scores_per_candidate, pair_scores

        a = self.args
        sec = "3. Decoder training, prompt shared across candidates"
        if self.kind != "decoder":
            self.add(sec, "skipped", "encoder backbone")
            return
        train, _ = make_batches(a, self.models, likelihood=True)

        def batch_fn(i):
            return to_device(train[i % len(train)], self.device)

        users = train[0]["labels"].numel()
        c = train[0]["num_candidates"]
        for scoring in ("head", "likelihood"):
            trainers = {}
            # on CUDA also the shared prompt with flex_attention's sparse BlockMask (blocks no candidate sees skipped)
            variants = ("shared", "per_candidate") + (("shared_flex",) if self.device.type == "cuda" else ())
            for variant in variants:
                torch.manual_seed(a.seed)  # the same initial LoRA and head weights in both
                m = LoRAModule(self.models.fresh(), r=a.r, alpha=a.alpha, dropout=a.dropout, scoring=scoring,
                               optimizer=partial(make_optimizer, args=a, device=self.device), warmup_ratio=0.05)
                self.models.place(m)
                m.train()
                m.backbone.model.eval()  # as Lightning leaves a frozen backbone (LoRA dropout active)
                if variant == "shared_flex":
                    unwrap_peft(m.model).set_attn_implementation("flex_attention")
                score_fn = None
                if variant == "per_candidate":
                    if scoring == "head":
                        score_fn = partial(lambda mod, b: pair_scores(mod.model, mod.head, as_pairs(b), "decoder"), m)
                    else:
                        score_fn = partial(lambda mod, b: likelihood_scores_per_candidate(mod.model, b), m)
                trainers[variant] = DirectTrainer(m, a, self.device, self.total_steps(), batch_fn, score_fn)
            res = alternate({v: partial(direct, t.step) for v, t in trainers.items()}, a.steps, a.rounds, a.warmup,
                            a.rewarm, self.meter)
            t_s, t_p = per_step(res["shared"]), per_step(res["per_candidate"])
            spread = round_ratios(res["per_candidate"], res["shared"])
            target = f">= 2x (CPU, SmolLM2, {c} candidates)"
            on_target = self.device.type == "cpu" and not a.shape and a.backbone == "embedded:smollm2-135m"
            ok = verdict(t_p / t_s, ">=", 2.0, spread) if on_target else None
            self.add(sec, f"examples/s, {scoring} scoring: shared prompt vs per-candidate batch", users / t_s,
                     users / t_p, t_p / t_s, target, ok, span(spread), key=f"shared/{scoring}_train_speedup")
            if "shared_flex" in res:
                t_f = per_step(res["shared_flex"])
                spread = round_ratios(res["shared"], res["shared_flex"])
                self.add(sec, f"examples/s, {scoring}: shared prompt, flex_attention vs sdpa block mask", users / t_f,
                         users / t_s, t_s / t_f, "reported", None, span(spread), key=f"shared/{scoring}_flex_over_sdpa")
            self.figures[f"shared/{scoring}_examples_per_s"] = users / t_s
            self.figures[f"shared/{scoring}_per_candidate_examples_per_s"] = users / t_p
            ps, pp = res["shared"]["peak"] / 2**20, res["per_candidate"]["peak"] / 2**20
            self.add(sec, f"peak memory above weights (MiB), {scoring}", ps, pp, mem_ratio(ps, pp))
            self.figures[f"shared/{scoring}_peak_mib"], self.figures[f"shared/{scoring}_per_candidate_peak_mib"] = ps, pp
            del trainers
            self.free()
        p_tok = float(train[0]["prompt_mask"].sum(1).float().mean())
        c_tok = float(train[0]["cont_mask"].sum(1).float().mean())
        self.add(sec, "mean prompt / candidate tokens", f"{p_tok:.0f} / {c_tok:.0f}")
        self.figures["shared/prompt_tokens"], self.figures["shared/cont_tokens"] = p_tok, c_tok
        # tokens a step: shared P + C L against C (P + L)
        self.figures["shared/token_ratio"] = c * (p_tok + c_tok) / (p_tok + c * c_tok)

    # ---------------------------------------------------------------- part 4: likelihood scoring
    def part_likelihood(self):
        from recsys.models.scoring import likelihood_scores, likelihood_scores_naive

        a = self.args
        if self.kind != "decoder":
            self.add("4. Likelihood scoring", "skipped", "encoder backbone")
            return
        _, batches = make_batches(a, self.models, likelihood=True)
        model = self.models.pristine.model
        model.eval()

        def batch_fn(i):
            return to_device(batches[i % len(batches)], self.device)

        def run(fn):
            return partial(direct, infer_step(lambda b: fn(model, b), a, batch_fn))

        variants = {"shared": run(likelihood_scores), "batched": run(likelihood_scores_batched)}
        res = alternate(variants, a.eval_steps, a.rounds, a.warmup, a.rewarm, self.meter)
        loop = None
        if a.naive_loop_batches > 0:
            loop = alternate({"loop": run(likelihood_scores_naive), "shared": run(likelihood_scores)},
                             a.naive_loop_batches, 1, 1, 0, self.meter)
        # the three agree
        with torch.inference_mode(), autocast(a):
            b = batch_fn(0)
            s, nb = likelihood_scores(model, b), likelihood_scores_batched(model, b)
            diff = float((s - nb).abs().max())
            if loop is not None:
                diff = max(diff, float((s - likelihood_scores_naive(model, b)).abs().max()))
        users = batches[0]["prompt_ids"].size(0)
        c = batches[0]["num_candidates"]
        t_s, t_b = per_step(res["shared"]), per_step(res["batched"])
        spread = round_ratios(res["batched"], res["shared"])
        sec = f"4. Decoder likelihood scoring, {c} candidates"
        target = ">= 3x (H100, 0.5B)"
        ok = verdict(t_b / t_s, ">=", 3.0, spread) if (self.device.type == "cuda" and a.shape == "qwen2-0.5b") else None
        self.add(sec, "users/s: shared KV cache vs batched full prompts", users / t_s, users / t_b, t_b / t_s, target,
                 ok, span(spread), key="likelihood/speedup_vs_batched")
        self.figures["likelihood/shared_users_per_s"] = users / t_s
        self.figures["likelihood/batched_users_per_s"] = users / t_b
        if loop is not None:
            t_l, t_s2 = per_step(loop["loop"]), per_step(loop["shared"])
            self.add(sec, "users/s: shared KV cache vs one-at-a-time", users / t_s2, users / t_l, t_l / t_s2,
                     key="likelihood/speedup_vs_loop")
            self.figures["likelihood/loop_users_per_s"] = users / t_l
        ps, pb = res["shared"]["peak"] / 2**20, res["batched"]["peak"] / 2**20
        self.add(sec, "peak memory above weights (MiB)", ps, pb, mem_ratio(ps, pb))
        self.figures["likelihood/shared_peak_mib"], self.figures["likelihood/batched_peak_mib"] = ps, pb
        self.add(sec, "max |score difference| between the methods", diff)
        self.figures["likelihood/max_abs_diff"] = diff
        p_tok = float(batches[0]["prompt_mask"].sum(1).float().mean())
        c_tok = float(batches[0]["cont_mask"].sum(1).float().mean())
        self.add(sec, "mean prompt / continuation tokens", f"{p_tok:.0f} / {c_tok:.0f}")
        self.figures["likelihood/prompt_tokens"], self.figures["likelihood/cont_tokens"] = p_tok, c_tok

    # ---------------------------------------------------------------- part 5: X-Cross
    def source_adapters(self, n: int, folder: str) -> dict[str, str]:
        """n random LoRA adapters of the backbone in an adapter store under ``folder``: {name: path}."""
        from peft import get_peft_model

        from recsys.models.adapter_store import AdapterStore

        lora_cfg = self.lora().lora
        store = AdapterStore(folder)
        bb = self.models.fresh()
        names = [f"source{j}" for j in range(n)]
        torch.manual_seed(self.args.seed + 1)
        pm = get_peft_model(bb.model, copy.deepcopy(lora_cfg), adapter_name=names[0])
        for name in names[1:]:
            pm.add_adapter(name, copy.deepcopy(lora_cfg))
        random_lora_b(pm, seed=self.args.seed + 1)
        from recsys.models.head import ScoringHead

        head = ScoringHead(bb.hidden_size)  # a stored adapter is complete: with the head it was scored with
        out = {name: str(store.save(bb.name, name, pm, name, head, {"domain": name})) for name in names}
        del pm, bb
        return out

    def part_xcross(self):
        from recsys.methods.xcross import XCrossModule

        a = self.args
        n = a.sources
        with tempfile.TemporaryDirectory() as tmp:
            adapters = self.source_adapters(n, tmp)
            torch.manual_seed(a.seed)
            compile_integrators = {"auto": "auto", "true": True, "false": False}[a.xcross_compile]
            module = XCrossModule(self.models.fresh(), adapters, normalize=a.xcross_normalize,
                                  compile_integrators=compile_integrators,
                                  optimizer=partial(make_optimizer, args=a, device=self.device))
        self.models.place(module)
        lora = self.lora()
        xt = DirectTrainer(module, a, self.device, self.total_steps(), self.train_batch)
        lt = self.lora_direct()
        peft_routing, unfused = a.xcross_compare in ("peft", "both"), a.xcross_compare in ("unfused", "both")

        @contextlib.contextmanager
        def integrators(impl):
            """``unfused``: every integrator runs ``forward_reference`` (the unfused original) inside the block."""
            if impl == "unfused":
                for integ in module.xcross.integrators:
                    integ.forward = integ.forward_reference
            try:
                yield
            finally:
                for integ in module.xcross.integrators:
                    integ.__dict__.pop("forward", None)

        def train(impl):
            def run(first, warmup, k, block):
                with integrators(impl):
                    return direct(xt.step, first, warmup, k, block)
            return run

        variants = {"xcross": train("fused"), "lora": partial(direct, lt.step)}
        if unfused:
            variants["xcross_unfused"] = train("unfused")
        tr = alternate(variants, a.steps, a.rounds, a.warmup, a.rewarm, self.meter)

        def infer(m, routing=None, impl="fused"):
            def run(first, warmup, k, block):
                default = module.xcross.routing
                if routing:  # the same X-Cross module with the other adapter routing
                    module.xcross.routing = routing
                try:
                    with eval_mode(m), integrators(impl):
                        return direct(infer_step(m.score, a, self.test_batch), first, warmup, k, block)
                finally:
                    module.xcross.routing = default
            return run

        variants = {"xcross": infer(module), "lora": infer(lora)}
        if peft_routing:
            variants["xcross_peft"] = infer(module, "peft")
        if unfused:
            variants["xcross_unfused"] = infer(module, impl="unfused")
        ev = alternate(variants, a.eval_steps, a.rounds, a.warmup, a.rewarm, self.meter)
        sec = f"5. X-Cross, n = {n} sources, normalize={a.xcross_normalize} (direct calls)"
        for what, res, target in (("training step", tr, 1.15), ("inference batch", ev, 1.1)):
            stem = "train" if what == "training step" else "infer"
            t_x, t_l = per_step(res["xcross"]), per_step(res["lora"])
            r, spread = t_x / (n * t_l), round_ratios(res["xcross"], res["lora"], n)
            self.add(sec, f"{what} (ms): X-Cross vs LoRA; ratio to {n} x LoRA", 1e3 * t_x, 1e3 * t_l, r,
                     f"<= {target}", verdict(r, "<=", target, spread), span(spread),
                     key=f"xcross/{stem}_ratio_to_n_lora")
            self.figures[f"xcross/{stem}_ratio_to_n_lora_rounds"] = spread
            if unfused:
                t_u = per_step(res["xcross_unfused"])
                r, spread = t_u / (n * t_l), round_ratios(res["xcross_unfused"], res["lora"], n)
                self.add(sec, f"{what} (ms): X-Cross, unfused integrators, vs LoRA; ratio to {n} x LoRA", 1e3 * t_u,
                         1e3 * t_l, r, f"<= {target}", verdict(r, "<=", target, spread), span(spread),
                         key=f"xcross/{stem}_ratio_to_n_lora_unfused")
                self.figures[f"xcross/{stem}_ratio_to_n_lora_unfused_rounds"] = spread
                spread = round_ratios(res["xcross"], res["xcross_unfused"], 1)
                self.add(sec, f"{what} (ms): fused integrators (default) vs unfused", 1e3 * t_x, 1e3 * t_u, t_x / t_u,
                         "<= 1.0", verdict(t_x / t_u, "<=", 1.0, spread), span(spread),
                         key=f"xcross/{stem}_fused_over_unfused")
                self.figures[f"xcross/{stem}_fused_over_unfused_rounds"] = spread
        if unfused:  # the integrators alone, on the states they saw in one inference batch
            self._integrators_alone(sec, module, infer, per_step(ev["xcross"]), per_step(ev["xcross_unfused"]))
        e_x, e_l = per_step(ev["xcross"]), per_step(ev["lora"])
        t_x, t_l = per_step(tr["xcross"]), per_step(tr["lora"])
        e_p = None
        if peft_routing:
            e_p = per_step(ev["xcross_peft"])
            spread = round_ratios(ev["xcross"], ev["xcross_peft"], 1)
            self.add(sec, "inference batch (ms): slice routing (default) vs peft's mixed-adapter batch", 1e3 * e_x,
                     1e3 * e_p, e_x / e_p, "<= 1.0", verdict(e_x / e_p, "<=", 1.0, spread), span(spread),
                     key="xcross/infer_slice_over_peft_routing")
        px, pl = tr["xcross"]["peak"] / 2**20, tr["lora"]["peak"] / 2**20
        self.add(sec, "training peak memory above weights (MiB)", px, pl, mem_ratio(px, pl))
        self.figures.update({"xcross/train_step_s": t_x, "xcross/lora_train_step_s": t_l,
                             "xcross/infer_batch_s": e_x, "xcross/lora_infer_batch_s": e_l,
                             "xcross/infer_batch_peft_routing_s": e_p,
                             "xcross/train_peak_mib": px, "xcross/lora_train_peak_mib": pl})
        del module, xt
        self.free()

    def _integrators_alone(self, sec: str, module, infer, e_fused: float, e_unfused: float) -> None:
        """Time every layer's integrator on the (n, B, T, d) states and mask it received in one X-Cross
        inference batch (captured by forward hooks), fused against unfused, alternating; their share of
        the whole inference batch."""
        a, seen = self.args, []
        integs = list(module.xcross.integrators)
        def grab(mod, args, out):
            seen.append((mod, args[0], args[1]))

        hooks = [i.register_forward_hook(grab) for i in integs]
        try:
            infer(module)(0, 0, 1, Block(self.meter))
        finally:
            for h in hooks:
                h.remove()

        def run(impl):
            @torch.inference_mode()
            def step(i):
                for integ, h, mask in seen:
                    (integ.forward if impl == "fused" else integ.forward_reference)(h, mask)
            return partial(direct, step)

        res = alternate({"fused": run("fused"), "unfused": run("unfused")}, 4 * a.eval_steps, a.rounds, a.warmup,
                        a.rewarm, self.meter)
        t_f, t_u = per_step(res["fused"]), per_step(res["unfused"])
        spread = round_ratios(res["fused"], res["unfused"])
        self.add(sec, f"the {len(seen)} integrators alone, one inference batch's states (ms): fused vs unfused",
                 1e3 * t_f, 1e3 * t_u, t_f / t_u, "<= 1.0", verdict(t_f / t_u, "<=", 1.0, spread), span(spread),
                 key="xcross/integrators_alone_fused_over_unfused")
        self.figures["xcross/integrators_alone_fused_over_unfused_rounds"] = spread
        self.add(sec, "integrators' share of an X-Cross inference batch: fused vs unfused", t_f / e_fused,
                 t_u / e_unfused, key="xcross/integrators_share_of_inference")
        self.figures["xcross/integrators_share_of_inference_unfused"] = t_u / e_unfused

    # ---------------------------------------------------------------- part 6: WeaveRec and merged inference
    def part_weaverec(self):
        a = self.args
        lora = self.lora()
        lt = self.lora_direct()
        weave = {}
        try:
            from recsys.methods.weaverec import WeaveRecModule

            for N in a.weave_sources:
                torch.manual_seed(a.seed)
                m = WeaveRecModule(self.models.fresh(), target="tools", sources=[f"source{j}" for j in range(N)],
                                   r=a.r, alpha=a.alpha, dropout=a.dropout, validate_branches=False,
                                   optimizer=partial(make_optimizer, args=a, device=self.device))
                self.models.place(m)
                streams = ["target"] + [f"hybrid/source{j}" for j in range(N)]

                def batch_fn(i, streams=streams):
                    b = self.train_batch(i)
                    return {s: b for s in streams}  # every branch on the same batch: the same work as N+1 LoRA steps

                weave[N] = (m, DirectTrainer(m, a, self.device, self.total_steps(), batch_fn))
        except Exception as e:  # the module is being written by another worker: say so, measure the merge alone
            self.add("6. WeaveRec", "weave-training", f"not measured: {type(e).__name__}: {e}"[:120])
            weave = {}
        sec = "6. WeaveRec (direct calls)"
        if weave:
            variants = {f"weave{N}": partial(direct, t.step) for N, (_, t) in weave.items()}
            variants["lora"] = partial(direct, lt.step)
            tr = alternate(variants, a.steps, a.rounds, a.warmup, a.rewarm, self.meter)
            t_l = per_step(tr["lora"])
            for N in weave:
                t_w = per_step(tr[f"weave{N}"])
                r = t_w / ((N + 1) * t_l)
                spread = round_ratios(tr[f"weave{N}"], tr["lora"], N + 1)
                self.add(sec, f"weave step, {N + 1} branches (ms) vs LoRA; ratio to {N + 1} x LoRA", 1e3 * t_w,
                         1e3 * t_l, r, "<= 1.1", verdict(r, "<=", 1.1, spread), span(spread),
                         key=f"weaverec/train_ratio_{N + 1}_branches")
                self.figures[f"weaverec/train_step_s_{N + 1}_branches"] = t_w
            self.figures["weaverec/lora_train_step_s"] = t_l

        # merged inference: merge_adapters of k random adapters, the dense fold of the largest, the modules' own
        from peft import get_peft_model

        from recsys.models.head import ScoringHead
        from recsys.models.merging import merge_adapters
        from recsys.models.scoring import pair_scores

        k_max = max(a.merged) if a.merged else 0
        variants, labels = {}, {}

        def infer(score_fn, modules, setup=None):
            def run(first, warmup, k, block):
                with eval_mode(*modules):
                    if setup is not None:
                        setup()
                    return direct(infer_step(score_fn, a, self.test_batch), first, warmup, k, block)
            return run

        variants["lora"] = infer(lora.score, [lora])
        if k_max:
            torch.manual_seed(a.seed + 2)
            pm = get_peft_model(self.models.fresh().model, copy.deepcopy(lora.lora), adapter_name="a0")
            for j in range(1, k_max):
                pm.add_adapter(f"a{j}", copy.deepcopy(lora.lora))
            random_lora_b(pm, seed=a.seed + 2)
            for k in a.merged:
                merge_adapters(pm, [f"a{j}" for j in range(k)], "weaverec", new_name=f"merged{k}", activate=False)
            head = ScoringHead(self.models.pristine.hidden_size)
            self.models.place(pm)
            self.models.place(head)
            pm.eval()

            for k in a.merged:
                variants[f"merged{k}"] = infer(lambda b: pair_scores(pm, head, b, self.kind), [pm, head],
                                               partial(pm.base_model.set_adapter, f"merged{k}", inference_mode=True))
                labels[f"merged{k}"] = f"merge_adapters, {k} adapter{'s' if k > 1 else ''} merged (rank {k * a.r})"
            pm.base_model.set_adapter(f"merged{k_max}", inference_mode=True)
            dense = copy.deepcopy(pm).merge_and_unload(adapter_names=[f"merged{k_max}"])
            dense.eval()
            variants["dense"] = infer(lambda b: pair_scores(dense, head, b, self.kind), [dense, head])
            labels["dense"] = f"dense fold of the {k_max}-adapter merge (merge_and_unload)"
        for N, (m, _) in weave.items():
            m.ensure_merged()
            variants[f"module{N}"] = infer(m.score, [m])
            labels[f"module{N}"] = f"WeaveRecModule.score, {N + 1} branches merged"
        ev = alternate(variants, a.eval_steps, a.rounds, a.warmup, a.rewarm, self.meter)
        e_l = per_step(ev["lora"])
        self.figures["weaverec/lora_infer_batch_s"] = e_l
        for name, label in labels.items():
            e = per_step(ev[name])
            spread = round_ratios(ev[name], ev["lora"])
            # a dense fold has no LoRA branch left: at most the LoRA model's cost; a merged adapter: the same
            target, op = ("<= 1.0", "<=") if name == "dense" else ("1.0 within noise", "~")
            self.add(sec, f"inference (ms): {label} vs LoRA", 1e3 * e, 1e3 * e_l, e / e_l, target,
                     verdict(e / e_l, op, 1.0, spread), span(spread), key=f"weaverec/infer_ratio_{name}")
            self.figures[f"weaverec/infer_batch_s_{name}"] = e
        self.free()

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
