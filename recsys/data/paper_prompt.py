"""WeaveRec's released prompt ("paper protocol", decoders only), for comparison with the published numbers.

One prompt per user lists the history titles joined by ``||`` and the shuffled candidates (30 in
the paper: ``data.num_negatives=29``) and asks for the top 5; the model is trained to answer
with the true title first, followed by four other candidates drawn at random (docs/methods.md, WeaveRec, "Released
setup"). Layout (``{...}`` are ``data.paper.*`` strings)::

    [BOS] {instruction} h_1 || ... || h_n {candidates_intro} c_1 || ... || c_30 {answer_intro}
    answer: t || c_a || c_b || c_c || c_d [EOS]

Everything is assembled from token ids, as in ``recsys.data.text``: titles are tokenised once and
cut to ``data.prompt.title_max_tokens``; when a prompt exceeds ``data.paper.max_prompt_length`` the
oldest history titles are dropped (candidates are never cut). Exact title match compares the
generated segments with these (cut) titles, which is what the model was trained to emit.

A batch holds, besides ``labels``/``num_candidates``:
- ``prompt_ids``/``prompt_mask`` (B, P), right-padded, and ``cont_ids``/``cont_mask`` (B*C, L) with
  each candidate's ``title ||``: the likelihood ranking of the same candidates
  (``recsys.models.scoring.likelihood_scores``);
- ``sft_ids``/``sft_mask``/``sft_labels`` (B, T): prompt + answer, left-padded so every answer ends
  at the last column; labels are -100 except on the answer (the training loss);
- ``cand_ids``: per user the C candidates' token id lists (matching generated titles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.core.errors import setting
from recsys.data.candidates import stable_seed
from recsys.data.domain import DataError
from recsys.data.text import TextEncoder, pad


@dataclass
class PaperTemplate:
    instruction: str = "The user bought these items, in order: "
    candidates_intro: str = ". Select the top 5 items the user will buy next from these candidates: "
    answer_intro: str = ". Answer: "
    sep: str = " || "
    answer_size: int = setting(5, at_least=1)            # titles in the trained answer: the true one first, then others
    max_prompt_length: int = setting(1024, at_least=1)   # prompt tokens; the oldest history titles are dropped first
    max_new_tokens: int | None = setting(None, at_least=1)   # generation budget (None: answer_size titles at full length + separators)
    generate_val: bool = False      # also generate on validation (model selection uses the likelihood ranking)


class PaperPrompt:
    """Token ids of the paper prompt and answer for one tokenizer (a ``TextEncoder``'s titles)."""

    def __init__(self, text: TextEncoder, tokenizer, template: PaperTemplate):
        if text.kind != "decoder":
            raise DataError("data.protocol=paper generates text: it needs a decoder backbone (e.g. backbone=smollm2)")
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        self.text, self.t, self.tokenizer = text, template, tokenizer
        self.instruction, self.cands_intro = enc(template.instruction), enc(template.candidates_intro)
        self.answer_intro, self.sep = enc(template.answer_intro), enc(template.sep)
        if not self.sep:
            raise DataError("data.paper.sep is empty: the titles of the answer need a separator (the paper's ' || ')")

    @property
    def max_new_tokens(self) -> int:
        if self.t.max_new_tokens:
            return int(self.t.max_new_tokens)
        return self.t.answer_size * (self.text.t.title_max_tokens + len(self.sep)) + len(self.text.eos)

    def join(self, titles: list[list[int]]) -> list[int]:
        out: list[int] = []
        for j, t in enumerate(titles):
            out += (self.sep if j else []) + t
        return out

    def prompt(self, domain: str, history, candidates) -> list[int]:
        titles = self.text.title_ids(domain)
        cands = self.join([titles[c] for c in candidates])
        fixed = len(self.text.bos) + len(self.instruction) + len(self.cands_intro) + len(cands) + len(self.answer_intro)
        budget = self.t.max_prompt_length - fixed
        if budget < 0:
            raise DataError(
                f"data.paper.max_prompt_length={self.t.max_prompt_length} is shorter than the {len(candidates)} "
                f"candidates' titles and the template ({fixed} tokens): raise it or lower data.prompt.title_max_tokens"
            )
        kept: list[list[int]] = []
        used = 0
        for item in reversed(list(history)):  # newest first, as many as fit
            cost = len(titles[item]) + (len(self.sep) if kept else 0)
            if used + cost > budget:
                break
            kept.append(titles[item])
            used += cost
        return self.text.bos + self.instruction + self.join(kept[::-1]) + self.cands_intro + cands + self.answer_intro

    def answer(self, domain: str, history, candidates, target_pos: int) -> list[int]:
        """The trained answer: the true title, then ``answer_size - 1`` other candidates drawn at random,
        as the release draws them (not a positional rule the model could copy). The draw is seeded by
        (domain, history, target): the same for an example in every epoch, process and run."""
        titles = self.text.title_ids(domain)
        others = [c for j, c in enumerate(candidates) if j != target_pos]
        rng = np.random.default_rng(stable_seed("answer", domain, *history, candidates[target_pos]))
        drawn = rng.choice(len(others), size=min(self.t.answer_size - 1, len(others)), replace=False)
        return self.join([titles[candidates[target_pos]]] + [titles[others[j]] for j in drawn]) + self.text.eos


class PaperCollator:
    """Items ``(domain, history, candidates, target_pos)`` -> a paper-protocol batch (module docstring)."""

    def __init__(self, prompt: PaperPrompt):
        self.p = prompt

    def __call__(self, items) -> dict:
        text = self.p.text
        labels = torch.tensor([it[3] for it in items], dtype=torch.long)
        prompts, conts, seqs, answers, cand_ids = [], [], [], [], []
        for dom, hist, cands, pos in items:
            titles = text.title_ids(dom)
            prompt = self.p.prompt(dom, hist, cands)
            answer = self.p.answer(dom, hist, cands, pos)
            prompts.append(prompt)
            conts += [titles[c] + self.p.sep for c in cands]
            seqs.append(prompt + answer)
            answers.append(len(answer))
            cand_ids.append([titles[c] for c in cands])
        width = max(len(s) for s in seqs)
        sft = torch.full((len(seqs), width), text.pad_id, dtype=torch.long)
        sft_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        sft_labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, a) in enumerate(zip(seqs, answers)):
            sft[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            sft_mask[i, width - len(s):] = 1
            sft_labels[i, width - a:] = torch.tensor(s[-a:], dtype=torch.long)
        return {
            "prompt_ids": pad(prompts, text.pad_id), "prompt_mask": (pad(prompts, -1) != -1).long(),
            "cont_ids": pad(conts, text.pad_id), "cont_mask": (pad(conts, -1) != -1).long(),
            "sft_ids": sft, "sft_mask": sft_mask, "sft_labels": sft_labels, "answer_len": max(answers),
            "cand_ids": cand_ids, "labels": labels, "num_candidates": len(items[0][2]),
        }
