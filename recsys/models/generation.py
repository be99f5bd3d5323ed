"""The paper protocol's model side (decoders): the answer loss, greedy generation, exact title match.

- ``answer_loss``: causal-LM cross-entropy on the answer tokens only (the model learns to emit the
  true title first, then four other candidates); only the answer positions' logits are computed.
- ``greedy_generate``: greedy decoding with a KV cache, left-padded prompts, stops at EOS.
- ``match_ranks``: cuts each generated answer at EOS, splits it at the separator, and matches every
  segment exactly against the true title: its 1-based position among all segments of the answer
  (0: not generated), as the released evaluation does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys.models.scoring import left_pack


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (``sft_*`` of a paper batch, left-padded)."""
    ids, mask, labels = batch["sft_ids"], batch["sft_mask"], batch["sft_labels"]
    keep = int(batch["answer_len"]) + 1  # the logits at the last A+1 positions predict the A answer tokens
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    target = labels[:, -(keep - 1):]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100)


@torch.no_grad()
def greedy_generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                    eos_id: int | None, pad_id: int = 0) -> torch.Tensor:
    """Greedy continuation of right-padded prompts: (B, <= max_new_tokens) ids, ``pad_id`` after EOS."""
    ids, mask, pos = left_pack(prompt_ids, prompt_mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, nxt_pos = out.past_key_values, pos[:, -1:] + 1
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    steps = []
    for _ in range(max_new_tokens):
        tok = out.logits[:, -1].argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        steps.append(tok)
        if eos_id is not None:
            done |= tok == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok.unsqueeze(1), attention_mask=mask, position_ids=nxt_pos,
                    past_key_values=cache, use_cache=True)
        cache, nxt_pos = out.past_key_values, nxt_pos + 1
    return torch.stack(steps, dim=1) if steps else ids[:, :0]


def _split(ids: list[int], sep: list[int]) -> list[list[int]]:
    parts, cur, i, n = [], [], 0, len(sep)
    while i < len(ids):
        if n and ids[i:i + n] == sep:
            parts.append(cur)
            cur, i = [], i + n
        else:
            cur.append(ids[i])
            i += 1
    parts.append(cur)
    return parts


def match_ranks(generated: torch.Tensor, cand_ids: list[list[list[int]]], target: torch.Tensor, sep: list[int],
                eos_id: int | None, decode) -> tuple[torch.Tensor, int, int]:
    """Target positions in the generated answers by exact title match, as WeaveRec's released
    evaluation (``src/metrics.py``) ranks them.

    Each answer is cut at EOS and split at the separator's ids (what the model was trained to emit
    between titles); the target's rank is the 1-based position of the first segment equal to its
    title among *all* segments, so a hallucinated, empty or repeated segment before it counts as a
    position.

    Args:
        generated: (B, N) generated ids. cand_ids: per user, the candidates' title ids.
        target: (B,) the true candidate's position. sep: the separator's ids.
        decode: ids -> text (the tokenizer's ``decode`` without special tokens); titles match when
            their whitespace-normalised texts are equal.
    Returns:
        (B,) long 1-based rank (0: not generated), the number of non-empty segments that are
        candidates' titles, and the number of non-empty segments.
    """
    norm = lambda x: " ".join(decode(x).split())  # noqa: E731
    ranks, matched, segments = [], 0, 0
    for row, cands, t in zip(generated.tolist(), cand_ids, target.tolist()):
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        titles = [norm(c) for c in cands]
        parts = [norm(seg) for seg in _split(row, sep)]
        ranks.append(next((j + 1 for j, seg in enumerate(parts) if seg == titles[t]), 0))
        known = set(titles)
        said = [seg for seg in parts if seg]
        segments += len(said)
        matched += sum(seg in known for seg in said)
    return torch.tensor(ranks, dtype=torch.long), matched, segments


class PaperProtocol(torch.nn.Module):
    """WeaveRec's released protocol (``protocol=paper``) as one object a module is given: the training loss
    (the answer's language-model loss), the generation (greedy answer + exact title match), its metrics
    (``<split>/gen/...``) and the table they go in (``recsys.core.metrics.PAPER_KEYS``, the results table).

    Args:
        prompt: the paper prompt builder of the run (``RecDataModule.paper_prompt()``: separators, EOS, budget).
    """

    def __init__(self, prompt):
        super().__init__()
        from recsys.core.metrics import GenerationMetrics

        self.prompt = prompt
        self.metrics = torch.nn.ModuleDict({"val": GenerationMetrics(), "test": GenerationMetrics()})

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The training loss of a paper batch: cross-entropy of the answer tokens."""
        return answer_loss(model, batch)

    def evaluate(self, stage: str, model, tokenizer, batch: dict) -> None:
        """Greedy answer of ``model`` as it stands (e.g. WeaveRec's merged adapter active), matched against the
        candidates' titles; on validation only with ``data.paper.generate_val``."""
        if stage != "test" and not self.prompt.t.generate_val:
            return
        eos = self.prompt.text.eos[0] if self.prompt.text.eos else None
        out = greedy_generate(model, batch["prompt_ids"], batch["prompt_mask"], self.prompt.max_new_tokens, eos,
                              self.prompt.text.pad_id)
        ranks, matched, segments = match_ranks(out, batch["cand_ids"], batch["labels"], self.prompt.sep, eos,
                                               lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self.metrics[stage].update(ranks, matched, segments)

    def compute(self, stage: str) -> dict:
        """``<stage>/gen/<metric>`` of what was generated since the last call (empty if nothing), then reset."""
        if not self.metrics[stage].update_count:
            return {}
        values = {f"{stage}/gen/{k}": v for k, v in self.metrics[stage].compute().items()}
        self.metrics[stage].reset()
        return values
