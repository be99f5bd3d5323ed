"""Run by tests/test_fsdp_lora.py: the LoRA module of a tiny decoder, wrapped by PyTorch's FSDP (FULL_SHARD,
use_orig_params) with ``recsys.pipeline.speed.lora_fsdp_policy``, on RANKS gloo processes, each on its share of one
batch: one backward and one AdamW step. Rank 0 saves, gathered to full size, the LoRA and head gradients and the
weights after the step, and what each FSDP unit holds (frozen or trainable, gradient storage or none).

    python tests/fsdp_lora_worker.py <out.pt> [ranks]
"""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, LENGTH, LR = 8, 12, 1e-2


class Loss(nn.Module):
    """The module's forward and a loss in one call (FSDP's root forward gathers the root unit)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, ids):
        hidden = self.module.model.base_model.model.model(input_ids=ids).last_hidden_state
        return self.module.head(hidden[:, -1]).float().pow(2).mean()


def build():
    from recsys.methods.lora import LoRAModule
    from recsys.models.backbone import build_tiny

    torch.manual_seed(0)
    module = LoRAModule(build_tiny("tiny:decoder"), r=4, dropout=0.0)
    torch.manual_seed(1)
    return Loss(module), torch.randint(5, 100, (BATCH, LENGTH))


def trained(model) -> dict:
    """The trainable parameters by name (FSDP's wrapper prefixes removed)."""
    return {n.replace("_fsdp_wrapped_module.", ""): p for n, p in model.named_parameters() if p.requires_grad}


def reference() -> dict:
    """One process, the whole batch: gradients and the weights after one step."""
    model, ids = build()
    model(ids).backward()
    grads = {n: p.grad.clone() for n, p in trained(model).items()}
    torch.optim.AdamW(trained(model).values(), lr=LR).step()
    return {"grads": grads, "after": {n: p.detach().clone() for n, p in trained(model).items()}}


def worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from recsys.pipeline.speed import lora_fsdp_policy

    model, ids = build()
    fsdp = FSDP(model, auto_wrap_policy=lora_fsdp_policy(), use_orig_params=True,
                sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"))
    share = BATCH // world
    fsdp(ids[rank * share:(rank + 1) * share]).backward()
    units = [(m._flat_param.requires_grad, m._flat_param.grad is not None, m._flat_param.numel())
             for m in FSDP.fsdp_modules(fsdp) if getattr(m, "_flat_param", None) is not None]
    with FSDP.summon_full_params(fsdp, with_grads=True):
        grads = {n: p.grad.clone() for n, p in trained(fsdp.module).items()}
    torch.optim.AdamW([p for p in fsdp.parameters() if p.requires_grad], lr=LR).step()
    with FSDP.summon_full_params(fsdp):
        after = {n: p.detach().clone() for n, p in trained(fsdp.module).items()}
    if rank == 0:
        torch.save({"grads": grads, "after": after, "units": units, "reference": reference()}, out)


if __name__ == "__main__":
    from gloo_ranks import spawn

    spawn(worker, int(sys.argv[2]) if len(sys.argv) > 2 else 2, sys.argv[1])
