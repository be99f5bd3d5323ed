"""SASRec (Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): the ID-based
baseline, on the same DataModule, split, candidates and metrics as the LLM methods.

Causal self-attention over item-id embeddings (learned positions, pre-norm blocks); the user's state
is the output at the most recent position, and an item's score is the dot product of that state with
the item's embedding (the input embeddings are shared with the output, as in the paper). Training
examples are the DataModule's leave-one-out prefixes (history -> next item), the loss on the last
position: ``loss=ce`` the softmax cross-entropy over the whole catalogue (default), ``loss=bce`` the
paper's sampled binary cross-entropy against the example's ``data.num_train_negatives`` negatives.
No language model: ``needs_backbone = False`` tells the pipeline not to load one, and batches are
item indices (``recsys.data.ids``).

``score_all`` scores the whole catalogue, so the run can rank against every item
(``eval.candidates=full``) and store its top K as a retriever (``recsys.evaluation.catalogue``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.core.errors import UserError, require
from recsys.methods.base import RecModule

LOSSES = ("ce", "bce")


class SASRec(nn.Module):
    """The network: item + position embeddings, ``blocks`` causal pre-norm Transformer blocks, final norm.

    Args:
        num_items: catalogue size N (item indices 0..N-1; the embedding row 0 is padding).
        max_len: longest history read (positions).
        hidden: embedding and state size d; ``blocks``, ``heads``: the Transformer; ``dropout``: on
            embeddings, attention and feed-forward.
    """

    def __init__(self, num_items: int, max_len: int, hidden: int = 64, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.5):
        super().__init__()
        self.item = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=hidden, dropout=dropout,
                                           activation="relu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        nn.init.normal_(self.item.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item indices + 1 -> (B, d) the state at the last (most recent) position."""
        L = history.size(1)
        if L > self.pos.num_embeddings:
            history, L = history[:, -self.pos.num_embeddings:], self.pos.num_embeddings
        real = (history > 0).unsqueeze(-1)
        x = self.item(history) * self.item.embedding_dim ** 0.5 + self.pos(torch.arange(L, device=history.device))
        x = self.drop(x) * real  # padding stays zero, as in the paper (only a causal mask, no key mask)
        causal = torch.triu(torch.full((L, L), float("-inf"), device=history.device), diagonal=1)
        h = self.blocks(x, mask=causal)
        return self.norm(h[:, -1])

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Output embeddings of ``items`` (any shape of item indices), or (N, d) of the whole catalogue."""
        if items is None:
            return self.item.weight[1:]
        return self.item(items + 1)


class SASRecModule(RecModule):
    """SASRec as a method of the framework (see the module docstring).

    Args:
        num_items, max_len: set by ``from_config`` from the data (catalogue size, ``data.max_history``).
        hidden, blocks, heads, dropout: the network (reference: 2 blocks, hidden 64).
        loss: ``ce`` (full softmax over the catalogue) | ``bce`` (sampled, the paper's).
        **kwargs: ``RecModule`` arguments (optimizer, scheduler, warmup_ratio).
    """

    needs_backbone = False  # the pipeline loads no language model (batches of item ids, recsys.data.ids)

    def __init__(self, num_items: int, max_len: int = 50, hidden: int = 64, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2, loss: str = "ce", backbone=None, **kwargs):
        kwargs.pop("scoring", None)
        super().__init__(backbone, **kwargs)
        if loss not in LOSSES:
            raise UserError(f"method.module.loss={loss!r} is unknown: use one of {LOSSES}")
        if hidden % heads:
            raise UserError(f"method.module.hidden={hidden} must divide by method.module.heads={heads}")
        self.loss_kind = loss
        self.net = SASRec(num_items, max_len, hidden, blocks, heads, dropout)

    @classmethod
    def check(cls, run, hidden: int = 64, heads: int = 1, loss: str = "ce", dropout: float = 0.2,
              blocks: int = 2, **kwargs) -> None:
        super().check(run, **{k: v for k, v in kwargs.items() if k != "scoring"})
        require("method.module.loss", loss, choices=LOSSES)
        for key, value in (("hidden", hidden), ("heads", heads), ("blocks", blocks)):
            require(f"method.module.{key}", value, at_least=1)
        require("method.module.dropout", dropout, at_least=0, below=1)
        if hidden % heads:
            raise UserError(f"method.module.hidden={hidden} must divide by method.module.heads={heads}")

    @classmethod
    def from_config(cls, backbone, run, **kwargs) -> "SASRecModule":
        """The catalogue size from the run (``RunInfo.num_items``), the history length from ``data.max_history``."""
        kwargs.setdefault("max_len", int(run.data.get("max_history", 50)))
        return cls(num_items=run.num_items, **kwargs)

    # ------------------------------------------------------------------ scoring
    def score(self, batch: dict) -> torch.Tensor:
        """(B, C) dot products of the user state with the candidates' embeddings, in float32."""
        state = self.net(batch["history"]).float()
        with torch.autocast(state.device.type, enabled=False):
            return torch.einsum("bd,bcd->bc", state, self.net.item_vectors(batch["candidates"]).float())

    def score_all(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) histories (``recsys.data.ids`` layout) -> (B, N) scores of every catalogue item, in float32.

        Scores are float32 even under ``trainer.precision=bf16-mixed``: bf16 keeps 8 bits of mantissa, so
        candidates with close scores would tie, and ties count against the model."""
        state = self.net(history).float()
        with torch.autocast(state.device.type, enabled=False):
            return state @ self.net.item_vectors().float().T

    # ------------------------------------------------------------------ training
    def objective(self, batch: dict, score_fn=None, stream: str = "train") -> torch.Tensor:
        """``ce``: softmax CE of the target over the whole catalogue; ``bce``: the target against the
        example's sampled negatives (binary CE on each)."""
        labels = batch["labels"]
        target = batch["candidates"].gather(1, labels.view(-1, 1)).squeeze(1)
        if self.loss_kind == "ce":
            logits = self.score_all(batch["history"])
            loss = F.cross_entropy(logits.float(), target)
            c = logits.size(1)
        else:
            scores = self.score(batch).float()
            is_pos = F.one_hot(labels, scores.size(1)).float()
            loss = F.binary_cross_entropy_with_logits(scores, is_pos, reduction="none")
            loss = (loss * is_pos).sum(1).mean() + (loss * (1 - is_pos)).sum(1).mean() / max(1, scores.size(1) - 1)
            c = 4  # chance: ln 2 on the positive + ln 2 on the negatives' mean = ln 4
        if self.global_step >= self.warmup_steps:
            self.chance.update(stream, loss.detach(), c)
        return loss
