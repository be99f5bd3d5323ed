"""Speed and memory switches applied to a built module (``conf/speed/*.yaml``), and the FSDP wrap policy.

The pipeline calls :func:`apply` on the module after building it. Other switches are config keys
where they act: ``trainer.precision`` (bf16-true on GPUs), ``method.module.optimizer.fused`` (fused
AdamW), ``data.num_workers``, ``data.bucket_by_length``.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from recsys.models.backbone import transformer_layers

log = logging.getLogger("recsys")


def _hf_models(module: nn.Module) -> list[nn.Module]:
    """The transformers models inside ``module`` (outermost first, each once)."""
    from transformers import PreTrainedModel

    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in module.modules():
        if isinstance(m, PreTrainedModel) and id(m) not in inside:
            found.append(m)
            inside.update(id(x) for x in m.modules())
    return found


def enable_activation_checkpointing(module: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass (non-reentrant checkpoints:
    they need no input that requires grad, so they work with frozen embeddings and LoRA). Returns the
    number of models switched."""
    n = 0
    for model in _hf_models(module):
        if not getattr(model, "supports_gradient_checkpointing", False):
            continue
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        n += 1
    return n


def compile_blocks(module: nn.Module, mode: str = "default", dynamic: bool = True) -> int:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``: parameter names and
    checkpoints stay as they are). Block by block compiles fast, and composes with activation
    checkpointing and FSDP units. Returns the number of blocks."""
    n = 0
    for model in _hf_models(module):
        for block in transformer_layers(model):
            block.compile(mode=mode, dynamic=dynamic)
            n += 1
    return n


def apply(module: nn.Module, speed: dict | None) -> nn.Module:
    """Apply ``cfg.speed`` (activation checkpointing, compile, matmul precision) to ``module``; returns it."""
    speed = dict(speed or {})
    if speed.get("matmul_precision"):
        torch.set_float32_matmul_precision(speed["matmul_precision"])
    if speed.get("activation_checkpointing"):
        log.info("activation checkpointing on %d model(s)", enable_activation_checkpointing(module))
    if speed.get("compile"):
        n = compile_blocks(module, mode=speed.get("compile_mode") or "default",
                           dynamic=bool(speed.get("compile_dynamic", True)))
        log.info("torch.compile on %d transformer blocks", n)
    return module


# ---------------------------------------------------------------------------------------------- FSDP
def lora_fsdp_policy(blocks: Iterable[str] = ()):
    """FSDP auto-wrap policy for a frozen backbone with trainable adapters (``conf/trainer/fsdp.yaml``).

    FSDP flattens the weights of a unit into one tensor; frozen and trainable weights in one unit
    either fail (``use_orig_params=False``) or keep gradient memory for the frozen part. So this
    wraps (1) each transformer block, by class name (``blocks``: e.g. ``Qwen2DecoderLayer``; empty:
    the class of the backbone's block stack), and (2) on its own, every outermost module whose weights
    all train and that is called (not a ModuleDict/ModuleList): LoRA A/B, the scoring head as one unit,
    X-Cross's integrators. The head is one unit, not one unit a linear layer, because its forward reads
    its layers' weights directly (float32 ``F.linear``): a nested unit's weights would still be sharded
    there. Every unit is all-frozen or all-trainable. Use with ``use_orig_params=True`` (the optimizer and
    ``torch.compile`` see the original parameters).
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    names = set(blocks)
    block_types: set[type] = set()
    chosen: set[int] = set()

    def is_block(m: nn.Module) -> bool:
        return type(m).__name__ in names or type(m) in block_types

    def choose(m: nn.Module) -> None:  # top-down: an all-trainable called module is a unit, its insides are not
        params = list(m.parameters())
        if params and all(p.requires_grad for p in params) and not isinstance(m, (nn.ModuleDict, nn.ModuleList)):
            chosen.add(id(m))
            return
        if is_block(m):
            chosen.add(id(m))
        for child in m.children():
            choose(child)

    def wrap(m: nn.Module) -> bool:
        if not chosen:  # the first call is on the root: find the block class, then the units
            if not names:
                try:
                    block_types.update(type(b) for b in transformer_layers(m))
                except ValueError:
                    pass
            for child in m.children():
                choose(child)
        return id(m) in chosen

    return CustomPolicy(wrap)
