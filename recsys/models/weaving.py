"""WeaveRec's branch bookkeeping, apart from the LightningModule (``recsys/methods/weaverec.py``), as X-Cross's
integrators are (``recsys/models/integrator.py``): several LoRA adapters ("branches") in one peft
``PeftModel``, one active at a time, each with its own trainable flags and its own gradient-clipping group.

peft's ``set_adapter`` freezes every adapter but the active one (and makes that one trainable), which would
unfreeze a reused, frozen branch and freeze a trained one mid-step: :class:`Weave` records every branch
weight's flag once and puts the flags back after every switch, so no parameter ever changes
``requires_grad`` (:meth:`Weave.activate`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
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
        stepped: the branches that had a batch since the last optimizer step (:meth:`drop_idle`).
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
        self.stepped: set[int] = set()
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

    def weights(self, i: int, heads: Sequence[nn.Module] | None) -> list[nn.Parameter]:
        """Branch ``i``'s own trainable weights: its LoRA weights, and ``heads[i]``'s trainable ones when each
        branch has its own head (``heads``; None: no head of its own)."""
        own = list(self.params[self.branches[i].adapter])
        return own + ([p for p in heads[i].parameters() if p.requires_grad] if heads is not None else [])

    def idle_term(self, i: int, heads: Sequence[nn.Module] | None) -> torch.Tensor:
        """0 x the sum of branch ``i``'s weights: added to the loss of a step the branch skips, it gives each of
        them a (zero) gradient, so every trainable weight takes part in every step, as DDP requires."""
        return sum(w.sum() for w in self.weights(i, heads)) * 0.0

    def drop_idle(self, heads: Sequence[nn.Module] | None) -> None:
        """Before the optimizer step: the trained branches not in ``stepped`` (no batch since the last step: a
        stream exhausted in every batch the step accumulated) lose their (zero) gradients, so the optimizer
        leaves them as they are (AdamW skips a weight without a gradient: no moment decay, no weight decay),
        as in one process; ``stepped`` starts again."""
        for i, b in enumerate(self.branches):
            if b.trained and i not in self.stepped:
                for w in self.weights(i, heads):
                    w.grad = None
        self.stepped = set()

    def param_groups(self, heads: Sequence[nn.Module] | None, trainable: Sequence[nn.Parameter]) -> list[dict]:
        """One optimizer param group a trained branch (:meth:`weights`), named by its ``stream``; then the
        rest of ``trainable`` (stream None)."""
        groups, taken = [], set()
        for i, b in enumerate(self.branches):
            if not b.trained:
                continue
            params = self.weights(i, heads)
            groups.append({"params": params, "stream": b.stream})
            taken |= {id(p) for p in params}
        rest = [p for p in trainable if id(p) not in taken]
        return groups + ([{"params": rest, "stream": None}] if rest else [])

    def remerge(self, settings, weights, merged: str) -> None:
        """(Re)build adapter ``merged`` from the branches by ``settings`` (``MergeSettings``) with ``weights``,
        leaving every flag as it was and the new adapter's dropout in eval mode."""
        if merged in self.model.peft_config:
            self.activate(self.branches[0].adapter)  # never delete the active adapter
            self.model.delete_adapter(merged)
        settings.merge(self.model, self.adapters, weights, activate=False)
        self.restore_flags()
        for module in self.model.modules():  # the new adapter's dropout layers start in training mode
            if isinstance(module, nn.ModuleDict) and merged in module:
                module[merged].eval()

    def learn_weights(self, settings, score, batches, init: list[float], device) -> dict[str, list[float]]:
        """AdaMerging: per-module lambdas minimising the entropy of the merged model's candidate distribution
        (``score(batch) -> (B, C)``) on up to ``settings.learn_batches`` unlabeled ``batches``."""
        from lightning.pytorch.utilities import move_data_to_device

        from recsys.models.merging import learn_merge_weights

        taken = []
        for batch in batches:
            taken.append(move_data_to_device(batch, device))
            if len(taken) >= settings.learn_batches:
                break
        with torch.inference_mode(False), torch.enable_grad():
            learned = learn_merge_weights(self.model, self.adapters, score, taken, init=init,
                                          steps=settings.learn_steps, lr=settings.learn_lr,
                                          granularity=settings.granularity)
        self.restore_flags()
        return learned

    def state_names(self, owner: nn.Module, heads: nn.Module | None) -> set[str]:
        """``owner``'s state-dict names of every branch weight (trained or reused) and of ``heads``: what a
        checkpoint must hold to rebuild the merge."""
        ids = {id(p) for p, _ in self.flags} | ({id(p) for p in heads.parameters()} if heads is not None else set())
        return {n for n, p in owner.named_parameters() if id(p) in ids}

    def per_branch_size(self) -> int:
        """Weights of one branch's adapter (every branch has the same LoRA)."""
        return sum(p.numel() for p, _ in self.flags) // len(self.branches)

    def clip_groups(self, heads: Sequence[nn.Module] | None, shared_head: bool) -> list[list[nn.Parameter]]:
        """The gradient-clipping groups: each trained branch's adapter with its own head (per-branch heads),
        and the shared head on its own (``shared_head``)."""
        own = None if shared_head else heads
        groups = [self.weights(i, own) for i, b in enumerate(self.branches) if b.trained]
        return groups + ([list(heads[0].parameters())] if heads is not None and shared_head else [])

    def clip(self, heads: Sequence[nn.Module] | None, shared_head: bool, max_norm: float) -> None:
        """Clip each group's gradient norm to ``max_norm`` on its own: one branch never rescales another's."""
        for params in self.clip_groups(heads, shared_head):
            params = [p for p in params if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, max_norm)


