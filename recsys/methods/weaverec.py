"""WeaveRec (Hou et al. 2025; docs/methods.md, "WeaveRec"): weave-training of LoRA adapters, merged into one.

For a target domain T and sources S_1..S_N, on one frozen backbone (one peft ``PeftModel``):

1. branch 0, adapter ``target``: a LoRA trained on T's examples (the DataModule's ``target`` stream);
2. branch n, adapter ``hybrid-<T>+<S_n>`` (sorted, order-free: :func:`hybrid_name`): a LoRA trained
   on the 50/50 mixture of T and S_n (stream ``hybrid/<S_n>``, ``data.mix=hybrid``, ``hybrid_cap``
   a side). No adapter ever trains on source data alone. Every optimizer step updates every branch,
   each on its own batch, with only its own adapter active;
3. merge: Delta W = sum_i lambda_i (alpha/r) B_i A_i on every adapted weight
   (``merging.merge_adapters(rule="weaverec")``: exact sum of the low-rank products, uniform
   lambda_i = 1/(N+1) by default; optionally per-layer lambdas learned AdaMerging-style);
4. deploy the merged adapter (one adapter of rank sum_i r_i), or the dense model with the update
   folded into the weights: inference is one forward pass of the backbone however many sources.

Validation scores every branch (``branch<i>/val/...``) and the merged model (``val/...``, what
model selection uses); test scores the merged model. Hybrids go to the adapter store under their
order-free name and are reused (frozen, not retrained) when a compatible one is there.

Choices the paper leaves open, each **[ours]** with its config switch (``conf/method/weaverec.yaml``):

- ``head``: the paper's model is a generative LLM whose only output layer (the LM head) is frozen
  and shared by all branches. With ``scoring=likelihood`` that is what happens here too (no head).
  With ``scoring=head`` the head is trainable: ``per_branch`` (default) gives every branch its own
  head, all starting from the same initial weights, so each branch trains exactly as an independent
  LoRA run would (the paper trains its adapters independently) and a stored hybrid is a complete
  model; the merged model's head is the lambda-weighted average of the branch heads (the heads are
  merged like the adapters: same start, averaged updates). ``shared`` trains one head with the
  losses of all branches (closest to the paper's shared output layer; a reused hybrid is then read by
  a head it was not trained with).
- Epochs: as released, every branch sees each of its examples once an epoch: the streams are
  combined in Lightning's ``max_size`` mode (an epoch is one pass over the longest stream, a hybrid
  of up to twice the target's examples), and a branch whose stream is exhausted skips the
  remaining steps of the epoch (``branch<i>/train/steps`` in metrics.json says how many it took;
  under DDP with zero gradients that are dropped before the optimizer step: :meth:`WeaveRecModule.training_step`).
- Each trained branch is its own optimizer param group with its own learning-rate schedule, over the
  steps IT takes (``lr_lambdas``): warm-up for ``warmup_ratio`` of its own steps, then the cosine to
  its end at its own last step, as the release trains each LoRA on its own schedule (one schedule
  over the longest stream would stop a shorter branch half-way down the cosine). Gradient clipping
  (``trainer.gradient_clip_val``) is applied per branch, so that one branch's gradients never rescale
  another's. With AdamW (per-parameter) and per-branch heads a branch then follows the updates it
  would get trained alone on its stream, up to random draws (dropout; the order of its batches).
  (``head=shared``: the shared head follows the schedule of the longest stream.)
- The target branch is not written to the store as T's LoRA (``<store>/<backbone>/<T>/seed-<seed>/`` belongs to
  ``method=lora``, which ``merge_sources`` reads); it is exported with every branch inside the
  WeaveRec folder (``branches/``). Hybrids are exported as ``<store>/<backbone>/hybrid-<a>+<b>/``.
- A stored hybrid is reused only when its LoRA settings (r, alpha, targets), scoring and head and
  the data settings that shape a hybrid (both domains, cap, history length, prompt, caps on
  examples) match; otherwise it is retrained (with a warning) and overwritten. ``retrain_hybrids``
  forces retraining.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

from recsys.core.errors import UserError, require
from recsys.methods.base import RecModule, RunInfo, stream_schedule, warmup_cosine
from recsys.methods.lora import check_lora, lora_config
from recsys.models.adapter_store import (
    AdapterSpec, AdapterStore, hybrid_name, load_into, lora_record, save_head, weaverec_name,
)
from recsys.models.backbone import Backbone
from recsys.models.merging import (
    MERGED, MergeSettings, average_heads, check_weight_count, save_dense, save_merged_adapter,
)
from recsys.models.scoring import likelihood_scores, pair_scores
from recsys.models.weaving import Branch, BranchValidation, Weave, branch_heads

log = logging.getLogger("recsys.weaverec")

TARGET = "target"  # the peft adapter of branch 0
HEAD_MODES = ("per_branch", "shared")
# data settings (``data.*``) that change what a hybrid is trained on: a stored hybrid must match them
HYBRID_DATA_KEYS = ("hybrid_cap", "max_train_examples", "max_history", "target_fraction", "prompt")
HEAD_SEED = 0  # [ours] the initial weights of WeaveRec's heads, the same in every run (see _build_heads)
__all__ = ["WeaveRecModule", "MERGED", "weaverec_name"]


def hybrid_specs(run: RunInfo, backbone: Backbone, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                 target_modules=None, scoring: str = "head", head: str = "per_branch", **kwargs) -> list[AdapterSpec]:
    """The stored hybrid of each source, optional (a missing or unfitting one is trained in the run): it fits
    when its LoRA, scoring and head, and the data settings that shape a hybrid (``HYBRID_DATA_KEYS``, both
    domains' specs) match this run's."""
    lora = lora_config(backbone, r, alpha, dropout, target_modules)
    mine = {"backbone": backbone.name, **lora_record(lora, scoring, head=head if scoring == "head" else None)}
    mine |= {f"data.{k}": run.data.get(k) for k in HYBRID_DATA_KEYS}
    domains = run.data.get("domains", {})
    return [AdapterSpec(hybrid_name(run.target, s), trainable=False, optional=True, strict=True,
                        expect={**mine, **{f"data.domains.{d}": domains.get(d) for d in (run.target, s)}})
            for s in run.sources]


def branch_lr_lambdas(m: "WeaveRecModule", total: int) -> list:
    """``WeaveRecModule.lr_lambdas``: each branch's schedule over its own optimizer steps, one a param group of
    ``m.param_groups()`` (``Weave.param_groups``): a branch whose stream makes ``n_i`` batches an epoch
    trains the first ``n_i`` of the epoch's steps, ``epochs * n_i`` in all, and warms up and decays over those
    (``base.stream_schedule``); the rest (a shared head) follows the longest stream's ``total`` steps."""
    floor = 1.0 if m.scheduler == "constant" else 0.0
    accumulate = max(1, int(m.trainer.accumulate_grad_batches))
    batches = int(m.trainer.num_training_batches)
    epoch_steps = max(1, math.ceil(batches / accumulate))
    epochs = max(1, math.ceil(total / epoch_steps))
    loaders = m.trainer.train_dataloader  # {stream: loader} (a CombinedLoader's iterables)
    loaders = loaders if isinstance(loaders, dict) else getattr(loaders, "iterables", None) or {}
    out = []
    for group in m.param_groups():
        stream = group["stream"]
        if stream is None or stream not in loaders:
            out.append(warmup_cosine(total, m.warmup_ratio, floor))
            continue
        steps = math.ceil(min(len(loaders[stream]), batches) / accumulate)
        own = min(total, epochs * steps)
        out.append(stream_schedule(warmup_cosine(own, m.warmup_ratio, floor), steps, epoch_steps))
    return out


def check_settings(run: RunInfo, r: int, alpha: float, dropout: float, head: str, merge: dict | None) -> None:
    """WeaveRec's keys before anything loads (``WeaveRecModule.check``): sources, the data mix, the LoRA, the head
    mode and the merge settings."""
    if not run.sources:
        raise UserError("WeaveRec needs at least one source domain: set data.sources (e.g. 'data.sources=[toys]')")
    if run.mix != "hybrid":
        raise UserError("method=weaverec needs the DataModule with data mix 'hybrid' (method.mix: hybrid)")
    check_lora(r, alpha, dropout)
    require("method.module.head", head, choices=HEAD_MODES)
    MergeSettings.of(merge)


class WeaveRecModule(RecModule):
    """WeaveRec: branch 0 (target LoRA) and one hybrid LoRA per source, weave-trained, merged.

    Args:
        backbone: the frozen backbone.
        target, sources: the target domain and the source domains (one hybrid each).
        r, alpha, dropout, target_modules: every branch's LoRA (None targets: the backbone's defaults).
        head: ``per_branch`` | ``shared`` (scoring=head only; see the module docstring).
        merge: the merge settings (``merging.MergeSettings``: rule, weights, scaling, density; AdaMerging's).
        reuse: {source: stored hybrid folder} for hybrids taken from the store (frozen).
        validate_branches: also score every branch on validation (``branch<i>/val/...``).
        export_dense: also export the dense merged model (``merge_and_unload``) as ``dense/``.
        **kwargs: ``RecModule`` arguments (optimizer, scheduler, warmup_ratio, scoring).
    """

    name, kind = "weaverec", "merge"  # its stored hybrids reach the loggers as RecModule.input_adapters

    def __init__(self, backbone: Backbone, target: str, sources: list[str], r: int = 8, alpha: float = 16,
                 dropout: float = 0.05, target_modules: list[str] | None = None, head: str = "per_branch",
                 merge: dict | None = None, reuse: dict[str, str] | None = None, validate_branches: bool = True,
                 export_dense: bool = False, **kwargs):
        super().__init__(backbone, **kwargs)
        require("method.module.head", head, choices=HEAD_MODES)
        reuse = dict(reuse or {})
        self.target, self.sources = target, list(sources)
        self.head_mode, self.validate_branches, self.export_dense = head, validate_branches, export_dense
        self.merge_cfg = MergeSettings.of(merge, grids=False)  # WeaveRec merges at merge.scaling, merge.density
        self.lora = lora_config(backbone, r, alpha, dropout, target_modules)
        self.branches = [Branch(TARGET, "target", None, True)] + [
            Branch(hybrid_name(target, s), f"hybrid/{s}", s, s not in reuse) for s in self.sources
        ]
        check_weight_count(self.merge_cfg.weights, self.adapters)

        self.model = get_peft_model(backbone.model, self.lora, adapter_name=TARGET)
        for b in self.branches[1:]:
            if b.trained:
                self.model.add_adapter(b.adapter, self.lora)
            else:
                load_into(self.model, {b.adapter: reuse[b.source]})
        # [ours] every run's heads start from the same weights (HEAD_SEED), so a reused hybrid's head aligns
        self.heads = None if self.scoring != "head" else branch_heads(
            self.branches, backbone.hidden_size, head == "shared", HEAD_SEED, reuse)
        self.own_heads = self.heads if head == "per_branch" else None  # each branch's own head, if it has one
        self.merged_head = None
        if self.heads is not None and head == "per_branch":
            self.merged_head = copy.deepcopy(self.heads[0]).requires_grad_(False)
        self.weave = Weave(self.model, self.branches)  # which adapter is active, which weights train

        self.branch_val = BranchValidation(len(self.branches))  # branch<i>/val/... (validate_branches)
        self.branch_steps = [0] * len(self.branches)  # optimizer steps each branch took (all epochs)
        self.learned_weights: dict[str, list[float]] | None = None  # AdaMerging's per-module lambdas
        self._stale = True  # the merged adapter must be (re)computed before it is used
        self._relearn = True  # AdaMerging weights must be relearned (the branches changed)
        log.info("WeaveRec branches: %s", ", ".join(f"{i}={b.adapter} ({'trained' if b.trained else 'reused'} on "
                                                     f"{b.stream})" for i, b in enumerate(self.branches)))

    # ------------------------------------------------------------------ construction
    @classmethod
    def check(cls, run: RunInfo, r: int = 8, alpha: float = 16, dropout: float = 0.05, head: str = "per_branch",
              merge: dict | None = None, **kwargs) -> None:
        super().check(run, **kwargs)
        check_settings(run, r, alpha, dropout, head, merge)

    @classmethod
    def required_adapters(cls, run: RunInfo, backbone: Backbone, retrain_hybrids: bool = False,
                          **kwargs) -> list[AdapterSpec]:
        """The stored hybrids it would reuse (:func:`hybrid_specs`), none with ``retrain_hybrids``."""
        return [] if retrain_hybrids else hybrid_specs(run, backbone, **kwargs)

    @classmethod
    def from_config(cls, backbone: Backbone, run: RunInfo, retrain_hybrids: bool = False,
                    **kwargs) -> "WeaveRecModule":
        """Target and sources from the run (``mix=hybrid``); the stored hybrids the pipeline found are reused."""
        reuse = {s: str(run.adapters[hybrid_name(run.target, s)]) for s in run.sources
                 if hybrid_name(run.target, s) in run.adapters}
        for folder in run.adapters.values():
            log.info("reusing the stored hybrid %s (retrain with method.module.retrain_hybrids=true)", folder)
        for name, why in run.absent.items():
            if not why.startswith("no adapter"):
                log.warning("stored hybrid %s is not reused (%s): it is retrained and will be overwritten", name, why)
        return cls(backbone, target=run.target, sources=list(run.sources), reuse=reuse, **kwargs)

    def train_streams(self) -> set[str]:
        """The target stream and the hybrid streams of the branches that train (a reused hybrid's is not loaded)."""
        return {b.stream for b in self.branches if b.trained}

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return [b.adapter for b in self.branches]

    def head_of(self, i: int) -> nn.Module | None:
        """Branch ``i``'s head (None with likelihood scoring)."""
        if self.heads is None:
            return None
        return self.heads[0] if self.head_mode == "shared" else self.heads[i]

    def merge_weights(self) -> list[float]:
        """The global lambda_i (config, or uniform 1/(N+1) for rule weaverec, 1 for the others)."""
        return self.merge_cfg.global_weights(len(self.branches))

    def ensure_merged(self, batches=None) -> None:
        """(Re)build the merged adapter (and head) from the current branches, if they changed; with
        ``merge.learn_weights`` the per-module lambdas are first learned on ``batches`` (unlabeled target
        validation batches) unless the current ones still hold."""
        if not self._stale and MERGED in self.model.peft_config:
            return
        weights = self.merge_weights()
        if self.merge_cfg.learn_weights:
            if self._relearn or self.learned_weights is None:
                if batches is None:
                    raise RuntimeError("merge.learn_weights needs validation batches to learn the lambdas")
                self.learned_weights = self._learn(batches, weights)
                self._relearn = False
            weights = self.learned_weights
        self.weave.remerge(self.merge_cfg, weights, MERGED)
        if self.merged_head is not None:
            average_heads(list(self.heads), self.merge_weights(), self.merged_head)
        self._stale = False

    def _learn(self, batches, init: list[float]) -> dict[str, list[float]]:
        """AdaMerging's lambdas (``Weave.learn_weights``), scored with the merged head as it now stands."""
        head = self.merged_head if self.merged_head is not None else self.head_of(0)
        if self.merged_head is not None:
            average_heads(list(self.heads), self.merge_weights(), self.merged_head)
        return self.weave.learn_weights(self.merge_cfg, lambda b: self._score(b, head), batches, init, self.device)

    # ------------------------------------------------------------------ scoring
    def _score(self, batch: dict, head: nn.Module | None) -> torch.Tensor:
        if self.scoring == "likelihood":
            return likelihood_scores(self.model, batch)
        return pair_scores(self.model, head, batch, self.kind)

    def branch_score(self, batch: dict, i: int) -> torch.Tensor:
        """(B, C) scores of branch ``i`` (its adapter alone, its head)."""
        self.weave.activate(self.branches[i].adapter)
        return self._score(batch, self.head_of(i))

    def score(self, batch: dict) -> torch.Tensor:
        """(B, C) scores of the merged model: the deployed WeaveRec model."""
        self.ensure_merged()
        self.weave.activate(MERGED)
        return self._score(batch, self.merged_head if self.merged_head is not None else self.head_of(0))

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """``batch``: {stream: batch or None}. Sum of the trained branches' losses, each on its own
        stream with only its own adapter active, so each branch's gradient comes from its own loss
        alone; a branch whose stream is exhausted this epoch (None) skips the step: it enters the loss as 0 x its
        weights, for DDP (``Weave.idle_term``), and those zero gradients are dropped (``Weave.drop_idle``)."""
        total, n, size, idle = 0.0, 0, 0, 0.0
        for i, b in enumerate(self.branches):
            if not b.trained:
                continue
            if b.stream not in batch:
                raise KeyError(f"no training batch for stream {b.stream!r}; got {sorted(batch)}: is data.mix=hybrid?")
            sub = batch[b.stream]
            if sub is None:
                idle = idle + self.weave.idle_term(i, self.own_heads)
                continue
            self.weave.stepped.add(i)
            self.weave.activate(self.branches[i].adapter)
            loss = self.objective(sub, lambda x: self._score(x, self.head_of(i)), stream=f"branch{i}/train")
            self.log(f"branch{i}/train/loss", loss, batch_size=sub["labels"].numel())
            self.branch_steps[i] += 1
            total, n, size = total + loss, n + 1, size or sub["labels"].numel()
        if not n:
            return None  # every trained stream is exhausted (only with reused hybrids' streams longer)
        self.log("train/loss", total / n, prog_bar=True, batch_size=size)
        return total + idle

    def on_before_optimizer_step(self, optimizer) -> None:  # a branch with no batch since the last step takes none
        self.weave.drop_idle(self.own_heads)

    def on_train_epoch_end(self) -> None:
        log.info("epoch %d: optimizer steps per branch: %s", self.current_epoch, ", ".join(
            f"{i}={b.adapter}: {self.branch_steps[i]}" for i, b in enumerate(self.branches) if b.trained))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._stale = self._relearn = True

    def on_validation_epoch_start(self) -> None:
        """The merged model is what validation and test score: (re)merge the branches if they changed."""
        batches = None
        if self.merge_cfg.learn_weights and self._relearn and self.trainer.datamodule is not None:
            batches = self.trainer.datamodule.val_dataloader()
        self.ensure_merged(batches)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.validate_branches:
            for i in range(len(self.branches)):
                self.branch_val.update(i, self.branch_score(batch, i), batch["labels"])
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.validate_branches:
            return
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        self.log_synchronised(self.branch_val.compute(self.current_epoch if fitting else None))

    # ------------------------------------------------------------------ optimisation
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip each branch's gradients (its adapter, and its head if it has its own) on their own."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # element-wise anyway
        self.weave.clip(self.heads, self.head_mode == "shared", gradient_clip_val)

    def param_groups(self) -> list[dict]:  # one group a trained branch (Weave.param_groups), then the rest
        return self.weave.param_groups(self.own_heads, self.trainable_parameters())
    lr_lambdas = branch_lr_lambdas  # each branch its own schedule, over its own steps

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        super().on_save_checkpoint(checkpoint)
        keep = self.weave.state_names(self, self.heads)  # every branch and head: the merge is rebuilt from them
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
        checkpoint["weaverec"] = {"learned_weights": self.learned_weights,
                                  "branch_val_history": self.branch_val.history,
                                  "branch_steps": list(self.branch_steps),
                                  "branches": [b.adapter for b in self.branches]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_weave(self, checkpoint.get("weaverec", {}))

    # ------------------------------------------------------------------ reports
    def extra_params(self) -> dict[str, float]:
        per_branch = self.weave.per_branch_size()
        out = {"params/per_branch_adapter": per_branch, "params/branches_trained": sum(b.trained for b in self.branches)}
        if self.merge_cfg.rule in ("weaverec", "task_arithmetic"):  # rank sum_i r_i; ties/dare: dense
            out["params/merged_adapter"] = per_branch * len(self.branches)
        return out

    def extra_metrics(self) -> dict[str, float]:
        """``branch<i>/val/...`` of the epoch that model selection chose (on the merged model), and
        ``branch<i>/train/steps``, the optimizer steps each trained branch took."""
        steps = {f"branch{i}/train/steps": float(self.branch_steps[i]) for i, b in enumerate(self.branches) if b.trained}
        return {**self.branch_val.of_epoch(self.best_epoch()), **steps}

    def export(self, store: AdapterStore, manifest: dict) -> Path:
        """Write the newly trained hybrids and the merge to the store (:func:`export_weave`)."""
        self.ensure_merged()
        return export_weave(self, store, manifest)


def restore_weave(m: WeaveRecModule, extra: dict) -> None:
    """WeaveRec's own part of a checkpoint (``checkpoint["weaverec"]``, :meth:`WeaveRecModule.on_save_checkpoint`)."""
    saved = extra.get("branches")
    if saved is not None and saved != m.adapters:
        raise ValueError(f"checkpoint has the WeaveRec branches {saved}, this module {m.adapters}")
    m.branch_val.history = dict(extra.get("branch_val_history", {}))
    m.branch_steps = list(extra.get("branch_steps", m.branch_steps))
    m.learned_weights = extra.get("learned_weights")
    m._stale = True
    m._relearn = m.learned_weights is None  # the checkpoint's lambdas are those validated


def export_weave(m: WeaveRecModule, store: AdapterStore, manifest: dict) -> Path:
    """The newly trained hybrids (``hybrid-<a>+<b>/``) and the merge (``weaverec-<T>-from-<S...>/``: the merged
    adapter in peft format, its head, every branch under ``branches/``, the dense model under ``dense/`` if
    ``export_dense``), written to the store; returns the merge's folder."""
    lora = lora_record(m.lora, m.scoring, head=m.head_mode if m.scoring == "head" else None)
    branch_metrics = m.extra_metrics()
    for i, b in enumerate(m.branches):
        if b.source is None or not b.trained:
            continue
        metrics = {k.split("/", 1)[1]: v for k, v in branch_metrics.items() if k.startswith(f"branch{i}/")}
        store.save(m.backbone.name, b.adapter, m.model, b.adapter, m.head_of(i), {
            **manifest, **lora, "method": "weaverec-hybrid", "domain": b.adapter,
            "domains": sorted([m.target, b.source]), "metrics": metrics,
        })

    def extra(folder: Path) -> None:
        for i, b in enumerate(m.branches):
            save_merged_adapter(m.model, b.adapter, str(folder / "branches" / b.adapter))
            if m.head_of(i) is not None:
                save_head(m.head_of(i), folder / "branches" / b.adapter / "head.safetensors")
        if m.export_dense:
            save_dense(m.model, MERGED, str(folder / "dense"), tokenizer=m.backbone.tokenizer)

    head = m.merged_head if m.merged_head is not None else m.head_of(0)
    return store.save(m.backbone.name, weaverec_name(m.target, m.sources), m.model, MERGED, head, {
        **manifest, **lora, "sources": m.sources, "branches": m.adapters,
        "reused": [b.adapter for b in m.branches if not b.trained],
        "merge": {**m.merge_cfg.as_dict(), "weights": m.merge_weights()},
        "learned_weights": m.learned_weights,
    }, extra=extra)
