"""Text: pair layouts (encoder and decoder), token budgets (candidate never cut, oldest history
dropped first, per-title cap), dynamic padding, likelihood prompt/continuation, and the shared-prompt
KV-cache likelihood scorer against the naive one-pass-per-candidate reference."""

import copy

import pytest
import torch

from recsys.data.domain import DataError
from recsys.data.text import Collator, PromptTemplate, TextEncoder, pad
from recsys.models.backbone import load_backbone
from recsys.models.scoring import likelihood_scores, likelihood_scores_naive

TITLES = [
    "red hat", "blue shoe", "green sock with stripes", "yellow scarf", "black leather belt for men",
    "white cotton shirt", "purple dress", "orange bag", "brown boots", "grey coat",
    " ".join(["very long title"] * 20),  # 10: longer than any cap
]
LONG = 10


@pytest.fixture(scope="module")
def enc_backbone():
    return load_backbone("tiny:encoder")


@pytest.fixture(scope="module")
def dec_backbone():
    return load_backbone("tiny:decoder")


def toks(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def text(backbone, kind=None, **template) -> TextEncoder:
    te = TextEncoder(backbone.tokenizer, kind or backbone.kind, PromptTemplate(**template))
    te.add_titles("d", TITLES)
    return te


def expected_encoder(tok, hist, cand, t: PromptTemplate, cap=24):
    title = lambda i: toks(tok, TITLES[i])[:cap]  # noqa: E731
    h = toks(tok, t.history_prefix)
    for j, i in enumerate(hist):
        h += (toks(tok, t.title_sep) if j else []) + title(i)
    first = [tok.cls_token_id] + h + [tok.sep_token_id]
    second = toks(tok, t.candidate_prefix) + title(cand) + [tok.sep_token_id]
    return first + second, [0] * len(first) + [1] * len(second)


def test_encoder_layout(enc_backbone):
    tok = enc_backbone.tokenizer
    te = text(enc_backbone)
    ids, types = te.pair("d", (0, 1, 2), 3)
    assert (ids, types) == expected_encoder(tok, (0, 1, 2), 3, PromptTemplate())
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids.count(tok.sep_token_id) == 2
    first_sep = ids.index(tok.sep_token_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    decoded = tok.decode(ids)
    assert decoded.startswith("[CLS] user bought : red hat ; blue shoe ; green sock with stripes [SEP] next item : yellow scarf")


def test_decoder_layout(dec_backbone):
    tok = dec_backbone.tokenizer
    te = text(dec_backbone)
    assert te.kind == "decoder"
    ids, _ = te.pair("d", (0, 1), 3)
    t = PromptTemplate()
    body = toks(tok, t.history_prefix) + toks(tok, TITLES[0]) + toks(tok, t.title_sep) + toks(tok, TITLES[1])
    body += toks(tok, t.candidate_prefix) + toks(tok, TITLES[3])
    # the tiny decoder's tokenizer has no BOS/EOS of its own: the model's [CLS]/[SEP] ids stand in
    bos, eos = dec_backbone.model.config.bos_token_id, dec_backbone.model.config.eos_token_id
    assert ids == [bos] + body + [eos]
    assert ids[-1] == eos and ids.count(eos) == 1  # the pooled (last) token is EOS
    batch = Collator(te)([("d", (0, 1), [3, 4], 0)])
    assert "token_type_ids" not in batch


def test_decoder_uses_tokenizer_bos_eos_when_present(enc_backbone):
    tok = copy.deepcopy(enc_backbone.tokenizer)
    tok.bos_token, tok.eos_token = "[unused1]", "[unused2]"
    te = TextEncoder(tok, "decoder", PromptTemplate())
    te.add_titles("d", TITLES)
    ids, _ = te.pair("d", (0,), 1)
    assert ids[0] == tok.bos_token_id != tok.cls_token_id and ids[-1] == tok.eos_token_id != tok.sep_token_id


def test_per_title_cap(enc_backbone):
    tok = enc_backbone.tokenizer
    te = text(enc_backbone, title_max_tokens=5)
    ids = te.title_ids("d")
    assert ids[LONG] == toks(tok, TITLES[LONG])[:5]
    assert all(len(x) <= 5 for x in ids)
    assert ids[0] == toks(tok, TITLES[0])  # short titles untouched
    pair, _ = te.pair("d", (LONG, LONG), LONG)
    assert pair == expected_encoder(tok, (LONG, LONG), LONG, PromptTemplate(title_max_tokens=5), cap=5)[0]


@pytest.mark.parametrize("max_length", [24, 30, 40, 50])
def test_candidate_never_cut_oldest_history_dropped_first(enc_backbone, max_length):
    tok = enc_backbone.tokenizer
    t = PromptTemplate(max_length=max_length, title_max_tokens=8)
    te = text(enc_backbone, max_length=max_length, title_max_tokens=8)
    hist = tuple(range(10))
    ids, _ = te.pair("d", hist, LONG)
    assert len(ids) <= max_length
    # the candidate is complete (capped title only) and last
    tail = toks(tok, t.candidate_prefix) + toks(tok, TITLES[LONG])[:8] + [tok.sep_token_id]
    assert ids[-len(tail):] == tail
    # the history kept is the longest suffix (newest items) that fits
    k = max(k for k in range(0, 11) if len(expected_encoder(tok, hist[10 - k:], LONG, t, cap=8)[0]) <= max_length)
    assert ids == expected_encoder(tok, hist[10 - k:], LONG, t, cap=8)[0]
    assert k < 10  # the budget really cut something
    if max_length >= 40:
        assert k >= 1


def test_max_length_too_small(enc_backbone):
    with pytest.raises(DataError, match="max_length"):
        TextEncoder(enc_backbone.tokenizer, "encoder", PromptTemplate(max_length=20, title_max_tokens=24))


def test_dynamic_padding(enc_backbone):
    tok = enc_backbone.tokenizer
    te = text(enc_backbone)
    items = [("d", (0,), [1, 2, 3], 2), ("d", (4, 5, 6, 7), [8, 9, 0], 0)]
    batch = Collator(te)(items)
    pairs = [te.pair(d, h, c) for d, h, cs, _ in items for c in cs]
    lengths = [len(p[0]) for p in pairs]
    assert batch["input_ids"].shape == (6, max(lengths))  # B*C rows, as long as the longest
    assert batch["num_candidates"] == 3 and batch["labels"].tolist() == [2, 0]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for r, (ids, types) in enumerate(pairs):
        assert batch["input_ids"][r, : len(ids)].tolist() == ids
        assert batch["token_type_ids"][r, : len(ids)].tolist() == types
        assert (batch["input_ids"][r, len(ids):] == tok.pad_token_id).all()
        assert (batch["token_type_ids"][r, len(ids):] == 0).all()
    # a batch of short pairs is shorter
    short = Collator(te)([("d", (0,), [1, 3], 0)])
    assert short["input_ids"].shape[1] < batch["input_ids"].shape[1]
    assert pad([[1], [2, 3]], 7).tolist() == [[1, 7], [2, 3]]


def test_likelihood_prompt_and_continuation(dec_backbone):
    tok = dec_backbone.tokenizer
    te = text(dec_backbone, max_length=48, title_max_tokens=8)
    eos = te.eos[0]
    cands = [0, LONG, 4]
    prompts = []
    for c in cands:
        p, x = te.prompt_and_continuation("d", tuple(range(10)), c)
        assert p[-3:] == toks(tok, "Next item: ") and p[0] == te.bos[0]
        assert x == toks(tok, TITLES[c])[:8] + [eos]
        assert len(p) + len(x) <= 48
        prompts.append(p)
    assert prompts[0] == prompts[1] == prompts[2]  # one prompt per user, whatever the candidate
    # the history was cut from the oldest side: the prompt ends with the newest title
    assert prompts[0][-3 - len(toks(tok, TITLES[9])):-3] == toks(tok, TITLES[9])
    # prompt + continuation is the pair layout
    pair, _ = te.pair("d", (8, 9), 4)
    p, x = te.prompt_and_continuation("d", (8, 9), 4)
    assert p + x == pair

    items = [("d", (0,), [1, 2], 1), ("d", (3, 4, 5, 6), [LONG, 0], 0)]
    b = Collator(te, likelihood=True)(items)
    assert b["prompt_ids"].shape[0] == 2 and b["cont_ids"].shape[0] == 4 and b["num_candidates"] == 2
    plen = b["prompt_mask"].sum(1).tolist()
    assert plen[0] < plen[1] == b["prompt_ids"].shape[1]  # right-padded prompts of different lengths
    assert b["cont_mask"].sum(1).tolist() == [len(te.prompt_and_continuation("d", h, c)[1])
                                              for _, h, cs, _ in items for c in cs]


# ------------------------------------------------------------------------------ likelihood scoring
def sharpened(model, seed=0):
    """A copy of the tiny decoder whose next-token distributions are far from uniform."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        m.get_input_embeddings().weight.mul_(8.0)
    return m


def likelihood_batch(te, items):
    return Collator(te, likelihood=True)(items)


ITEMS = [
    ("d", (0,), [1, 2, 3, 4], 0),
    ("d", (5, 6, 7, 8, 9, 0, 1), [LONG, 2, 6, 9], 3),
    ("d", (2, 3), [7, 8, 0, LONG], 1),
]


@pytest.mark.parametrize("variant", ["plain", "sharpened", "lora", "truncated"])
def test_shared_prompt_likelihood_equals_naive(dec_backbone, variant):
    max_length = 40 if variant == "truncated" else 256
    te = text(dec_backbone, max_length=max_length, title_max_tokens=10)
    model = dec_backbone.model
    if variant in ("sharpened", "lora"):
        model = sharpened(model)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    batch = likelihood_batch(te, ITEMS)
    lens = batch["prompt_mask"].sum(1)
    assert len(set(lens.tolist())) == 3  # three different prompt lengths, right-padded
    with torch.no_grad():
        fast = likelihood_scores(model, batch)
        slow = likelihood_scores_naive(model, batch)
    assert fast.shape == (3, 4)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)
    assert fast.std() > 1e-3  # scores are not all equal: the comparison means something
    if variant == "sharpened":
        assert fast.std() > 0.1


def test_likelihood_is_per_user_not_per_batch(dec_backbone):
    """A user's scores do not change with who else is in the batch (padding is invisible)."""
    te = text(dec_backbone, title_max_tokens=10)
    model = sharpened(dec_backbone.model, seed=3)
    with torch.no_grad():
        together = likelihood_scores(model, likelihood_batch(te, ITEMS))
        alone = torch.cat([likelihood_scores(model, likelihood_batch(te, [it])) for it in ITEMS])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)
