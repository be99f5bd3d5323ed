"""Synthetic domains: determinism, sizes and knobs, titles, shared vocabulary, learnability.

The learnability figures use small local helpers (candidates, pessimistic ranks), not the
project's candidate sampler and metrics, so this file tests the data generator alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys.data.domain import DataError, Domain
from recsys.data.synthetic import DOMAINS, THEMES, TIERS, make_domain

NUM_NEGATIVES = 19
CHANCE_HR1 = 1 / (NUM_NEGATIVES + 1)


def _digest(d: Domain) -> str:
    blob = json.dumps([d.name, d.item_ids, d.titles, d.user_ids, d.sequences, d.stats])
    return hashlib.sha256(blob.encode()).hexdigest()


def _words(title: str) -> set[str]:
    return set(re.findall(r"[a-z0-9+]+", title.lower()))


def _test_ranks(d: Domain, score, seed: int = 0) -> np.ndarray:
    """Pessimistic 0-based rank of each test target among itself + 19 random negatives.

    Negatives are drawn uniformly from items the user never had; ``score(example, items)``
    returns one float per candidate; a negative scoring equal to the target ranks above it.
    """
    rng = np.random.default_rng(seed)
    ranks = []
    for ex in d.examples("test"):
        pool = np.setdiff1d(np.arange(d.num_items), d.sequences[ex.user])
        cands = np.concatenate([[ex.target], rng.choice(pool, NUM_NEGATIVES, replace=False)])
        s = np.asarray(score(ex, cands), dtype=float)
        ranks.append(int((s[1:] >= s[0]).sum()))
    return np.array(ranks)


def _overlap_scorer(d: Domain, decay: float = 1.0, vocab: set[str] | None = None):
    """Score = sum over the candidate's words of how many history titles contain the word
    (each history title weighted decay**age, newest age 0), optionally only words in ``vocab``."""
    words = [_words(t) if vocab is None else _words(t) & vocab for t in d.titles]

    def score(ex, cands):
        weight: dict[str, float] = {}
        for age, i in enumerate(reversed(ex.history)):
            for w in words[i]:
                weight[w] = weight.get(w, 0.0) + decay**age
        return [sum(weight.get(w, 0.0) for w in words[c]) for c in cands]

    return score


def _popularity_scorer(d: Domain):
    counts = np.asarray(d.train_item_counts(), dtype=float)
    return lambda ex, cands: counts[cands]


def _hr(ranks: np.ndarray, k: int) -> float:
    return float((ranks < k).mean())


@pytest.fixture(scope="module")
def domains() -> dict[str, Domain]:
    return {name: make_domain(name) for name in DOMAINS}


@pytest.fixture(scope="module")
def figures(domains) -> dict[str, dict[str, float]]:
    """Per domain: HR@1/HR@5 of the word-overlap ranker, its recency-weighted form, popularity."""
    out = {}
    for name, d in domains.items():
        plain = _test_ranks(d, _overlap_scorer(d))
        recent = _test_ranks(d, _overlap_scorer(d, decay=0.8))
        pop = _test_ranks(d, _popularity_scorer(d))
        out[name] = {
            "overlap_hr1": _hr(plain, 1),
            "overlap_hr5": _hr(plain, 5),
            "recency_hr1": _hr(recent, 1),
            "pop_hr1": _hr(pop, 1),
            "pop_hr5": _hr(pop, 5),
        }
    return out


def test_known_domains():
    assert {"toys", "tools", "sports", "electronics", "beauty"} <= set(DOMAINS)
    assert len(set(DOMAINS)) == len(DOMAINS)


def test_deterministic_within_and_across_processes():
    d = make_domain("toys")
    assert _digest(d) == _digest(make_domain("toys"))
    # another interpreter with another str-hash salt builds the very same domain
    code = (
        "import hashlib, json, sys; sys.path.insert(0, sys.argv[1]);"
        "from recsys.data.synthetic import make_domain; d = make_domain('toys');"
        "blob = json.dumps([d.name, d.item_ids, d.titles, d.user_ids, d.sequences, d.stats]);"
        "print(hashlib.sha256(blob.encode()).hexdigest())"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, root], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == _digest(d)


def test_seeds_and_domains_differ():
    base = make_domain("toys", seed=0)
    other_seed = make_domain("toys", seed=1)
    assert base.titles != other_seed.titles
    assert base.sequences != other_seed.sequences
    other_domain = make_domain("tools", seed=0)
    assert not set(base.titles) & set(other_domain.titles)
    assert base.sequences != other_domain.sequences


def test_catalogue_does_not_depend_on_users_or_sequence_knobs():
    base = make_domain("sports")
    assert make_domain("sports", num_users=50).titles == base.titles
    assert make_domain("sports", consistency=0.5, drift=0.3).titles == base.titles


def test_sizes_ids_and_stats():
    d = make_domain("beauty", num_users=37, num_items=120, seed=3, min_len=3, max_len=4)
    assert (d.num_users, d.num_items) == (37, 120)
    assert d.user_ids[0] == "u0001" and d.user_ids[-1] == "u0037"
    assert d.item_ids[0] == "i0001" and d.item_ids[-1] == "i0120"
    assert all(3 <= len(s) <= 4 for s in d.sequences)
    assert {len(s) for s in d.sequences} == {3, 4}
    assert d.stats["seed"] == 3 and d.stats["min_len"] == 3 and d.stats["max_len"] == 4
    assert d.summary()["users"] == 37
    big = make_domain("toys", num_users=10000)
    assert big.user_ids[0] == "u00001" and big.num_users == 10000


def test_knobs_are_honoured():
    assert all(t.count(",") == 1 for t in make_domain("tools", spec_share=0.0).titles)
    assert all(t.count(",") == 2 for t in make_domain("tools", spec_share=1.0).titles)
    base = make_domain("tools")
    assert 0.7 <= base.stats["preference_match_share"] <= 0.9
    noisy = make_domain("tools", consistency=0.0)
    assert noisy.stats["preference_match_share"] < base.stats["preference_match_share"] - 0.3
    assert make_domain("tools", line_size=4).stats["num_lines"] == 75
    for key in ("consistency", "stay", "drift", "popularity_skew", "preference_strength"):
        assert key in base.stats


def test_every_user_has_a_triple_and_no_repeats(domains):
    for d in domains.values():
        assert all(len(s) >= 3 and len(set(s)) == len(s) for s in d.sequences)
        assert len(d.examples("test")) == len(d.examples("val")) == d.num_users
        assert all(0 <= i < d.num_items for s in d.sequences for i in s)


def test_titles_unique_short_and_amazon_like(domains):
    pattern = re.compile(rf"^\w+ ({'|'.join(TIERS)}) ({'|'.join(THEMES)}) [^,]+, [^,]+(, [^,]+)?$")
    for d in domains.values():
        assert len(set(d.titles)) == d.num_items
        lengths = [len(t.split()) for t in d.titles]
        assert 4 <= min(lengths) and max(lengths) <= 8 and 5.5 <= np.mean(lengths) <= 7.5
        assert not [t for t in d.titles if not pattern.match(t)]


def test_vocabulary_shared_across_domains(domains):
    vocab = {n: set().union(*(_words(t) for t in d.titles)) for n, d in domains.items()}
    shared_style = {w.lower() for w in TIERS + THEMES}
    for name, words in vocab.items():
        assert shared_style <= words
        brands = {t.split()[0].lower() for t in domains[name].titles}
        others = set().union(*(v for n, v in vocab.items() if n != name))
        assert brands & others, f"{name} shares no brand"
        assert words - others, f"{name} has no domain-specific words"
    assert {"blue", "black"} <= vocab["toys"] & vocab["tools"] & vocab["beauty"]


def test_popularity_is_skewed(domains):
    for d in domains.values():
        counts = np.sort(d.train_item_counts())[::-1]
        top = counts[: d.num_items // 10].sum() / counts.sum()
        assert top >= 0.25  # uniform popularity would give ~0.10
        assert counts[0] >= 5 * max(1.0, float(np.median(counts)))


def test_word_overlap_ranker_beats_popularity_and_chance(figures):
    for name, f in figures.items():
        assert f["overlap_hr1"] >= 0.3, (name, f)  # chance is 0.05
        assert f["overlap_hr1"] >= 2 * f["pop_hr1"], (name, f)
        assert f["overlap_hr5"] >= 0.55, (name, f)  # chance is 0.25
        assert f["pop_hr1"] >= 1.5 * CHANCE_HR1, (name, f)  # popularity is informative, too


def test_same_signal_in_every_domain(figures):
    hr1 = [f["overlap_hr1"] for f in figures.values()]
    assert max(hr1) - min(hr1) <= 0.15
    # order matters: weighting recent history titles more helps, on average over domains
    assert np.mean([f["recency_hr1"] for f in figures.values()]) >= np.mean(hr1) + 0.03


def test_words_shared_across_domains_alone_carry_the_signal(domains):
    vocab = {n: set().union(*(_words(t) for t in d.titles)) for n, d in domains.items()}
    shared = {w for w in set().union(*vocab.values()) if sum(w in v for v in vocab.values()) >= 2}
    for name, d in domains.items():
        hr1 = _hr(_test_ranks(d, _overlap_scorer(d, vocab=shared)), 1)
        assert hr1 >= 4 * CHANCE_HR1, (name, hr1)


def test_bad_arguments_raise_data_error():
    with pytest.raises(DataError, match="known: toys, tools, sports, electronics, beauty"):
        make_domain("garden")
    with pytest.raises(DataError, match="min_len"):
        make_domain("toys", min_len=2)
    with pytest.raises(DataError, match="max_len"):
        make_domain("toys", num_items=10)
    with pytest.raises(DataError, match="consistency"):
        make_domain("toys", consistency=1.5)
