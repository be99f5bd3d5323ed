"""Candidate lists: fixed evaluation candidates (deterministic across calls and processes, never a
user's own item, shuffled, right size) and training negatives (fresh per epoch, deterministic per
(seed, epoch, index), the same whatever the number of DataLoader workers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.candidates import NegativeSampler, eval_candidates, stable_seed
from recsys.data.datamodule import RecDataModule, TrainDataset
from recsys.data.domain import DataError, Domain
from recsys.data.synthetic import make_domain

REPO = Path(__file__).resolve().parents[1]


def toy_domain(num_items: int = 60, num_users: int = 30, seed: int = 0, name: str = "toy") -> Domain:
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(num_items, size=int(rng.integers(3, 9)), replace=False).tolist() for _ in range(num_users)]
    return Domain(
        name=name, item_ids=[f"i{j}" for j in range(num_items)], titles=[f"item {j}" for j in range(num_items)],
        user_ids=[f"u{u}" for u in range(num_users)], sequences=seqs,
    )


@pytest.fixture(scope="module")
def synth():
    return make_domain("tools", num_users=200, num_items=150, seed=0)


def test_same_lists_across_calls(synth):
    for split in ("val", "test"):
        exs = synth.examples(split)
        a = eval_candidates(synth, exs, split, 19, seed=3)
        b = eval_candidates(synth, exs, split, 19, seed=3)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # they depend on the split and the seed
    exs = synth.examples("test")
    assert not np.array_equal(eval_candidates(synth, exs, "test", 19, 0)[0], eval_candidates(synth, exs, "test", 19, 1)[0])
    v = eval_candidates(synth, synth.examples("val"), "val", 19, 0)[0]
    assert not np.array_equal(v, eval_candidates(synth, exs, "test", 19, 0)[0])


def test_lists_do_not_depend_on_which_users_are_evaluated(synth):
    """A user's list depends on (domain, user, split, seed) only, not on the other users in the call."""
    exs = synth.examples("test")
    full, tf = eval_candidates(synth, exs, "test", 19, 0)
    part, tp = eval_candidates(synth, exs[5:9], "test", 19, 0)
    assert np.array_equal(full[5:9], part) and np.array_equal(tf[5:9], tp)


_CHILD = """
import json, sys
from recsys.data.synthetic import make_domain
from recsys.data.candidates import eval_candidates
d = make_domain("tools", num_users=200, num_items=150, seed=0)
c, t = eval_candidates(d, d.examples("test"), "test", 19, seed=3)
json.dump({"c": c.tolist(), "t": t.tolist()}, sys.stdout)
"""


def test_same_lists_in_another_process(synth):
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    c, t = eval_candidates(synth, synth.examples("test"), "test", 19, seed=3)
    assert got["c"] == c.tolist() and got["t"] == t.tolist()


def test_stable_seed_is_not_python_hash():
    assert stable_seed("a", 1, "test") == stable_seed("a", 1, "test")
    assert stable_seed("a", 1, "test") != stable_seed("a", 1, "val")
    assert isinstance(stable_seed("x"), int)


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_never_a_user_item_and_right_size(synth, sampling):
    for split in ("val", "test"):
        exs = synth.examples(split)
        cands, target = eval_candidates(synth, exs, split, 19, seed=0, sampling=sampling)
        assert cands.shape == (len(exs), 20) and target.shape == (len(exs),)
        for n, ex in enumerate(exs):
            row = cands[n].tolist()
            assert len(set(row)) == 20, "duplicate candidates"
            assert row[target[n]] == ex.target
            negatives = set(row) - {ex.target}
            assert len(negatives) == 19
            # neither the history, nor the target, nor any other item of the user's sequence
            assert not negatives & set(synth.sequences[ex.user])
            assert all(0 <= i < synth.num_items for i in row)


def test_num_negatives_sets_the_size():
    d = toy_domain()
    cands, _ = eval_candidates(d, d.examples("test"), "test", num_negatives=7)
    assert cands.shape[1] == 8


def test_target_position_is_shuffled(synth):
    exs = synth.examples("test")
    _, target = eval_candidates(synth, exs, "test", 19, seed=0)
    counts = np.bincount(target, minlength=20)
    assert (target != 0).any()
    assert (counts > 0).sum() >= 15  # 200 users over 20 positions: nearly every position is used
    assert counts.max() <= 30  # ~10 expected per position


