"""Batches of item indices for ID-based models (SASRec): no text, no tokenizer.

``IdCollator`` turns items ``(domain_name, history, candidates, target_pos)`` (what the
DataModule's datasets yield) into a dict with ``history`` (B, L) long, the history's item indices
+ 1, left-padded with 0 (0 is padding, so the most recent item is always at position L-1);
``candidates`` (B, C) long item indices; ``labels`` (B,) the target's position among the
candidates (-1: the target is not a candidate, retrieved candidates); ``num_candidates`` C;
``history_mask`` (B, L), 1 where ``history`` holds an item; ``domains`` the B domain names.
"""

from __future__ import annotations

import torch


class IdCollator:
    """See the module docstring; ``max_len`` caps the history (the most recent items are kept)."""

    def __init__(self, max_len: int):
        self.max_len = int(max_len)

    def __call__(self, items) -> dict:
        hists = [list(it[1])[-self.max_len:] for it in items]
        length = max(1, max(len(h) for h in hists))
        history = torch.zeros(len(items), length, dtype=torch.long)
        for b, h in enumerate(hists):
            if h:
                history[b, length - len(h):] = torch.tensor(h, dtype=torch.long) + 1
        return {
            "history": history,
            "candidates": torch.tensor([list(it[2]) for it in items], dtype=torch.long),
            "labels": torch.tensor([it[3] for it in items], dtype=torch.long),
            "num_candidates": len(items[0][2]),
            "history_mask": (history != 0).long(),
            "domains": [it[0] for it in items],
        }
