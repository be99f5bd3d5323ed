"""X-Cross model exactness: integrators, mixed-adapter streams, hooks, gradients, parameter counts.

Every check runs on the tiny encoder (BERT) and the tiny decoder (Llama) with random non-zero
LoRA source adapters (peft initialises B = 0, which would make every adapter the backbone).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from recsys.models.backbone import body, build_tiny, transformer_layers
from recsys.models.head import ScoringHead, pool
from recsys.models.integrator import Integrator, XCrossModel, ordered_pairs

KINDS = ["tiny:encoder", "tiny:decoder"]
TARGETS = {
    "encoder": ["query", "value"],
    "decoder": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# The z layout as documented in Integrator, written out by hand (not derived from the code).
PAIRS = {2: [(0, 1), (1, 0)], 3: [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]}


def make_sources(name: str, n: int, seed: int = 0):
    """A tiny backbone in a PeftModel with n random LoRA source adapters s0..s{n-1}."""
    bb = build_tiny(name)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[bb.kind], lora_dropout=0.1)
    names = [f"s{i}" for i in range(n)]
    pm = get_peft_model(bb.model, cfg, adapter_name=names[0])
    for a in names[1:]:
        pm.add_adapter(a, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bb, pm, names


def batch(kind: str, seed: int = 1, lengths=(7, 4, 6)):
    """Right-padded random token ids with a mask (rows of the given lengths)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, 1000, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def what_w_concat_reads(cat: torch.Tensor, normalize: str) -> torch.Tensor:
    """As documented in Integrator: the concatenation (B, T, n d), layer-normalised without affine
    weights and divided by sqrt(n d) (``layernorm``), or as it is (``none``)."""
    if normalize == "none":
        return cat
    mu, var = cat.mean(-1, keepdim=True), cat.var(-1, unbiased=False, keepdim=True)
    return (cat - mu) / torch.sqrt(var + 1e-5) / cat.size(-1) ** 0.5


