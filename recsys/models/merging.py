"""Merging peft LoRA adapters of one backbone: WeaveRec's merge and the merge baselines.

Every rule works on the dense update that each adapter makes to each adapted weight,

    D_i = s_i * B_i @ A_i        (out, in);  s_i = the adapter's own peft scaling at that module:
                                 alpha_i / r_i, alpha_i / sqrt(r_i) with rsLoRA, rank/alpha patterns included,

with per-adapter weights ``w_i`` (lambda_i in the paper; one list for the whole model, or one list
per adapted module) and one global coefficient ``c`` (``scaling``). Per adapted weight the merge is:

===============  =============================================  ===========  ============  ========================
rule             Delta W                                        default w_i  adapter rank  computed by
===============  =============================================  ===========  ============  ========================
weaverec         c * sum_i w_i D_i                              1/N          sum_i r_i     peft "cat"
task_arithmetic  c * sum_i w_i D_i                              1            sum_i r_i     peft "cat"
ties             c * disjoint_mean_i(w_i trim(D_i))             1            min(out, in)  merge_utils.ties
dare_linear      c * sum_i w_i (M_i * D_i) / density            1            min(out, in)  merge_utils.dare_linear
dare_ties        c * disjoint_mean_i(w_i M_i * D_i / density)   1            min(out, in)  merge_utils.dare_ties
===============  =============================================  ===========  ============  ========================

- ``weaverec`` sums the low-rank *products* (the paper's merge, uniform lambda = 1/N by default);
  it is exact: peft's "cat" stacks the factors, A = [w_1 s_1 A_1; ...; w_N s_N A_N], B = [B_1 ... B_N],
  so B A = sum_i w_i s_i B_i A_i. ``task_arithmetic`` is the same sum with weights 1 and ``scaling``
  as the task-arithmetic coefficient (the two differ in which adapters are merged, not in the
  formula). peft's "linear" is *not* used: it averages A and B separately,
  (sum_i sqrt(w_i s_i) B_i)(sum_i sqrt(w_i s_i) A_i), which adds cross terms B_i A_j.
- ``ties`` (Yadav et al. 2023): keep the ``int(density * numel)`` largest-magnitude entries of each
  D_i, elect the sign of each entry as the sign of the sum of the trimmed D_i (ties -> +; or the
  sign held by most adapters with ``majority_sign_method="frequency"``; the weights do not vote),
  and average the trimmed w_i D_i over the adapters whose entry has the elected sign (entries
  nobody keeps stay 0).
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): drop each entry of each D_i with probability
  1 - density (Bernoulli masks M_i, seeded by ``seed``), rescale by 1/density, then sum
  (``dare_linear``) or elect signs and take the disjoint mean as in TIES without trimming
  (``dare_ties``). With density = 1 they are task arithmetic and TIES without trimming.
- TIES and DARE act on the dense D_i (as in the papers, where the task vector is the weight
  update), not on A and B separately as peft's LoRA "ties"/"dare_*" types do. Their result is
  not low-rank, so the merged adapter stores it exactly with rank min(out, in) per module
  (B = Delta W, A = I or the other way round); ``rank=k`` truncates it by SVD instead (approximate,
  what peft's ``*_svd`` types do). At 7B scale such an adapter is as large as the weights it
  adapts: :func:`save_dense` is the practical export for TIES/DARE.

API::

    MERGE_RULES = ("weaverec", "task_arithmetic", "ties", "dare_linear", "dare_ties")
    merge_adapters(model, adapters, rule="weaverec", weights=None, new_name="merged", *, scaling=1.0,
                   density=0.5, majority_sign_method="total", seed=0, rank=None, activate=True) -> str
    lora_delta(model, adapter) -> {module_name: Delta W}          # weight layout, scaling included
    check_mergeable(model, adapters) -> {module_name: (out, in)}  # ValueError if not mergeable
    save_merged_adapter(model, name, path)                         # plain PeftModel.from_pretrained loads it
    save_dense(model, name, path, *, inplace=False, tokenizer=None) -> dense model (merge_and_unload)
    load_adapter_folders(base_model, folders, names=None) -> PeftModel
    weighted_adapters(model, adapters, lambdas)                    # context: W0 + sum_i lambda_{i,m} D_i
    learn_merge_weights(model, adapters, score_fn, batches, *, init=None, steps=100, lr=1e-3,
                        granularity="module") -> {module_name: [lambda_1..lambda_N]}   # AdaMerging
    prediction_entropy(scores (B, C)) -> (B,)                      # AdaMerging's objective

``model`` is a ``peft.PeftModel`` holding the adapters; module names are those of the wrapped
transformers model (``model.base_model.model``), e.g. ``model.layers.0.self_attn.q_proj``. Only
LoRA on linear layers is supported (both papers' setup); DoRA, LoRA bias, ``modules_to_save``
and inits that alter the base weights (PiSSA, OLoRA, ...) are refused, since a sum of D_i
no longer describes them.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn
from torch.nn import functional as F

from recsys.core.errors import UserError, checked
from recsys.core.progress import track

MERGE_RULES = ("weaverec", "task_arithmetic", "ties", "dare_linear", "dare_ties")
_LOW_RANK_RULES = ("weaverec", "task_arithmetic")  # exact sums of products, via peft's "cat"
GRANULARITIES = ("module", "block")
DENSITY_RULES = ("ties", "dare_linear", "dare_ties")  # the rules that keep a share (``density``) of the entries
MERGED = "merged"  # the peft adapter that holds a merge (merge_adapters' default new_name)

Weights = Sequence[float] | Mapping[str, Sequence[float]] | None


@dataclass(frozen=True)
class MergeSettings:
    """The ``merge`` config (``conf/method/weaverec.yaml``, ``merge_sources.yaml``), checked on construction:
    an unknown key, rule or granularity, or a value of the wrong type, fails before any backbone loads."""

    rule: str = "weaverec"  # one of MERGE_RULES
    weights: list[float] | None = None  # lambda_i, one per adapter; None: 1/N (weaverec), 1 (others)
    scaling: float = 1.0  # global coefficient c
    density: float = 0.5  # ties / dare: share of entries kept
    majority_sign_method: str = "total"  # ties / dare_ties: total | frequency
    seed: int = 0  # dare: seed of the random drop masks
    learn_weights: bool = False  # AdaMerging (WeaveRec only)
    learn_steps: int = 50
    learn_lr: float = 1e-3
    learn_batches: int = 8
    granularity: str = "module"  # AdaMerging: module | block
    scaling_grid: list[float] | None = None  # merge_sources: the scalings validation chooses among (not rule weaverec)
    density_grid: list[float] | None = None  # merge_sources: the densities validation chooses among (ties, dare)

    def __post_init__(self):
        if self.rule not in MERGE_RULES:
            raise UserError(f"merge.rule={self.rule!r} is unknown; known rules: {', '.join(MERGE_RULES)}")
        for key, grid, top in (("scaling_grid", self.scaling_grid, math.inf), ("density_grid", self.density_grid, 1.0)):
            if grid is not None and (not grid or any(not 0 < float(v) <= top for v in grid)):
                raise UserError(f"merge.{key}={grid} must be null or a non-empty list of values in (0, {top}]")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"merge.granularity={self.granularity!r} is unknown; known: {GRANULARITIES}")
        if self.weights is not None:
            object.__setattr__(self, "weights", [float(w) for w in self.weights])

    @classmethod
    def of(cls, merge: "Mapping | MergeSettings | None", grids: bool = True) -> "MergeSettings":
        """From the config's mapping (None: the defaults); UserError naming an unknown key or a wrong type, or
        (``grids=False``: a method that merges at the set scale, WeaveRec) a ``scaling_grid``/``density_grid``."""
        if isinstance(merge, MergeSettings):
            settings = merge
        else:
            values = dict(merge or {})
            unknown = sorted(set(values) - {f.name for f in fields(cls)})
            if unknown:  # the message tests and users know
                raise UserError(f"unknown merge settings {unknown}; known: {sorted(f.name for f in fields(cls))}")
            settings = checked(cls, values, "merge")
        if not grids and (settings.scaling_grid or settings.density_grid):
            raise UserError("merge.scaling_grid / density_grid choose merge_sources's scale on validation; this method "
                            "merges at merge.scaling and merge.density: set the grids to null")
        return settings

    def as_dict(self) -> dict:
        return asdict(self)

    def grid(self) -> list["MergeSettings"]:
        """The settings validation chooses among (``merge_sources``): every ``scaling_grid`` x ``density_grid``
        pair the rule uses (scaling: every rule but ``weaverec``, whose uniform lambdas are WeaveRec's own;
        density: ``ties`` and the ``dare`` rules), scalings outer, in grid order; ``[self]`` without a grid."""
        scalings = self.scaling_grid if self.scaling_grid and self.rule != "weaverec" else [self.scaling]
        densities = self.density_grid if self.density_grid and self.rule in DENSITY_RULES else [self.density]
        return [replace(self, scaling=float(c), density=float(d), scaling_grid=None, density_grid=None)
                for c in scalings for d in densities]

    def global_weights(self, n: int) -> list[float]:
        """The global lambda_i of ``n`` adapters: ``weights``, or 1/n for rule weaverec, 1 for the others."""
        check_weight_count(self.weights, n)
        if self.weights is not None:
            return list(self.weights)
        return [1.0 / n] * n if self.rule == "weaverec" else [1.0] * n

    def merge(self, model, adapters: Sequence[str], weights: Weights = None, *, activate: bool) -> str:
        """``merge_adapters`` of ``adapters`` into :data:`MERGED` under these settings (``weights``: learned
        per-module lambdas, else these settings' own)."""
        return merge_adapters(model, adapters, rule=self.rule, weights=self.weights if weights is None else weights,
                              new_name=MERGED, scaling=self.scaling, density=self.density,
                              majority_sign_method=self.majority_sign_method, seed=self.seed, activate=activate)


def check_weight_count(weights, adapters: Sequence[str] | int) -> None:
    """UserError unless ``weights`` (None or a list) has one value per adapter."""
    n = adapters if isinstance(adapters, int) else len(adapters)
    if weights is not None and len(weights) != n:
        which = f" ({', '.join(adapters)})" if not isinstance(adapters, int) else ""
        raise UserError(
            f"merge.weights has {len(weights)} values {list(weights)} but {n} adapters are merged{which}: give one "
            "lambda per adapter, in this order, or null for the default"
        )


def average_heads(heads: Sequence[nn.Module], weights: Sequence[float], into: nn.Module) -> None:
    """Set ``into``'s parameters to the weighted average sum_i w_i theta_i / sum_i w_i of the heads'."""
    total = sum(weights)
    if total == 0:
        raise UserError(f"the merge weights {list(weights)} sum to 0: the heads cannot be averaged")
    with torch.no_grad():
        for name, p in into.named_parameters():
            p.copy_(sum(w * dict(h.named_parameters())[name] for w, h in zip(weights, heads)) / total)


# --------------------------------------------------------------------------------------------
# Inspecting adapters


def _lora_layers(model, adapter: str) -> dict[str, nn.Module]:
    """The peft LoRA layers that hold ``adapter``, by module name in the wrapped model."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A)
    }


def _shape(layer: nn.Module, adapter: str) -> tuple[int, int]:
    """(out, in) of the product B @ A of ``adapter`` at ``layer``."""
    return layer.lora_B[adapter].weight.shape[0], layer.lora_A[adapter].weight.shape[1]


def check_mergeable(model, adapters: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Check that ``adapters`` of ``model`` can be merged; return the adapted modules' (out, in).

    Raises ValueError naming the problem: an unknown adapter, a non-LoRA adapter or a LoRA variant
    that is not a plain low-rank update, adapters of different backbones (``base_model_name_or_path``
    set and different), or adapters that adapt different modules or the same module with
    different shapes.
    """
    if not adapters:
        raise ValueError("no adapters to merge")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapter names repeat: {list(adapters)}")
    known = list(getattr(model, "peft_config", {}))
    for a in adapters:
        if a not in known:
            raise ValueError(f"adapter {a!r} is not in the model; it holds {known}")
        _check_lora_config(model.peft_config[a], a)
    backbones = {a: model.peft_config[a].base_model_name_or_path for a in adapters}
    if len({b for b in backbones.values() if b}) > 1:
        raise ValueError(f"adapters come from different backbones (base_model_name_or_path): {backbones}")
    first, reference = adapters[0], None
    for a in adapters:
        layers = _lora_layers(model, a)
        for name, layer in layers.items():
            if a not in layer.lora_A or not isinstance(layer.lora_A[a], nn.Linear):
                kind = type(layer).__name__
                raise ValueError(f"adapter {a!r} adapts {name} ({kind}): only linear layers can be merged")
        shapes = {name: _shape(layer, a) for name, layer in layers.items()}
        if reference is None:
            reference = shapes
        else:
            _compare_modules(reference, shapes, first, a)
    return reference


def _check_lora_config(config, name: str) -> None:
    from peft import PeftType

    if getattr(config, "peft_type", None) != PeftType.LORA:
        raise ValueError(f"adapter {name!r} is not a LoRA adapter (peft_type {config.peft_type})")
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {name!r} uses DoRA: its update is not s * B A and cannot be merged here")
    if getattr(config, "lora_bias", False):
        raise ValueError(f"adapter {name!r} has a LoRA bias, which the merge would drop")
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"adapter {name!r} has modules_to_save={config.modules_to_save}, which cannot be merged")
    if getattr(config, "target_parameters", None):
        raise ValueError(f"adapter {name!r} targets parameters ({config.target_parameters}), not modules")
    if not isinstance(config.init_lora_weights, bool):
        raise ValueError(
            f"adapter {name!r} has init_lora_weights={config.init_lora_weights!r}, an init that changes the "
            "base weights; only plain LoRA adapters can be merged"
        )


