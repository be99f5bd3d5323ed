"""Run by tests/test_sharded_load.py: RANKS gloo processes load a small saved decoder with
``recsys.models.sharded_load.load_sharded``; rank 0 saves the gathered weights, the logits of a fixed input, and
each rank's share of the parameters.

    python tests/sharded_load_worker.py <checkpoint folder> <out.pt> [ranks]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(rank: int, world: int, folder: str, out: str) -> None:
    from recsys.models.sharded_load import load_sharded

    model = load_sharded(folder, "decoder", torch.float32)
    local = sum(p.to_local().numel() for p in model.parameters())
    shares = [None] * world
    dist.all_gather_object(shares, local)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # before forward (the root stays gathered)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 19).view(2, 8)).logits
    if rank == 0:
        torch.save({"weights": full, "logits": logits, "shares": shares}, out)


if __name__ == "__main__":
    from gloo_ranks import spawn

    spawn(worker, int(sys.argv[3]) if len(sys.argv) > 3 else 2, sys.argv[1], sys.argv[2])
