"""Joint training, a baseline WeaveRec argues against (docs/methods.md, "WeaveRec"): one LoRA adapter
trained on the target's and all sources' training examples pooled (DataModule ``mix=joint``).

It is the per-domain LoRA module on other data; only its place in the store differs:
``<store>/<backbone>/joint-<T>-with-<S1+S2>/``, so it never overwrites the target's own LoRA
(``<store>/<backbone>/<T>/seed-<seed>/``, which ``merge_sources`` reads).
"""

from __future__ import annotations

from recsys.core.errors import UserError
from recsys.methods.base import RunInfo
from recsys.methods.lora import LoRAModule
from recsys.models.adapter_store import joint_name, lora_record
from recsys.models.backbone import Backbone


class JointLoRAModule(LoRAModule):
    """LoRA + head trained on the pooled target and source examples (see ``LoRAModule``)."""

    name = "joint"

    @classmethod
    def from_config(cls, backbone: Backbone, run: RunInfo, **kwargs) -> "JointLoRAModule":
        if run.mix != "joint" or not run.sources:
            raise UserError("method=joint needs data.mix=joint (method.mix: joint) and data.sources")
        module = super().from_config(backbone, run, **kwargs)
        module.sources = list(run.sources)
        return module

    def export(self, store, manifest: dict):
        manifest = {**manifest, **lora_record(self.lora, self.scoring, sources=self.sources)}
        name = joint_name(manifest["domain"], self.sources)
        return store.save(self.backbone.name, name, self.model, "default", self.head, manifest)
