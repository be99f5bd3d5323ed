"""Backbone shapes without weights: the published ``config.json`` of each preset's backbone, shipped in
``conf/backbone/shapes/`` (a few KB each), and the model built from it on the ``meta`` device (no weights
read, no download). ``python -m recsys.plan`` sizes a run from it.

A shape is found by the backbone's name: ``Qwen/Qwen2-7B-Instruct`` -> ``Qwen--Qwen2-7B-Instruct.json``,
``embedded:minilm-l6`` -> ``embedded--minilm-l6.json``; a local folder's own ``config.json``; the ``tiny:*``
test models' own config.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from recsys import CONFIG_DIR
from recsys.core.errors import UserError

SHAPES_DIR = CONFIG_DIR / "backbone" / "shapes"


def shape_file(name: str) -> Path:
    """The shipped config.json of a backbone name (it may not exist)."""
    return SHAPES_DIR / (re.sub(r"[/:]", "--", name) + ".json")


def shipped_shapes() -> list[str]:
    """The backbone names with a shipped shape, e.g. ``Qwen/Qwen2-7B-Instruct``."""
    return sorted(p.stem.replace("embedded--", "embedded:").replace("--", "/") for p in SHAPES_DIR.glob("*.json"))


def shape_config(name: str):
    """The transformers config of backbone ``name``, from a shipped shape, a local folder's config.json, or the
    tiny test models; a UserError naming the shipped shapes otherwise (nothing is downloaded)."""
    from transformers import AutoConfig

    from recsys.models.backbone import TINY, build_tiny

    if name in TINY:
        return build_tiny(name).model.config
    path = os.path.expanduser(name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return AutoConfig.from_pretrained(path)
    if shape_file(name).is_file():
        data = json.loads(shape_file(name).read_text())
        data.pop("auto_map", None)  # transformers' own class, not the repository's code
        if "torch_dtype" in data:  # the published files' key; transformers 5 reads dtype
            data["dtype"] = data.pop("torch_dtype")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    raise UserError(
        f"backbone.name={name!r}: no shape to plan with: shipped shapes are {', '.join(shipped_shapes())} "
        f"({SHAPES_DIR}); add its config.json there as {shape_file(name).name}, or point backbone.name at a folder "
        "holding its config.json"
    )


def meta_model(config, kind: str) -> nn.Module:
    """The model of ``config`` on the meta device: shapes and parameter counts, no memory, no weights."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if kind == "encoder" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)
