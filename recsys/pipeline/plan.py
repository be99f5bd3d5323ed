"""A plan before the job: the memory a GPU needs and the work an epoch does, from the composed config and the
backbone's shape on the meta device (no weights read, nothing downloaded). ``python -m recsys.plan`` prints it;
:class:`PlanCheck` refuses a SLURM sweep whose plan does not fit before anything is submitted.

Per GPU (bytes; N ranks, FSDP shards what it holds by N):

- frozen weights: the backbone (and X-Cross's n frozen source adapters) at ``backbone.dtype``;
- trainable weights, their gradients, AdamW's two states (the trainables' dtype: bf16 under ``bf16-true``, float32
  otherwise: peft keeps adapters in float32 over a bf16 base);
- activations: batch a rank x tokens a user x layers x the bytes a block keeps a token
  (:func:`block_bytes_per_token`) x streams held at once (X-Cross: n streams; WeaveRec: N+1 branches, their losses
  summed before one backward); with gradient checkpointing a block keeps only its input and one block is
  recomputed at a time; plus the float32 LM-head copy and logits of likelihood scoring;
- FSDP: two gathered units (the largest block or the root: embeddings and LM head) beside the shards;
- a fixed overhead (CUDA context, allocator slack: ``plan.overhead_gb``).

Work an epoch: optimizer steps, tokens (upper bounds: every sequence at its length cap; domain sizes are capped by
``data.max_train_examples``, or given as ``+plan.examples``), FLOPs = 2 x forward (4 N_frozen + 6 N_trained a
token, + 2 N_frozen with checkpointing) as in benchmarks/README.md part 7, and the time at ``plan.tflops`` achieved
a GPU. Validated against measured peaks on the CPU for small decoder shapes (tests/test_plan.py).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from hydra.experimental.callback import Callback

from recsys.core.errors import UserError

log = logging.getLogger("recsys")
GIB = 2**30
DEFAULTS = {"check": True, "device_gb": 80.0, "tflops": 300.0, "overhead_gb": 2.0, "headroom": 0.9, "examples": None}
WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What the estimates read from a backbone: sizes and the linear layers of one block (name -> (in, out))."""
    kind: str
    layers: int
    d: int
    d_attn: int
    heads: int
    inter: int
    vocab: int
    params: int
    block_params: int
    linears: dict = field(default_factory=dict)


