"""RecDataModule: loading (synthetic, plain folders, the shared Amazon data), mix modes and their
proportions, target_fraction, max_eval_users, every bad input, sharding over processes and
length-bucketed batching."""

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import recsys.data.datamodule as dmod
from recsys.data.datamodule import EpochBatchSampler, RecDataModule
from recsys.data.domain import DataError

SHARED_AMAZON = Path(__file__).resolve().parents[2] / "shared/data/amazon"


def synth(n_users=60, n_items=80, **extra):
    return {"source": "synthetic", "num_users": n_users, "num_items": n_items, "seed": 0, **extra}


DOMAINS = {"tools": synth(), "toys": synth(), "sports": synth(40, 70)}


def make(**kw) -> RecDataModule:
    kw.setdefault("domains", DOMAINS)
    kw.setdefault("target", "tools")
    dm = RecDataModule.from_config(**kw)
    dm.setup("fit")
    return dm


def n_train(dm, name) -> int:
    """Training examples of a domain: every position t >= 1 except the last two, per user."""
    return sum(max(0, len(s) - 3) for s in dm.domains[name].sequences)


# ------------------------------------------------------------------------------------------ loading
def test_synthetic_target_only():
    dm = make()
    assert list(dm.domains) == ["tools"]  # unused domains are not built
    d = dm.domains["tools"]
    assert d.num_users == 60 and d.num_items <= 80
    assert list(dm.train_entries) == ["train"]
    assert len(dm.train_entries["train"]) == n_train(dm, "tools")
    assert {name for name, _ in dm.train_entries["train"]} == {"tools"}
    assert len(dm.eval_sets["val"]) == len(dm.eval_sets["test"]) == 60
    for split in ("val", "test"):
        ds = dm.eval_sets[split]
        assert ds.candidates.shape == (60, 20)
        for i in range(len(ds)):
            dom, hist, cands, pos = ds[i]
            assert dom == "tools" and cands[pos] == ds.examples[i].target
    s = dm.summary()
    assert s["test_examples"] == 60 and s["train_examples/train"] == n_train(dm, "tools")


