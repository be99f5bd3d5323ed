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

The merge's scale is chosen on validation, as the task-arithmetic and TIES papers choose theirs: every
``merge.scaling_grid`` x ``merge.density_grid`` pair the rule uses (``MergeSettings.grid``: scaling for every
rule but ``weaverec``, density for ``ties`` and ``dare``) is merged and scored on the target's validation
split (the monitored metric, ``optimized_metric``), at validation's precision (the trainer's autocast); the
best (the first on ties) is the merge that is validated and tested. Only validation batches are read to
choose, also when ``evaluate.py`` rebuilds the merge for a test. metrics.json: ``merge/scale``,
``merge/density`` (the chosen) and ``merge/grid/<c>,<d>`` (each pair's validation score).
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.utilities import move_data_to_device

from recsys.core.errors import UserError, require
from recsys.core.metrics import RankingMetrics
from recsys.methods.base import RecModule, RunInfo
from recsys.models.adapter_store import AdapterSpec, AdapterStore
from recsys.models.backbone import Backbone
from recsys.models.head import ScoringHead
from recsys.models.merging import (
    MERGED, MergeSettings, average_heads, check_weight_count, load_adapter_folders,
)
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

    name = "merge_sources"
    kind = "merge"

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
        self.grid = self.merge_cfg.grid()  # the settings validation chooses among
        self.chosen: MergeSettings | None = None if len(self.grid) > 1 else self.grid[0]
        self.grid_scores: dict[tuple[float, float], float] = {}
        self.remerge(self.grid[0])
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

    # ------------------------------------------------------------------ the merge and its scale
    def remerge(self, settings: MergeSettings) -> None:
        """(Re)build the merged adapter under ``settings`` and make it the active one; nothing trains."""
        if MERGED in self.model.peft_config:
            self.model.set_adapter(self.domains[0])  # never delete the active adapter
            self.model.delete_adapter(MERGED)
        settings.merge(self.model, self.domains, activate=True)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def choose(self, batches) -> MergeSettings:
        """The grid's settings with the best validation ``monitor`` on ``batches`` (the first on ties), merged."""
        key = self.monitor.split("/", 1)[1] if self.monitor.startswith("val/") else self.monitor
        was_training = self.training
        for settings in self.grid:
            self.remerge(settings)
            self.eval()  # the new adapter's dropout layers start in training mode
            metrics = RankingMetrics().to(self.device)
            for batch in batches:
                batch = move_data_to_device(batch, self.device)
                with self.trainer.precision_plugin.val_step_context():  # validation's precision (bf16 autocast)
                    metrics.update(self.score(batch).float(), batch["labels"])
            self.grid_scores[(settings.scaling, settings.density)] = float(metrics.compute()[key])
            log.info("merge %s scaling %.3g density %.3g: val %s %.4f", settings.rule, settings.scaling,
                     settings.density, key, self.grid_scores[(settings.scaling, settings.density)])
        best = max(range(len(self.grid)), key=lambda i: (self.grid_scores[(self.grid[i].scaling, self.grid[i].density)], -i))
        self.remerge(self.grid[best])
        self.train(was_training)
        return self.grid[best]

    def on_validation_start(self) -> None:
        """Before the first validation (or test): choose the merge on the validation split."""
        if self.chosen is None:
            self.chosen = self.choose(self.trainer.datamodule.val_dataloader())

    on_test_start = on_validation_start  # evaluate.py tests a rebuilt merge: chosen on validation too

    def extra_metrics(self) -> dict[str, float]:
        """``merge/scale`` and ``merge/density``, the merge tested; ``merge/grid/<c>,<d>``, each pair's val score."""
        chosen = self.chosen or self.grid[0]
        out = {"merge/scale": chosen.scaling, "merge/density": chosen.density}
        return out | {f"merge/grid/{c:g},{d:g}": v for (c, d), v in self.grid_scores.items()}

    def score(self, batch: dict) -> torch.Tensor:
        if self.scoring == "likelihood":
            return likelihood_scores(self.model, batch)
        return pair_scores(self.model, self.head, batch, self.kind)
