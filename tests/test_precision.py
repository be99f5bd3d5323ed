"""Scores keep float32 resolution whatever the trainer's precision (issue 10, item 0).

Ties count against the model, so scores rounded to bf16 (3 significant digits) make nearby
candidates tie and bias every row down; the head therefore runs in float32 outside autocast.
"""

import pytest
import torch

from recsys.data.datamodule import RecDataModule
from recsys.methods.lora import LoRAModule
from recsys.models.backbone import load_backbone
from recsys.models.head import ScoringHead


def near_states(n=20, d=64, spread=1e-3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) + spread * torch.randn(n, d, generator=g)


def test_head_under_bf16_autocast_keeps_fp32_scores():
    torch.manual_seed(0)
    head = ScoringHead(64)
    pooled = near_states()
    ref = head(pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(pooled)
    assert scores.dtype == torch.float32
    assert scores.unique().numel() == 20  # bf16 outputs gave ties here
    torch.testing.assert_close(scores, ref, rtol=0, atol=1e-6)


def test_head_with_bf16_weights_and_inputs_scores_in_fp32():
    """``bf16-true``: weights and pooled states are bf16, the products and sums still run in float32."""
    torch.manual_seed(0)
    head = ScoringHead(64).to(torch.bfloat16)
    pooled = near_states(spread=3e-2).to(torch.bfloat16)
    scores = head(pooled)
    assert scores.dtype == torch.float32
    assert scores.unique().numel() == 20
    ref = ScoringHead(64)
    ref.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    torch.testing.assert_close(scores, ref(pooled.float()), rtol=1e-5, atol=1e-5)


def test_minilm_candidates_never_tie_under_bf16_mixed():
    """A real backbone under ``bf16-mixed``: the 20 candidates of each user get 20 distinct scores."""
    backbone = load_backbone("embedded:minilm-l6")
    dm = RecDataModule({"tools": {"source": "synthetic", "num_users": 40, "num_items": 80, "seed": 0}},
                       target="tools", max_history=5, max_eval_users=8, eval_batch_size=8)
    dm.attach(backbone.tokenizer, backbone.kind)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    torch.manual_seed(0)
    module = LoRAModule(backbone).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = module.score(batch)
    assert scores.dtype == torch.float32
    distinct = [row.unique().numel() for row in scores]
    assert distinct == [scores.size(1)] * scores.size(0), distinct