def write_plain(folder: Path, n_users: int, n_items: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with open(folder / "items.jsonl", "w") as f:
        for j in range(n_items):
            f.write(json.dumps({"item_id": f"p{j}", "title": f"Product {j} in colour {j % 7}"}) + "\n")
    with open(folder / "sequences.jsonl", "w") as f:
        for u in range(n_users):
            seq = rng.choice(n_items, size=int(rng.integers(4, 9)), replace=False)
            f.write(json.dumps({"user_id": f"user{u}", "item_ids": [f"p{j}" for j in seq]}) + "\n")


def test_plain_folder(tmp_path):
    write_plain(tmp_path / "a", 30, 50)
    write_plain(tmp_path / "b", 20, 40, seed=1)
    domains = {"a": {"source": "plain", "path": str(tmp_path / "a")},
               "b": {"source": "plain", "path": str(tmp_path / "b")}}
    dm = make(domains=domains, target="a", sources=["b"], mix="joint")
    assert dm.domains["a"].num_users == 30 and dm.domains["b"].num_users == 20
    assert dm.domains["a"].user_ids[0] == "user0"
    assert len(dm.train_entries["train"]) == n_train(dm, "a") + n_train(dm, "b")
    assert len(dm.eval_sets["test"]) == 30  # evaluation is always on the target


def test_missing_plain_folder(tmp_path):
    dm = RecDataModule.from_config(domains={"a": {"source": "plain", "path": str(tmp_path / "nope")}}, target="a")
    with pytest.raises(DataError, match="nope") as e:
        dm.setup("fit")
    assert "data.root" in str(e.value)


def test_unknown_domain_source():
    dm = RecDataModule.from_config(domains={"a": {"source": "ftp"}}, target="a")
    with pytest.raises(DataError, match="ftp"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------ mixes
def test_mix_joint_pools_counts():
    dm = make(sources=["toys", "sports"], mix="joint")
    entries = dm.train_entries["train"]
    by = Counter(name for name, _ in entries)
    assert by == {"tools": n_train(dm, "tools"), "toys": n_train(dm, "toys"), "sports": n_train(dm, "sports")}
    assert list(dm.train_entries) == ["train"]
    assert len(dm.eval_sets["test"]) == 60


def test_mix_target_ignores_sources():
    dm = make(sources=["toys"], mix="target")
    assert {name for name, _ in dm.train_entries["train"]} == {"tools"}


def _check_hybrid(dm, source, n_t, n_s):
    entries = dm.train_entries[f"hybrid/{source}"]
    by = Counter(name for name, _ in entries)
    assert by == {"tools": n_t, source: n_s}
    # no example twice, and each is a real example of its domain
    keys = [(name, e) for name, e in entries]
    assert len(set(keys)) == len(keys)
    full = {name: set(dm.domains[name].examples("train", dm.max_history)) for name in ("tools", source)}
    assert all(e in full[name] for name, e in entries)


def test_mix_hybrid_50_50():
    dm = make(sources=["toys", "sports"], mix="hybrid")
    t = n_train(dm, "tools")
    assert set(dm.train_entries) == {"target", "hybrid/toys", "hybrid/sports"}
    assert len(dm.train_entries["target"]) == t
    # under the cap every example of both sides (the release's min(cap, |T|) and min(cap, |S|))
    _check_hybrid(dm, "toys", t, n_train(dm, "toys"))
    _check_hybrid(dm, "sports", t, n_train(dm, "sports"))


def test_mix_hybrid_cap_smaller_than_target():
    dm = make(sources=["toys"], mix="hybrid", hybrid_cap=50)
    assert n_train(dm, "tools") > 50
    _check_hybrid(dm, "toys", 50, 50)
    # seeded: the same subset again, another subset with another seed
    again = make(sources=["toys"], mix="hybrid", hybrid_cap=50)
    assert again.train_entries["hybrid/toys"] == dm.train_entries["hybrid/toys"]
    other = make(sources=["toys"], mix="hybrid", hybrid_cap=50, seed=1)
    assert other.train_entries["hybrid/toys"] != dm.train_entries["hybrid/toys"]


def test_mix_hybrid_small_source(caplog):
    domains = {**DOMAINS, "tiny": synth(8, 60, kind="grocery")}
    with caplog.at_level(logging.WARNING, logger="recsys.data"):
        dm = make(domains=domains, sources=["tiny"], mix="hybrid")
    t, s = n_train(dm, "tools"), n_train(dm, "tiny")
    assert s < t
    _check_hybrid(dm, "tiny", t, s)  # all of the source, never more
    assert "is not 50/50" in caplog.text


def test_mix_hybrid_sides_are_capped_independently():
    """As released: min(cap, |T|) target and min(cap, |S|) source examples, even when |T| < cap < |S|
    (the source side is not cut to the target's size)."""
    domains = {**DOMAINS, "grocery": synth(12, 60)}
    dm = make(domains=domains, target="grocery", sources=["toys"], mix="hybrid", hybrid_cap=100)
    t, s = n_train(dm, "grocery"), n_train(dm, "toys")
    assert t < 100 < s
    by = Counter(name for name, _ in dm.train_entries["hybrid/toys"])
    assert by == {"grocery": t, "toys": 100}


def test_hybrid_loaders_one_stream_each():
    from recsys.models.backbone import load_backbone

    dm = make(sources=["toys"], mix="hybrid", hybrid_cap=20, batch_size=4, max_eval_users=6)
    dm.attach(load_backbone("tiny:encoder").tokenizer, "encoder")
    loaders = dm.train_dataloader().iterables
    assert set(loaders) == {"target", "hybrid/toys"}
    assert len(loaders["hybrid/toys"]) == 10  # 40 examples / 4
    batch = next(iter(loaders["hybrid/toys"]))
    assert batch["input_ids"].shape[0] == 4 * 5 and batch["labels"].shape == (4,)
    assert len(dm.val_dataloader()) == len(dm.test_dataloader()) == 1  # 6 users, eval batches of 8


def test_every_stream_is_seen_once_an_epoch():
    """Streams of different lengths: each yields each of its batches exactly once an epoch (then None),
    the shorter one is not cycled (Lightning's default max_size_cycle would repeat it)."""
    from recsys.models.backbone import load_backbone

    dm = make(sources=["toys"], mix="hybrid", hybrid_cap=20, batch_size=4, max_eval_users=6)
    dm.attach(load_backbone("tiny:encoder").tokenizer, "encoder")
    combined = dm.train_dataloader()
    lengths = {k: len(v) for k, v in combined.iterables.items()}
    assert lengths["hybrid/toys"] == 10 and lengths["target"] > lengths["hybrid/toys"]
    combined.reset() if hasattr(combined, "reset") else None
    seen = Counter()
    steps = 0
    for batch, _, _ in combined:
        steps += 1
        seen.update(k for k, v in batch.items() if v is not None)
    assert steps == max(lengths.values()) and dict(seen) == lengths


# ------------------------------------------------------------------------------------------ fractions
def _users(entries):
    return {e.user for _, e in entries}


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_target_fraction_keeps_share_of_users(fraction):
    full = make()
    dm = make(target_fraction=fraction)
    kept = _users(dm.train_entries["train"])
    assert len(kept) == round(fraction * 60)
    # all the kept users' examples, nothing else
    assert dm.train_entries["train"] == [x for x in full.train_entries["train"] if x[1].user in kept]
    # evaluation is untouched
    assert np.array_equal(dm.eval_sets["test"].candidates, full.eval_sets["test"].candidates)
    # seeded
    assert _users(make(target_fraction=fraction).train_entries["train"]) == kept
    assert _users(make(target_fraction=fraction, seed=9).train_entries["train"]) != kept


def test_target_fraction_is_nested_in_joint_only_for_target():
    dm = make(sources=["toys"], mix="joint", target_fraction=0.5)
    by = Counter(name for name, _ in dm.train_entries["train"])
    assert by["toys"] == n_train(dm, "toys")  # sources are never cut
    assert by["tools"] < n_train(dm, "tools")


def test_max_eval_users():
    dm = make(max_eval_users=10)
    val, test = dm.eval_sets["val"], dm.eval_sets["test"]
    assert len(val) == len(test) == 10
    users = [e.user for e in test.examples]
    assert users == [e.user for e in val.examples] and len(set(users)) == 10
    assert [e.user for e in make(max_eval_users=10).eval_sets["test"].examples] == users
    assert [e.user for e in make(max_eval_users=10, seed=2).eval_sets["test"].examples] != users
    # a user's candidates do not depend on the subset size
    full = make()
    assert np.array_equal(test.candidates, full.eval_sets["test"].candidates[users])
    assert len(make(max_eval_users=1000).eval_sets["test"]) == 60


def test_max_train_examples():
    dm = make(max_train_examples=25)
    assert len(dm.train_entries["train"]) == 25


def test_cap_scales_with_fraction_for_the_target_only():
    """Data-efficiency under a budget: f of the capped examples, from f of the users; sources keep the cap."""
    for f, n in [(0.25, 6), (0.5, 12), (1.0, 24)]:
        dm = make(max_train_examples=24, cap_scales_with_fraction=True, target_fraction=f)
        assert len(dm.train_entries["train"]) == n
        assert _users(dm.train_entries["train"]) <= _users(make(target_fraction=f).train_entries["train"])
    joint = make(sources=["toys"], mix="joint", max_train_examples=24, cap_scales_with_fraction=True, target_fraction=0.25)
    doms = [d for d, _ in joint.train_entries["train"]]
    assert doms.count("tools") == 6 and doms.count("toys") == 24


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,pattern", [
    ({"target": "garden"}, r"data.target.*garden"),
    ({"sources": ["garden"]}, r"data.sources.*garden"),
    ({"sources": ["tools"]}, r"target.*own source"),
    ({"sources": ["toys", "toys"]}, "repeats"),
    ({"target_fraction": 0.0}, r"target_fraction.*\(0, 1\]"),
    ({"target_fraction": 1.5}, r"target_fraction.*\(0, 1\]"),
    ({"target_fraction": -0.2}, r"target_fraction.*\(0, 1\]"),
    ({"mix": "pooled"}, r"data.mix.*pooled"),
    ({"mix": "joint"}, r"needs data.sources"),
    ({"mix": "hybrid"}, r"needs data.sources"),
    ({"num_negatives": 0}, "num_negatives"),
])
def test_bad_input_fails_at_construction(kwargs, pattern):
    """Errors come from the constructor: before any data is read, let alone any training."""
    kw = {"domains": DOMAINS, "target": "tools", **kwargs}
    with pytest.raises(DataError, match=pattern):
        RecDataModule.from_config(**kw)


