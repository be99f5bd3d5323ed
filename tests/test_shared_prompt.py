"""Decoder training with the prompt shared across candidates (recsys/models/scoring.py): one sequence
a user with a block mask gives the per-candidate batch's loss and gradients (fp32, relative 1e-5), for
the head on the candidate's last token and for the likelihood, on the tiny decoder and SmolLM2; the
likelihood's LM head runs in float32 under bf16 autocast."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from recsys.data.text import Collator, PromptTemplate, TextEncoder
from recsys.models.backbone import body, default_lora_targets, load_backbone
from recsys.models.head import ScoringHead
from recsys.models.scoring import (
    as_pairs, candidate_mask, likelihood_scores, likelihood_scores_cached, likelihood_scores_per_candidate,
    pack_candidates, pair_scores, token_logprobs,
)

TITLES = ["red hat", "blue shoe", "green sock with stripes", "yellow scarf", "black leather belt for men",
          "white cotton shirt", "purple dress", "orange bag", "brown boots", "grey coat",
          " ".join(["very long title"] * 20)]
ITEMS = [  # three prompt lengths, candidates of different lengths, the target anywhere
    ("d", (0,), [1, 2, 3, 4, 10], 0),
    ("d", (5, 6, 7, 8, 9, 0, 1), [10, 2, 6, 9, 3], 3),
    ("d", (2, 3), [7, 8, 0, 10, 5], 4),
]


def lora_model(backbone, seed=0, std=0.3):
    """A LoRA-wrapped copy of the backbone with non-zero B (a fresh LoRA is a no-op), in train mode
    without dropout, and a head: what a decoder LoRA module trains."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(backbone.model), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=default_lora_targets(backbone)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.train()
    return model, ScoringHead(backbone.hidden_size)


def batch_of(backbone, items=ITEMS, max_length=256, title_max_tokens=10):
    te = TextEncoder(backbone.tokenizer, "decoder", PromptTemplate(max_length=max_length,
                                                                   title_max_tokens=title_max_tokens))
    te.add_titles("d", TITLES)
    return Collator(te, likelihood=True)(items)


def loss_and_grads(model, head, batch, scoring):
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    for p in params:
        p.grad = None
    s = likelihood_scores(model, batch) if scoring == "likelihood" else pair_scores(model, head, batch, "decoder")
    loss = F.cross_entropy(s.float(), batch["labels"])
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    return s.detach(), loss.detach(), grads


def reference(model, head, batch, scoring):
    """The per-candidate batch: each candidate after its own copy of the prompt."""
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    for p in params:
        p.grad = None
    if scoring == "likelihood":
        s = likelihood_scores_per_candidate(model, batch)
    else:
        s = pair_scores(model, head, as_pairs(batch), "decoder")
    loss = F.cross_entropy(s.float(), batch["labels"])
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    return s.detach(), loss.detach(), grads


def grad_noise_floor(model, head, batch, reversed_batch, scoring):
    """The largest relative difference (norm) between two per-candidate gradients that are equal in exact
    arithmetic: the same users in reverse order. float32 rounding alone; the floor to compare against."""
    _, _, a = reference(model, head, batch, scoring)
    _, _, b = reference(model, head, reversed_batch, scoring)
    top = max(float(x.abs().max()) for x in a)
    return max(float((x - y).norm() / y.norm()) for x, y in zip(b, a) if float(y.abs().max()) >= 1e-6 * top)


