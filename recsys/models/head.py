"""The scoring head shared by every method (X-Cross's head; docs/methods.md, "Per-domain LoRA fine-tuning").

pooled token -> dense -> GELU -> linear -> one score per (history, candidate) pair.
The pooled token is the first token for encoders ([CLS]) and the last non-pad token for decoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Pick the pooled token.

    Args:
        hidden: (N, T, d) last hidden states.
        attention_mask: (N, T), 1 on real tokens; sequences are right-padded.
        kind: ``"encoder"`` (first token) or ``"decoder"`` (last non-pad token).
    Returns:
        (N, d)
    """
    if kind == "encoder":
        return hidden[:, 0]
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # right padding
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class ScoringHead(nn.Module):
    """score = v^T GELU(W_p h + b_p) + c, for a pooled hidden state h of size ``hidden_size``."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) float32 scores, whatever the backbone's dtype or the trainer's precision.

        Computed outside autocast with the weights read as float32: under ``bf16-mixed`` autocast would
        round the scores to bf16 (3 significant digits), and ties count against the model, so nearby
        candidates would tie and every row would be biased down (``bf16-true`` stores the weights in
        bf16, but the products and sums still run in float32).
        """
        with torch.autocast(pooled.device.type, enabled=False):
            h = F.linear(pooled.float(), self.dense.weight.float(), self.dense.bias.float())
            h = self.dropout(self.act(h))
            return F.linear(h, self.out.weight.float(), self.out.bias.float()).squeeze(-1)
