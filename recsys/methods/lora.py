"""Per-domain LoRA fine-tuning: the source adapters, and the baseline every method is compared to.

A peft LoRA on the frozen backbone plus the scoring head, trained on one domain's examples
(docs/methods.md, "Per-domain LoRA fine-tuning"). Zero-shot is this module with training skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from recsys.core.errors import UserError, require
from recsys.methods.base import RecModule, RunInfo
from recsys.models.adapter_store import AdapterStore, load_into, lora_record, mismatch
from recsys.models.backbone import Backbone, default_lora_targets
from recsys.models.head import ScoringHead
from recsys.models.scoring import likelihood_scores, pair_scores
from recsys.models.sharded_load import shard_module


def check_lora(r: int, alpha: float, dropout: float) -> None:
    """The LoRA keys of every LoRA method (lora, joint, weaverec): UserError naming ``method.module.<key>``."""
    require("method.module.r", r, at_least=1)
    require("method.module.alpha", alpha, above=0)
    require("method.module.dropout", dropout, at_least=0, below=1)


def lora_config(backbone: Backbone, r: int, alpha: float, dropout: float, target_modules) -> LoraConfig:
    """A peft LoraConfig with docs/methods.md's defaults (targets: q/v on encoders, all linear on decoders)."""
    targets = list(target_modules) if target_modules else default_lora_targets(backbone)
    check_lora(r, alpha, dropout)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


class LoRAModule(RecModule):
    """LoRA adapter + scoring head on a frozen backbone.

    Args:
        backbone: the frozen backbone.
        r, alpha, dropout, target_modules: the LoRA (None targets: the backbone's defaults).
        adapter: optional peft adapter folder to start from (e.g. a source adapter from the store).
        **kwargs: ``RecModule`` arguments (optimizer, scheduler, warmup_ratio, scoring).
    """

    name = "lora"
    kind = "lora"
    loads_sharded = True  # trainer=fsdp2: one peft model on self.backbone.model, sharded and read by
    configure_model = shard_module  # each rank (Lightning calls it before fit and test; nothing for a loaded one)

    def __init__(self, backbone: Backbone, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                 target_modules: list[str] | None = None, adapter: str | None = None, **kwargs):
        super().__init__(backbone, **kwargs)
        self.lora = lora_config(backbone, r, alpha, dropout, target_modules)
        self.adapter = adapter
        if adapter:
            self.model = load_into(backbone.model, {"default": adapter}, trainable=True)
        else:
            self.model = get_peft_model(backbone.model, self.lora)
        self.head = ScoringHead(backbone.hidden_size) if self.scoring == "head" else None

    @classmethod
    def check(cls, run: RunInfo, r: int = 8, alpha: float = 16, dropout: float = 0.05, **kwargs) -> None:
        super().check(run, **kwargs)
        check_lora(r, alpha, dropout)

    @classmethod
    def from_config(cls, backbone: Backbone, run: RunInfo, **kwargs) -> "LoRAModule":
        module = cls(backbone, **kwargs)
        module.domain = run.target
        return module

    @classmethod
    def from_adapter(cls, backbone: Backbone, folder: str | Path, precision: str, **kwargs) -> "LoRAModule":
        """The module a LoRA run trained, rebuilt from its stored adapter folder (``evaluate.py adapter=``):
        its weights and head, scored as it was trained (the manifest's ``scoring``); UserError if it does not
        fit ``backbone``. ``kwargs``: the method config's other keys (the LoRA shape is the adapter's)."""
        folder = Path(folder)
        AdapterStore.verify(folder)
        manifest = AdapterStore.load_manifest(folder) if (folder / "manifest.json").is_file() else {}
        why = mismatch(manifest, {"backbone": backbone.name})
        if why:
            raise UserError(f"adapter={folder} was {why}: set backbone.name={manifest['backbone']}")
        if manifest.get("precision", precision) != precision:
            logging.getLogger("recsys").warning(
                "adapter %s was trained and tested with trainer.precision=%s, this evaluation uses %s: metrics may "
                "differ slightly from train.py's", folder, manifest["precision"], precision)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("optimizer", "r", "alpha", "dropout", "target_modules")}
        kwargs["scoring"] = manifest.get("scoring", kwargs.get("scoring", "head"))  # as the adapter was trained
        head = AdapterStore.load_head(folder)
        if kwargs["scoring"] == "head" and head is None:
            raise UserError(f"adapter={folder} has no head.safetensors: scoring=head needs the trained head")
        module = cls(backbone, adapter=str(folder), **kwargs)
        module.load_head(head)
        return module

    def input_adapters(self) -> list[Path]:
        """The stored adapter it started from (``adapter``: ``evaluate.py adapter=``), if any."""
        return [Path(self.adapter)] if self.adapter else super().input_adapters()

    def load_head(self, state: dict | None) -> None:
        if state is not None and self.head is not None:
            self.head.load_state_dict(state)

    def export(self, store, manifest: dict):
        """Save the adapter (peft format), the head and the manifest as ``<store>/<backbone>/<domain>/seed-<seed>/``."""
        manifest = {**manifest, **lora_record(self.lora, self.scoring)}
        return store.save(self.backbone.name, manifest["domain"], self.model, "default", self.head, manifest)

    def score(self, batch: dict) -> torch.Tensor:
        if self.scoring == "likelihood":
            return likelihood_scores(self.model, batch)
        return pair_scores(self.model, self.head, batch, self.kind)
