"""The naive merge baseline WeaveRec argues against (docs/methods.md, "WeaveRec"): independent per-domain
LoRA adapters from the store, the target's and each source's, merged into one by a merge rule.

Nothing trains (``skip_training``): the adapters come from ``<store>/<backbone>/<domain>/``, written by
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

from recsys.methods.base import RecModule
from recsys.methods.weaverec import average_heads, check_weight_count, merge_settings
from recsys.models.adapter_store import AdapterStore
from recsys.models.backbone import Backbone
from recsys.models.head import ScoringHead
from recsys.models.merging import load_adapter_folders, merge_adapters
from recsys.models.scoring import likelihood_scores, pair_scores

log = logging.getLogger("recsys.merge_sources")

MERGED = "merged"
HEAD_MODES = ("target", "mean")


def lora_command(cfg, domain: str, store_root) -> str:
    """The command that trains and stores ``domain``'s LoRA adapter with this run's other settings
    (this run's command-line overrides, less method, merge, target and sources)."""
    drop = ("method", "merge", "data.target", "data.sources", "hydra.", "paths.adapter_store", "+method", "+merge")
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("~+").startswith(drop)]
    except Exception:  # not under @hydra.main (e.g. hydra.compose): name the backbone at least
        overrides = [f"backbone.name={cfg.backbone.name}"] if cfg is not None else []
    return " ".join(["python train.py method=lora", f"data.target={domain}", *overrides,
                     f"paths.adapter_store={store_root}"])


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
            raise ValueError(f"method.module.head={head!r} is unknown: use one of {HEAD_MODES}")
        self.merge_cfg = merge_settings(merge)
        if self.merge_cfg["learn_weights"]:
            raise ValueError("merge.learn_weights is a WeaveRec option; merge_sources takes fixed merge.weights")
        self.domains = list(folders)
        check_weight_count(self.merge_cfg["weights"], self.domains)
        self.model = load_adapter_folders(backbone.model, [str(f) for f in folders.values()], self.domains)
        m = self.merge_cfg
        merge_adapters(self.model, self.domains, rule=m["rule"], weights=m["weights"], new_name=MERGED,
                       scaling=m["scaling"], density=m["density"], majority_sign_method=m["majority_sign_method"],
                       seed=m["seed"], activate=True)
        self.model.requires_grad_(False)
        self.head = None
        if self.scoring == "head":
            missing = [d for d in self.domains if (heads or {}).get(d) is None]
            if missing:
                raise ValueError(f"stored adapters {missing} have no head.safetensors: they were trained with "
                                 "scoring=likelihood; use method.module.scoring=likelihood")
            self.head = ScoringHead(backbone.hidden_size).requires_grad_(False)
            if head == "target":
                self.head.load_state_dict(heads[self.domains[0]])
            else:
                w = m["weights"] or ([1.0 / len(self.domains)] * len(self.domains))
                loaded = []
                for d in self.domains:
                    h = ScoringHead(backbone.hidden_size)
                    h.load_state_dict(heads[d])
                    loaded.append(h)
                average_heads(loaded, [float(x) for x in w], self.head)
        self.skip_training = True

    @classmethod
    def from_config(cls, backbone: Backbone, datamodule=None, store: AdapterStore | None = None, cfg=None,
                    train_missing: bool = False, **kwargs) -> "MergeSourcesModule":
        """Find the target's and the sources' adapters in the store (training the missing ones first
        with ``train_missing``); a clear error for each missing one."""
        if datamodule is None or store is None:
            raise ValueError("merge_sources needs the DataModule (target, sources) and the adapter store")
        target, sources = datamodule.target, list(datamodule.sources)
        if not sources:
            raise ValueError("merge_sources needs source domains: set data.sources (e.g. 'data.sources=[toys]')")
        domains = [target] + sources
        missing = [d for d in domains if not store.exists(backbone.name, d)]
        if missing and train_missing and cfg is not None:
            from recsys.run import train_source_adapters

            train_source_adapters(cfg, missing)
            missing = [d for d in domains if not store.exists(backbone.name, d)]
        if missing:
            lines = [f"  {d}: {store.path(backbone.name, d)} -> {lora_command(cfg, d, store.root)}" for d in missing]
            raise FileNotFoundError(
                f"merge_sources needs the LoRA adapter of every domain in the store; missing {len(missing)}:\n"
                + "\n".join(lines) + "\nor set method.module.train_missing=true to train them first."
            )
        scoring = kwargs.get("scoring", "head")
        folders, heads = {}, {}
        for d in domains:
            folder = store.path(backbone.name, d)
            manifest = store.load_manifest(folder)
            if manifest.get("backbone", backbone.name) != backbone.name:
                raise ValueError(f"adapter {folder} was trained on backbone {manifest['backbone']!r}, "
                                 f"this run uses {backbone.name!r}")
            if manifest.get("scoring", scoring) != scoring:
                raise ValueError(f"adapter {folder} was trained with scoring={manifest['scoring']}, this run uses "
                                 f"scoring={scoring}: retrain it or set method.module.scoring={manifest['scoring']}")
            folders[d] = str(folder)
            heads[d] = store.load_head(folder)
        log.info("merging %s by %s", ", ".join(f"{d} ({f})" for d, f in folders.items()),
                 kwargs.get("merge", {}).get("rule", "weaverec"))
        return cls(backbone, folders=folders, heads=heads, **kwargs)

    def score(self, batch: dict) -> torch.Tensor:
        if self.scoring == "likelihood":
            return likelihood_scores(self.model, batch)
        return pair_scores(self.model, self.head, batch, self.kind)