def test_the_datamodule_takes_a_few_typed_settings():
    """Issue 23: the DataModule is built from typed settings (at most 8 parameters), none only swallowed."""
    import inspect

    from recsys.data.settings import BatchSettings, CandidateSettings, DomainSettings

    params = list(inspect.signature(RecDataModule.__init__).parameters)[1:]
    assert len(params) <= 8 and params == ["domains", "candidates", "batching", "prompt", "paper"]
    dm = RecDataModule.from_config(domains=DOMAINS, target="tools", batch_size=4, candidate_sampling="popularity",
                                   prompt={"max_length": 64}, root=None, collection="synthetic", year=2014)
    assert isinstance(dm.domain_settings, DomainSettings) and dm.batching == BatchSettings(batch_size=4)
    assert dm.candidate_settings == CandidateSettings(candidate_sampling="popularity")
    assert dm.template.max_length == 64


def test_unknown_domain_lists_known_ones():
    with pytest.raises(DataError) as e:
        RecDataModule.from_config(domains=DOMAINS, target="garden")
    assert all(n in str(e.value) for n in DOMAINS)


def test_loaders_need_a_tokenizer():
    dm = make()
    with pytest.raises(RuntimeError, match="attach"):
        dm.val_dataloader()


# ------------------------------------------------------------------------------------------ sharding
def _shards(monkeypatch, sampler_kwargs, world=2):
    out = []
    for rank in range(world):
        monkeypatch.setattr(dmod, "_dist", lambda rank=rank: (rank, world))
        s = EpochBatchSampler(**sampler_kwargs)
        out.append([[i for i, _ in b] for b in s])
        assert len(s) == len(out[-1])
    return out


