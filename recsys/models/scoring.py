"""Scoring shared by all methods: (history, candidate) text pairs in, one score each out.

Two batch layouts (``recsys.data.text.Collator``):

- pairs (encoders, and X-Cross): ``input_ids`` (B*C, T), every candidate after its own copy of the
  history;
- prompt and continuations (decoders): ``prompt_ids`` (B, P) once a user, ``cont_ids`` (B*C, L) each
  candidate's title + [EOS]. A decoder reads the prompt once for all C candidates:

  * with gradients (training): :func:`pack_candidates` puts one sequence a user, the prompt then every
    candidate, with a block mask in which each candidate sees the prompt and itself only, and position
    ids that restart right after the prompt for every candidate, so each candidate's hidden states are
    those of ``prompt + candidate`` alone (tests: equal loss and gradients to :func:`as_pairs`'s
    per-candidate batch);
  * without (evaluation, likelihood): the prompt's KV cache reused by the C candidates
    (``Cache.batch_repeat_interleave``).

Scorings:

- ``pair_scores``: the X-Cross head on the candidate's last token (encoders: [CLS]);
- ``likelihood_scores``: decoders only; the length-normalised log-likelihood of each candidate's
  title after the prompt. The LM head and log-softmax run in float32 outside autocast
  (:func:`token_logprobs`), on the positions that predict a candidate token only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys.models.backbone import body, unwrap_peft
from recsys.models.head import ScoringHead, pool


# ---------------------------------------------------------------------------------------------- layouts
def is_prompt_batch(batch: dict) -> bool:
    """True for the prompt + continuations layout (decoders), False for pairs."""
    return "prompt_ids" in batch


def as_pairs(batch: dict) -> dict:
    """The per-candidate batch of a prompt + continuations batch: each candidate's prompt + title as one
    right-padded row, ``input_ids``/``attention_mask`` (B*C, P + L), the pair layout of a decoder. Pair
    batches pass through unchanged."""
    if not is_prompt_batch(batch):
        return batch
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    c_ids, c_mask = batch["cont_ids"], batch["cont_mask"]
    c = batch["num_candidates"]
    n, L = c_ids.shape
    lp = p_mask.sum(1).repeat_interleave(c)  # (N,) prompt lengths
    width = p_ids.size(1) + L
    ar = torch.arange(width, device=p_ids.device).unsqueeze(0)  # (1, W)
    in_prompt = ar < lp.unsqueeze(1)
    prompt = p_ids.repeat_interleave(c, 0).gather(1, ar.clamp(max=p_ids.size(1) - 1).expand(n, -1))
    cont = c_ids.gather(1, (ar - lp.unsqueeze(1)).clamp(0, L - 1))
    mask = (ar < (lp + c_mask.sum(1)).unsqueeze(1)).long()
    out = {k: v for k, v in batch.items() if k not in ("prompt_ids", "prompt_mask", "cont_ids", "cont_mask")}
    out.update(input_ids=torch.where(in_prompt, prompt, cont) * mask, attention_mask=mask)
    return out


def pack_candidates(batch: dict) -> dict:
    """One sequence a user: the prompt once, then every candidate's continuation, right-padded.

    Returns ``input_ids``, ``position_ids`` and ``segment`` (B, S) (0: prompt, k + 1: candidate k,
    -1: padding; candidate tokens take the positions they have after the prompt alone), ``last``
    (B*C,) the flat index (into B*S) of each candidate's last token, and ``pred`` (B*C, L) the flat
    index of the position that predicts each continuation token (the prompt's last token for the first).
    """
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    c_ids, c_mask = batch["cont_ids"], batch["cont_mask"]
    b, c = p_ids.size(0), batch["num_candidates"]
    P, L = p_ids.size(1), c_ids.size(1)
    dev = p_ids.device
    p_len = p_mask.sum(1)  # (B,)
    c_len = c_mask.sum(1).view(b, c)  # (B, C)
    start = (p_len.unsqueeze(1) + c_len.cumsum(1) - c_len).view(-1)  # (B*C,) first index of each candidate
    S = int((p_len + c_len.sum(1)).max())
    ids = torch.zeros(b, S, dtype=p_ids.dtype, device=dev)
    pos = torch.zeros(b, S, dtype=torch.long, device=dev)
    seg = torch.full((b, S), -1, dtype=torch.long, device=dev)
    pm = p_mask.bool()
    rows = torch.arange(b, device=dev).unsqueeze(1).expand(b, P)[pm]
    cols = torch.arange(P, device=dev).expand(b, P)[pm]
    ids[rows, cols], pos[rows, cols], seg[rows, cols] = p_ids[pm], cols, 0
    cm = c_mask.bool()
    ar = torch.arange(L, device=dev)
    user = torch.arange(b, device=dev).repeat_interleave(c)  # (B*C,)
    rows = user.unsqueeze(1).expand(-1, L)[cm]
    cols = (start.unsqueeze(1) + ar)[cm]
    ids[rows, cols] = c_ids[cm]
    pos[rows, cols] = (p_len[user].unsqueeze(1) + ar)[cm]
    seg[rows, cols] = (torch.arange(c, device=dev).repeat(b) + 1).unsqueeze(1).expand(-1, L)[cm]
    last = user * S + start + c_mask.sum(1) - 1
    pred = torch.where(ar == 0, (user * S + p_len[user] - 1).unsqueeze(1), (user * S + start).unsqueeze(1) + ar - 1)
    return {"input_ids": ids, "position_ids": pos, "segment": seg, "last": last,
            "pred": torch.minimum(pred, (user * S + S - 1).unsqueeze(1))}


def candidate_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, S) segments -> (B, 1, S, S) boolean attention mask (True: attend): causal, and a candidate's
    token sees the prompt and its own candidate's earlier tokens only. Padding rows see the prompt."""
    S = segment.size(1)
    causal = torch.ones(S, S, dtype=torch.bool, device=segment.device).tril()
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)
    return (causal & ((k == 0) | (k == q))).unsqueeze(1)


