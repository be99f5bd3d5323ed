"""The scoring head shared by every method (X-Cross's head, METHODS.md step 5).

pooled token -> dense -> GELU -> linear -> one score per (history, candidate) pair.
The pooled token is the first token for encoders ([CLS]) and the last non-pad token for decoders.
"""

from __future__ import annotations

import torch
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
        """(N, d) -> (N,) scores, computed in float32 whatever the backbone's dtype."""
        pooled = pooled.to(self.dense.weight.dtype)
        return self.out(self.dropout(self.act(self.dense(pooled)))).squeeze(-1)
