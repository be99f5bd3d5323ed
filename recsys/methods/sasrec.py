"""SASRec (Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): the ID-based
baseline, on the same DataModule, split, candidates and metrics as the LLM methods.

Causal self-attention over item-id embeddings (learned positions, pre-norm blocks); the user's state
is the output at the most recent position, and an item's score is the dot product of that state with
the item's embedding (the input embeddings are shared with the output, as in the paper).

Two ways to train on the same transitions (``train_on``):

- ``sequence`` (the paper's, the default): one example a user (the pipeline asks the DataModule for
  each user's longest training prefix, and for users longer than ``data.max_history`` one more window each
  ``max_history`` items back), the loss at every position of the causal sequence: the input
  ``s_1..s_{L}`` predicts ``s_2..s_{L+1}``. Every training transition is seen once an epoch, as in
  ``last``, in 4-6x fewer forward passes; a position sees only the items of its own window before it;
- ``last`` [ours]: the DataModule's leave-one-out prefixes, one example each (history -> next item), the
  loss on the last position only, like the LLM methods' examples.

``sequence`` is the default because the study of both on the three shared Amazon domains found it as
good on test and faster to train (``results/sasrec/study.md``, ``docs/results.md``).

``loss=ce`` the softmax cross-entropy over the whole catalogue at each trained position (default),
``loss=bce`` the paper's binary cross-entropy of the positive against ONE sampled negative (``last``: the
first of the example's ``data.num_train_negatives`` fresh negatives; ``sequence``: a uniform draw
outside the window's items, one a position). No language model: ``needs_backbone = False`` tells the pipeline not to load one, and batches are
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
TRAIN_ON = ("last", "sequence")  # every prefix, loss at its last position | one window a user, loss everywhere


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
        return self.encode(history)[:, -1]

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item indices + 1 -> (B, L', d) the causal state at every position
        (L' = min(L, max_len): the most recent positions)."""
        L = history.size(1)
        if L > self.pos.num_embeddings:
            history, L = history[:, -self.pos.num_embeddings:], self.pos.num_embeddings
        real = (history > 0).unsqueeze(-1)
        x = self.item(history) * self.item.embedding_dim ** 0.5 + self.pos(torch.arange(L, device=history.device))
        x = self.drop(x) * real  # padding stays zero, as in the paper (only a causal mask, no key mask)
        causal = torch.triu(torch.full((L, L), float("-inf"), device=history.device), diagonal=1)
        return self.norm(self.blocks(x, mask=causal))

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
        loss: ``ce`` (full softmax over the catalogue) | ``bce`` (one sampled negative a positive, the paper's).
        train_on: ``sequence`` (the paper's: one example a user, the loss at every position) | ``last``
            (every prefix, the loss at its last position); see the module docstring.
        **kwargs: ``RecModule`` arguments (optimizer, scheduler, warmup_ratio).
    """

    name = "sasrec"
    kind = "ids"
    needs_backbone = False  # the pipeline loads no language model (batches of item ids, recsys.data.ids)

    def __init__(self, num_items: int, max_len: int = 50, hidden: int = 64, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.5, loss: str = "ce", train_on: str = "sequence", backbone=None, **kwargs):
        kwargs.pop("scoring", None)
        super().__init__(backbone, **kwargs)
        if loss not in LOSSES:
            raise UserError(f"method.module.loss={loss!r} is unknown: use one of {LOSSES}")
        if train_on not in TRAIN_ON:
            raise UserError(f"method.module.train_on={train_on!r} is unknown: use one of {TRAIN_ON}")
        if hidden % heads:
            raise UserError(f"method.module.hidden={hidden} must divide by method.module.heads={heads}")
        self.loss_kind, self.train_on = loss, train_on
        self.net = SASRec(num_items, max_len, hidden, blocks, heads, dropout)

    @classmethod
    def check(cls, run, hidden: int = 64, heads: int = 1, loss: str = "ce", dropout: float = 0.5,
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

    def train_examples(self) -> str:
        """``sequences`` under ``train_on=sequence`` (one window a user), else every prefix."""
        return "sequences" if self.train_on == "sequence" else "prefixes"

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
    @staticmethod
    def transitions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's (B, L) inputs (``history``) and the next item at each position (item index + 1; 0 where
        the input is padding): ``history[:, 1:]`` then the target, so position t predicts the item after it."""
        history = batch["history"]
        target = batch["candidates"].gather(1, batch["labels"].view(-1, 1)) + 1
        nexts = torch.cat([history[:, 1:], target], 1) * (history > 0)
        return history, nexts

    def negatives(self, history: torch.Tensor, nexts: torch.Tensor) -> torch.Tensor:
        """One uniform negative a position (B, L) item indices + 1, outside the row's items and its positive
        (redrawn up to 20 times; the catalogue is far larger than a window)."""
        n = self.net.item.num_embeddings - 1
        row = torch.cat([history, nexts[:, -1:]], 1)
        neg = torch.randint(1, n + 1, nexts.shape, device=nexts.device)
        for _ in range(20):
            bad = (neg.unsqueeze(-1) == row.unsqueeze(1)).any(-1)
            if not bad.any():
                break
            neg = torch.where(bad, torch.randint(1, n + 1, nexts.shape, device=nexts.device), neg)
        return neg

    def sequence_objective(self, batch: dict) -> tuple[torch.Tensor, int]:
        """``train_on=sequence``: the mean loss over every real position of the batch, and the chance's C."""
        history, nexts = self.transitions(batch)
        L = self.net.pos.num_embeddings
        history, nexts = history[:, -L:], nexts[:, -L:]
        states = self.net.encode(history).float()
        real = nexts > 0
        with torch.autocast(states.device.type, enabled=False):
            if self.loss_kind == "ce":
                logits = states[real] @ self.net.item_vectors().float().T
                return F.cross_entropy(logits, nexts[real] - 1), logits.size(1)
            neg = self.negatives(history, nexts)
            pos_s = (states[real] * self.net.item(nexts[real]).float()).sum(-1)
            neg_s = (states[real] * self.net.item(neg[real]).float()).sum(-1)
        return bce_pair(pos_s, neg_s), 4

    def objective(self, batch: dict, score_fn=None, stream: str = "train") -> torch.Tensor:
        """``ce``: softmax CE of the target over the whole catalogue; ``bce``: the target against one of the
        example's sampled negatives (binary CE on each); ``train_on=sequence``: at every position."""
        labels = batch["labels"]
        if self.train_on == "sequence":
            loss, c = self.sequence_objective(batch)
        elif self.loss_kind == "ce":
            target = batch["candidates"].gather(1, labels.view(-1, 1)).squeeze(1)
            logits = self.score_all(batch["history"])
            loss, c = F.cross_entropy(logits.float(), target), logits.size(1)
        else:
            scores = self.score(batch).float()
            negative = (labels == 0).long()  # the first candidate that is not the target
            loss, c = bce_pair(scores.gather(1, labels.view(-1, 1)), scores.gather(1, negative.view(-1, 1))), 4
        if self.global_step >= self.warmup_steps:
            self.chance.update(stream, loss.detach(), c)
        return loss


def bce_pair(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The paper's loss: binary CE of the positives' scores as 1 plus of their negatives' as 0, each a mean
    (chance: ln 2 + ln 2 = ln 4)."""
    return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))