def shape_of(model, kind: str) -> Shape:
    """The :class:`Shape` of a (meta-device) transformers model."""
    from torch import nn

    from recsys.models.backbone import transformer_layers

    c = model.config
    blocks = transformer_layers(model)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    linears = {name.split(".")[-1]: (m.in_features, m.out_features)
               for name, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    return Shape(kind=kind, layers=len(blocks), d=c.hidden_size, d_attn=heads * head_dim, heads=heads,
                 inter=c.intermediate_size, vocab=c.vocab_size, params=sum(p.numel() for p in model.parameters()),
                 block_params=sum(p.numel() for p in blocks[0].parameters()), linears=linears)


@dataclass(frozen=True)
class Setting:
    """What the estimates read from a composed run config."""
    method: str
    streams: int            # forward streams whose activations are held at once
    adapters: int           # LoRA adapters that train
    frozen_adapters: int    # frozen LoRA adapters (X-Cross's sources)
    r: int
    targets: tuple
    dropout: float
    scoring: str
    heads: int              # scoring heads that train
    ranks: int
    batch: int              # users a rank a micro-batch
    tokens: int             # tokens a user (the length cap)
    answer_tokens: int      # tokens the LM head scores a user (likelihood)
    weight_bytes: int
    train_bytes: int
    act_bytes: int
    fsdp: bool
    checkpointing: bool
    accumulate: int
    examples: list          # training examples an epoch, a stream (None: unknown)
    plan: dict
    sharded_load: bool = False   # trainer=fsdp2: each rank reads only its shard of the frozen weights


def block_bytes_per_token(s: Shape, st: Setting) -> float:
    """Bytes a transformer block keeps for backward, a token a stream (decoder: Llama/Qwen blocks with sdpa):
    the normalisations' float32 inputs (2 x 4d), attention's q, k, v, output (k and v repeated to all heads, as
    with a padding mask) and log-sum-exp, the MLP's gate, activation and up outputs (3 I), and for each LoRA
    layer that trains its dropout mask (1 byte) and dropped input (when dropout > 0); frozen linear layers keep
    nothing (their input gradient needs only the weight)."""
    a = st.act_bytes
    attn = a * 4 * s.d_attn + 4 * s.heads
    mlp = 3 * a * s.inter
    norms = 2 * 4 * s.d if s.kind == "decoder" else 2 * (a + 1) * s.d  # encoders: LayerNorm inputs, dropout masks
    adapted = [s.linears[t][0] for t in st.targets if t in s.linears]
    if st.adapters:
        lora = sum((a + 1) * i for i in adapted) if st.dropout > 0 else a * len(set(adapted)) * s.d
    else:
        lora = sum(adapted) if st.dropout > 0 and st.frozen_adapters else 0  # frozen adapters: masks only
    integrator = 3 * a * s.d if st.method == "xcross" else 0
    return norms + attn + mlp + lora + integrator


def activation_bytes(s: Shape, st: Setting, checkpointing: bool) -> float:
    """Activations a rank holds at the peak of a step (bytes)."""
    tokens = st.batch * st.tokens * st.streams
    per_block = block_bytes_per_token(s, st)
    if checkpointing:  # each block keeps its input; one block is recomputed (and its gradients live) at a time
        kept = tokens * (s.layers * st.act_bytes * s.d + 2 * per_block)
    else:
        kept = tokens * per_block * (s.layers + 1)  # + the gradients of the block in backward
    return kept


def lm_head_bytes(s: Shape, st: Setting) -> float:
    """Likelihood scoring (recsys.models.scoring.token_logprobs): the float32 logits of the scored tokens and,
    over non-float32 weights, the LM head's float32 copy that backward keeps, a stream each."""
    if st.scoring != "likelihood":
        return 0.0
    return (4 * s.vocab * st.batch * st.answer_tokens + (4 * s.vocab * s.d if st.weight_bytes != 4 else 0)) * st.streams


# ---------------------------------------------------------------------------------------------- the setting
PRECISION = {"bf16-true": (2, 2), "bf16-mixed": (4, 2), "16-mixed": (4, 2), "16-true": (2, 2), "32-true": (4, 4),
             "32": (4, 4), "64-true": (8, 8)}  # trainer.precision -> (trainable bytes, activation bytes)


def plan_options(cfg) -> dict:
    """``plan.*`` (all optional: ``+plan.device_gb=141``), over :data:`DEFAULTS`."""
    from omegaconf import OmegaConf

    given = cfg.get("plan") or {}
    given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given)
    unknown = sorted(set(given) - set(DEFAULTS) - {"source_r"})
    if unknown:
        raise UserError(f"plan: unknown keys {unknown}; known: {sorted(DEFAULTS)} and source_r")
    return {**DEFAULTS, "source_r": 8, **given}


def _streams(cfg, n: int) -> tuple[int, int, int, int]:
    """(streams, trained adapters, frozen adapters, trained heads) of the run's method."""
    method, module = cfg.method.name, cfg.method.module
    head = 1 if module.get("scoring", "head") == "head" else 0
    if method == "weaverec":  # every branch trains (stored hybrids that are reused would not)
        return n + 1, n + 1, 0, head * (n + 1 if module.get("head") == "per_branch" else 1)
    if method == "xcross":
        if n < 2:
            raise UserError(f"data.sources={list(cfg.data.sources)}: X-Cross needs n >= 2 sources to plan")
        return n, 0, n, 1
    if method in ("lora", "joint"):
        return 1, 1, 0, head
    raise UserError(f"method={method}: the plan covers lora, joint, weaverec and xcross (what trains a backbone)")


def _tokens(cfg, kind: str) -> tuple[int, int]:
    """(tokens a user, tokens the LM head scores a user) at the length caps."""
    d, title = cfg.data, cfg.data.prompt.title_max_tokens
    if d.get("protocol", "ranking") == "paper":
        answer = d.paper.answer_size * (title + 4)  # titles, separators, end of sequence
        return d.paper.max_prompt_length + answer, answer
    cands = 1 + d.num_train_negatives
    if kind == "encoder":
        return cands * d.prompt.max_length, 0
    cont = cands * (title + 2)
    return d.prompt.max_length - title + cont, cont


