"""Per-domain LoRA fine-tuning: the source adapters, and the baseline every method is compared to.

A peft LoRA on the frozen backbone plus the scoring head, trained on one domain's examples
(docs/methods.md, "Per-domain LoRA fine-tuning"). Zero-shot is this module with training skipped.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from recsys.methods.base import RecModule
from recsys.models.backbone import Backbone, default_lora_targets
from recsys.models.head import ScoringHead
from recsys.models.scoring import likelihood_scores, pair_scores


def lora_config(backbone: Backbone, r: int, alpha: float, dropout: float, target_modules) -> LoraConfig:
    """A peft LoraConfig with docs/methods.md's defaults (targets: q/v on encoders, all linear on decoders)."""
    targets = list(target_modules) if target_modules else default_lora_targets(backbone)
    if r < 1:
        raise ValueError(f"method.r={r} must be >= 1")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


class LoRAModule(RecModule):
    """LoRA adapter + scoring head on a frozen backbone.

    Args:
        backbone: the frozen backbone.
        r, alpha, dropout, target_modules: the LoRA (None targets: the backbone's defaults).
        adapter: optional peft adapter folder to start from (e.g. a source adapter from the store).
        **kwargs: ``RecModule`` arguments (optimizer, scheduler, warmup_ratio, scoring).
    """

    def __init__(self, backbone: Backbone, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                 target_modules: list[str] | None = None, adapter: str | None = None, **kwargs):
        super().__init__(backbone, **kwargs)
        self.lora = lora_config(backbone, r, alpha, dropout, target_modules)
        if adapter:
            self.model = PeftModel.from_pretrained(backbone.model, adapter, is_trainable=True)
        else:
            self.model = get_peft_model(backbone.model, self.lora)
        self.head = ScoringHead(backbone.hidden_size) if self.scoring == "head" else None

    @classmethod
    def from_config(cls, backbone: Backbone, datamodule=None, store=None, cfg=None, **kwargs) -> "LoRAModule":
        module = cls(backbone, **kwargs)
        module.domain = datamodule.target if datamodule is not None else None
        return module

    def load_head(self, state: dict | None) -> None:
        if state is not None and self.head is not None:
            self.head.load_state_dict(state)

    def export(self, store, manifest: dict):
        """Save the adapter (peft format), the head and the manifest as ``<store>/<backbone>/<domain>/``."""
        manifest = {**manifest, "r": self.lora.r, "alpha": self.lora.lora_alpha,
                    "target_modules": sorted(self.lora.target_modules), "scoring": self.scoring}
        return store.save(self.backbone.name, manifest["domain"], self.model, "default", self.head, manifest)

    def score(self, batch: dict) -> torch.Tensor:
        if self.scoring == "likelihood":
            return likelihood_scores(self.model, batch)
        return pair_scores(self.model, self.head, batch, self.kind)
