"""The naive merge baseline WeaveRec argues against (docs/methods.md, "WeaveRec"): independent per-domain
LoRA adapters from the store, the target's and each source's, merged into one by a merge rule.

Nothing trains (``skip_training``): the adapters come from ``<store>/<backbone>/<domain>/seed-<seed>/``, written by
``python train.py method=lora data.target=<domain>``; the merge is ``merging.merge_adapters`` with
``merge.rule`` (weaverec | task_arithmetic | ties | dare_linear | dare_ties); the merged model is
scored on the target's validation and test splits with the same fixed candidates as every method.

Choices the paper leaves open, **[ours]**: the default rule is ``weaverec`` (the uniform sum of
lambda-scaled products that WeaveRec itself uses, so the two differ only in what is merged: source
adapters here, hybrids there); with ``scoring=head`` the merged model reads the target adapter's
head (``head: target``, default) or the lambda-weighted mean of all adapters' heads (``head: mean``).
"""

from __future__ import annotations

import logging

import torch

from recsys.core.errors import UserError, require
from recsys.methods.base import RecModule, RunInfo
from recsys.models.adapter_store import AdapterSpec, AdapterStore
from recsys.models.backbone import Backbone
from recsys.models.head import ScoringHead
from recsys.models.merging import MergeSettings, average_heads, check_weight_count, load_adapter_folders
from recsys.models.scoring import likelihood_scores, pair_scores

log = logging.getLogger("recsys.merge_sources")

HEAD_MODES = ("target", "mean")


class MergeSourcesModule(RecModule):
    """The target's and the sources' stored LoRA adapters, merged by one rule; nothing trains.

    Args:
        backbone: the frozen backbone.
        folders: {domain: adapter folder}, the target first.
        merge: merge settings (``rule``, ``weights`` (one per adapter, target first), ``scaling``,
            ``density``, ``majority_sign_method``, ``seed``).
        heads: {domain: head state dict} (scoring=head), from the store.
        head: ``target`` | ``mean`` (see the module docstring).
        **kwargs: ``RecModule`` arguments (scoring; optimizer and schedule are unused).
    """

    def __init__(self, backbone: Backbone, folders: dict[str, str], merge: dict | None = None,
                 heads: dict[str, dict] | None = None, head: str = "target", **kwargs):
        super().__init__(backbone, **kwargs)
        if head not in HEAD_MODES:
            raise UserError(f"method.module.head={head!r} is unknown: use one of {HEAD_MODES}")
        self.merge_cfg = MergeSettings.of(merge)
        if self.merge_cfg.learn_weights:
            raise UserError("merge.learn_weights is a WeaveRec option; merge_sources takes fixed merge.weights")
        self.domains = list(folders)
        check_weight_count(self.merge_cfg.weights, self.domains)
        self.model = load_adapter_folders(backbone.model, [str(f) for f in folders.values()], self.domains)
        self.merge_cfg.merge(self.model, self.domains, activate=True)
        self.model.requires_grad_(False)
        self.head = None
        if self.scoring == "head":
            missing = [d for d in self.domains if (heads or {}).get(d) is None]
            if missing:
                raise UserError(f"stored adapters {missing} have no head.safetensors: they were trained with "
                                 "scoring=likelihood; use method.module.scoring=likelihood")
            self.head = ScoringHead(backbone.hidden_size).requires_grad_(False)
            if head == "target":
                self.head.load_state_dict(heads[self.domains[0]])
            else:
                w = self.merge_cfg.weights or ([1.0 / len(self.domains)] * len(self.domains))
                loaded = []
                for d in self.domains:
                    h = ScoringHead(backbone.hidden_size)
                    h.load_state_dict(heads[d])
                    loaded.append(h)
                average_heads(loaded, [float(x) for x in w], self.head)
        self.skip_training = True

    @classmethod
    def check(cls, run: RunInfo, merge: dict | None = None, head: str = "target", **kwargs) -> None:
        """Source domains, the head mode and the merge settings (``merge.*``), before anything loads."""
        super().check(run, **kwargs)
        if not run.sources:
            raise UserError("merge_sources needs source domains: set data.sources (e.g. 'data.sources=[toys]')")
        require("method.module.head", head, choices=HEAD_MODES)
        if MergeSettings.of(merge).learn_weights:
            raise UserError("merge.learn_weights is a WeaveRec option; merge_sources takes fixed merge.weights")

    @classmethod
    def required_adapters(cls, run: RunInfo, backbone: Backbone, scoring: str = "head", **kwargs) -> list[AdapterSpec]:
        """The target's and each source's LoRA adapter, of this backbone and scoring."""
        cls.check(run, scoring=scoring, **kwargs)
        return [AdapterSpec(d, expect={"backbone": backbone.name, "scoring": scoring})
                for d in (run.target, *run.sources)]

    @classmethod
    def from_config(cls, backbone: Backbone, run: RunInfo, **kwargs) -> "MergeSourcesModule":
        """The target's and the sources' stored adapters (``run.adapters``) and their heads, merged."""
        folders = {d: str(run.adapters[d]) for d in (run.target, *run.sources)}
        heads = {d: AdapterStore.load_head(f) for d, f in folders.items()}
        log.info("merging %s by %s", ", ".join(f"{d} ({f})" for d, f in folders.items()),
                 MergeSettings.of(kwargs.get("merge")).rule)
        return cls(backbone, folders=folders, heads=heads, **kwargs)

    def score(self, batch: dict) -> torch.Tensor:
        if self.scoring == "likelihood":
            return likelihood_scores(self.model, batch)
        return pair_scores(self.model, self.head, batch, self.kind)