def randomise(xc: XCrossModel, seed: int = 2, std: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for integ in xc.integrators:
            if integ.W_concat is not None:
                integ.W_concat.weight.copy_(torch.randn(integ.W_concat.weight.shape, generator=g) * std)


def single_source(pm, name, kind, head, ids, mask):
    """Scores and pooled state of the plain source model: backbone + adapter ``name``, same head."""
    pm.set_adapter(name)
    with torch.no_grad():
        pooled = pool(body(pm)(input_ids=ids, attention_mask=mask).last_hidden_state, mask, kind)
        return pooled, head(pooled)


def reference_refine(ys, z, beta, gamma):
    """The paper's equation with explicit loops over the documented pairs: list of (B,T,d) -> list."""
    n = len(ys)
    pairs, P = PAIRS[n], len(PAIRS[n])
    out = []
    for m in range(n):
        acc = ys[m].clone()
        for k, (mm, mp) in enumerate(pairs):
            if mm == m:
                a, b = z[..., k : k + 1], z[..., P + k : P + k + 1]
                acc = acc + beta * a * ys[mp] + gamma * b * (ys[m] - ys[mp])
        out.append(acc)
    return out


class _Stop(Exception):
    pass


def manual_xcross(pm, names, kind, ids, mask, xc: XCrossModel):
    """X-Cross computed layer by layer, one stream at a time, by hand (the model's layers, our maths)."""
    layers = transformer_layers(pm)
    integs = xc.integrators
    beta, gamma, mode = integs[0].beta, integs[0].gamma, integs[0].mode

    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["args"], grabbed["kwargs"] = args, kwargs
        raise _Stop

    xs = []
    for name in names:  # each stream's input to layer 1 and the layer call's other arguments
        pm.set_adapter(name)
        handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            body(pm)(input_ids=ids, attention_mask=mask, **({"use_cache": False} if kind == "decoder" else {}))
        except _Stop:
            pass
        finally:
            handle.remove()
        xs.append(grabbed["args"][0])
    rest, kwargs = grabbed["args"][1:], grabbed["kwargs"]

    with torch.no_grad():
        for layer, integ in zip(layers, integs):
            ys = []
            for m, name in enumerate(names):
                pm.set_adapter(name)
                out = layer(xs[m], *rest, **kwargs)
                ys.append(out[0] if isinstance(out, tuple) else out)
            if len(names) == 1:
                xs = ys
                continue
            z = what_w_concat_reads(torch.cat(ys, dim=-1), integ.normalize) @ integ.W_concat.weight.T  # (B, T, 2P)
            if mode == "pooled":
                z = pool(z, mask, kind).unsqueeze(1)  # z of the pooled token, for every token
            xs = reference_refine(ys, z, beta, gamma)
        w = xc.w.detach()
        norm = getattr(body(pm), "norm", None)
        if norm is None:
            h_final = sum(w[m] * xs[m] for m in range(len(xs)))
        elif xc.combine == "after_norm":
            h_final = sum(w[m] * norm(xs[m]) for m in range(len(xs)))
        else:
            h_final = norm(sum(w[m] * xs[m] for m in range(len(xs))))
        pooled = pool(h_final, mask, kind)
        return pooled, xc.head(pooled)


# --------------------------------------------------------------------------------------------
# (a) zero integrators + one-hot w == the source model


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("n", [2, 3])
def test_zero_integrators_one_hot_w_is_the_source_model(name, n):
    bb, pm, names = make_sources(name, n)
    head = ScoringHead(bb.hidden_size)
    ids, mask = batch(bb.kind)
    for m in range(n):
        w = [1.0 if i == m else 0.0 for i in range(n)]
        xc = XCrossModel(pm, names, bb.kind, w_init=w, head_state=head.state_dict())
        with torch.no_grad():
            pooled, scores = xc.encode(ids, mask), xc(ids, mask)
        ref_pooled, ref_scores = single_source(pm, names[m], bb.kind, head, ids, mask)
        torch.testing.assert_close(pooled, ref_pooled)
        torch.testing.assert_close(scores, ref_scores)
    # the sources really differ, so the check above can tell them apart
    a, _ = single_source(pm, names[0], bb.kind, head, ids, mask)
    b, _ = single_source(pm, names[1], bb.kind, head, ids, mask)
    assert (a - b).abs().max() > 1e-2


def test_zero_integrators_one_hot_w_decoder_before_norm():
    bb, pm, names = make_sources("tiny:decoder", 2)
    head = ScoringHead(bb.hidden_size)
    ids, mask = batch(bb.kind)
    xc = XCrossModel(pm, names, bb.kind, w_init=[0.0, 1.0], head_state=head.state_dict(), combine="before_norm")
    with torch.no_grad():
        scores = xc(ids, mask)
    torch.testing.assert_close(scores, single_source(pm, names[1], bb.kind, head, ids, mask)[1])


# (b) n = 1


@pytest.mark.parametrize("name", KINDS)
def test_one_source_has_no_integrator_and_is_the_source(name):
    bb, pm, names = make_sources(name, 2)
    xc = XCrossModel(pm, names[1:], bb.kind)
    assert all(i.W_concat is None for i in xc.integrators)
    assert sum(p.numel() for p in xc.integrators.parameters()) == 0
    assert xc.w.tolist() == [1.0]
    ids, mask = batch(bb.kind)
    with torch.no_grad():
        scores = xc(ids, mask)
    torch.testing.assert_close(scores, single_source(pm, names[1], bb.kind, xc.head, ids, mask)[1])


# (c) hand-computed recursion (f: also in mode="pooled")


@pytest.mark.parametrize(
    "name,mode,combine,normalize",
    [
        ("tiny:encoder", "token", "after_norm", "layernorm"),
        ("tiny:encoder", "token", "after_norm", "none"),
        ("tiny:encoder", "pooled", "after_norm", "layernorm"),
        ("tiny:decoder", "token", "after_norm", "layernorm"),
        ("tiny:decoder", "pooled", "after_norm", "none"),
        ("tiny:decoder", "token", "before_norm", "layernorm"),
    ],
)
def test_matches_hand_computed_recursion(name, mode, combine, normalize):
    bb, pm, names = make_sources(name, 2)
    xc = XCrossModel(pm, names, bb.kind, beta=0.7, gamma=0.4, mode=mode, w_init=[0.3, 0.9], combine=combine,
                     normalize=normalize)
    assert len(xc.integrators) == 2
    randomise(xc)
    ids, mask = batch(bb.kind)
    with torch.no_grad():
        pooled, scores = xc.encode(ids, mask), xc(ids, mask)
    ref_pooled, ref_scores = manual_xcross(pm, names, bb.kind, ids, mask, xc)
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(scores, ref_scores)
    # the integrators matter: the same model with zero W_concat scores differently
    with torch.no_grad():
        for integ in xc.integrators:
            integ.W_concat.weight.zero_()
        assert (xc(ids, mask) - scores).abs().max() > 1e-3


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["token", "pooled"])
@pytest.mark.parametrize("normalize", ["layernorm", "none"])
def test_integrator_matches_equation(n, mode, normalize):
    torch.manual_seed(0)
    B, T, d = 3, 5, 8
    integ = Integrator(n, d, beta=0.5, gamma=2.0, mode=mode, init="normal", kind="decoder", init_std=0.1,
                       normalize=normalize)
    assert integ.pairs == PAIRS[n] == ordered_pairs(n)
    assert integ.W_concat.bias is None and integ.W_concat.weight.shape == (2 * n * (n - 1), n * d)
    h = torch.randn(n, B, T, d)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    z = what_w_concat_reads(torch.cat(list(h), dim=-1), normalize) @ integ.W_concat.weight.T
    if mode == "pooled":
        z = pool(z, mask, "decoder").unsqueeze(1)
    expected = torch.stack(reference_refine(list(h), z, 0.5, 2.0))
    torch.testing.assert_close(integ(h, mask), expected)
    assert torch.equal(Integrator(n, d)(h, mask), h)  # zero init: identity


