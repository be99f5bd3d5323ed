"""Merging of LoRA adapters: every rule against a reference computed by hand, both export forms, errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from recsys.models.backbone import build_tiny
from recsys.models.merging import (
    MERGE_RULES,
    check_mergeable,
    learn_merge_weights,
    load_adapter_folders,
    lora_delta,
    merge_adapters,
    prediction_entropy,
    save_dense,
    save_merged_adapter,
    weighted_adapters,
)

KINDS = ("tiny:encoder", "tiny:decoder")
# (name, r, alpha): different ranks and scalings
SPECS = [("t0", 4, 8), ("h1", 2, 2), ("h2", 3, 12)]
_BASES: dict = {}


def base(kind: str, hidden_size: int = 32):
    key = (kind, hidden_size)
    if key not in _BASES:
        _BASES[key] = build_tiny(kind, hidden_size=hidden_size).model
    return copy.deepcopy(_BASES[key])


def with_adapters(kind, specs=SPECS, target_modules="all-linear", seed=0, hidden_size=32, **config):
    """A PeftModel with the given LoRA adapters, A and B random (peft inits B = 0), all frozen."""
    model = None
    for name, r, alpha in specs:
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, **config)
        if model is None:
            model = get_peft_model(base(kind, hidden_size), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                p.requires_grad_(False)
    model.eval()
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1000, 2000, (2, 7), generator=g)


def output(model):
    with torch.no_grad():
        out = model(input_ids=inputs())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def layers(model, adapter):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def hand_delta(model, adapter):
    """alpha / r * B @ A from the raw factors and the config (not peft's get_delta_weight)."""
    cfg = model.peft_config[adapter]
    return {n: cfg.lora_alpha / cfg.r * (m.lora_B[adapter].weight @ m.lora_A[adapter].weight)
            for n, m in layers(model, adapter).items()}


def assert_deltas(got: dict, want: dict, atol=1e-5):
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=atol, rtol=1e-4, msg=m)


