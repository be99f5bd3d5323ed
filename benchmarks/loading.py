"""Peak host memory a rank while loading a frozen backbone on several ranks: ``from_pretrained`` on every rank, then
FSDP2 sharding (before), against :func:`recsys.models.sharded_load.load_sharded` (after: meta-device init, FSDP2
sharding, each rank reads only its rows of the safetensors files).

A random Llama-style decoder (default about 370M parameters, bf16 on disk: ~0.75 GB) is built once and saved to a
folder (default /tmp/recsys-loading-bench); each way then runs in fresh processes (``--ranks`` gloo processes on
the CPU), so each process's peak resident set (``ru_maxrss``) is that way's alone. Printed per rank: the peak above
the process's memory before loading, the resident memory after, and the ratio after / before.

    python benchmarks/loading.py                      # 2 ranks, ~370M parameters
    python benchmarks/loading.py --layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.models.sharded_load import load_sharded, rss_bytes  # noqa: E402

MIB = 2**20


def build_checkpoint(folder: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """Save a random bf16 decoder once (a marker file says it is complete); its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = folder / "complete.json"
    if marker.is_file():
        return json.loads(marker.read_text())["params"]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    marker.write_text(json.dumps({"params": params}))
    return params


def _eager(folder: str):
    """Before: every rank reads the whole checkpoint, then FSDP2 shards it."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from recsys.models.backbone import transformer_layers

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.requires_grad_(False)
    for block in transformer_layers(model):
        fully_shard(block)
    fully_shard(model)
    return model


class PeakRSS:
    """The highest resident set size of this process while the block runs, sampled every millisecond (the kernel's
    ``ru_maxrss`` is no use here: a process started by another can begin with its parent's peak)."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def _warm_up(folder: str) -> None:
    """Import everything both ways use and build the model once on the meta device."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from recsys.models.shapes import meta_model

    meta_model(AutoConfig.from_pretrained(folder), "decoder")


def _rank(rank: int, world: int, port: int, folder: str, way: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _warm_up(folder)  # imports and lazy module loading count before the start, not in the peak
    dist.barrier()
    start = rss_bytes()
    with PeakRSS() as sampler:
        model = _eager(folder) if way == "before" else load_sharded(folder, "decoder", torch.bfloat16)
    dist.barrier()
    peak = sampler.peak
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    Path(out, f"{way}-{rank}.json").write_text(json.dumps(
        {"rank": rank, "peak_above_start": peak - start, "resident_after": rss_bytes() - start, "local_params": local}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(folder: Path, ranks: int) -> dict:
    """{way: [per-rank records]} for both ways, each in fresh processes."""
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for way in ("before", "after"):
            mp.spawn(_rank, args=(ranks, free_port(), str(folder), way, out), nprocs=ranks, join=True)
            results[way] = [json.loads(Path(out, f"{way}-{r}.json").read_text()) for r in range(ranks)]
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/recsys-loading-bench", help="where the checkpoint is built once")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    folder = Path(a.folder) / f"l{a.layers}-d{a.hidden}-i{a.inter}-v{a.vocab}"
    folder.mkdir(parents=True, exist_ok=True)
    params = build_checkpoint(folder, a.layers, a.hidden, a.inter, a.vocab)
    res = measure(folder, a.ranks)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"checkpoint: {params / 1e6:.0f}M parameters, {size / MIB:.0f} MiB of bf16 safetensors; {a.ranks} ranks (gloo)")
    print(f"{'rank':>4} {'peak before':>12} {'peak after':>12} {'ratio':>6} {'resident after':>15} {'shard':>8}")
    for b, f in zip(res["before"], res["after"]):
        print(f"{b['rank']:>4} {b['peak_above_start'] / MIB:>8.0f} MiB {f['peak_above_start'] / MIB:>8.0f} MiB "
              f"{f['peak_above_start'] / b['peak_above_start']:>6.2f} {f['resident_after'] / MIB:>11.0f} MiB "
              f"{f['local_params'] / params:>8.2f}")
    out = {"params": params, "bytes": size, "ranks": a.ranks, **res}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
