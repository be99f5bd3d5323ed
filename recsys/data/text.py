"""Text: prompt templates, token budgets and the collator that turns candidate lists into batches.

Every title is tokenised once (capped at ``title_max_tokens``); a (history, candidate) pair is then
assembled from token ids, so the candidate is never cut and, when the pair exceeds ``max_length``,
the oldest history titles are dropped first.

Layouts (``{...}`` are the template strings of ``conf/data/*.yaml``):
- encoder: ``[CLS] {history_prefix} t_1 {title_sep} ... t_h [SEP] {candidate_prefix} c [SEP]``,
  token types 0 then 1;
- decoder: ``[BOS] {history_prefix} t_1 {title_sep} ... t_h {candidate_prefix} c [EOS]``; the
  pooled token is the final [EOS]. Split in two (``prompt_and_continuation``, the layout every decoder
  trains and evaluates on, ``recsys.pipeline.run.prompt_layout``): the prompt ends after ``{candidate_prefix}``
  and is the same for all of a user's candidates, the continuation is ``c [EOS]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.core.errors import setting
from recsys.data.domain import DataError


@dataclass
class PromptTemplate:
    history_prefix: str = "User bought: "
    title_sep: str = " ; "
    candidate_prefix: str = "Next item: "
    title_max_tokens: int = setting(24, at_least=1)  # each title is cut to this many tokens
    max_length: int = setting(256, at_least=1)  # pair length cap; the oldest history titles are dropped first


class TextEncoder:
    """Token ids of titles and templates for one tokenizer, and the pair layout.

    Args:
        tokenizer: a transformers tokenizer.
        kind: ``"encoder"`` or ``"decoder"``.
        template: the prompt template.
    """

    def __init__(self, tokenizer, kind: str, template: PromptTemplate):
        self.kind, self.t = kind, template
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        self._enc = enc
        self.hist_prefix = enc(template.history_prefix)
        self.sep = enc(template.title_sep)
        self.cand_prefix = enc(template.candidate_prefix)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if kind == "encoder":
            self.bos = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
            self.mid = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
            self.eos = list(self.mid)
        else:
            # a tokenizer without BOS/EOS (a BERT tokenizer on a decoder, as in tiny:decoder) uses [CLS]/[SEP]
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
            self.bos = [bos] if bos is not None else []
            self.mid = []
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            self.eos = [eos] if eos is not None else []
        fixed = len(self.bos) + len(self.hist_prefix) + len(self.mid) + len(self.cand_prefix) + len(self.eos)
        if fixed + template.title_max_tokens + 1 > template.max_length:
            raise DataError(
                f"data.prompt.max_length={template.max_length} leaves no room for one history title "
                f"and the candidate (templates take {fixed} tokens, titles up to "
                f"{template.title_max_tokens}): raise data.prompt.max_length"
            )
        self._titles: dict[str, list[list[int]]] = {}

    def add_titles(self, domain_name: str, titles: list[str]) -> None:
        """Tokenise a domain's titles once (capped at ``title_max_tokens``)."""
        if domain_name not in self._titles:
            cap = self.t.title_max_tokens
            ids = self._enc(list(titles)) if titles else []
            self._titles[domain_name] = [x[:cap] for x in ids]

    def title_ids(self, domain_name: str) -> list[list[int]]:
        return self._titles[domain_name]

    def history_ids(self, domain_name: str, history, budget: int) -> list[int]:
        """History titles, oldest first, keeping the newest ones that fit in ``budget`` tokens."""
        titles = self._titles[domain_name]
        kept: list[list[int]] = []
        used = len(self.hist_prefix)
        for item in reversed(history):
            cost = len(titles[item]) + (len(self.sep) if kept else 0)
            if used + cost > budget:
                break
            kept.append(titles[item])
            used += cost
        out = list(self.hist_prefix)
        for j, t in enumerate(reversed(kept)):
            if j:
                out += self.sep
            out += t
        return out

    def pair(self, domain_name: str, history, candidate: int) -> tuple[list[int], list[int]]:
        """Token ids and token types of one (history, candidate) pair, within ``max_length``."""
        cand = self.cand_prefix + self._titles[domain_name][candidate]
        budget = self.t.max_length - len(self.bos) - len(self.mid) - len(cand) - len(self.eos)
        hist = self.history_ids(domain_name, history, budget)
        first = self.bos + hist + self.mid
        second = cand + self.eos
        return first + second, [0] * len(first) + [1] * len(second)

    def prompt_and_continuation(self, domain_name: str, history, candidate: int) -> tuple[list[int], list[int]]:
        """Likelihood mode (decoders): prompt ids (ending in the candidate prefix) and continuation ids."""
        cont = self._titles[domain_name][candidate] + self.eos
        budget = self.t.max_length - len(self.bos) - len(self.cand_prefix) - self.t.title_max_tokens - len(self.eos)
        prompt = self.bos + self.history_ids(domain_name, history, budget) + self.cand_prefix
        return prompt, cont


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids into a (N, T) long tensor (dynamic padding: T = longest)."""
    t = max(1, max((len(s) for s in seqs), default=1))
    out = torch.full((len(seqs), t), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Collator:
    """Turns items ``(domain_name, history, candidates, target_pos)`` into a model batch.

    Returns a dict with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for encoders) of
    shape (B*C, T), ``labels`` (B,) the target positions, and ``num_candidates`` C. With
    ``likelihood=True`` (decoders, both scorings) it returns ``prompt_ids``/``prompt_mask`` (B, P) once a
    user and ``cont_ids``/``cont_mask`` (B*C, L) instead of the pair tensors (``recsys.models.scoring``
    reads the prompt once for all candidates; ``as_pairs`` gives back the pair layout).
    """

    def __init__(self, text: TextEncoder, likelihood: bool = False):
        self.text, self.likelihood = text, likelihood

    def __call__(self, items) -> dict:
        labels = torch.tensor([it[3] for it in items], dtype=torch.long)
        c = len(items[0][2])
        if self.likelihood:
            prompts, conts = [], []
            for dom, hist, cands, _ in items:
                for j, cand in enumerate(cands):
                    p, x = self.text.prompt_and_continuation(dom, hist, cand)
                    if j == 0:
                        prompts.append(p)
                    conts.append(x)
            pid = pad(prompts, self.text.pad_id)
            cid = pad(conts, self.text.pad_id)
            return {
                "prompt_ids": pid, "prompt_mask": (pad(prompts, -1) != -1).long(),
                "cont_ids": cid, "cont_mask": (pad(conts, -1) != -1).long(),
                "labels": labels, "num_candidates": c,
            }
        ids, types = [], []
        for dom, hist, cands, _ in items:
            for cand in cands:
                x, tt = self.text.pair(dom, hist, cand)
                ids.append(x)
                types.append(tt)
        batch = {
            "input_ids": pad(ids, self.text.pad_id),
            "attention_mask": (pad(ids, -1) != -1).long(),
            "labels": labels,
            "num_candidates": c,
        }
        if self.text.kind == "encoder":
            batch["token_type_ids"] = pad(types, 0)
        return batch