# (d) gradients


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("mode", ["token", "pooled"])
def test_gradients_reach_integrators_w_head_only(name, mode):
    bb, pm, names = make_sources(name, 2)
    xc = XCrossModel(pm, names, bb.kind, mode=mode, head_dropout=0.1).train()
    assert xc.training and xc.head.training
    assert not any(mod.training for mod in pm.modules())  # frozen model stays in eval
    ids, mask = batch(bb.kind)
    scores = xc(ids, mask)  # peft would refuse a mixed-adapter batch in training mode
    torch.nn.functional.cross_entropy(scores.view(1, -1), torch.tensor([0])).backward()
    for integ in xc.integrators:  # layer 1 too: gradients flow back through the frozen adapters
        assert integ.W_concat.weight.grad is not None and integ.W_concat.weight.grad.abs().sum() > 0
    assert xc.w.grad is not None and xc.w.grad.abs().sum() > 0
    assert all(p.grad is not None for p in xc.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in pm.parameters())
    trainable = {id(p) for p in xc.trainable_parameters()}
    assert trainable == {id(p) for p in xc.parameters() if p.requires_grad}
    assert set(xc.trainable_state_dict()) == {"w"} | {f"integrators.{i}.W_concat.weight" for i in range(2)} | {
        f"head.{k}" for k in xc.head.state_dict()
    }


# hooks live only inside forward


