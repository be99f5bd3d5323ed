"""Scoring shared by all methods: (history, candidate) text pairs in, one score each out.

- ``pair_scores``: the X-Cross head on the pooled token of each pair (default, encoders and decoders).
- ``likelihood_scores``: decoders only; the length-normalised log-likelihood of each candidate's
  title after the prompt. The prompt is run once per user and its KV cache reused for all C
  candidates (``Cache.batch_repeat_interleave``), not once per candidate.
"""

from __future__ import annotations

import torch

from recsys.models.backbone import body
from recsys.models.head import ScoringHead, pool


def pooled_hidden(model, batch: dict, kind: str) -> torch.Tensor:
    """Run the transformer body on a pair batch and pool: (B*C, T) ids -> (B*C, d)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    hidden = body(model)(**kwargs).last_hidden_state
    return pool(hidden, batch["attention_mask"], kind)


def pair_scores(model, head: ScoringHead, batch: dict, kind: str) -> torch.Tensor:
    """Scores of every candidate: (B, C)."""
    scores = head(pooled_hidden(model, batch, kind))
    return scores.view(-1, batch["num_candidates"])


def left_pack(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and mask -> left-padded ids, mask and position ids (0 at each first token)."""
    lens = mask.sum(1)
    width = ids.size(1)
    shift = width - lens
    ar = torch.arange(width, device=ids.device)
    src = (ar.unsqueeze(0) - shift.unsqueeze(1)).clamp(min=0)
    keep = ar.unsqueeze(0) >= shift.unsqueeze(1)
    left_ids = torch.where(keep, ids.gather(1, src), torch.zeros_like(ids))
    left_mask = keep.long()
    return left_ids, left_mask, (left_mask.cumsum(1) - 1).clamp(min=0)


def likelihood_scores(model, batch: dict) -> torch.Tensor:
    """Length-normalised log-likelihood of each candidate title after its user's prompt: (B, C).

    ``model`` is a causal LM (optionally peft-wrapped). Prompts are right-padded in the batch; they
    are re-packed left-padded so that every candidate continues right after its prompt's last token,
    with explicit position ids.
    """
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    c_ids, c_mask = batch["cont_ids"], batch["cont_mask"]
    b, c = p_ids.size(0), batch["num_candidates"]
    lens = p_mask.sum(1)
    left_ids, left_mask, pos = left_pack(p_ids, p_mask)
    out = model(input_ids=left_ids, attention_mask=left_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): predicts token 1
    cache.batch_repeat_interleave(c)
    mask = torch.cat([left_mask.repeat_interleave(c, 0), c_mask], dim=1)
    cpos = lens.repeat_interleave(c).unsqueeze(1) + torch.arange(c_ids.size(1), device=c_ids.device)
    cont = model(input_ids=c_ids, attention_mask=mask, position_ids=cpos, past_key_values=cache, use_cache=True)
    logits = cont.logits[:, :-1].float()  # position j predicts continuation token j+1
    tok_lp = torch.log_softmax(logits, dim=-1).gather(-1, c_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    first = first_logp.repeat_interleave(c, 0).gather(1, c_ids[:, :1]).squeeze(1)
    total = first + (tok_lp * c_mask[:, 1:]).sum(1)
    return (total / c_mask.sum(1).clamp(min=1)).view(b, c)


def likelihood_scores_naive(model, batch: dict) -> torch.Tensor:
    """Reference implementation: each candidate's full prompt + title run separately. (B, C)."""
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    c_ids, c_mask = batch["cont_ids"], batch["cont_mask"]
    c = batch["num_candidates"]
    rows = []
    for i in range(c_ids.size(0)):
        p = p_ids[i // c][p_mask[i // c].bool()]
        x = c_ids[i][c_mask[i].bool()]
        ids = torch.cat([p, x]).unsqueeze(0)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        tgt = ids[0, 1:]
        lp = logp.gather(1, tgt.unsqueeze(1)).squeeze(1)[len(p) - 1 :]
        rows.append(lp.mean())
    return torch.stack(rows).view(-1, c)
