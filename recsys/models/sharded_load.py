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
a rank-0 load and broadcast, where rank 0 holds the whole model and the others idle). ``benchmarks/loading.py``
measures the peak resident memory a rank, both ways.

The training path (``trainer=fsdp2``, Lightning's ModelParallelStrategy) reads the same way, one rule for both
(:func:`shard_blocks`, :func:`read_frozen_rows`): :func:`hollow_backbone` builds the backbone before any process
group exists, with CPU weights that hold no memory (:func:`hollow`), so the method puts its LoRA and head on it as
on a loaded one (peft draws the same random numbers); the module's ``configure_model`` then calls
:func:`shard_module`: the hollow weights go to meta, blocks and root become FSDP2 units, each rank allocates and
reads its shards, and the trainable weights keep this rank's rows of their initial values (:func:`shard_and_load`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("recsys")


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


def checkpoint_name(name: str) -> str:
    """The checkpoint's name of a parameter of a (possibly LoRA-injected) transformers model: peft moves a
    wrapped layer's own weights under ``base_layer``."""
    return name.replace(".base_layer.", ".")


def shard_blocks(model: nn.Module, root: nn.Module, mesh=None) -> None:
    """FSDP2 units: every transformer block of ``model``, then ``root`` (holding ``model``: embeddings, norms,
    LM head and whatever else it owns)."""
    from torch.distributed.fsdp import fully_shard

    from recsys.models.backbone import transformer_layers

    for block in transformer_layers(model):
        fully_shard(block, mesh=mesh)
    # the root resharded after its forward too (FSDP2 keeps a root gathered until the backward): an evaluation, which
    # has none, would leave the whole root gathered, and the optimizer's sharded weights off the module
    fully_shard(root, mesh=mesh, reshard_after_forward=True)


def read_frozen_rows(model: nn.Module, folder: str | Path, mesh=None) -> int:
    """Each frozen parameter of the sharded ``model`` filled with this rank's rows (dim 0) read from the
    ``save_pretrained`` folder's safetensors (trainable ones are left as they are); returns the bytes read."""
    import torch.distributed as dist

    group = mesh.get_group() if mesh is not None else None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    files = safetensors_index(folder)
    headers = {path: safetensors_header(path) for path in set(files.values())}
    read = 0
    for name, param in model.named_parameters():  # tied weights appear once
        if param.requires_grad:
            continue
        key = checkpoint_name(name)
        path = files.get(key)
        if path is None:
            raise KeyError(f"{folder}: no tensor {key!r} in the checkpoint")
        local = param.to_local() if hasattr(param, "to_local") else param
        start, stop = shard_rows(param.shape[0], rank, world)
        if stop > start:
            with torch.no_grad():
                read_rows(path, *headers[path], key, start, stop, local[: stop - start])
            read += local[: stop - start].numel() * local.element_size()
    return read


def load_sharded(folder: str | Path, kind: str = "decoder", dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", mesh=None) -> nn.Module:
    """The ``save_pretrained`` model in ``folder``, frozen, sharded over the default process group (FSDP2), each
    rank reading only its rows. Call on every rank after ``init_process_group``."""
    from transformers import AutoConfig

    from recsys.models.shapes import meta_model

    config = AutoConfig.from_pretrained(folder)
    config.dtype = dtype
    model = meta_model(config, kind).to(dtype)
    model.requires_grad_(False)
    shard_blocks(model, model, mesh)
    model.to_empty(device=device)
    read_frozen_rows(model, folder, mesh)
    _rebuild_buffers(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------- a hollow backbone
# The training path (trainer=fsdp2): the backbone is built before the trainer exists, on every rank, without its
# weights; the method puts its LoRA and head on it as usual; ``configure_model`` then shards and reads.
_HOLLOW: dict[torch.dtype, torch.Tensor] = {}  # one zero element a dtype, the storage of every hollow weight


def _hollow_zero(dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _HOLLOW:
        _HOLLOW[dtype] = torch.zeros((), dtype=dtype)
    return _HOLLOW[dtype]


def is_hollow(param: torch.Tensor) -> bool:
    """Whether ``param`` is a hollow placeholder (:func:`hollow`): no storage of its own."""
    zero = _HOLLOW.get(param.dtype)
    return zero is not None and param.device.type == "cpu" and \
        param.untyped_storage().data_ptr() == zero.untyped_storage().data_ptr()


def _replace_params(model: nn.Module, make) -> None:
    """Every parameter ``p`` for which ``make(p)`` returns a tensor replaced by it, tied weights kept tied."""
    memo: dict[int, nn.Parameter | None] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                new = make(p)
                memo[id(p)] = None if new is None else nn.Parameter(new, requires_grad=p.requires_grad)
            if memo[id(p)] is not None:
                module._parameters[key] = memo[id(p)]


def hollow(model: nn.Module) -> nn.Module:
    """``model`` (built on the meta device) with CPU weights that hold no memory: each a zero-stride view of one
    shared zero; real (small) buffers. It has the devices, shapes and dtypes of a loaded model, so a method puts
    its LoRA (peft creates and initialises it on the CPU, drawing the same random numbers as on a loaded model)
    and head on it as usual; nothing may run it before :func:`shard_and_load`."""
    _replace_params(model, lambda p: _hollow_zero(p.dtype).expand(p.shape) if p.device.type == "meta" else None)
    for module in model.modules():
        for key, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[key] = torch.zeros(b.shape, dtype=b.dtype)
    _rebuild_buffers(model)
    return model


def hollow_backbone(name: str, dtype: str = "auto", tokenizer: str | None = None,
                    lora_targets: list[str] | None = None, **kwargs):
    """``backbone.name`` (a hub name or a ``save_pretrained`` folder) as a hollow :class:`Backbone` (:func:`hollow`:
    shapes and dtypes, no weights read) with its tokenizer; its ``checkpoint`` is the folder of safetensors (a hub
    name: its snapshot, from the local cache or fetched) each rank reads its shard from in :func:`shard_and_load`.
    ``kwargs``: ``revision``, ``trust_remote_code`` (``attn_implementation`` is the config's)."""
    from transformers import AutoConfig

    from recsys.core.errors import UserError
    from recsys.models.backbone import (DTYPES, EMBEDDED, TINY, Backbone, _hub_kwargs, _tokenizer,
                                        config_kind)
    from recsys.models.shapes import meta_model

    if name in TINY or name in EMBEDDED:
        raise UserError(f"trainer=fsdp2 reads the backbone's safetensors shard by shard: backbone.name={name} is built "
                        "in, with none; use backbone=hf backbone.name=<a hub name or save_pretrained folder>, or "
                        "trainer=ddp for this backbone")
    if dtype not in DTYPES:
        raise UserError(f"backbone.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = os.path.expanduser(name)
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(name, revision=kwargs.get("revision"),
                                       allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as e:  # offline and not cached, no such repository...
            raise UserError(f"cannot find backbone {name!r}: not a folder, and not on the hub or in its local cache "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        safetensors_index(folder)
        config = AutoConfig.from_pretrained(folder, **_hub_kwargs(kwargs))
    except (OSError, ValueError) as e:
        raise UserError(f"trainer=fsdp2 reads backbone {name!r} from its config.json and safetensors files, which "
                        f"{folder} lacks ({str(e).splitlines()[0]}); use trainer=fsdp for it") from None
    if kwargs.get("attn_implementation"):
        config._attn_implementation = kwargs["attn_implementation"]
    kind = config_kind(config)
    own = getattr(config, "dtype", None) or torch.float32  # dtype auto: the checkpoint's own
    own = getattr(torch, own.replace("torch.", "")) if isinstance(own, str) else own
    config.dtype = own if dtype == "auto" else DTYPES[dtype]
    model = hollow(meta_model(config, kind).to(config.dtype))
    model.requires_grad_(False)
    model.eval()
    tok = _tokenizer(os.path.expanduser(tokenizer) if tokenizer else folder, kind, **_hub_kwargs(kwargs))
    return Backbone(name=name, model=model, tokenizer=tok, kind=kind,
                    lora_targets=list(lora_targets) if lora_targets else None, checkpoint=str(folder))


def shard_and_load(root: nn.Module, model: nn.Module, folder: str | Path, mesh=None, device="cpu",
                   forward_methods: tuple[str, ...] = ()) -> int:
    """Shard ``root`` (a module holding the hollow ``model`` and its trainable weights) with FSDP2 and fill it:
    the hollow weights go to the meta device, every block of ``model`` and then ``root`` become units,
    ``to_empty`` (on ``model``) allocates each rank's shards, the trainable weights get back this rank's rows of their full
    initial values (the same on every rank: the run's seed), and the frozen ones are read from ``folder`` row by
    row (:func:`read_frozen_rows`). ``forward_methods``: methods of ``root`` that run it (FSDP2 gathers the root's
    weights around them, as around ``forward``). Returns the bytes of frozen weights this rank read."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    _replace_params(model, lambda p: torch.empty(p.shape, dtype=p.dtype, device="meta") if is_hollow(p) else None)
    shard_blocks(model, root, mesh)
    trained = {n: p.to_local().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.to_empty(device=device)  # not root: its other modules (metrics' states) hold no meta tensor to lose
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                param.to_local().copy_(trained[name])
    read = read_frozen_rows(model, folder, mesh)
    _rebuild_buffers(model)
    for method in forward_methods:
        register_fsdp_forward_method(root, method)
    return read


def shard_module(module: nn.Module, forward_methods: tuple[str, ...] = ("score",)) -> None:
    """A method module's ``configure_model`` under ``trainer=fsdp2`` (Lightning calls it on every rank before each
    fit and test): a hollow ``module.backbone`` (``checkpoint`` set) is sharded with ``module`` as the root and read,
    each rank its rows (:func:`shard_and_load`), once; later calls and a loaded backbone change nothing. Logs the
    bytes read and this rank's growth in resident memory."""
    backbone = getattr(module, "backbone", None)
    if backbone is None or backbone.checkpoint is None or getattr(module, "_sharded", False):
        return
    mesh = module.device_mesh["data_parallel"] if module.device_mesh is not None else None
    before = rss_bytes()
    read = shard_and_load(module, backbone.model, backbone.checkpoint, mesh=mesh,
                          device=module.trainer.strategy.root_device, forward_methods=forward_methods)
    module._sharded = True
    whole = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    log.info("sharded loading: rank %d read %.1f MiB of frozen weights (whole model %.1f MiB); resident memory "
             "%+.1f MiB", module.global_rank, read / 2**20, whole / 2**20, (rss_bytes() - before) / 2**20)


def gather_trainable(module: nn.Module) -> None:
    """After the last evaluation of a sharded run (:func:`shard_module`), on every rank: each trainable weight made
    whole again (a plain tensor gathered from the ranks), so that the adapter export writes full weights; the
    frozen ones stay sharded. Nothing for a module that was not sharded."""
    if not getattr(module, "_sharded", False):
        return
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                sub._parameters[key] = nn.Parameter(p.full_tensor().detach().cpu(), requires_grad=True)


def rss_bytes() -> int:
    """This process's resident set size now (bytes)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
