"""WeaveRec's branch bookkeeping, apart from the LightningModule (``recsys/methods/weaverec.py``), as X-Cross's
integrators are (``recsys/models/integrator.py``): several LoRA adapters ("branches") in one peft
``PeftModel``, one active at a time, each with its own trainable flags and its own gradient-clipping group.

peft's ``set_adapter`` freezes every adapter but the active one (and makes that one trainable), which would
unfreeze a reused, frozen branch and freeze a trained one mid-step: :class:`Weave` records every branch
weight's flag once and puts the flags back after every switch, so no parameter ever changes
``requires_grad`` (:meth:`Weave.activate`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Branch:
    """One weave branch: its peft adapter, the DataModule stream it trains on, and whether it trains."""

    adapter: str  # peft adapter name: "target" or hybrid_name(T, S)
    stream: str  # training stream: "target" or "hybrid/<S>"
    source: str | None  # S for a hybrid, None for the target branch
    trained: bool  # False: reused from the adapter store, frozen


class Weave:
    """The branches of ``model`` (a PeftModel holding one adapter a branch).

    Attributes:
        params: adapter name -> its LoRA weights (A and B of every adapted module).
        flags: (parameter, requires_grad) of every branch weight: True for a trained branch's.
    """

    def __init__(self, model, branches: Sequence[Branch]):
        self.model, self.branches = model, list(branches)
        pattern = re.compile(r"\.lora_[AB]\.(" + "|".join(re.escape(a) for a in self.adapters) + r")\.")
        self.params: dict[str, list[nn.Parameter]] = {a: [] for a in self.adapters}
        for n, p in model.named_parameters():
            m = pattern.search(n)
            if m:
                self.params[m.group(1)].append(p)
        trained = {b.adapter for b in self.branches if b.trained}
        self.flags = [(p, a in trained) for a, ps in self.params.items() for p in ps]
        self.restore_flags()

    @property
    def adapters(self) -> list[str]:
        return [b.adapter for b in self.branches]

    def restore_flags(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)

    def activate(self, adapter: str) -> None:
        """Make ``adapter`` the one active adapter; no parameter changes ``requires_grad``."""
        if self.model.base_model.active_adapter != adapter:
            self.model.base_model.set_adapter(adapter, inference_mode=True)  # freezes every adapter ...
            self.model.active_adapter = adapter
            self.restore_flags()  # ... so the branches get their own flags back

    def weight_ids(self) -> set[int]:
        """``id`` of every branch weight, trained or reused."""
        return {id(p) for p, _ in self.flags}

    def per_branch_size(self) -> int:
        """Weights of one branch's adapter (every branch has the same LoRA)."""
        return sum(p.numel() for p, _ in self.flags) // len(self.branches)

    def clip_groups(self, heads: Sequence[nn.Module] | None, shared_head: bool) -> list[list[nn.Parameter]]:
        """The gradient-clipping groups: each trained branch's adapter with its own head (per-branch heads),
        and the shared head on its own (``shared_head``)."""
        groups = {b.adapter: list(self.params[b.adapter]) for b in self.branches if b.trained}
        if heads is not None:
            if shared_head:
                groups["head"] = list(heads[0].parameters())
            else:
                for b, h in zip(self.branches, heads):
                    if b.trained:
                        groups[b.adapter] += list(h.parameters())
        return list(groups.values())

    def clip(self, heads: Sequence[nn.Module] | None, shared_head: bool, max_norm: float) -> None:
        """Clip each group's gradient norm to ``max_norm`` on its own: one branch never rescales another's."""
        for params in self.clip_groups(heads, shared_head):
            params = [p for p in params if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