def test_popularity_sampling_favours_popular_items(synth):
    counts = np.asarray(synth.train_item_counts())
    exs = synth.examples("test")
    mean = {}
    for sampling in ("uniform", "popularity"):
        cands, target = eval_candidates(synth, exs, "test", 19, seed=0, sampling=sampling)
        negs = np.array([np.delete(cands[n], target[n]) for n in range(len(exs))])
        mean[sampling] = counts[negs].mean()
    assert mean["popularity"] > 1.5 * mean["uniform"], mean


def test_catalogue_too_small():
    d = toy_domain(num_items=12, num_users=5)
    with pytest.raises(DataError, match="num_negatives"):
        eval_candidates(d, d.examples("test"), "test", num_negatives=19)


def test_unknown_sampling():
    with pytest.raises(DataError, match="candidate_sampling"):
        NegativeSampler(toy_domain(), "zipf")


def test_sampler_never_loops_when_exactly_enough_items():
    # a user with 8 of 12 items leaves exactly 4 negatives: all of them must come out
    d = Domain("t", [str(i) for i in range(12)], [f"t{i}" for i in range(12)], ["u"], [list(range(8))])
    for sampling in ("uniform", "popularity"):
        s = NegativeSampler(d, sampling)
        got = s.sample(0, 4, np.random.default_rng(0))
        assert sorted(got) == [8, 9, 10, 11]


# ------------------------------------------------------------------------------------ training negatives
def test_training_negatives_fresh_per_epoch_and_deterministic(synth):
    entries = [("tools", e) for e in synth.examples("train")]
    samplers = {"tools": NegativeSampler(synth)}
    a = TrainDataset(entries, samplers, num_negatives=4, seed=7)
    b = TrainDataset(entries, samplers, num_negatives=4, seed=7)
    other_seed = TrainDataset(entries, samplers, num_negatives=4, seed=8)
    differ_epoch = differ_seed = 0
    for i in range(0, len(entries), 37):
        dom, hist, cands, pos = a[(i, 0)]
        ex = entries[i][1]
        assert dom == "tools" and hist == ex.history and len(cands) == 5 and cands[pos] == ex.target
        assert not (set(cands) - {ex.target}) & set(synth.sequences[ex.user])
        assert a[(i, 0)] == b[(i, 0)] and a[(i, 3)] == b[(i, 3)]  # deterministic per (seed, epoch, index)
        differ_epoch += a[(i, 0)][2] != a[(i, 1)][2]
        differ_seed += a[(i, 0)][2] != other_seed[(i, 0)][2]
    n = len(range(0, len(entries), 37))
    assert differ_epoch >= n - 1 and differ_seed >= n - 1
    assert a[5] == a[(5, 0)]  # a plain index is epoch 0


@pytest.fixture(scope="module")
def tokenizer():
    from recsys.models.backbone import load_backbone

    return load_backbone("tiny:encoder").tokenizer


def _dm(tokenizer, num_workers: int) -> RecDataModule:
    dm = RecDataModule.from_config(
        domains={"tools": {"source": "synthetic", "num_users": 60, "num_items": 80}}, target="tools",
        batch_size=8, max_eval_users=10, num_workers=num_workers, seed=5,
        prompt={"max_length": 96},
    )
    dm.attach(tokenizer, "encoder")
    dm.setup("fit")
    return dm


def _epoch_batches(loader, epoch: int, n: int = 6) -> list[dict]:
    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, epoch)  # exactly what Lightning's fit loop calls each epoch
    out = []
    for j, b in enumerate(loader):
        out.append(b)
        if j + 1 == n:
            break
    return out


def test_training_batches_independent_of_num_workers_and_fresh_per_epoch(tokenizer):
    l0 = _dm(tokenizer, 0).train_dataloader()
    l2 = _dm(tokenizer, 2).train_dataloader()
    assert len(l0) == len(l2)
    e0 = _epoch_batches(l0, 0)
    assert len(e0) == 6
    for epoch in (0, 1):
        for b0, b2 in zip(_epoch_batches(l0, epoch), _epoch_batches(l2, epoch)):
            assert b0.keys() == b2.keys()
            for k in b0:
                assert (torch.equal(b0[k], b2[k]) if torch.is_tensor(b0[k]) else b0[k] == b2[k]), k
    e1 = _epoch_batches(l0, 1)
    assert not torch.equal(e0[0]["input_ids"], e1[0]["input_ids"]), "epoch 1 replays epoch 0"
    # the same epoch again gives the same batches
    again = _epoch_batches(l0, 0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(e0, again))