@pytest.mark.parametrize("n", [11, 12, 1, 7])
def test_train_shards_equal_length_cover_all(monkeypatch, n):
    shards = _shards(monkeypatch, {"n": n, "batch_size": 3, "shuffle": True, "seed": 4, "pad": True})
    assert len(shards[0]) == len(shards[1])  # same number of batches on every rank (no DDP hang)
    flat = [[i for b in s for i in b] for s in shards]
    assert len(flat[0]) == len(flat[1])
    assert set(flat[0]) | set(flat[1]) == set(range(n))
    assert len(flat[0]) + len(flat[1]) - n <= 1  # at most one padded repeat


@pytest.mark.parametrize("n", [11, 12, 1])
def test_eval_shards_disjoint_exactly_once(monkeypatch, n):
    shards = _shards(monkeypatch, {"n": n, "batch_size": 4, "shuffle": False, "seed": 0, "pad": False})
    flat = [i for s in shards for b in s for i in b]
    assert sorted(flat) == list(range(n))  # every example once, none twice


def test_train_shards_follow_epoch(monkeypatch):
    monkeypatch.setattr(dmod, "_dist", lambda: (0, 2))
    s = EpochBatchSampler(20, 4, shuffle=True, seed=1, pad=True)
    e0 = list(s)
    s.sampler.set_epoch(1)  # Lightning's hook
    e1 = list(s)
    assert {k[1] for b in e0 for k in b} == {0} and {k[1] for b in e1 for k in b} == {1}
    assert [[i for i, _ in b] for b in e0] != [[i for i, _ in b] for b in e1]


def test_batch_size_is_global(monkeypatch):
    """``data.batch_size`` is the global batch: at every step, the examples of the W ranks together are
    the examples of that step in a 1-process run (same steps, same optimisation); W must divide it."""
    from recsys.models.backbone import load_backbone

    dm = make(batch_size=8, max_eval_users=4)
    dm.attach(load_backbone("tiny:encoder").tokenizer, "encoder")

    def steps(world):
        per_rank = []
        for rank in range(world):
            monkeypatch.setattr(dmod, "_dist", lambda rank=rank: (rank, world))
            per_rank.append([[i for i, _ in b] for b in dm.train_dataloader().batch_sampler])
        assert all(len(b) == 8 // world for r in per_rank for b in r[:-1])
        return [sorted(i for r in per_rank for i in r[k]) for k in range(len(per_rank[0]))]

    one, two, four = steps(1), steps(2), steps(4)
    n = len(dm.train_entries["train"])
    assert len(one) == len(two) == len(four) == -(-n // 8)  # the same number of optimizer steps
    assert one[:-1] == two[:-1] == four[:-1]  # the same examples at every full step
    monkeypatch.setattr(dmod, "_dist", lambda: (0, 3))
    with pytest.raises(DataError, match="global training batch.*3 processes"):
        dm.train_dataloader()


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_bucketing_reduces_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=300).tolist()
    plain = EpochBatchSampler(300, 8, shuffle=True, seed=0, pad=True)
    bucketed = EpochBatchSampler(300, 8, shuffle=True, seed=0, pad=True, lengths=lengths, bucket_window=10)
    pb = [[i for i, _ in b] for b in plain]
    bb = [[i for i, _ in b] for b in bucketed]
    assert sorted(i for b in bb for i in b) == list(range(300))  # still every example once
    assert _padding(bb, lengths) < 0.3 * _padding(pb, lengths)
    # batch order is shuffled: not sorted by length across the epoch
    firsts = [lengths[b[0]] for b in bb]
    assert firsts != sorted(firsts)


def test_datamodule_bucketing_on():
    from recsys.models.backbone import load_backbone

    dm = make(bucket_by_length=True, batch_size=8, max_eval_users=4)
    dm.attach(load_backbone("tiny:encoder").tokenizer, "encoder")
    loader = dm.train_dataloader()
    assert loader.batch_sampler.lengths is not None
    assert sum(len(b) for b in loader.batch_sampler) == len(dm.train_entries["train"])


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not (SHARED_AMAZON / "beauty").is_dir(), reason=f"{SHARED_AMAZON}/beauty is absent")
def test_shared_amazon_beauty():
    manifest = json.loads((SHARED_AMAZON / "beauty" / "manifest.json").read_text())
    t0 = time.time()
    dm = RecDataModule.from_config(domains={"beauty": {"source": "plain", "path": str(SHARED_AMAZON / "beauty")}}, target="beauty")
    dm.setup("fit")
    took = time.time() - t0
    d = dm.domains["beauty"]
    assert (d.num_users, d.num_items, d.num_interactions) == (22363, 12101, 198502)
    assert (manifest["users"], manifest["items"], manifest["interactions"]) == (22363, 12101, 198502)
    # every user has >= 5 items: one val and one test example each; train = interactions - 3 per user
    assert len(dm.eval_sets["val"]) == len(dm.eval_sets["test"]) == 22363
    assert len(dm.train_entries["train"]) == 198502 - 3 * 22363 == 131413
    assert d.stats.get("dropped_short_users", 0) == 0
    assert dm.eval_sets["test"].candidates.shape == (22363, 20)
    ref = dm.reference_metrics("test")
    assert ref["random"]["hr@1"] == pytest.approx(0.05, abs=0.01)
    assert ref["popularity"]["hr@1"] > ref["random"]["hr@1"]
    assert took < 60, took