def _compare_modules(ref: Mapping[str, tuple], other: Mapping[str, tuple], ref_name: str, name: str) -> None:
    if set(ref) != set(other):
        only_ref, only_other = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
        raise ValueError(
            f"adapters {ref_name!r} and {name!r} have different target modules: only in {ref_name!r}: "
            f"{only_ref[:5]}{' ...' if len(only_ref) > 5 else ''}; only in {name!r}: "
            f"{only_other[:5]}{' ...' if len(only_other) > 5 else ''}"
        )
    for m in ref:
        if tuple(ref[m]) != tuple(other[m]):
            raise ValueError(
                f"adapters {ref_name!r} and {name!r} adapt {m} with different shapes (out, in): "
                f"{tuple(ref[m])} vs {tuple(other[m])}; they come from different backbones"
            )


@torch.no_grad()
def lora_delta(model, adapter: str) -> dict[str, torch.Tensor]:
    """The dense update of every weight ``adapter`` adapts: {module name: s * B @ A}.

    In the layout of the base weight (``(out, in)`` for ``nn.Linear``, transposed for
    ``fan_in_fan_out`` layers), so that ``W0 + lora_delta(...)[m]`` is the merged weight.
    """
    if adapter not in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter {adapter!r} is not in the model; it holds {list(model.peft_config)}")
    return {name: layer.get_delta_weight(adapter).detach() for name, layer in _lora_layers(model, adapter).items()}


