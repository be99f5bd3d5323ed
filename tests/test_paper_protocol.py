"""WeaveRec's released protocol (protocol=paper): prompt layout and budget, the answer loss on the
answer tokens only, cached greedy generation against uncached greedy, exact title matching, the
generation metrics by hand, and train.py / evaluate.py end to end on a tiny decoder."""

import math

import pytest
import torch
import torch.nn.functional as F

from recsys.data.domain import DataError
from recsys.data.paper_prompt import PaperCollator, PaperPrompt, PaperTemplate
from recsys.data.text import PromptTemplate, TextEncoder
from recsys.core.metrics import GenerationMetrics
from recsys.models.backbone import load_backbone
from recsys.models.generation import answer_loss, greedy_generate, match_ranks
from recsys.models.scoring import likelihood_scores, likelihood_scores_naive

from test_lora import load, paths, run

TITLES = ["red hat", "blue shoe", "green sock with stripes", "yellow scarf", "black leather belt",
          "white cotton shirt", "purple dress", "orange bag", "brown boots", "grey coat"]


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    return load_backbone("tiny:decoder")


def prompt_of(backbone, **template) -> PaperPrompt:
    te = TextEncoder(backbone.tokenizer, backbone.kind, PromptTemplate(title_max_tokens=8, max_length=64))
    te.add_titles("d", TITLES)
    return PaperPrompt(te, backbone.tokenizer, PaperTemplate(**template))