def test_train_on_val_holds_out_a_selection_split():
    """data.train_on_val (the release trains on validation examples): every validation example trains
    except those of a seeded 2% of the users, which alone select the model; test is unchanged."""
    base = make()
    dm = make(train_on_val=True)
    d = dm.domains["tools"]
    sel = dm.selection_users
    assert len(sel) == max(1, round(0.02 * d.num_users)) and sel == make(train_on_val=True).selection_users
    assert {e.user for e in dm.eval_sets["val"].examples} == sel
    val = {e for e in d.examples("val", dm.max_history)}
    trained = {e for _, e in dm.train_entries["train"]}
    assert trained - {e for _, e in base.train_entries["train"]} == {e for e in val if e.user not in sel}
    assert not trained & {e for e in val if e.user in sel}
    assert dm.eval_sets["test"].examples == base.eval_sets["test"].examples
    with pytest.raises(DataError, match="selection_share"):
        make(train_on_val=True, selection_share=0.0)


# ------------------------------------------------------------------------------------------ a folder of domains
def test_domains_found_under_root(tmp_path, monkeypatch):
    """data=amazon with data.root=<folder>: every sub-folder with items.jsonl and sequences.jsonl is a
    domain; the root comes from RECSYS_DATA when set; a missing target lists the domains found."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    for name, seed in (("garden", 0), ("kitchen", 1)):
        write_plain(tmp_path / name, 30, 40, seed)
    (tmp_path / "notes").mkdir()  # not a domain: no plain files
    (tmp_path / "notes" / "items.jsonl").write_text("")
    monkeypatch.setenv("RECSYS_DATA", str(tmp_path))
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["data=amazon", "data.target=kitchen", "paths.output_dir=/tmp/x"])
    assert cfg.data.root == str(tmp_path)
    dm = RecDataModule.from_config(OmegaConf.to_container(cfg.data, resolve=True))
    assert sorted(dm.domain_specs) == ["garden", "kitchen"]
    dm.setup("fit")
    assert dm.domains["kitchen"].num_users == 30
    with pytest.raises(DataError, match=r"unknown domain 'beauty'.*\['garden', 'kitchen'\].*found under data.root="):
        RecDataModule.from_config(domains={}, target="beauty", root=str(tmp_path))
    # a spec in the config replaces the one found
    dm = RecDataModule.from_config(domains={"garden": {"source": "plain", "path": str(tmp_path / "kitchen")}}, target="garden", root=str(tmp_path))
    assert dm.domain_specs["garden"]["path"] == str(tmp_path / "kitchen")
    monkeypatch.delenv("RECSYS_DATA")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["data=amazon", "paths.output_dir=/tmp/x"])
    assert cfg.data.root == "../shared/data/amazon"