@pytest.mark.parametrize("name", KINDS)
def test_peft_model_is_untouched_outside_forward(name):
    bb, pm, names = make_sources(name, 2)
    ids, mask = batch(bb.kind)
    pm.eval()  # no LoRA dropout
    pm.set_adapter(names[1])
    with torch.no_grad():
        before = body(pm)(input_ids=ids, attention_mask=mask).last_hidden_state
        xc = XCrossModel(pm, names, bb.kind, init="normal")
        xc(ids, mask)
        after = body(pm)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(before, after)
    def no_hooks():
        return all(not m._forward_hooks and not m._forward_pre_hooks for m in pm.modules())

    assert no_hooks()

    def boom(*args):
        raise RuntimeError("boom")

    xc.integrators[1].forward = boom
    with pytest.raises(RuntimeError, match="boom"):  # a failing forward leaves no hook behind either
        xc(ids, mask)
    assert no_hooks()


# (e) parameter counts


def test_parameter_counts_25_percent_of_lora():
    d, L = 384, 6
    integ = XCrossModel.integrator_param_count(2, d, L)
    lora = XCrossModel.lora_param_count([(d, d), (d, d)], r=8, num_layers=L)
    assert integ == L * 8 * d and lora == L * 32 * d
    assert integ / lora == pytest.approx(0.25)
    bb, pm, names = make_sources("tiny:encoder", 3)
    xc = XCrossModel(pm, names, bb.kind)
    d, L = bb.hidden_size, len(xc.integrators)
    assert sum(p.numel() for p in xc.integrators.parameters()) == XCrossModel.integrator_param_count(3, d, L)


