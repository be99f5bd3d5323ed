"""Memory-light loading of a frozen backbone on several ranks: each rank reads only its shard of the weights.

``from_pretrained`` on every rank puts the whole checkpoint in each rank's host memory (8 ranks x 15 GB for a bf16
7B) before anything is sharded. Here instead (:func:`load_sharded`):

1. the model is built on the ``meta`` device (shapes only, no memory);
2. FSDP2's ``fully_shard`` shards every transformer block and the root over the ranks (dim 0, ``torch.chunk``
   rows a rank), still on meta;
3. ``to_empty`` allocates only each rank's local shards;
4. each rank reads from the ``safetensors`` files only the bytes of its own rows, straight into its local shards
   (plain positioned reads, :func:`read_rows`: not the memory map, whose touched pages count in the resident set
   until it is closed, nor ``get_slice``, which copies); non-persistent buffers (rotary frequencies) are rebuilt
   from the config.

So a rank's host memory holds at most its shard of the frozen weights, and no rank waits on another's read (unlike
a rank-0 load and broadcast, where rank 0 holds the whole model and the others idle). Chosen over Lightning's
``configure_model``, which says where to build the model but not how to read a checkpoint shard by shard.
``benchmarks/loading.py`` measures the peak resident memory a rank, both ways.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


def safetensors_index(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or a sharded checkpoint's index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    return {k: folder / "model.safetensors" for k in safetensors_header(folder / "model.safetensors")[0]}


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that ``rank`` holds, as FSDP2 shards (torch.chunk: ceil(rows / world) a rank)."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, where the data begins) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_rows(path: str | Path, header: dict, begin: int, name: str, start: int, stop: int,
              out: torch.Tensor) -> None:
    """Rows [start, stop) of tensor ``name`` (dim 0) read from the file into ``out`` (contiguous, that many rows)."""
    entry = header[name]
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape = entry["shape"]
    row = int(torch.tensor(shape[1:], dtype=torch.int64).prod()) if len(shape) > 1 else 1
    item = torch.tensor([], dtype=dtype).element_size()
    offset = begin + entry["data_offsets"][0] + start * row * item
    target = out if out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu" else \
        torch.empty(out.shape, dtype=dtype)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view = memoryview(target.view(torch.uint8).numpy()).cast("B") if target.numel() else memoryview(b"")
        got = f.readinto(view) if target.numel() else 0
    if got != (stop - start) * row * item:
        raise OSError(f"{path}: {name} is cut short ({got} of {(stop - start) * row * item} bytes)")
    if target is not out:
        out.copy_(target)


def _rebuild_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: rebuild them from the config."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            fresh = type(module)(config=module.config)
            for key, buf in fresh.named_buffers(recurse=False):
                getattr(module, key).copy_(buf)


def load_sharded(folder: str | Path, kind: str = "decoder", dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", mesh=None) -> nn.Module:
    """The ``save_pretrained`` model in ``folder``, frozen, sharded over the default process group (FSDP2), each
    rank reading only its rows. Call on every rank after ``init_process_group``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig

    from recsys.models.backbone import transformer_layers
    from recsys.models.shapes import meta_model

    config = AutoConfig.from_pretrained(folder)
    config.dtype = dtype
    model = meta_model(config, kind).to(dtype)
    model.requires_grad_(False)
    for block in transformer_layers(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    files = safetensors_index(folder)
    headers = {path: safetensors_header(path) for path in set(files.values())}
    for name, param in model.named_parameters():  # tied weights appear once
        path = files.get(name)
        if path is None:
            raise KeyError(f"{folder}: no tensor {name!r} in the checkpoint")
        local = param.to_local() if hasattr(param, "to_local") else param
        start, stop = shard_rows(param.shape[0], rank, world)
        if stop > start:
            with torch.no_grad():
                read_rows(path, *headers[path], name, start, stop, local[: stop - start])
    _rebuild_buffers(model)
    return model.eval()


def rss_bytes() -> int:
    """This process's resident set size now (bytes)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
