"""Progress on the long steps outside Lightning's loops (recsys/core/progress.py): raw-dump parsing (lines
read), k-core filtering (rounds, users left) and AdaMerging (steps)."""

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

import recsys.core.progress as progress

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "raw" / "2014"


@pytest.fixture
def shown(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "CONSOLE", Console(file=out, force_terminal=True, width=160, color_system=None))
    return out


def test_raw_dump_parsing_shows_lines_read(shown):
    from recsys.data.readers import _read_reviews, _read_titles

    reviews = _read_reviews(FIXTURES / "reviews_Beauty_5.json.gz", 2014)
    _read_titles(FIXTURES / "meta_Beauty.json", 2014, {i for _, i, _ in reviews})
    text = shown.getvalue()
    assert "reading reviews reviews_Beauty_5.json.gz (lines)" in text and f"{len(reviews)}" in text
    assert "reading titles meta_Beauty.json (lines)" in text


def test_k_core_shows_rounds(shown):
    from recsys.data.preprocess import _k_core

    # u3 has 2 items: dropped in round 1; then item c has 1 user left: dropped in round 2, and so on
    users = {"u1": ["a", "b", "c"], "u2": ["a", "b", "d"], "u3": ["c", "d"], "u4": ["a", "b", "e"]}
    kept, rounds = _k_core(users, 3)
    text = shown.getvalue()
    assert rounds >= 2 and f"round {rounds}: {len(kept):,} users left" in text
    assert "k-core filtering (k=3, rounds)" in text


def test_adamerging_shows_steps(shown):
    from test_merging import _scorer, with_adapters

    from recsys.models.merging import learn_merge_weights

    model = with_adapters("tiny:encoder")
    batches = [torch.randint(1000, 2000, (4, 6), generator=torch.Generator().manual_seed(5))]
    learn_merge_weights(model, ["t0", "h1"], _scorer(model), batches, steps=4, lr=0.05)
    assert "AdaMerging: learning the merge weights (steps)" in shown.getvalue() and "4/4" in shown.getvalue()