# --------------------------------------------------------------------------------------------
# Merging


def _resolve_weights(
    weights: Weights, adapters: Sequence[str], modules: Sequence[str], default: float
) -> tuple[list[float] | None, dict[str, list[float]]]:
    """(global weights or None, weights of every module). ValueError on counts or names that do not match."""
    n = len(adapters)
    if weights is None:
        weights = [default] * n
    if isinstance(weights, Mapping):
        missing, extra = sorted(set(modules) - set(weights)), sorted(set(weights) - set(modules))
        if missing or extra:
            raise ValueError(
                f"per-module weights must name exactly the adapted modules: missing {missing[:5]}, unknown {extra[:5]}"
            )
        per_module = {}
        for m in modules:
            w = [float(x) for x in weights[m]]
            if len(w) != n:
                raise ValueError(f"got {len(w)} weights for {n} adapters {list(adapters)} at module {m}")
            per_module[m] = w
        return None, per_module
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} adapters {list(adapters)}")
    return w, {m: w for m in modules}


def _fork_rng(model):
    """A context restoring the global RNG (CPU and the model's GPUs) on exit."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    return torch.random.fork_rng(devices=devices)


def merge_adapters(
    model,
    adapters: Sequence[str],
    rule: str = "weaverec",
    weights: Weights = None,
    new_name: str = MERGED,
    *,
    scaling: float = 1.0,
    density: float = 0.5,
    majority_sign_method: str = "total",
    seed: int = 0,
    rank: int | None = None,
    activate: bool = True,
) -> str:
    """Add to ``model`` (a PeftModel) a LoRA adapter ``new_name`` that is the merge of ``adapters``.

    Args:
        rule: one of :data:`MERGE_RULES` (see the module docstring for what each computes).
        weights: w_i, one per adapter (default 1/N for ``weaverec``, 1 otherwise), or a mapping
            {module name: [w_1..w_N]} with one list per adapted module (e.g. learned by
            :func:`learn_merge_weights`).
        scaling: the coefficient c multiplying the merged update (task arithmetic's lambda).
        density: share of entries kept by ``ties`` (top magnitude) and ``dare_*`` (random), in (0, 1].
        majority_sign_method: ``"total"`` (sign of the sum) or ``"frequency"`` (most adapters), for
            ``ties`` and ``dare_ties``.
        seed: seeds DARE's random masks; the global RNG is left as it was.
        rank: ``ties``/``dare_*`` only: None stores the merge exactly (rank min(out, in) per
            module); an int k keeps its best rank-k approximation (SVD).
        activate: make the merged adapter the active one (frozen).

    Returns ``new_name``. The source adapters stay in the model, unchanged.
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}; known rules: {', '.join(MERGE_RULES)}")
    if new_name in model.peft_config:
        raise ValueError(f"an adapter named {new_name!r} already exists in the model")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if rule not in _LOW_RANK_RULES and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rank is not None and (rule in _LOW_RANK_RULES or rank < 1):
        raise ValueError(f"rank={rank} is allowed only with ties/dare rules and must be >= 1")
    shapes = check_mergeable(model, adapters)
    default = 1.0 / len(adapters) if rule == "weaverec" else 1.0
    global_w, per_module = _resolve_weights(weights, adapters, list(shapes), default)

    with _fork_rng(model):  # peft's initialisation of the new adapter draws random numbers
        if rule in _LOW_RANK_RULES:
            _merge_low_rank(model, adapters, global_w, per_module, scaling, new_name)
        else:
            _merge_dense(model, adapters, rule, per_module, scaling, new_name, shapes,
                         density, majority_sign_method, seed, rank)
    model.set_requires_grad(new_name, requires_grad=False)
    if activate:
        model.set_adapter(new_name, inference_mode=True)
    return new_name