def branch_heads(branches: Sequence[Branch], hidden_size: int, shared: bool, seed: int,
                 reused: Mapping[str, str]) -> nn.ModuleList:
    """One shared head, or one head a branch, all from the same initial weights (drawn under ``seed``, not
    the run's random state: a hybrid reused from the store was trained from this very initial head, so the
    merged head, their mean, averages aligned units); a reused branch's head is its stored one, frozen
    (``reused``: source -> stored hybrid folder)."""
    from recsys.core.errors import UserError
    from recsys.models.adapter_store import AdapterStore
    from recsys.models.head import ScoringHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        first = ScoringHead(hidden_size)
    if shared:
        return nn.ModuleList([first])
    heads = nn.ModuleList([copy.deepcopy(first) for _ in branches])
    for b, h in zip(branches, heads):
        if not b.trained:
            state = AdapterStore.load_head(reused[b.source])
            if state is None:
                raise UserError(f"stored hybrid {reused[b.source]} has no head.safetensors: retrain it")
            h.load_state_dict(state)
            h.requires_grad_(False)
    return heads


class BranchValidation(nn.Module):
    """Every branch scored on validation on its own (``branch<i>/val/...``): the metrics, the last values and
    those of each training epoch, so that the epoch model selection chose can be reported."""

    def __init__(self, n: int):
        super().__init__()
        from recsys.core.metrics import RankingMetrics

        self.metrics = nn.ModuleList([RankingMetrics() for _ in range(n)])
        self.history: dict[int, dict[str, float]] = {}  # epoch -> values
        self.last: dict[str, float] = {}

    def update(self, i: int, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.metrics[i].update(scores.float(), labels)

    def compute(self, epoch: int | None) -> dict[str, float]:
        """This validation's ``branch<i>/val/<metric>`` (recorded for ``epoch`` unless None); resets."""
        values = {}
        for i, metric in enumerate(self.metrics):
            values.update({f"branch{i}/val/{k}": float(v) for k, v in metric.compute().items()})
            metric.reset()
        self.last = values
        if epoch is not None:
            self.history[epoch] = values
        return values

    def of_epoch(self, epoch: int | None) -> dict[str, float]:
        """The values of ``epoch`` if recorded, else the last ones."""
        return self.history[epoch] if epoch in self.history else self.last