def attention_mask_for(model, segment: torch.Tensor):
    """The block mask in the form the model's attention implementation takes: a boolean (B, 1, S, S)
    tensor for ``sdpa`` (and the kernels that take one), an additive float one for ``eager``, a
    ``BlockMask`` for ``flex_attention`` (sparse: blocks no candidate sees are skipped)."""
    impl = getattr(unwrap_peft(model).config, "_attn_implementation", "sdpa")
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        seg = segment

        def mask_mod(b, h, q, k):
            return (k <= q) & ((seg[b, k] == 0) | (seg[b, k] == seg[b, q]))

        return create_block_mask(mask_mod, seg.size(0), None, seg.size(1), seg.size(1), device=seg.device)
    mask = candidate_mask(segment)
    if impl == "eager":
        dtype = next(unwrap_peft(model).parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def shared_prompt_hidden(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The body's last hidden states on :func:`pack_candidates`'s sequences: (B*S, d), and the packing."""
    packed = pack_candidates(batch)
    hidden = body(model)(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         attention_mask=attention_mask_for(model, packed["segment"]), use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.size(-1)), packed


# ---------------------------------------------------------------------------------------------- head scoring
def pooled_hidden(model, batch: dict, kind: str) -> torch.Tensor:
    """The pooled token of each (history, candidate): (B*C, d). Pair batches: the body on (B*C, T) ids,
    then :func:`pool`; prompt batches: each candidate's last token in the shared-prompt sequences."""
    if is_prompt_batch(batch):
        hidden, packed = shared_prompt_hidden(model, batch)
        return hidden[packed["last"]]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    hidden = body(model)(**kwargs).last_hidden_state
    return pool(hidden, batch["attention_mask"], kind)


def pair_scores(model, head: ScoringHead, batch: dict, kind: str) -> torch.Tensor:
    """Scores of every candidate: (B, C)."""
    scores = head(pooled_hidden(model, batch, kind))
    return scores.view(-1, batch["num_candidates"])


# ---------------------------------------------------------------------------------------------- likelihood
def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target | hidden state) under the model's LM head: (N, d), (N,) -> (N,) float32.

    The LM head and the log-softmax run in float32 outside autocast (bf16 logits of a 50k-150k
    vocabulary lose about 0.05 nats a token); Gemma-style final logit soft-capping is applied.
    """
    lm = unwrap_peft(model).get_output_embeddings()
    cap = getattr(unwrap_peft(model).config, "final_logit_softcapping", None)
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if getattr(lm, "bias", None) is None else lm.bias.float()
        logits = F.linear(hidden.float(), lm.weight.float(), bias)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def mean_logprob(model, pred_hidden: torch.Tensor, c_ids: torch.Tensor, c_mask: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each continuation: (N, L, d) states predicting token j, (N, L) ids and mask
    -> (N,). The LM head runs on the real tokens only."""
    m = c_mask.bool()
    lp = torch.zeros(c_ids.shape, dtype=torch.float32, device=c_ids.device)
    lp = lp.masked_scatter(m, token_logprobs(model, pred_hidden[m], c_ids[m]))
    return lp.sum(1) / c_mask.sum(1).clamp(min=1)


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

    ``model`` is a causal LM (optionally peft-wrapped); ``batch`` the prompt + continuations layout.
    With gradients enabled (training) the prompt is shared through :func:`pack_candidates`' block mask,
    else through the prompt's KV cache (:func:`likelihood_scores_cached`). Both equal
    :func:`likelihood_scores_per_candidate`.
    """
    if not torch.is_grad_enabled():
        return likelihood_scores_cached(model, batch)
    hidden, packed = shared_prompt_hidden(model, batch)
    scores = mean_logprob(model, hidden[packed["pred"]], batch["cont_ids"], batch["cont_mask"])
    return scores.view(-1, batch["num_candidates"])


def likelihood_scores_cached(model, batch: dict) -> torch.Tensor:
    """:func:`likelihood_scores` through the prompt's KV cache: the prompt is run once a user and its
    cache repeated for the C candidates. Prompts are re-packed left-padded so that every candidate
    continues right after its prompt's last token, with explicit position ids. (B, C)."""
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]
    c_ids, c_mask = batch["cont_ids"], batch["cont_mask"]
    c = batch["num_candidates"]
    lens = p_mask.sum(1)
    left_ids, left_mask, pos = left_pack(p_ids, p_mask)
    net = body(model)
    out = net(input_ids=left_ids, attention_mask=left_mask, position_ids=pos, use_cache=True)
    cache = out.past_key_values
    first = out.last_hidden_state[:, -1].repeat_interleave(c, 0)  # (B*C, d): predicts continuation token 0
    cache.batch_repeat_interleave(c)
    mask = torch.cat([left_mask.repeat_interleave(c, 0), c_mask], dim=1)
    cpos = lens.repeat_interleave(c).unsqueeze(1) + torch.arange(c_ids.size(1), device=c_ids.device)
    cont = net(input_ids=c_ids, attention_mask=mask, position_ids=cpos, past_key_values=cache,
               use_cache=True).last_hidden_state
    pred = torch.cat([first.unsqueeze(1), cont[:, :-1]], dim=1)  # (B*C, L, d): position j predicts token j
    return mean_logprob(model, pred, c_ids, c_mask).view(-1, c)


def likelihood_scores_per_candidate(model, batch: dict) -> torch.Tensor:
    """The per-candidate reference: every candidate's full prompt + title, all B*C sequences in one
    right-padded batch (:func:`as_pairs`), the LM head at the positions that predict the title. (B, C)."""
    pairs = as_pairs(batch)
    c_ids, c_mask = batch["cont_ids"], batch["cont_mask"]
    hidden = body(model)(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"],
                         use_cache=False).last_hidden_state  # (N, W, d)
    lp = batch["prompt_mask"].sum(1).repeat_interleave(batch["num_candidates"])
    pos = (lp - 1).unsqueeze(1) + torch.arange(c_ids.size(1), device=c_ids.device)  # position predicting token j
    h = hidden.gather(1, pos.clamp(max=hidden.size(1) - 1).unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
    return mean_logprob(model, h, c_ids, c_mask).view(-1, batch["num_candidates"])


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
