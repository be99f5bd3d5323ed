"""The shared pieces of the throughput benchmark (``benchmarks/bench.py``): timing blocks and memory
(``Meter``, ``Block``, ``alternate``), ratios and verdicts, shaped random-weight backbones and batches
(``Models``, ``make_batches``), the plain transformers + peft loop it compares against (``PlainLoRA``,
``DirectTrainer``), and the model-FLOP count (``lora_step_flops``). The parts are ``bench_<part>.py``."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import os
import sys
import threading
import time
import warnings
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