def toks(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def split_answer(p: PaperPrompt, ans: list[int]) -> list[str]:
    """An answer's titles as text (the tiny tokenizer decodes ' || ' with spaces inside: split on ids)."""
    from recsys.models.generation import _split

    return [" ".join(p.tokenizer.decode(seg).split()) for seg in _split(ans[: -len(p.text.eos)], p.sep)]


ITEMS = [("d", [0, 1, 2], [5, 3, 9, 7, 4], 2), ("d", [8], [1, 6, 0, 2, 3], 0)]


def test_prompt_and_answer_layout(dec):
    p = prompt_of(dec, answer_size=3)
    tok = dec.tokenizer
    ids = p.prompt("d", [0, 1, 2], [5, 3, 9, 7, 4])
    sep = " || "
    want = (p.text.bos + toks(tok, p.t.instruction) + toks(tok, "red hat") + toks(tok, sep) + toks(tok, "blue shoe")
            + toks(tok, sep) + toks(tok, "green sock with stripes") + toks(tok, p.t.candidates_intro))
    cands = [5, 3, 9, 7, 4]
    for j, c in enumerate(cands):
        want += (toks(tok, sep) if j else []) + toks(tok, TITLES[c])
    want += toks(tok, p.t.answer_intro)
    assert ids == want
    # the true title first, then answer_size - 1 other candidates, then EOS
    ans = p.answer("d", [0, 1, 2], cands, 2)
    parts = split_answer(p, ans)
    assert len(parts) == 3 and parts[0] == "grey coat"
    assert set(parts[1:]) <= {TITLES[c] for c in (5, 3, 7, 4)} and len(set(parts[1:])) == 2
    assert ans[-len(p.text.eos):] == p.text.eos


def test_answer_draws_the_other_titles_at_random_and_stably(dec):
    """The release follows the true title with randomly drawn candidates, not the next ones in prompt
    order (a positional rule the model could copy); the draw is stable for an example."""
    p = prompt_of(dec)  # answer_size 5: 4 others of the 9 non-target candidates
    cands = list(range(10))
    first_four = []
    for user in range(40):
        hist = [user % 10, (user * 7 + 3) % 10]
        ans = p.answer("d", hist, cands, 0)
        assert ans == p.answer("d", hist, cands, 0)  # stable
        others = split_answer(p, ans)[1:]
        assert len(set(others)) == 4 and TITLES[0] not in others
        first_four.append(others == TITLES[1:5])
    assert sum(first_four) < 5  # prompt order would give 40 of 40


def test_history_is_cut_oldest_first_and_candidates_never(dec):
    full = prompt_of(dec)
    n = len(full.prompt("d", [0, 1, 2], [5, 3]))
    cut = prompt_of(dec, max_prompt_length=n - 1)
    ids = cut.prompt("d", [0, 1, 2], [5, 3])
    assert len(ids) <= n - 1
    text = dec.tokenizer.decode(ids)
    assert "red hat" not in text and "green sock" in text and "white cotton shirt" in text
    with pytest.raises(DataError, match="data.paper.max_prompt_length"):
        prompt_of(dec, max_prompt_length=8).prompt("d", [0], [5, 3])


def test_bad_settings_fail_clearly(dec):
    from recsys.core.errors import checked

    enc = load_backbone("tiny:encoder")
    te = TextEncoder(enc.tokenizer, "encoder", PromptTemplate())
    with pytest.raises(DataError, match="decoder"):
        PaperPrompt(te, enc.tokenizer, PaperTemplate())
    with pytest.raises(DataError, match=r"data.paper.answer_size=0 must be >= 1"):
        checked(PaperTemplate, {"answer_size": 0}, "data.paper", DataError)
    from recsys.data.datamodule import RecDataModule

    with pytest.raises(DataError, match="data.paper has unknown keys"):
        RecDataModule.from_config(domains={"a": {"source": "synthetic"}}, target="a", paper={"answr_size": 5})
    with pytest.raises(DataError, match="data.protocol"):
        RecDataModule.from_config(domains={"a": {"source": "synthetic"}}, target="a", protocol="generate")


def test_collator_answer_labels_and_alignment(dec):
    p = prompt_of(dec)
    b = PaperCollator(p)(ITEMS)
    assert b["num_candidates"] == 5 and b["labels"].tolist() == [2, 0]
    for i, (dom, hist, cands, pos) in enumerate(ITEMS):
        prompt, ans = p.prompt(dom, hist, cands), p.answer(dom, hist, cands, pos)
        row = b["sft_ids"][i][b["sft_mask"][i].bool()].tolist()
        assert row == prompt + ans  # left-padded: the sequence ends at the last column
        assert b["sft_mask"][i, -1] == 1
        lab = b["sft_labels"][i]
        assert lab[lab != -100].tolist() == ans  # the loss sees the answer only
        assert b["prompt_ids"][i][b["prompt_mask"][i].bool()].tolist() == prompt
        # the likelihood continuation of every candidate is its title followed by the separator
        conts = b["cont_ids"][i * 5:(i + 1) * 5]
        masks = b["cont_mask"][i * 5:(i + 1) * 5].bool()
        assert [c[m].tolist() for c, m in zip(conts, masks)] == [p.text.title_ids("d")[c] + p.sep for c in cands]


def test_answer_loss_is_the_loss_of_the_answer_tokens(dec):
    p = prompt_of(dec)
    b = PaperCollator(p)(ITEMS)
    model = dec.model.eval()
    got = answer_loss(model, b)
    nll, count = 0.0, 0
    for dom, hist, cands, pos in ITEMS:  # unpadded, one sequence at a time, every logit
        prompt, ans = p.prompt(dom, hist, cands), p.answer(dom, hist, cands, pos)
        ids = torch.tensor([prompt + ans])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        nll += F.cross_entropy(logits.float(), torch.tensor(ans), reduction="sum").item()
        count += len(ans)
    assert got.item() == pytest.approx(nll / count, rel=1e-4, abs=1e-5)


def test_greedy_generation_with_cache_equals_recomputation(dec):
    p = prompt_of(dec)
    b = PaperCollator(p)(ITEMS)
    model = dec.model.eval()
    out = greedy_generate(model, b["prompt_ids"], b["prompt_mask"], 6, eos_id=None)
    assert out.shape == (2, 6)
    for i in range(2):  # no cache, no padding: argmax of the full sequence, token by token
        ids = b["prompt_ids"][i][b["prompt_mask"][i].bool()].tolist()
        for t in range(6):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            assert nxt == int(out[i, t])
            ids.append(nxt)


def test_generation_stops_at_eos_and_pads_after(dec):
    p = prompt_of(dec)
    b = PaperCollator(p)(ITEMS)
    model = dec.model.eval()
    first = greedy_generate(model, b["prompt_ids"], b["prompt_mask"], 3, eos_id=None)
    eos = int(first[0, 1])  # pretend the second token of row 0 is EOS
    out = greedy_generate(model, b["prompt_ids"], b["prompt_mask"], 3, eos_id=eos, pad_id=-1)
    want, ends = [], []
    for row in first.tolist():  # each row up to its first EOS, then padding; stop when every row ended
        end = row.index(eos) + 1 if eos in row else 3
        want.append(row[:end] + [-1] * (3 - end))
        ends.append(end)
    assert out.tolist() == [r[: max(ends)] for r in want]


def test_the_trained_answer_matches_with_rank_one(dec):
    """The parser reads back exactly what the model is trained to emit: every target at rank 1."""
    p = prompt_of(dec)
    b = PaperCollator(p)(ITEMS)
    answers = torch.where(b["sft_labels"] == -100, torch.full_like(b["sft_labels"], p.text.pad_id), b["sft_labels"])
    answers = torch.stack([torch.cat([r[r != p.text.pad_id], r[r == p.text.pad_id]]) for r in answers])
    eos = p.text.eos[0]
    decode = lambda ids: dec.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ranks, matched, segments = match_ranks(answers, b["cand_ids"], b["labels"], p.sep, eos, decode)
    assert ranks.tolist() == [1, 1] and matched == segments == 10


def test_match_ranks_by_hand(dec):
    p = prompt_of(dec)
    tok = dec.tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    cands = [[p.text.title_ids("d")[c] for c in [5, 3, 9, 7, 4]]]
    sep = toks(tok, " || ")
    eos = p.text.eos[0]

    def gen(*parts, tail=()):
        ids = []
        for j, s in enumerate(parts):
            ids += (sep if j else []) + toks(tok, s)
        return torch.tensor([ids + list(tail)])

    tgt = torch.tensor([2])  # grey coat

    def rank(*parts, tail=()):
        return match_ranks(gen(*parts, tail=tail), cands, tgt, sep, eos, decode)

    # the position among all segments, as released: a hallucinated first title puts the true one at 2
    r, m, s = rank("no such thing", "grey coat")
    assert r.tolist() == [2] and (m, s) == (1, 2)
    # repeats and unknown titles count as positions too; the first occurrence of the true title counts
    r, m, s = rank("yellow scarf", "no such thing", "yellow scarf", "grey coat", "grey coat")
    assert r.tolist() == [4] and (m, s) == (4, 5)
    # an empty segment is a position (not a title: not counted in valid's segments)
    empty = torch.tensor([toks(tok, "yellow scarf") + sep + sep + toks(tok, "grey coat")])
    r, m, s = match_ranks(empty, cands, tgt, sep, eos, decode)
    assert r.tolist() == [3] and (m, s) == (2, 2)
    # not generated (cut at EOS before it): 0
    r, _, _ = rank("yellow scarf", tail=[eos] + sep + toks(tok, "grey coat"))
    assert r.tolist() == [0]
    # a prefix of the title is not the title
    r, _, _ = rank("grey")
    assert r.tolist() == [0]
    # nothing generated
    r, m, s = match_ranks(torch.tensor([[eos]]), cands, tgt, sep, eos, decode)
    assert r.tolist() == [0] and (m, s) == (0, 0)


def test_generation_metrics_by_hand():
    m = GenerationMetrics()
    m.update(torch.tensor([1, 2, 0, 5]), matched=7, segments=8)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["hr@1"] == pytest.approx(0.25) and out["hr@3"] == pytest.approx(0.5) and out["hr@5"] == pytest.approx(0.75)
    assert out["ndcg@1"] == pytest.approx(0.25)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4, rel=1e-6)
    assert out["mrr"] == pytest.approx((1 + 0.5 + 0 + 0.2) / 4, rel=1e-6)
    assert out["valid"] == pytest.approx(7 / 8)



