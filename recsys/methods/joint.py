"""Joint training, a baseline WeaveRec argues against (docs/methods.md, "WeaveRec"): one LoRA adapter
trained on the target's and all sources' training examples pooled (DataModule ``mix=joint``).

It is the per-domain LoRA module on other data; only its place in the store differs:
``<store>/<backbone>/joint-<T>-with-<S1+S2>/``, so it never overwrites the target's own LoRA
(``<store>/<backbone>/<T>/seed-<seed>/``, which ``merge_sources`` reads).

``steps``: ``epochs`` (default) trains the recipe's epochs over the pooled data, so 2-3x the optimizer steps
of target-only training; ``equal`` [ours] caps each epoch at the batches target-only training takes on
the same target examples (the first of the pool's shuffled batches, a fresh subset each epoch; the
DataModule's ``epoch_batches=target``), so the schedule spans those steps: the comparison at equal compute. Stored as ``joint-<T>-with-<S...>-equal-steps``.
"""

from __future__ import annotations

from recsys.core.errors import UserError
from recsys.methods.base import RunInfo
from recsys.methods.lora import LoRAModule
from recsys.models.adapter_store import joint_name, lora_record
from recsys.models.backbone import Backbone

STEPS = ("epochs", "equal")  # the recipe's epochs over the pool | target-only's optimizer steps an epoch


class JointLoRAModule(LoRAModule):
    """LoRA + head trained on the pooled target and source examples (see ``LoRAModule``).

    Args:
        steps: ``epochs`` | ``equal`` (see the module docstring).
        **kwargs: ``LoRAModule`` arguments.
    """

    def __init__(self, backbone: Backbone, steps: str = "epochs", **kwargs):
        super().__init__(backbone, **kwargs)
        if steps not in STEPS:
            raise UserError(f"method.module.steps={steps!r} is unknown: use one of {STEPS}")
        self.steps, self.target, self.sources = steps, None, []

    name = "joint"
    loads_sharded = False  # trainer=fsdp2 is tested with method=lora only

    @classmethod
    def from_config(cls, backbone: Backbone, run: RunInfo, **kwargs) -> "JointLoRAModule":
        if run.mix != "joint" or not run.sources:
            raise UserError("method=joint needs data.mix=joint (method.mix: joint) and data.sources")
        module = super().from_config(backbone, run, **kwargs)
        module.target, module.sources = run.target, list(run.sources)
        return module

    def epoch_batches(self) -> str:
        """``steps=equal``: each epoch of the pool stops after target-only's batches (``RecDataModule.train_only``)."""
        return "target" if self.steps == "equal" else "all"

    def extra_metrics(self) -> dict[str, float]:
        """``train/steps``: the optimizer steps taken (``steps=equal``: target-only's)."""
        return {**super().extra_metrics(), "train/steps": float(self.trainer.global_step)}

    def export(self, store, manifest: dict):
        manifest = {**manifest, **lora_record(self.lora, self.scoring, sources=self.sources), "steps": self.steps}
        name = joint_name(manifest["domain"], self.sources, self.steps)
        return store.save(self.backbone.name, name, self.model, "default", self.head, manifest)
