"""Joint training, a baseline WeaveRec argues against (docs/methods.md, "WeaveRec"): one LoRA adapter
trained on the target's and all sources' training examples pooled (DataModule ``mix=joint``).

It is the per-domain LoRA module on other data; only its place in the store differs:
``<store>/<backbone>/joint-<T>-with-<S1+S2>/``, so it never overwrites the target's own LoRA
(``<store>/<backbone>/<T>/``, which ``merge_sources`` reads).
"""

from __future__ import annotations

from recsys.methods.lora import LoRAModule
from recsys.models.backbone import Backbone


def joint_name(target: str, sources) -> str:
    """Store name of a joint adapter: ``joint-games-with-beauty+toys`` (sources sorted)."""
    return f"joint-{target}-with-" + "+".join(sorted(sources))


class JointLoRAModule(LoRAModule):
    """LoRA + head trained on the pooled target and source examples (see ``LoRAModule``)."""

    @classmethod
    def from_config(cls, backbone: Backbone, datamodule=None, store=None, cfg=None, **kwargs) -> "JointLoRAModule":
        if datamodule is None or datamodule.mix != "joint" or not datamodule.sources:
            raise ValueError("method=joint needs data.mix=joint (method.mix: joint) and data.sources")
        module = super().from_config(backbone, datamodule=datamodule, store=store, cfg=cfg, **kwargs)
        module.sources = list(datamodule.sources)
        return module

    def export(self, store, manifest: dict):
        manifest = {**manifest, "sources": self.sources, "r": self.lora.r, "alpha": self.lora.lora_alpha,
                    "target_modules": sorted(self.lora.target_modules), "scoring": self.scoring}
        name = joint_name(manifest["domain"], self.sources)
        return store.save(self.backbone.name, name, self.model, "default", self.head, manifest)