@torch.no_grad()
def _merge_low_rank(model, adapters, global_w, per_module, scaling, new_name) -> None:
    """c * sum_i w_i s_i B_i A_i by peft's "cat": A = [c w_i s_i A_i], B = [B_i], rank sum_i r_i."""
    peft_w = [scaling * w for w in global_w] if global_w is not None else [scaling] * len(adapters)
    model.base_model.add_weighted_adapter(list(adapters), peft_w, new_name, combination_type="cat")
    for name, layer in _lora_layers(model, new_name).items():
        A = layer.lora_A[new_name].weight
        if global_w is None:  # per-module weights: scale each adapter's block of rows of A
            start = 0
            for a, w in zip(adapters, per_module[name]):
                r = layer.lora_A[a].weight.shape[0]
                A[start:start + r] *= w
                start += r
        # peft sets lora_alpha = r of the merged adapter, so its scaling is 1, except with rsLoRA
        # (alpha / sqrt(r) = sqrt(r)): fold the inverse into A, which stays right once saved.
        s = layer.scaling[new_name]
        if s != 1:
            A /= s


def _merge_fn(rule: str, density: float, majority_sign_method: str) -> Callable:
    from peft.utils import merge_utils

    if rule == "ties":
        return lambda d, w: merge_utils.ties(d, w, density, majority_sign_method)
    if rule == "dare_linear":
        return lambda d, w: merge_utils.dare_linear(d, w, density)
    if rule == "dare_ties":
        return lambda d, w: merge_utils.dare_ties(d, w, density, majority_sign_method)
    raise ValueError(f"unknown merge rule {rule!r}; known rules: {', '.join(MERGE_RULES)}")