# (g) padding


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("mode", ["token", "pooled"])
def test_padded_rows_score_as_unpadded(name, mode):
    bb, pm, names = make_sources(name, 2)
    xc = XCrossModel(pm, names, bb.kind, mode=mode)
    randomise(xc)
    lengths = (7, 4, 6)
    ids, mask = batch(bb.kind, lengths=lengths)
    with torch.no_grad():
        scores = xc(ids, mask)
        alone = torch.cat([xc(ids[i : i + 1, :n], mask[i : i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)


def test_bf16_backbone_trains_float32_integrators():
    bb, pm, names = make_sources("tiny:decoder", 2)
    pm.to(torch.bfloat16)
    xc = XCrossModel(pm, names, bb.kind, init="normal").train()
    ids, mask = batch(bb.kind)
    scores = xc(ids, mask)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert all(i.W_concat.weight.grad.dtype == torch.float32 for i in xc.integrators)


@pytest.mark.parametrize("name", KINDS)
def test_slice_routing_equals_peft_routing(name):
    """The default slice-wise adapter routing computes what peft's mixed-adapter batch computes:
    the same scores and the same integrator gradients, with non-zero integrators."""
    bb, pm, names = make_sources(name, 2)
    ids, mask = batch(bb.kind)
    torch.manual_seed(3)
    xc = XCrossModel(pm, names, bb.kind, init="normal")
    assert xc.routing == "slice"
    grads = {}
    for routing in ("slice", "peft"):
        xc.routing = routing
        xc.zero_grad()
        scores = xc(ids, mask)
        scores.sum().backward()
        grads[routing] = (scores.detach(), [i.W_concat.weight.grad.clone() for i in xc.integrators])
    torch.testing.assert_close(grads["slice"][0], grads["peft"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["slice"][1], grads["peft"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert not any(getattr(m, "_disable_adapters", False) for m in pm.modules())  # flags restored
    with pytest.raises(ValueError, match="routing"):
        XCrossModel(pm, names, bb.kind, routing="gather")


# (e) how much the integrators act


@pytest.mark.parametrize("name", KINDS)
def test_integrator_effect_and_w_concat_abs(name):
    """xcross/integrator_effect: mean over layers, streams and real tokens of ||h~_m - h_m|| / ||h_m||;
    0 at the zero initialisation, and by hand for a one-layer check of the first layer's hook."""
    bb, pm, names = make_sources(name, 2)
    xc = XCrossModel(pm, names, bb.kind)
    ids, mask = batch(bb.kind)
    assert xc.measure_effect(False) is None  # nothing measured
    xc.measure_effect(True)
    with torch.no_grad():
        xc(ids, mask)
    assert xc.measure_effect(False) == 0.0 and xc.w_concat_abs() == 0.0
    randomise(xc, std=0.05)
    assert xc.w_concat_abs() == pytest.approx(
        torch.cat([i.W_concat.weight.abs().flatten() for i in xc.integrators]).mean().item())
    seen = []  # (h, refined) of every layer, recomputed from the integrators' own inputs
    hooks = [integ.register_forward_hook(lambda mod, args, out: seen.append((args[0], out))) for integ in xc.integrators]
    xc.measure_effect(True)
    with torch.no_grad():
        xc(ids, mask)
    effect = xc.measure_effect(False)
    for h in hooks:
        h.remove()
    ratios = [((r - h).norm(dim=-1) / h.norm(dim=-1))[:, mask.bool()] for h, r in seen]  # (n, real tokens) a layer
    assert len(seen) == len(xc.integrators)
    assert effect == pytest.approx(torch.cat([r.flatten() for r in ratios]).mean().item(), rel=1e-5)
    assert effect > 1e-3


def test_layernormed_integrators_move_at_an_ordinary_learning_rate():
    """With W_concat reading the normalised concatenation, 20 Adam steps at lr 1e-3 change the hidden
    states by a visible amount (the raw states at lr 1e-5 barely moved: issue 10, item 5)."""
    bb, pm, names = make_sources("tiny:encoder", 2)
    ids, mask = batch(bb.kind, lengths=(7, 4, 6, 5, 7))
    effects = {}
    for normalize, lr in (("layernorm", 1e-3), ("none", 1e-5)):
        torch.manual_seed(0)
        xc = XCrossModel(pm, names, bb.kind, normalize=normalize).train()
        opt = torch.optim.AdamW(xc.integrators.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(xc(ids, mask).view(1, -1), torch.tensor([2]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        xc.measure_effect(True)
        with torch.no_grad():
            xc(ids, mask)
        effects[normalize] = xc.measure_effect(False)
    assert effects["layernorm"] > 0.01 and effects["layernorm"] > 10 * effects["none"], effects


# (f) the fused integrator step (issue 15) against the unfused reference


def _fused_and_reference(integ, h, mask):
    """Outputs and gradients (W_concat, h) of ``forward`` and ``forward_reference`` on the same inputs."""
    out = {}
    for name, fn in (("fused", integ.forward), ("reference", integ.forward_reference)):
        hh = h.clone().requires_grad_(True)
        integ.zero_grad(set_to_none=True)
        y = fn(hh, mask)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
        (y * g).sum().backward()
        out[name] = (y.detach(), integ.W_concat.weight.grad.clone(), hh.grad.clone())
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("normalize", ["none", "layernorm"])
@pytest.mark.parametrize("mode", ["token", "pooled"])
def test_fused_integrator_equals_reference(n, normalize, mode):
    """The fused step (combined weights, folded layer norm, in-place sums) is the unfused computation:
    fp32 output and gradients (W_concat and the states) within 1e-6 relative, with off-centre states
    (mean 0.5, unequal scales per stream) so the folded layer norm's mean term matters."""
    torch.manual_seed(0)
    B, T, d = 3, 6, 16
    integ = Integrator(n, d, beta=0.7, gamma=1.3, mode=mode, init="normal", init_std=0.3, kind="decoder",
                       normalize=normalize, compile=False)
    h = torch.randn(n, B, T, d) * torch.arange(1, n + 1).view(n, 1, 1, 1) + 0.5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    res = _fused_and_reference(integ, h, mask)
    for what, fused, ref in zip(("output", "grad W_concat", "grad h"), res["fused"], res["reference"]):
        assert _rel(fused, ref) < 1e-6, (what, _rel(fused, ref))
    assert _rel(res["fused"][0], h) > 1e-2  # the integrator acts


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("normalize", ["none", "layernorm"])
def test_fused_integrator_is_exact_in_float64(n, normalize):
    """In float64 the two computations agree to rounding (1e-12): the fused one is the same maths."""
    torch.manual_seed(0)
    integ = Integrator(n, 16, beta=0.7, gamma=1.3, init="normal", init_std=0.3, normalize=normalize,
                       compile=False).double()
    h = (torch.randn(n, 3, 6, 16) + 0.5).double()
    res = _fused_and_reference(integ, h, torch.ones(3, 6, dtype=torch.long))
    for fused, ref in zip(res["fused"], res["reference"]):
        assert _rel(fused, ref) < 1e-12


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("normalize", ["none", "layernorm"])
def test_fused_xcross_equals_reference(name, n, normalize):
    """The whole model (every layer's integrator fused) against the same model with the unfused reference
    integrators: scores and the gradients of every trainable parameter, fp32, within 5e-5 relative.
    (Not 1e-6: through the backbone's backward the reference's own fp32 result is 0.5-16e-6 from its
    float64 value on these models, and fused and reference differ by up to about 1.2e-5: fp32 rounding;
    the maths is checked exactly in float64 and at 1e-6 in fp32 on the integrator itself above.)"""
    bb, pm, names = make_sources(name, n)
    xc = XCrossModel(pm, names, bb.kind, normalize=normalize, compile_integrators=False).train()
    randomise(xc, std=0.05)
    ids, mask = batch(bb.kind)
    grads = {}
    for impl in ("fused", "reference"):
        for integ in xc.integrators:
            if impl == "reference":
                integ.forward = integ.forward_reference  # the instance's forward: the unfused original
        xc.zero_grad(set_to_none=True)
        scores = xc(ids, mask)
        (scores * torch.linspace(0.5, 1.5, scores.numel())).sum().backward()
        grads[impl] = [scores.detach()] + [p.grad.clone() for p in xc.trainable_parameters()]
        for integ in xc.integrators:
            integ.__dict__.pop("forward", None)
    assert len(grads["fused"]) == 1 + len(xc.trainable_parameters())
    for i, (fused, ref) in enumerate(zip(grads["fused"], grads["reference"])):
        assert _rel(fused, ref) < 5e-5, (i, _rel(fused, ref))


def test_integrator_compile_setting():
    """compile="auto" compiles on CUDA only; a wrong value fails at construction."""
    integ = Integrator(2, 4)
    assert integ.compile == "auto" and not integ.use_compile(torch.zeros(1))
    assert Integrator(2, 4, compile=True).use_compile(torch.zeros(1))
    with pytest.raises(ValueError, match="compile"):
        Integrator(2, 4, compile="yes")


@pytest.mark.slow
def test_compiled_integrator_step_on_cpu_equals_eager():
    """A CPU smoke of the torch.compile'd step (on CUDA it is the default): same output and gradients."""
    torch.manual_seed(0)
    integ = Integrator(2, 8, init="normal", init_std=0.3, compile=True)
    h, mask = torch.randn(2, 2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    compiled = _fused_and_reference(integ, h, mask)["fused"]
    integ.compile = False
    eager = _fused_and_reference(integ, h, mask)["fused"]
    for fused, ref in zip(compiled, eager):
        assert _rel(fused, ref) < 1e-5


@pytest.mark.parametrize("normalize", ["none", "layernorm"])
def test_fused_integrator_in_bf16_close_to_reference(normalize):
    """bf16 integrators (bf16-true): the fused step (layer-norm statistics in float32) stays within bf16
    rounding of the reference."""
    torch.manual_seed(0)
    integ = Integrator(2, 64, init="normal", init_std=0.3, normalize=normalize, compile=False).to(torch.bfloat16)
    h, mask = (torch.randn(2, 3, 6, 64) + 0.5).to(torch.bfloat16), torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        fused, ref = integ(h, mask).float(), integ.forward_reference(h, mask).float()
    assert _rel(fused, ref) < 2e-2 and _rel(fused, h.float()) > 5e-2