def test_generation_mrr_is_cut_at_5():
    """The release's MRR is MRR@5: a true title at position 6 or later scores 0 (as on every NDCG@k)."""
    m = GenerationMetrics()
    m.update(torch.tensor([6, 2, 9]), matched=3, segments=3)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["mrr"] == pytest.approx(0.5 / 3, rel=1e-6)
    assert out["hr@5"] == pytest.approx(1 / 3, rel=1e-6)


def test_likelihood_of_the_paper_batch_equals_naive(dec):
    b = PaperCollator(prompt_of(dec))(ITEMS)
    model = dec.model.eval()
    torch.testing.assert_close(likelihood_scores(model, b), likelihood_scores_naive(model, b), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- end to end
PAPER = ["backbone=tiny_decoder", "protocol=paper", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
         "trainer.precision=32-true", "data.max_eval_users=8", "data.max_train_examples=24", "logger=none"]


def test_train_and_evaluate_paper_protocol(tmp_path):
    out = tmp_path / "run"
    run("train.py", *PAPER, *paths(tmp_path), f"hydra.run.dir={out}")
    m = load(out)
    for k in ("ndcg@1", "ndcg@3", "ndcg@5", "mrr", "valid"):
        assert 0.0 <= m[f"test/gen/{k}"] <= 1.0 and f"zero_shot/test/gen/{k}" in m
    assert "test/gen/hr@10" not in m and "val/gen/mrr" not in m  # generation on test only by default
    for k in ("ndcg@1", "ndcg@3", "ndcg@5", "mrr", "hr@10"):  # the likelihood ranking of the same 30 candidates
        assert f"test/{k}" in m
    assert "paper protocol" in (out / "results.txt").read_text()
    ev = tmp_path / "eval"
    run("evaluate.py", f"run_dir={out}", *paths(tmp_path), f"hydra.run.dir={ev}")
    e = load(ev)
    for k, v in m.items():
        if k.startswith("test/"):
            assert e[k] == pytest.approx(v, abs=1e-6), k


def test_paper_protocol_needs_a_decoder_and_one_language_model(tmp_path):
    p = run("train.py", "protocol=paper", "backbone=tiny_encoder", "logger=none", *paths(tmp_path),
            f"hydra.run.dir={tmp_path}/a", check=False)
    assert p.returncode != 0 and "decoder" in p.stderr


def test_weaverec_trains_every_branch_on_the_answer_and_generates_with_the_merged_adapter(tmp_path):
    out = tmp_path / "weave"
    run("train.py", *PAPER, "method=weaverec", "data.sources=[toys]", "zero_shot=false", *paths(tmp_path),
        f"hydra.run.dir={out}")
    m = load(out)
    assert 0.0 <= m["test/gen/mrr"] <= 1.0 and "branch0/val/mrr" in m and "branch1/val/mrr" in m


def test_xcross_refuses_the_paper_protocol(tmp_path):
    p = run("train.py", *PAPER, "method=xcross", "data.sources=[toys,beauty]",
            *paths(tmp_path), f"hydra.run.dir={tmp_path}/x", check=False)
    assert p.returncode != 0 and "protocol=paper needs a method that runs one language model" in p.stderr