def _factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with B @ A = delta (out, in): exact if r = min(out, in), else the SVD's best rank r."""
    out, inn = delta.shape
    if r == min(out, inn):
        eye = torch.eye(r, dtype=delta.dtype, device=delta.device)
        return (delta, eye) if inn <= out else (eye, delta)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


@torch.no_grad()
def _merge_dense(model, adapters, rule, per_module, scaling, new_name, shapes,
                 density, majority_sign_method, seed, rank) -> None:
    """TIES / DARE on the dense D_i with peft's merge_utils, stored as an adapter of rank min(out, in) (or ``rank``)."""
    ranks = {m: min(out, inn) if rank is None else min(rank, out, inn) for m, (out, inn) in shapes.items()}
    r = max(ranks.values())
    config = replace(
        model.peft_config[adapters[0]], r=r, lora_alpha=r, rank_pattern=dict(ranks), alpha_pattern=dict(ranks),
        use_rslora=False, init_lora_weights=True,
    )  # alpha = r at every module: scaling 1
    model.add_adapter(new_name, config)
    merge = _merge_fn(rule, density, majority_sign_method)
    torch.manual_seed(seed)  # after the adapter's init, so the masks depend on the seed only
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no pruning will be performed")  # density = 1
        for name, layer in _lora_layers(model, new_name).items():  # the sources' layers too: same modules
            deltas = [layer.get_delta_weight(a).float() for a in adapters]
            w = torch.tensor(per_module[name], dtype=torch.float32, device=deltas[0].device)
            delta = merge(deltas, w) * scaling
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T  # weight layout (in, out) -> B @ A layout (out, in)
            B, A = _factors(delta, ranks[name])
            layer.lora_A[new_name].weight.copy_(A)
            layer.lora_B[new_name].weight.copy_(B)