def assert_same_training(model, head, batch, scoring, rtol=1e-5, atol=1e-6, grad_rtol=None):
    s, loss, grads = loss_and_grads(model, head, batch, scoring)
    s_ref, loss_ref, grads_ref = reference(model, head, batch, scoring)
    torch.testing.assert_close(s, s_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    assert s.std() > 1e-3  # the candidates' scores differ: the comparison means something
    top = max(float(r.abs().max()) for r in grads_ref)
    nonzero = 0
    for g, r in zip(grads, grads_ref):
        scale = float(r.abs().max())
        if scale < 1e-6 * top:  # zero in exact arithmetic (the head's output bias: softmax is shift-invariant)
            assert float(g.abs().max()) < 1e-5 * top
            continue
        # relative error of the tensor (norm of the difference over the norm), and element-wise within
        # rtol plus 10 rtol of the tensor's largest element (float32 sums in another order: the prompt's
        # gradient is summed over the candidates inside attention here, across B*C rows there)
        grtol = grad_rtol or rtol
        assert float((g - r).norm()) <= grtol * float(r.norm()), float((g - r).norm() / r.norm())
        torch.testing.assert_close(g / scale, r / scale, rtol=grtol, atol=10 * grtol)
        nonzero += 1
    assert nonzero >= len(grads) // 2  # the gradients reach the LoRA weights (and the head)


@pytest.fixture(scope="module")
def dec():
    return load_backbone("tiny:decoder", hidden_size=64)


def test_packing_layout(dec):
    b = batch_of(dec, ITEMS[:2])
    packed = pack_candidates(b)
    c = b["num_candidates"]
    p_len, c_len = b["prompt_mask"].sum(1), b["cont_mask"].sum(1).view(2, c)
    S = packed["input_ids"].size(1)
    assert S == int((p_len + c_len.sum(1)).max())  # the prompt once, then every candidate
    for u in range(2):
        seg, ids, pos = packed["segment"][u], packed["input_ids"][u], packed["position_ids"][u]
        assert ids[: p_len[u]].tolist() == b["prompt_ids"][u, : p_len[u]].tolist()
        for k in range(c):
            at = (seg == k + 1).nonzero().squeeze(1)
            assert ids[at].tolist() == b["cont_ids"][u * c + k, : c_len[u, k]].tolist()
            assert pos[at].tolist() == list(range(int(p_len[u]), int(p_len[u] + c_len[u, k])))  # as if alone
            assert int(packed["last"][u * c + k]) == u * S + int(at[-1])
    m = candidate_mask(packed["segment"])[0, 0]
    seg = packed["segment"][0]
    q = int((seg == 2).nonzero()[0])  # candidate 1's first token
    assert m[q, seg == 0].all() and not m[q, seg == 1].any() and not m[q, seg == 3].any() and m[q, q]


@pytest.mark.parametrize("scoring", ["head", "likelihood"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_training_equals_per_candidate(dec, scoring, attn):
    model, head = lora_model(dec)
    model.get_base_model().config._attn_implementation = attn
    try:
        assert_same_training(model, head, batch_of(dec), scoring)
    finally:
        model.get_base_model().config._attn_implementation = "sdpa"


def test_shared_prompt_with_truncated_history(dec):
    """Histories cut to fit max_length: the kept prompt is the same for every candidate."""
    model, head = lora_model(dec, seed=1)
    b = batch_of(dec, max_length=40)
    assert b["prompt_mask"].sum(1).max() < 40
    assert_same_training(model, head, b, "head")


def test_cached_likelihood_equals_shared_prompt(dec):
    """Evaluation (no gradients: the prompt's KV cache) and training (block mask) give the same scores."""
    model, _ = lora_model(dec)
    b = batch_of(dec)
    with torch.no_grad():
        cached = likelihood_scores(model, b)
        per_candidate = likelihood_scores_per_candidate(model, b)
    shared = likelihood_scores(model, b).detach()
    torch.testing.assert_close(cached, likelihood_scores_cached(model, b).detach())
    torch.testing.assert_close(cached, shared, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_candidate, shared, rtol=1e-5, atol=1e-5)


def test_likelihood_lm_head_in_float32_under_bf16_autocast(dec):
    """Under bf16-mixed the body's matmuls run in bf16 but the LM head and log-softmax in float32: the
    scores equal the float32 log-probabilities of the body's hidden states, at fp32 resolution."""
    model, _ = lora_model(dec)
    model.eval()
    b = batch_of(dec)
    seen = {}
    net = body(model)
    hook = net.register_forward_hook(lambda m, i, o: seen.update(h=o.last_hidden_state))  # returns None
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = likelihood_scores(model, b)  # gradients on: the packed path, one body call
    finally:
        hook.remove()
    h = seen["h"]
    packed = pack_candidates(b)
    pred = h.reshape(-1, h.size(-1))[packed["pred"]].float()
    lm = model.get_base_model().get_output_embeddings().weight.float()
    logp = torch.log_softmax(pred @ lm.T, dim=-1).gather(-1, b["cont_ids"].unsqueeze(-1)).squeeze(-1)
    m = b["cont_mask"].float()
    expected = ((logp * m).sum(1) / m.sum(1)).view_as(scores)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-5, atol=1e-5)
    # a bf16 LM head (the autocast default) would miss by far more than that
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.log_softmax(torch.nn.functional.linear(pred, lm).float(), -1)
    assert (low.gather(-1, b["cont_ids"].unsqueeze(-1)).squeeze(-1) - logp).abs().max() > 1e-3
    # token_logprobs itself ignores an enclosing autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = token_logprobs(model, pred[:, 0], b["cont_ids"][:, 0])
    torch.testing.assert_close(t, logp[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["head", "likelihood"])
def test_shared_prompt_training_equals_per_candidate_smollm2(scoring):
    bb = load_backbone("embedded:smollm2-135m")
    model, head = lora_model(bb, std=0.02)
    batch = batch_of(bb, ITEMS[:2])
    # 30 layers in float32 (RMSNorm computes in float32 even in a float64 model): the per-candidate
    # gradients of some LoRA weights change by 0.5e-5 to 1.7e-5 (relative, norm) from run to run when
    # only the order of the users changes. Scores and loss must agree within 1e-5, gradients within
    # 3e-5 or three times that floor measured here, whichever is higher.
    floor = grad_noise_floor(model, head, batch, batch_of(bb, ITEMS[:2][::-1]), scoring)
    assert floor < 1e-4
    assert_same_training(model, head, batch, scoring, rtol=1e-5, atol=1e-5, grad_rtol=max(3e-5, 3 * floor))


def test_shared_prompt_with_activation_checkpointing(dec):
    """speed.activation_checkpointing recomputes the blocks in backward: same loss and gradients (no KV
    cache is involved, which transformers turns off under checkpointing)."""
    from recsys.pipeline.speed import enable_activation_checkpointing

    b = batch_of(dec)
    model, head = lora_model(dec)
    _, loss, grads = loss_and_grads(model, head, b, "likelihood")
    assert enable_activation_checkpointing(model) == 1
    _, loss2, grads2 = loss_and_grads(model, head, b, "likelihood")
    torch.testing.assert_close(loss2, loss)
    for g, r in zip(grads2, grads):
        torch.testing.assert_close(g, r)
