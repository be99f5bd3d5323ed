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
    dm = RecDataModule.from_config(domains={"tools": {"source": "synthetic", "num_users": 40, "num_items": 80, "seed": 0}},
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


@pytest.mark.slow  # a MiniLM forward of 640 pairs: ~40 s on a loaded CPU
def test_untrained_rows_have_no_ties_and_chance_hr10():
    """An untrained module (fresh head, LoRA B = 0) under bf16-mixed: no user's 20 candidates tie,
    and over 100 head initialisations HR@10 averages to chance (1/2). HR@1 does not: the true
    item's (history, candidate) state sits nearer the centre of the candidates' states than the
    negatives' (it shares words with the history), and a random head puts outliers on top, so
    untrained rows sit below chance at the top of the list without any tie (README, default run)."""
    backbone = load_backbone("embedded:minilm-l6")
    dm = RecDataModule.from_config(domains={"tools": {"source": "synthetic", "num_users": 400, "num_items": 300, "seed": 0}},
                       target="tools", max_history=5, max_eval_users=32, eval_batch_size=16)
    dm.attach(backbone.tokenizer, backbone.kind)
    dm.setup("test")
    from recsys.core.metrics import RankingMetrics
    from recsys.models.scoring import pooled_hidden

    pooled, labels = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in dm.test_dataloader():
            pooled.append(pooled_hidden(backbone.model, batch, backbone.kind).float().view(-1, 20, backbone.hidden_size))
            labels.append(batch["labels"])
    pooled, labels = torch.cat(pooled), torch.cat(labels)
    hr10, hr1 = [], []
    for seed in range(100):
        torch.manual_seed(seed)
        head = ScoringHead(backbone.hidden_size)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            scores = head(pooled.flatten(0, 1)).view(-1, 20)
        assert all(row.unique().numel() == 20 for row in scores)
        m = RankingMetrics()
        m.update(scores, labels)
        out = m.compute()
        hr10.append(float(out["hr@10"]))
        hr1.append(float(out["hr@1"]))
    hr10, hr1 = torch.tensor(hr10), torch.tensor(hr1)
    assert abs(hr10.mean() - 0.5) < 3 * hr10.std() / 10 + 1e-3, (float(hr10.mean()), float(hr10.std()))
    # the centrality that pulls HR@1 below 1/20: more negatives lie farther from the candidates' mean
    dist = (pooled - pooled.mean(1, keepdim=True)).norm(dim=-1)
    farther = (dist > dist.gather(1, labels.view(-1, 1))).sum(1).float().mean()
    assert farther > 9.5 and hr1.mean() < 0.05