def _examples(cfg, n: int, given) -> list | None:
    """Training examples an epoch, a stream: ``plan.examples`` or the caps of the data config (upper bounds)."""
    if given is not None:
        return [int(x) for x in (given if isinstance(given, (list, tuple)) else [given])]
    cap = cfg.data.get("max_train_examples")
    if cap is None:
        return None
    target = int(cap * (cfg.data.get("target_fraction") or 1.0))
    method = cfg.method.name
    if method == "weaverec":
        hc = cfg.data.hybrid_cap
        return [target] + [min(hc, target) + min(hc, cap)] * n
    return [target + (cap * n if method == "joint" else 0)]


def setting_of(cfg, shape: Shape, targets: list[str]) -> Setting:
    """The :class:`Setting` of a composed train config."""
    from recsys.pipeline.scale import sharded_loading

    opts = {**plan_options(cfg), "nodes": int(cfg.trainer.get("num_nodes") or 1)}
    n = len(cfg.data.get("sources") or [])
    streams, adapters, frozen, heads = _streams(cfg, n)
    t = cfg.trainer
    ranks = int(t.get("devices") or 1) * int(t.get("num_nodes") or 1)
    precision = str(t.get("precision"))
    if precision not in PRECISION:
        raise UserError(f"trainer.precision={precision}: the plan knows {sorted(PRECISION)}")
    train_b, act_b = PRECISION[precision]
    dtype = cfg.backbone.get("dtype", "float32")
    weight_b = 2 if precision.endswith("-true") and train_b == 2 else WIDTH.get(dtype, 2)  # auto: the checkpoint's
    strategy = t.get("strategy")
    target = strategy.get("_target_", "") if hasattr(strategy, "get") else str(strategy)
    tokens, answer = _tokens(cfg, shape.kind)
    module = cfg.method.module
    return Setting(
        method=cfg.method.name, streams=streams, adapters=adapters, frozen_adapters=frozen,
        r=int(module.get("r") or opts["source_r"]), targets=tuple(targets), dropout=float(module.get("dropout") or 0.05),
        scoring=module.get("scoring", "head"), heads=heads, ranks=ranks, batch=-(-int(cfg.data.batch_size) // ranks),
        tokens=tokens, answer_tokens=answer, weight_bytes=weight_b, train_bytes=train_b, act_bytes=act_b,
        fsdp="FSDP" in target or target == "fsdp", checkpointing=bool(cfg.get("speed", {}).get("activation_checkpointing")),
        accumulate=int(t.get("accumulate_grad_batches") or 1), examples=_examples(cfg, n, opts["examples"]), plan=opts,
        sharded_load=sharded_loading(cfg))


# ---------------------------------------------------------------------------------------------- the plan
def lora_params(s: Shape, r: int, targets) -> int:
    """Weights of one LoRA adapter: r (in + out) for every targeted linear layer of every block."""
    return s.layers * sum(r * (i + o) for name, (i, o) in s.linears.items() if name in targets)


def trainable_params(s: Shape, st: Setting) -> int:
    """What trains: LoRA adapters, scoring heads (dense d x d, GELU, linear d -> 1), X-Cross's integrators
    (W_concat: n d -> 2n(n-1) a layer) and stream weights."""
    n = st.frozen_adapters
    integrators = s.layers * n * s.d * 2 * n * (n - 1) + n if st.method == "xcross" else 0
    return st.adapters * lora_params(s, st.r, st.targets) + st.heads * (s.d * s.d + 2 * s.d + 1) + integrators


def estimate(s: Shape, st: Setting) -> dict:
    """The plan: bytes a GPU (rows), whether it fits, and the work of an epoch."""
    shard = st.ranks if st.fsdp else 1
    frozen = s.params + st.frozen_adapters * lora_params(s, st.r, st.targets)
    trained = trainable_params(s, st)
    rows = {
        "frozen weights": frozen * st.weight_bytes / shard,
        "trainable weights": trained * st.train_bytes / shard,
        "gradients": trained * st.train_bytes / shard,
        "optimizer state (AdamW)": 2 * trained * st.train_bytes / shard,
        "activations": activation_bytes(s, st, st.checkpointing),
        "LM head (likelihood scoring)": lm_head_bytes(s, st),
    }
    if st.fsdp:  # two units gathered at once (the one computing, the one prefetched): a block or the root
        root = s.params - s.layers * s.block_params
        rows["FSDP gathered units"] = 2 * max(s.block_params, root) * st.weight_bytes
    rows["CUDA context, allocator slack"] = st.plan["overhead_gb"] * GIB
    total = sum(rows.values())
    device = st.plan["device_gb"] * GIB
    per_node = st.ranks // max(1, st.plan.get("nodes", 1))
    host = frozen * st.weight_bytes // (st.ranks if st.sharded_load else 1)  # fsdp2: a rank's rows only
    return {"rows": rows, "total": total, "device": device, "fits": total <= st.plan["headroom"] * device,
            "host_rank": host, "host_node": per_node * host,
            "params": {"frozen": frozen, "trainable": trained},
            "activations_other": activation_bytes(s, st, not st.checkpointing), **work(s, st, trained)}


def work(s: Shape, st: Setting, trained: int) -> dict:
    """Steps, tokens, FLOPs and time of one epoch (None where the domain sizes are unknown)."""
    matmul = s.layers * sum(i * o for i, o in s.linears.values())  # the blocks' linear weights
    per_token = (4 + 2 * st.checkpointing) * matmul * st.streams + (6 + 2 * st.checkpointing) * trained
    per_token += 12 * s.layers * s.d_attn * st.tokens * st.streams  # attention over a user's sequence
    head = 6 * s.vocab * s.d * st.answer_tokens * st.streams if st.scoring == "likelihood" else 0
    out = {"flops_per_user": per_token * st.tokens + head, "steps": None, "tokens": None, "flops": None, "hours": None}
    if st.examples:
        users = max(st.examples)  # streams advance together: an epoch is the longest stream
        global_batch = st.batch * st.ranks
        out["steps"] = -(-users // (global_batch * st.accumulate))
        out["tokens"] = sum(st.examples) * st.tokens
        out["flops"] = out["flops_per_user"] * sum(st.examples) / st.streams
        out["hours"] = out["flops"] / (st.ranks * st.plan["tflops"] * 1e12) / 3600
    return out


def check_sharded(cfg) -> None:
    """UserError for what ``trainer=fsdp2`` does not support (``checks.sharded``), without reading any data: a plan
    of what train.py would refuse is no plan (``recsys.plan`` and :class:`PlanCheck` ask before planning)."""
    from recsys.pipeline import checks, stages
    from recsys.pipeline.scale import sharded_loading

    if sharded_loading(cfg):
        checks.sharded(cfg, stages.method_class(cfg)[0], cfg.data.get("protocol", "ranking"))


def plan_config(cfg) -> tuple[Shape, Setting, dict]:
    """Compose-free entry: the shape (meta device), the setting and the estimate of a composed train config."""
    from recsys.models.backbone import config_kind, default_lora_targets
    from recsys.models.shapes import meta_model, shape_config

    config = shape_config(cfg.backbone.name)
    kind = config_kind(config)
    model = meta_model(config, kind)
    shape = shape_of(model, kind)
    targets = (cfg.method.module.get("target_modules") or cfg.backbone.get("lora_target_modules")
               or default_lora_targets(model, kind))
    st = setting_of(cfg, shape, list(targets))
    return shape, st, estimate(shape, st)


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f} GiB"


def format_plan(cfg, shape: Shape, st: Setting, est: dict) -> str:
    """The plan as text (what ``python -m recsys.plan`` prints)."""
    mode = f"FSDP over {st.ranks}" if st.fsdp else (f"DDP x {st.ranks}" if st.ranks > 1 else "1 device")
    lines = [f"plan: {st.method} on {cfg.backbone.name} ({shape.params / 1e9:.2f}B, {shape.layers} layers, d={shape.d}), "
             f"{mode}, precision {cfg.trainer.precision}, {st.batch} users a GPU x {st.tokens} tokens x {st.streams} "
             f"stream(s), activation checkpointing {'on' if st.checkpointing else 'off'}",
             f"  parameters: frozen {est['params']['frozen'] / 1e6:,.1f}M, trainable {est['params']['trainable'] / 1e6:,.2f}M"]
    lines += [f"  {name:<32}{_gib(v)}" for name, v in est["rows"].items()]
    other = "on" if not st.checkpointing else "off"
    lines.append(f"  {'(activations with checkpointing ' + other + ')':<32}{_gib(est['activations_other'])}")
    verdict = "fits" if est["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total a GPU':<32}{_gib(est['total'])} of {_gib(est['device']).strip()} "
                 f"(plan.device_gb; headroom {st.plan['headroom']:.0%}): {verdict}")
    how = "each rank reads its shard, trainer=fsdp2" if st.sharded_load else "from_pretrained on every rank"
    lines.append(f"  host memory while loading ({how}): {_gib(est['host_rank']).strip()} a rank, "
                 f"{_gib(est['host_node']).strip()} a node (SLURM: hydra.launcher.mem_gb)")
    if est["steps"] is None:
        lines.append("  epoch: domain sizes unknown (data.max_train_examples=null): give +plan.examples=<users>")
    else:
        lines.append(f"  epoch (upper bounds, examples a stream {st.examples}): {est['steps']:,} optimizer steps, "
                     f"{est['tokens'] / 1e6:,.1f}M tokens, {est['flops']:.3g} FLOPs, {est['hours']:.1f} h on "
                     f"{st.ranks} GPU(s) at {st.plan['tflops']:g} TFLOP/s achieved a GPU (plan.tflops)")
    return "\n".join(lines)


def one_line(cfg, st: Setting, est: dict) -> str:
    """The plan in one line (the refusal's message)."""
    rows = ", ".join(f"{k} {v / GIB:.1f}" for k, v in est["rows"].items())
    return (f"{st.method} on {cfg.backbone.name}, {'FSDP' if st.fsdp else 'DDP'} x {st.ranks}: {est['total'] / GIB:.1f} "
            f"GiB a GPU ({rows}) > {st.plan['headroom']:.0%} of plan.device_gb={st.plan['device_gb']:g}")


class PlanCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml): on a multirun with the SLURM launcher, refuse before submission
    when the plan of the sweep's base settings (its swept keys at their config values) does not fit
    ``plan.device_gb``: one line on stderr, exit status 2 (Hydra only warns about a callback's exceptions).
    ``+plan.check=false`` submits anyway; a backbone without a shape is submitted unplanned, with a warning."""

    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if "Slurm" not in launcher or not plan_options(config)["check"]:
            return
        try:
            check_sharded(config)
        except UserError as e:
            print(f"error: refused before submission: {e}", file=sys.stderr)
            raise SystemExit(2)
        try:
            _, st, est = plan_config(config)
        except UserError as e:
            log.warning("no plan before submission: %s", e)
            return
        if not est["fits"]:
            print(f"error: refused before submission, the plan does not fit: {one_line(config, st, est)}. Try "
                  "trainer=fsdp, speed.activation_checkpointing=true, a smaller recipe.batch_size (more "
                  "trainer.accumulate_grad_batches), or +plan.check=false to submit anyway", file=sys.stderr)
            raise SystemExit(2)
        mem_gb = config.hydra.launcher.get("mem_gb")
        if mem_gb and est["host_node"] > mem_gb * GIB:
            need = -(-est["host_node"] * 1.25 // GIB)
            print(f"error: refused before submission, the host memory does not fit: {st.ranks // st.plan['nodes']} "
                  f"ranks a node each load {est['host_rank'] / GIB:.1f} GiB of weights ({est['host_node'] / GIB:.1f} "
                  f"GiB) > hydra.launcher.mem_gb={mem_gb}. Set hydra.launcher.mem_gb={need:.0f}, or "
                  "+plan.check=false to submit anyway", file=sys.stderr)
            raise SystemExit(2)
        log.info("plan: %.1f GiB a GPU of %g: fits", est["total"] / GIB, st.plan["device_gb"])