def ties_ref(deltas, weights, density, method="total"):
    """TIES written out: trim to the top-k magnitudes, elect the sign, mean of the agreeing weighted entries."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().argsort(descending=True)[:k]] = True
        trimmed.append(d * keep.view(d.shape))
    t = torch.stack(trimmed)
    votes = t.sum(0) if method == "total" else t.sign().sum(0)
    sign = torch.where(votes >= 0, 1.0, -1.0)
    agree = t.sign() == sign
    weighted = t * torch.tensor(weights).view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


# --------------------------------------------------------------------------------------------
# WeaveRec: the exact sum of low-rank products


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3])
def test_weaverec_is_lambda_weighted_sum_of_products(kind, n):
    model = with_adapters(kind)
    names = [s[0] for s in SPECS[:n]]
    hand = {a: hand_delta(model, a) for a in names}
    merge_adapters(model, names)  # uniform 1/N
    assert_deltas(lora_delta(model, "merged"), {m: sum(hand[a][m] for a in names) / n for m in hand[names[0]]})
    assert model.peft_config["merged"].r == sum(s[1] for s in SPECS[:n])  # concatenated factors
    assert model.active_adapter == "merged"
    w = [0.5, -0.2, 0.7][:n]
    merge_adapters(model, names, weights=w, scaling=2.0, new_name="m2")
    assert_deltas(lora_delta(model, "m2"), {m: 2.0 * sum(wi * hand[a][m] for wi, a in zip(w, names))
                                            for m in hand[names[0]]})
    for a in names:  # the sources are untouched
        assert_deltas(hand_delta(model, a), hand[a], atol=0)


def test_weaverec_rslora_per_module_weights_and_single_adapter():
    # rsLoRA: peft's "cat" gives the merged adapter scaling r/sqrt(r) = sqrt(r); merge_adapters folds 1/scaling into A
    model = with_adapters("tiny:decoder", use_rslora=True)
    names = ["t0", "h1"]
    hand = {a: {m: d * model.peft_config[a].r / model.peft_config[a].r ** 0.5 for m, d in hand_delta(model, a).items()}
            for a in names}
    merge_adapters(model, names)
    assert_deltas(lora_delta(model, "merged"), {m: (hand["t0"][m] + hand["h1"][m]) / 2 for m in hand["t0"]})
    # one list of weights per module
    per = {m: [0.1 * i, 1.0 - 0.05 * i] for i, m in enumerate(hand["t0"])}
    merge_adapters(model, names, weights=per, new_name="pm")
    assert_deltas(lora_delta(model, "pm"), {m: per[m][0] * hand["t0"][m] + per[m][1] * hand["h1"][m] for m in per})
    merge_adapters(model, ["h1"], weights=[0.3], new_name="one")  # peft switches to "linear" for one adapter
    assert_deltas(lora_delta(model, "one"), {m: 0.3 * d for m, d in hand["h1"].items()})


def test_peft_linear_is_not_the_sum_of_products():
    """Why "cat": peft's "linear" averages A and B, (sum sqrt(w) B_i)(sum sqrt(w) A_i), adding cross terms."""
    model = with_adapters("tiny:encoder", specs=[("t0", 4, 8), ("h1", 4, 8)])
    model.base_model.add_weighted_adapter(["t0", "h1"], [0.5, 0.5], "lin", combination_type="linear")
    want = {m: (d + hand_delta(model, "h1")[m]) / 2 for m, d in hand_delta(model, "t0").items()}
    got = lora_delta(model, "lin")
    assert all(not torch.allclose(got[m], want[m], atol=1e-3) for m in want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", ["weaverec", "ties"])
def test_exports_load_with_plain_peft_and_as_dense(kind, rule, tmp_path):
    model = with_adapters(kind)
    merge_adapters(model, ["t0", "h1", "h2"], rule=rule)
    merged_delta, merged_out = lora_delta(model, "merged"), output(model)
    base_out = output(base(kind))
    assert not torch.allclose(merged_out, base_out, atol=1e-3)  # the merge does something

    save_merged_adapter(model, "merged", str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    loaded = PeftModel.from_pretrained(base(kind), str(tmp_path / "adapter")).eval()
    assert_deltas(lora_delta(loaded, "default"), merged_delta, atol=1e-6)
    torch.testing.assert_close(output(loaded), merged_out, atol=1e-5, rtol=1e-4)

    dense = save_dense(model, "merged", str(tmp_path / "dense"))
    assert "merged" in model.peft_config and not isinstance(dense, PeftModel)  # model untouched by default
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if kind == "tiny:encoder" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(str(tmp_path / "dense")).eval()
    torch.testing.assert_close(output(reloaded), merged_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output(model), merged_out)


# --------------------------------------------------------------------------------------------
# Baselines


def test_task_arithmetic():
    model = with_adapters("tiny:encoder")
    hand = {a: hand_delta(model, a) for a in ("t0", "h1")}
    merge_adapters(model, ["t0", "h1"], rule="task_arithmetic", scaling=0.7)  # weights default to 1
    assert_deltas(lora_delta(model, "merged"), {m: 0.7 * (hand["t0"][m] + hand["h1"][m]) for m in hand["t0"]})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density,method", [(0.5, "total"), (1.0, "total"), (0.3, "frequency")])
def test_ties_matches_reference(kind, density, method):
    model = with_adapters(kind)
    names, w = ["t0", "h1", "h2"], [1.0, 0.5, 2.0]
    hand = {a: hand_delta(model, a) for a in names}
    merge_adapters(model, names, rule="ties", weights=w, density=density, majority_sign_method=method, scaling=0.9)
    want = {m: 0.9 * ties_ref([hand[a][m] for a in names], w, density, method) for m in hand["t0"]}
    assert_deltas(lora_delta(model, "merged"), want)
    # exact storage: rank min(out, in) at each module
    for m, layer in layers(model, "merged").items():
        assert layer.lora_A["merged"].weight.shape[0] == min(want[m].shape)


def test_ties_equals_peft_ties_svd_at_full_rank():
    """On square targets peft's "ties_svd" with svd_rank = in = out computes the same (up to the SVD's float error)."""
    model = with_adapters("tiny:encoder", target_modules=["query", "value"])
    names = ["t0", "h1", "h2"]
    model.base_model.add_weighted_adapter(names, [1.0, 1.0, 1.0], "peft_ties", combination_type="ties_svd",
                                          svd_rank=32, density=0.5)
    merge_adapters(model, names, rule="ties", density=0.5)
    assert_deltas(lora_delta(model, "merged"), lora_delta(model, "peft_ties"), atol=1e-4)


def test_rank_truncation_is_the_best_low_rank_approximation():
    model = with_adapters("tiny:encoder")
    merge_adapters(model, ["t0", "h1"], rule="ties", new_name="exact", activate=False)
    merge_adapters(model, ["t0", "h1"], rule="ties", new_name="r2", rank=2)
    for m, d in lora_delta(model, "exact").items():
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        torch.testing.assert_close(lora_delta(model, "r2")[m], (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-4)
        assert layers(model, "r2")[m].lora_A["r2"].weight.shape[0] == 2


def test_dare_density_one_is_task_arithmetic_and_ties():
    model = with_adapters("tiny:decoder")
    names, w = ["t0", "h1", "h2"], [0.3, 0.3, 0.4]
    hand = {a: hand_delta(model, a) for a in names}
    merge_adapters(model, names, rule="dare_linear", weights=w, density=1.0, new_name="dl")
    assert_deltas(lora_delta(model, "dl"), {m: sum(wi * hand[a][m] for wi, a in zip(w, names)) for m in hand["t0"]})
    merge_adapters(model, names, rule="dare_ties", weights=w, density=1.0, new_name="dt")
    assert_deltas(lora_delta(model, "dt"), {m: ties_ref([hand[a][m] for a in names], w, 1.0) for m in hand["t0"]})


@pytest.mark.parametrize("rule", ["dare_linear", "dare_ties"])
def test_dare_seeded_matches_reference(rule):
    model = with_adapters("tiny:encoder")
    names, w, density = ["t0", "h1"], [1.0, 0.5], 0.4
    hand = {a: hand_delta(model, a) for a in names}
    state = torch.random.get_rng_state()
    merge_adapters(model, names, rule=rule, weights=w, density=density, seed=3, new_name="da")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(3)  # the reference draws the masks in the same order: module by module, adapter by adapter
    want = {}
    for m in hand["t0"]:
        dropped = [hand[a][m] * torch.bernoulli(torch.full_like(hand[a][m], density)) / density for a in names]
        if rule == "dare_linear":
            want[m] = sum(wi * d for wi, d in zip(w, dropped))
        else:
            want[m] = ties_ref(dropped, w, 1.0)
    assert_deltas(lora_delta(model, "da"), want)
    kept = torch.cat([(d != 0).float().flatten() for d in want.values()]).mean()
    assert 0.25 < kept < 0.75  # about 1 - (1 - density)^2 of the entries survive in at least one adapter
    merge_adapters(model, names, rule=rule, weights=w, density=density, seed=3, new_name="db")
    merge_adapters(model, names, rule=rule, weights=w, density=density, seed=4, new_name="dc")
    assert_deltas(lora_delta(model, "db"), lora_delta(model, "da"), atol=0)
    assert any(not torch.equal(lora_delta(model, "dc")[m], want[m]) for m in want)


# --------------------------------------------------------------------------------------------
# Loading adapter folders, errors


def test_load_adapter_folders_then_merge(tmp_path):
    model = with_adapters("tiny:decoder")
    for a in ("t0", "h1"):
        save_merged_adapter(model, a, str(tmp_path / a))
    merge_adapters(model, ["t0", "h1"])
    loaded = load_adapter_folders(base("tiny:decoder"), [str(tmp_path / "t0"), str(tmp_path / "h1")])
    assert set(loaded.peft_config) == {"t0", "h1"}
    merge_adapters(loaded, ["t0", "h1"])
    assert_deltas(lora_delta(loaded, "merged"), lora_delta(model, "merged"), atol=1e-6)
    torch.testing.assert_close(output(loaded), output(model))
    save_merged_adapter(model, "h2", str(tmp_path / "h2"))
    assert load_adapter_folders(loaded, [str(tmp_path / "h2")]) is loaded  # into an existing PeftModel
    assert_deltas(lora_delta(loaded, "h2"), hand_delta(model, "h2"), atol=1e-6)


def test_load_adapter_folders_errors(tmp_path):
    a = with_adapters("tiny:encoder", specs=[("t0", 2, 4)])
    save_merged_adapter(a, "t0", str(tmp_path / "t0"))
    b = with_adapters("tiny:encoder", specs=[("q", 2, 4)], target_modules=["query"])
    save_merged_adapter(b, "q", str(tmp_path / "q"))
    with pytest.raises(ValueError, match="different target modules"):
        load_adapter_folders(base("tiny:encoder"), [str(tmp_path / "t0"), str(tmp_path / "q")])
    wide = with_adapters("tiny:encoder", specs=[("w", 2, 4)], hidden_size=48)
    save_merged_adapter(wide, "w", str(tmp_path / "w"))
    with pytest.raises(ValueError, match="different backbone"):
        load_adapter_folders(base("tiny:encoder"), [str(tmp_path / "w")])
    with pytest.raises(ValueError, match="different shapes"):
        load_adapter_folders(base("tiny:encoder"), [str(tmp_path / "t0"), str(tmp_path / "w")])
    save_merged_adapter(a, "t0", str(tmp_path / "t1"))
    for folder, backbone in (("t0", "org/model-a"), ("t1", "org/model-b")):
        path = tmp_path / folder / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg["base_model_name_or_path"] = backbone
        path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different backbones"):
        load_adapter_folders(base("tiny:encoder"), [str(tmp_path / "t0"), str(tmp_path / "t1")], ["x", "y"])
    with pytest.raises(ValueError, match="2 names for 1 folders"):
        load_adapter_folders(base("tiny:encoder"), [str(tmp_path / "t0")], ["x", "y"])


def test_merge_errors():
    model = with_adapters("tiny:encoder")
    with pytest.raises(ValueError, match="unknown merge rule 'avg'; known rules: " + ", ".join(MERGE_RULES)):
        merge_adapters(model, ["t0", "h1"], rule="avg")
    with pytest.raises(ValueError, match="got 3 weights for 2 adapters"):
        merge_adapters(model, ["t0", "h1"], weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="missing"):
        merge_adapters(model, ["t0", "h1"], weights={"encoder.layer.0.attention.self.query": [0.5, 0.5]})
    with pytest.raises(ValueError, match="'nope' is not in the model"):
        merge_adapters(model, ["t0", "nope"])
    with pytest.raises(ValueError, match="density"):
        merge_adapters(model, ["t0", "h1"], rule="ties", density=0.0)
    with pytest.raises(ValueError, match="rank"):
        merge_adapters(model, ["t0", "h1"], rank=4)
    merge_adapters(model, ["t0", "h1"])
    with pytest.raises(ValueError, match="already exists"):
        merge_adapters(model, ["t0", "h1"])
    model.add_adapter("q", LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="different target modules"):
        merge_adapters(model, ["t0", "q"], new_name="x")
    model.peft_config["t0"].base_model_name_or_path = "org/model-a"
    model.peft_config["h1"].base_model_name_or_path = "org/model-b"
    with pytest.raises(ValueError, match="different backbones"):
        check_mergeable(model, ["t0", "h1"])
    model.peft_config["h1"].base_model_name_or_path = None  # unset: not compared
    check_mergeable(model, ["t0", "h1"])
    model.add_adapter("d", LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        merge_adapters(model, ["t0", "d"], new_name="y")


# --------------------------------------------------------------------------------------------
# AdaMerging-style learned weights


@pytest.mark.parametrize("kind", KINDS)
def test_weighted_adapters_computes_the_merge(kind):
    model = with_adapters(kind)
    names = ["t0", "h1", "h2"]
    before = output(model)
    merge_adapters(model, names, weights=[0.2, 0.5, 0.3])
    merged = output(model)
    with weighted_adapters(model, names, [0.2, 0.5, 0.3]):
        torch.testing.assert_close(output(model), merged, atol=1e-5, rtol=1e-4)
    model.set_adapter("t0")
    torch.testing.assert_close(output(model), before)  # hooks gone, adapters enabled again


def _scorer(model, n_candidates=5):
    proj = torch.randn(32, n_candidates, generator=torch.Generator().manual_seed(2))

    def score_fn(batch):
        return model(input_ids=batch).last_hidden_state.mean(1) @ proj * 3  # (B, C)

    return score_fn


def test_learn_merge_weights_lowers_entropy_and_leaves_the_model():
    model = with_adapters("tiny:encoder")
    names = ["t0", "h1"]
    score_fn = _scorer(model)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(1000, 2000, (4, 6), generator=g) for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    start = learn_merge_weights(model, names, score_fn, batches, steps=0)
    assert all(v == [0.5, 0.5] for v in start.values())
    learned = learn_merge_weights(model, names, score_fn, batches, steps=30, lr=0.05)

    def entropy(lambdas):
        with torch.no_grad(), weighted_adapters(model, names, lambdas):
            return torch.cat([prediction_entropy(score_fn(b)) for b in batches]).mean()

    assert entropy(learned) < entropy(start) - 1e-3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # the learned weights build the adapter: sum_i lambda_{i,m} D_i at each module
    hand = {a: hand_delta(model, a) for a in names}
    merge_adapters(model, names, weights=learned)
    assert_deltas(lora_delta(model, "merged"),
                  {m: learned[m][0] * hand["t0"][m] + learned[m][1] * hand["h1"][m] for m in learned})

    blocks = learn_merge_weights(model, names, score_fn, batches, steps=3, lr=0.05, granularity="block")
    assert blocks["encoder.layer.0.attention.self.query"] == blocks["encoder.layer.0.output.dense"]
    assert blocks["encoder.layer.0.attention.self.query"] != blocks["encoder.layer.1.attention.self.query"]
    with pytest.raises(ValueError, match="granularity"):
        learn_merge_weights(model, names, score_fn, batches, granularity="head")


def test_prediction_entropy_masks_minus_inf():
    scores = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]], requires_grad=True)
    h = prediction_entropy(scores)
    torch.testing.assert_close(h, torch.tensor([2.0, 3.0]).log())
    h.sum().backward()
    assert torch.isfinite(scores.grad).all()