# --------------------------------------------------------------------------------------------
# Saving and loading


def save_merged_adapter(model, name: str, path: str) -> str:
    """Save adapter ``name`` as a peft adapter folder ``path`` (files directly in it, not in a
    sub-folder named after the adapter), so that ``PeftModel.from_pretrained(base, path)`` loads it."""
    if name not in model.peft_config:
        raise ValueError(f"adapter {name!r} is not in the model; it holds {list(model.peft_config)}")
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        src = tmp if name == "default" else os.path.join(tmp, name)  # peft puts non-default adapters in tmp/name
        for f in os.listdir(src):
            target = os.path.join(path, f)
            if os.path.isdir(target):
                shutil.rmtree(target)
            shutil.move(os.path.join(src, f), target)
    return path


def save_dense(model, name: str, path: str, *, inplace: bool = False, tokenizer=None) -> nn.Module:
    """Fold adapter ``name`` into the base weights (peft ``merge_and_unload``) and ``save_pretrained`` it to ``path``.

    ``merge_and_unload`` rewrites the base weights and removes the LoRA layers, so by default it runs
    on a deep copy of ``model`` (twice the memory); ``inplace=True`` runs it on ``model`` itself,
    which is then spent. Returns the dense transformers model; saves ``tokenizer`` too when given.
    """
    if name not in model.peft_config:
        raise ValueError(f"adapter {name!r} is not in the model; it holds {list(model.peft_config)}")
    source = model if inplace else copy.deepcopy(model)
    dense = source.merge_and_unload(adapter_names=[name])
    dense.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return dense


_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _saved_modules(folder: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every module of a saved LoRA adapter folder, from its weights."""
    from peft.utils import load_peft_weights

    state = load_peft_weights(folder, device="cpu")
    outs, ins = {}, {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match:
            (ins if match.group(2) == "A" else outs)[match.group(1)] = tensor.shape[1 if match.group(2) == "A" else 0]
    return {m: (outs.get(m), ins.get(m)) for m in set(outs) | set(ins)}


def load_adapter_folders(base_model: nn.Module, folders: Sequence[str], names: Sequence[str] | None = None,
                         *, is_trainable: bool = False):
    """Load peft LoRA adapter folders into one PeftModel, as adapters ``names`` (default: the folder names).

    ``base_model`` is a transformers model (peft injects the LoRA layers into it, in place) or a
    PeftModel to add the adapters to. Before loading, checks (ValueError) that every folder is a
    plain LoRA adapter, that they name the same backbone when they name one, adapt the same
    modules with the same shapes, and that these modules exist in ``base_model`` with those shapes.
    """
    from peft import PeftConfig, PeftModel

    folders = [os.fspath(f) for f in folders]
    if not folders:
        raise ValueError("no adapter folders given")
    names = list(names) if names is not None else [os.path.basename(os.path.normpath(f)) for f in folders]
    if len(names) != len(folders):
        raise ValueError(f"got {len(names)} names for {len(folders)} folders")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {names}")
    configs = [PeftConfig.from_pretrained(f) for f in folders]
    for f, c in zip(folders, configs):
        _check_lora_config(c, f)
    backbones = {f: c.base_model_name_or_path for f, c in zip(folders, configs)}
    if len({b for b in backbones.values() if b}) > 1:
        raise ValueError(f"adapters come from different backbones (base_model_name_or_path): {backbones}")
    modules = [_saved_modules(f) for f in folders]
    for f, mods in zip(folders[1:], modules[1:]):
        _compare_modules(modules[0], mods, folders[0], f)
    inner = base_model.base_model.model if isinstance(base_model, PeftModel) else base_model
    for m, (out, inn) in modules[0].items():
        try:
            module = inner.get_submodule(m)
        except AttributeError:
            raise ValueError(f"adapter {folders[0]!r} adapts {m}, which the base model does not have") from None
        base_layer = getattr(module, "base_layer", module)
        expected = (getattr(base_layer, "out_features", None), getattr(base_layer, "in_features", None))
        if None not in expected and expected != (out, inn):
            raise ValueError(
                f"adapter {folders[0]!r} adapts {m} with shape (out, in) = {(out, inn)} but the base model's is "
                f"{expected}: the adapter is from a different backbone"
            )
    if isinstance(base_model, PeftModel):
        model, todo = base_model, list(zip(folders, names))
    else:
        model = PeftModel.from_pretrained(base_model, folders[0], adapter_name=names[0], is_trainable=is_trainable)
        todo = list(zip(folders[1:], names[1:]))
    for f, n in todo:
        model.load_adapter(f, adapter_name=n, is_trainable=is_trainable)
    return model


# --------------------------------------------------------------------------------------------
# AdaMerging-style learned weights


def _install(model, adapters: Sequence[str], coef: Callable[[str], torch.Tensor]) -> list:
    """Forward hooks adding sum_i coef(m)[i] * s_i * B_i A_i x to the output of every adapted module m."""
    handles = []
    for name, layer in _lora_layers(model, adapters[0]).items():

        def hook(module, args, kwargs, output, name=name, layer=layer):
            x = args[0] if args else kwargs["x"]
            lam = coef(name).to(output.device)  # differentiable; lambdas live on the CPU
            extra = 0
            for i, a in enumerate(adapters):
                A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
                extra = extra + (lam[i] * layer.scaling[a]) * F.linear(F.linear(x.to(A.dtype), A), B)
            return output + extra.to(output.dtype)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return handles


@contextmanager
def weighted_adapters(model, adapters: Sequence[str], lambdas: Weights = None):
    """Within the context, every adapted module m of ``model`` computes W0 x + sum_i lambda_{i,m} s_i B_i A_i x.

    The model's own LoRA layers are disabled meanwhile (``model.disable_adapter()``), so this is the
    ``weaverec`` merge with weights ``lambdas`` (a list, or {module name: list}; default 1/N) without
    building it; the lambdas may be tensors that require grad.
    """
    shapes = check_mergeable(model, adapters)
    if isinstance(lambdas, Mapping):  # keep tensors as they are (they may require grad)
        table = {m: torch.as_tensor(v, dtype=torch.float32) for m, v in lambdas.items()}
        _resolve_weights({m: v.detach().tolist() for m, v in table.items()}, adapters, list(shapes), 0.0)
    else:
        _, per_module = _resolve_weights(lambdas, adapters, list(shapes), 1.0 / len(adapters))
        table = {m: torch.tensor(w) for m, w in per_module.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = _install(model, adapters, lambda m: table[m])
    try:
        with model.disable_adapter():
            yield model
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():  # leaving disable_adapter() makes the active adapter trainable
            p.requires_grad_(flag)


def _group(name: str, granularity: str) -> str:
    """The module itself, or its transformer block: the name up to its first numeric part (``model.layers.3``)."""
    if granularity == "module":
        return name
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
    return match.group(1) if match else name


def prediction_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(scores) over the last dim, (B, C) -> (B,); -inf scores (masked candidates) count as p = 0."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    return -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(-1)


def learn_merge_weights(
    model,
    adapters: Sequence[str],
    score_fn: Callable[[object], torch.Tensor],
    batches: Iterable,
    *,
    init: Weights = None,
    steps: int = 100,
    lr: float = 1e-3,
    granularity: str = "module",
) -> dict[str, list[float]]:
    """Learn per-layer merge weights lambda_{i,l} by minimising prediction entropy (AdaMerging, Yang et al. 2024).

    Args:
        model: the PeftModel holding ``adapters``.
        adapters: the N adapters to merge.
        score_fn: ``batch -> (B, C)`` candidate scores computed by running ``model`` (or modules of it)
            with gradients enabled; masked candidates may score -inf.
        batches: unlabeled batches (a list or a DataLoader), cycled through for ``steps`` steps.
        init: initial weights as in :func:`merge_adapters` (default uniform 1/N).
        steps, lr: Adam steps on the lambdas, and its learning rate (AdaMerging's lr is 1e-3).
        granularity: ``"module"``: one lambda per adapter and adapted weight matrix (AdaMerging's
            layer-wise); ``"block"``: one per adapter and transformer block.

    Each step sets every adapted weight to W0 + sum_i lambda_{i,l} s_i B_i A_i (:func:`weighted_adapters`),
    computes ``score_fn(batch)`` and takes an Adam step on the mean entropy of softmax over candidates.
    Only the lambdas change: the model's parameters, ``requires_grad`` flags and train/eval mode are
    restored. Returns {module name: [lambda_1..lambda_N]}, ready for
    ``merge_adapters(model, adapters, "weaverec", weights=...)``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; known: {GRANULARITIES}")
    shapes = check_mergeable(model, adapters)
    modules = list(shapes)
    _, start = _resolve_weights(init, adapters, modules, 1.0 / len(adapters))
    groups = {m: _group(m, granularity) for m in modules}
    keys = list(dict.fromkeys(groups.values()))
    index = {m: keys.index(groups[m]) for m in modules}
    first = [torch.tensor([start[m] for m in modules if groups[m] == k]).mean(0) for k in keys]
    lam = nn.Parameter(torch.stack(first).float())  # (groups, N), on the CPU

    optimizer = torch.optim.Adam([lam], lr=lr)
    handles = _install(model, adapters, lambda m: lam[index[m]])
    try:
        with _frozen(model), model.disable_adapter():
            batch_stream = _cycle(batches)
            for _ in track(range(steps), "AdaMerging: learning the merge weights (steps)"):
                scores = score_fn(next(batch_stream))
                if scores.dim() != 2:
                    raise ValueError(f"score_fn must return (B, C) scores, got shape {tuple(scores.shape)}")
                loss = prediction_entropy(scores).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        for h in handles:
            h.remove()
    return {m: lam[index[m]].detach().cpu().tolist() for m in modules}


@contextmanager
def _frozen(model):
    """``model`` in eval mode with every parameter frozen; flags and mode restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _cycle(batches: Iterable):
    """The batches over and over (a DataLoader restarts each pass); ValueError if there are none."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches is empty")
