"""Seeded synthetic Amazon-like domains: the project's embedded default data.

A domain is a catalogue of short Amazon-style titles, "<Brand> <Tier> <Theme> <Type>, <Colour>[,
<Spec>]" (e.g. "Apex Pro Outdoor Cordless Drill, Blue, 18V", 5-8 words), grouped in product lines:
one line is one (brand, tier, theme), e.g. "Apex Pro Outdoor", with about ``line_size`` items of
different types, colours and specs. Tier, theme and colour words and a pool of brands are shared by
several domains; product types, spec words and the other brands are domain-specific (grocery has
flavours in the colour slot).

Users have latent preferences on the shared dimensions: a favourite brand (sometimes two), a tier
and a theme. Each step either continues the user's current product line, or picks an item by
popularity times a bonus for each of brand/tier/theme its line matches, or (rarely) picks by
popularity alone; preferences drift now and then. Item popularity is Zipf-like. So from titles
alone a model can learn "a candidate whose brand/tier/theme words recur in the (recent) history is
the next item", a rule that carries over to another domain because the words and the latent
dimensions are the same. Colour, type and spec words carry no preference: they are noise.

Everything is a pure function of the arguments: the random state is numpy's ``default_rng`` seeded
with ``zlib.crc32(name)``, a stream name and ``seed`` (never Python's salted ``hash``), and the
catalogue does not depend on ``num_users`` or the sequence knobs. ``tests/test_synthetic.py``
measures the learnability (a word-overlap ranker against popularity and chance).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from recsys.data.domain import DataError, Domain

TIERS = ("Basic", "Plus", "Pro", "Elite")
THEMES = ("Kids", "Outdoor", "Eco", "Travel", "Compact", "Retro", "Deluxe", "Classic")
COLOURS = ("Black", "White", "Blue", "Red", "Green", "Pink", "Grey", "Silver")
SHARED_BRANDS = (
    "Apex", "Nova", "Atlas", "Orion", "Summit", "Falcon", "Harbor", "Vista", "Echo", "Horizon",
    "Beacon", "Crown",
)  # fmt: skip


@dataclass(frozen=True)
class _Spec:
    """The vocabulary of one domain: brands, product types, spec words and colours."""

    brands: tuple[str, ...]
    types: tuple[str, ...]
    specs: tuple[str, ...]
    colours: tuple[str, ...] = COLOURS


# Each domain's own 8 brands, 16 product types and 5 specs; _shared() adds 6 shared brands.
# fmt: off
_SPECS: dict[str, _Spec] = {
    "toys": _Spec(
        ("Jolly", "Sunny", "Wonder", "Giggle", "Bloom", "Rocket", "Bubble", "Magic"),
        ("Building Blocks", "Puzzle", "Doll House", "Race Car", "Plush Bear", "Board Game",
         "Robot Kit", "Train Set", "Art Set", "Water Blaster", "Kite", "Card Game", "Play Tent",
         "Action Figure", "Toy Drone", "Marble Run"),
        ("100 Pieces", "Ages 3+", "Ages 8+", "4-Piece", "500 Pieces"),
    ),
    "tools": _Spec(
        ("Titan", "Forge", "Bolt", "Granite", "Ranger", "Hawk", "Iron", "Steel"),
        ("Cordless Drill", "Hammer", "Wrench Set", "Screwdriver Set", "Tape Measure",
         "Circular Saw", "Tool Box", "Utility Knife", "Laser Level", "Pliers", "Socket Set",
         "Work Light", "Stud Finder", "Orbital Sander", "Bar Clamp", "Jigsaw"),
        ("18V", "20V", "12-Piece", "16 oz", "25 ft"),
    ),
    "sports": _Spec(
        ("Stride", "Peak", "Alpine", "Pulse", "Trail", "Arrow", "Surge", "Glacier"),
        ("Yoga Mat", "Water Bottle", "Running Shorts", "Dumbbell Set", "Tennis Racket",
         "Bike Helmet", "Gym Bag", "Jump Rope", "Soccer Ball", "Camping Tent", "Hiking Backpack",
         "Resistance Bands", "Swim Goggles", "Knee Sleeve", "Foam Roller", "Headlamp"),
        ("32 oz", "Size M", "Size L", "10 lb", "2-Person"),
    ),
    "electronics": _Spec(
        ("Pixel", "Sonic", "Nexus", "Zenith", "Fusion", "Quantum", "Matrix", "Vector"),
        ("Bluetooth Speaker", "Wireless Earbuds", "USB-C Charger", "Power Bank", "Smart Watch",
         "HDMI Cable", "Webcam", "Keyboard", "Wireless Mouse", "Phone Case", "Tablet Stand",
         "Headphones", "Action Camera", "Car Charger", "Smart Plug", "Desk Lamp"),
        ("64GB", "10000mAh", "6 ft", "4K", "65W"),
    ),
    "beauty": _Spec(
        ("Glow", "Silk", "Velvet", "Aura", "Bella", "Rosa", "Luna", "Pearl"),
        ("Face Serum", "Lipstick", "Shampoo", "Conditioner", "Moisturizer", "Nail Polish",
         "Eye Palette", "Body Lotion", "Hair Dryer", "Brush Set", "Face Mask", "Sunscreen",
         "Perfume", "Hand Cream", "Lip Balm", "Dry Shampoo"),
        ("30 ml", "8 oz", "SPF 50", "3-Pack", "Travel Size"),
    ),
    "clothing": _Spec(
        ("Denim", "Cotton", "Urban", "Thread", "Heritage", "Canvas", "Tailor", "Liberty"),
        ("T-Shirt", "Hoodie", "Jeans", "Rain Jacket", "Sneakers", "Socks", "Baseball Cap", "Dress",
         "Leggings", "Polo Shirt", "Beanie", "Sweater", "Cargo Shorts", "Scarf", "Sandals",
         "Fleece Vest"),
        ("Size S", "Size M", "Size L", "3-Pack", "Slim Fit"),
    ),
    "grocery": _Spec(
        ("Harvest", "Orchard", "Meadow", "Farmhouse", "Golden", "Prairie", "Garden", "Valley"),
        ("Granola", "Coffee Beans", "Protein Bar", "Trail Mix", "Olive Oil", "Pasta",
         "Peanut Butter", "Oatmeal", "Sparkling Water", "Dark Chocolate", "Rice Crackers",
         "Tomato Sauce", "Almonds", "Herbal Tea", "Maple Syrup", "Energy Drink"),
        ("12 oz", "6-Pack", "16 oz", "Family Size", "Gluten Free"),
        # flavours in the colour slot: the one shared dimension grocery does not share
        ("Original", "Vanilla", "Chocolate", "Lemon", "Mint", "Berry", "Cinnamon", "Caramel"),
    ),
}
# fmt: on


def _shared(k: int) -> tuple[str, ...]:
    """Domain k takes 6 of the 12 shared brands, rotating by 2: neighbours share 4 brands."""
    return tuple(SHARED_BRANDS[(2 * k + j) % len(SHARED_BRANDS)] for j in range(6))


_SPECS = {
    name: _Spec(_shared(k) + spec.brands, spec.types, spec.specs, spec.colours)
    for k, (name, spec) in enumerate(_SPECS.items())
}

#: The known synthetic domains: X-Cross's Amazon family first, then two of WeaveRec's.
DOMAINS: tuple[str, ...] = tuple(_SPECS)

# Logit bonus of a product line matching the user's favourite brand / tier / theme (times
# preference_strength), and of the user's current line on a "stay" step (large: stay if possible).
_MATCH_WEIGHTS = {"brand": 4.5, "tier": 2.0, "theme": 3.0}
_STAY_BONUS = 30.0
_BRAND_SKEW = 0.5  # Zipf exponent of brand popularity (how many lines a brand has)
_SECOND_BRAND = 0.3  # share of users with a second favourite brand


def _rng(name: str, seed: int, stream: str) -> np.random.Generator:
    """A generator that depends only on (name, seed, stream), the same in every process."""
    key = [zlib.crc32(name.encode()), zlib.crc32(stream.encode()), int(seed) & 0xFFFFFFFF]
    return np.random.default_rng(key)


def _zipf(n: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights 1/rank**skew over n things, in a random order; shape (n,), sums to 1."""
    w = 1.0 / np.arange(1, n + 1) ** skew
    w = w[rng.permutation(n)]
    return w / w.sum()


@dataclass(frozen=True)
class _Catalogue:
    titles: list[str]
    line: np.ndarray  # (num_items,) product line of each item
    line_brand: np.ndarray  # (num_lines,) index into spec.brands
    line_tier: np.ndarray  # (num_lines,) index into TIERS
    line_theme: np.ndarray  # (num_lines,) index into THEMES
    brand_pop: np.ndarray  # (num_brands,)


def _catalogue(
    name: str, spec: _Spec, num_items: int, seed: int, line_size: int, spec_share: float
) -> _Catalogue:
    """Unique titles "<Brand> <Tier> <Theme> <Type>, <Colour>[, <Spec>]" in product lines.

    A product line is one (brand, tier, theme) -- "Apex Pro Outdoor" -- with about ``line_size``
    items of different types, colours and specs. Lines are distinct while the vocabulary allows.
    """
    rng = _rng(name, seed, "catalogue")
    n_brands, n_types, n_colours = len(spec.brands), len(spec.types), len(spec.colours)
    n_lines = max(1, round(num_items / line_size))
    brand_pop = _zipf(n_brands, _BRAND_SKEW, rng)
    keys: list[tuple[int, int, int]] = []
    distinct = n_lines <= n_brands * len(TIERS) * len(THEMES)
    while len(keys) < n_lines:
        brand = int(rng.choice(n_brands, p=brand_pop))
        key = (brand, int(rng.integers(len(TIERS))), int(rng.integers(len(THEMES))))
        if not (distinct and key in keys):
            keys.append(key)
    line_brand, line_tier, line_theme = (np.array(k) for k in zip(*keys))

    line = rng.permutation(np.arange(num_items) % n_lines)  # equal-sized lines, items scattered
    kind = np.empty(num_items, dtype=np.int64)
    for ln in range(n_lines):  # different product types within a line while there are enough
        members = np.flatnonzero(line == ln)
        kind[members] = rng.choice(n_types, members.size, replace=members.size > n_types)
    colour = rng.integers(n_colours, size=num_items)
    has_spec = rng.random(num_items) < spec_share
    extra = np.where(has_spec, rng.integers(len(spec.specs), size=num_items), -1)

    titles: list[str] = []
    seen: set[str] = set()
    for i in range(num_items):
        ln = line[i]
        head = f"{spec.brands[line_brand[ln]]} {TIERS[line_tier[ln]]} {THEMES[line_theme[ln]]}"
        for _ in range(500):
            t = f"{head} {spec.types[kind[i]]}, {spec.colours[colour[i]]}"
            t += f", {spec.specs[extra[i]]}" if extra[i] >= 0 else ""
            if t not in seen:
                break
            kind[i], colour[i] = rng.integers(n_types), rng.integers(n_colours)
            extra[i] = rng.integers(-1, len(spec.specs))
        else:
            raise DataError(
                f"synthetic domain {name!r}: cannot make {num_items} unique titles; "
                "lower num_items or raise line_size"
            )
        seen.add(t)
        titles.append(t)
    return _Catalogue(titles, line, line_brand, line_tier, line_theme, brand_pop)


def make_domain(
    name: str,
    num_users: int = 400,
    num_items: int = 300,
    seed: int = 0,
    min_len: int = 5,
    max_len: int = 12,
    *,
    consistency: float = 0.9,
    stay: float = 0.8,
    drift: float = 0.1,
    popularity_skew: float = 1.0,
    preference_strength: float = 1.0,
    line_size: int = 8,
    spec_share: float = 0.5,
) -> Domain:
    """A seeded synthetic domain with Amazon-like titles and preference-driven sequences.

    Each user has a favourite brand (30%: two), tier and theme. Each step is, with probability
    ``1 - consistency``, a popularity-only pick; otherwise, with probability ``stay``, the next
    item of the user's current product line (while it has unseen items), else an item drawn by
    popularity times exp(bonus) for each of brand/tier/theme its line matches. Then, with
    probability ``drift``, one preference (second brand, tier or theme) is redrawn. No user
    has an item twice.

    Args:
        name: one of :data:`DOMAINS`.
        num_users, num_items: sizes; every item is in the catalogue, used or not.
        seed: random seed; ``(name, num_items, seed, line_size, spec_share)`` fix the catalogue.
        min_len, max_len: each user's number of items, uniform in ``[min_len, max_len]``.
        consistency: share of steps that follow the user's preferences.
        stay: share of preference steps that continue the current product line.
        drift: per step, probability that one preference is redrawn.
        popularity_skew: Zipf exponent of item popularity.
        preference_strength: multiplier on the logit bonus of a line matching brand/tier/theme.
        line_size: items per product line (one brand + tier + theme).
        spec_share: share of titles with a trailing size/spec ("18V", "Size M").

    Returns:
        a :class:`Domain` with ids ``u0001``/``i0001``; ``stats`` holds the settings and
        ``preference_match_share``, the measured share of items whose brand or theme is one of
        the user's favourites at that step.
    """
    _check_settings(name, num_users, num_items, min_len, max_len, line_size,
                    {"consistency": consistency, "stay": stay, "drift": drift, "spec_share": spec_share})
    spec = _SPECS[name]
    cat = _catalogue(name, spec, num_items, seed, line_size, spec_share)
    rng = _rng(name, seed, "users")
    pop = _zipf(num_items, popularity_skew, rng)
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    prefs = _Preferences.draw(rng, cat, len(spec.brands), num_users)
    w = {k: v * preference_strength for k, v in _MATCH_WEIGHTS.items()}
    seqs, consistent = _walk(rng, cat, pop, lengths, max_len, prefs, w, consistency, stay, drift)
    sequences = [seqs[u, : lengths[u]].tolist() for u in range(num_users)]
    width_u, width_i = max(4, len(str(num_users))), max(4, len(str(num_items)))
    stats = {
        "generator": "synthetic", "seed": seed, "min_len": min_len, "max_len": max_len,
        "consistency": consistency, "stay": stay, "drift": drift, "popularity_skew": popularity_skew,
        "preference_strength": preference_strength, "line_size": line_size, "num_lines": len(cat.line_brand),
        "spec_share": spec_share, "preference_match_share": round(consistent / int(lengths.sum()), 4),
        "unused_items": num_items - len({i for s in sequences for i in s}),
    }
    return Domain(
        name=name,
        item_ids=[f"i{i + 1:0{width_i}d}" for i in range(num_items)],
        titles=cat.titles,
        user_ids=[f"u{u + 1:0{width_u}d}" for u in range(num_users)],
        sequences=sequences,
        stats=stats,
    )


def _check_settings(name: str, num_users: int, num_items: int, min_len: int, max_len: int, line_size: int,
                    shares: dict[str, float]) -> None:
    """DataError naming the knob when a synthetic domain's settings cannot make a domain."""
    if name not in _SPECS:
        raise DataError(f"unknown synthetic domain {name!r}; known: {', '.join(DOMAINS)}")
    if num_users < 1 or num_items < 1:
        raise DataError(
            f"synthetic domain needs num_users >= 1 and num_items >= 1, got num_users={num_users}, "
            f"num_items={num_items}"
        )
    if not 3 <= min_len <= max_len:
        raise DataError(
            f"synthetic domain needs 3 <= min_len <= max_len, got min_len={min_len}, "
            f"max_len={max_len}"
        )
    if num_items <= max_len:
        raise DataError(
            f"synthetic domain needs num_items > max_len (no repeats), got {num_items} <= {max_len}"
        )
    if line_size < 1:
        raise DataError(f"synthetic domain knob line_size must be >= 1, got {line_size}")
    for knob, value in shares.items():
        if not 0.0 <= value <= 1.0:
            raise DataError(f"synthetic domain knob {knob} must be in [0, 1], got {value}")


@dataclass
class _Preferences:
    """The users' latent preferences, one entry a user: favourite brands (a second for some), tier, theme,
    and the product line of the last preference step (-1: none yet)."""

    brand1: np.ndarray
    brand2: np.ndarray
    tier: np.ndarray
    theme: np.ndarray
    current: np.ndarray

    @classmethod
    def draw(cls, rng, cat, n_brands: int, num_users: int) -> "_Preferences":
        """Favourite brands follow brand popularity."""
        brand1 = rng.choice(n_brands, num_users, p=cat.brand_pop)
        second = rng.random(num_users) < _SECOND_BRAND
        brand2 = np.where(second, rng.choice(n_brands, num_users, p=cat.brand_pop), brand1)
        tier = rng.integers(len(TIERS), size=num_users)
        theme = rng.integers(len(THEMES), size=num_users)
        return cls(brand1, brand2, tier, theme, np.full(num_users, -1))

    def drift(self, rng, cat, n_brands: int, drift: float) -> None:
        """Redraw one preference (second brand, tier or theme) for some users."""
        n = len(self.brand1)
        moved = rng.random(n) < drift
        dim = rng.integers(3, size=n)
        new_brand = rng.choice(n_brands, n, p=cat.brand_pop)
        self.brand2 = np.where(moved & (dim == 0), new_brand, self.brand2)
        self.tier = np.where(moved & (dim == 1), rng.integers(len(TIERS), size=n), self.tier)
        self.theme = np.where(moved & (dim == 2), rng.integers(len(THEMES), size=n), self.theme)


def _line_members(cat, pop: np.ndarray, num_users: int):
    """(lines, largest line) item indices of each product line (-1 padding), and the (users, lines) unseen
    popularity mass and unseen item counts every user starts with."""
    num_items, n_lines = len(cat.line), len(cat.line_brand)
    order = np.argsort(cat.line, kind="stable")
    sizes = np.bincount(cat.line, minlength=n_lines)
    slot = np.arange(num_items) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    members = np.full((n_lines, sizes.max()), -1)  # (lines, largest line), -1 = padding
    members[cat.line[order], slot] = order
    line_mass = np.bincount(cat.line, weights=pop, minlength=n_lines)
    return members, np.tile(line_mass, (num_users, 1)), np.tile(sizes, (num_users, 1))


def _walk(rng, cat, pop, lengths, max_len: int, prefs: _Preferences, w: dict, consistency: float, stay: float,
          drift: float) -> tuple[np.ndarray, int]:
    """Every user's ``max_len`` items, step by step (see ``make_domain``); returns (sequences (users, max_len),
    how many of the kept steps matched a favourite brand or theme).

    An item ~ softmax(log popularity + bonus of its line) is sampled exactly in two stages: a line by
    (bonus + log of the user's unseen popularity mass in it), then an unseen item of it by popularity. The
    work per step stays at (users, lines), not (users, items)."""
    num_users, n_lines = len(lengths), len(cat.line_brand)
    log_pop = np.log(pop)
    members, mass, left = _line_members(cat, pop, num_users)
    users = np.arange(num_users)
    seqs = np.zeros((num_users, max_len), dtype=np.int64)
    consistent = 0
    for t in range(max_len):
        by_pref = rng.random(num_users) < consistency
        stays = by_pref & (rng.random(num_users) < stay) & (prefs.current >= 0)
        fav_brand = (cat.line_brand == prefs.brand1[:, None]) | (cat.line_brand == prefs.brand2[:, None])
        bonus = (w["brand"] * fav_brand + w["tier"] * (cat.line_tier == prefs.tier[:, None])
                 + w["theme"] * (cat.line_theme == prefs.theme[:, None]))  # (users, lines)
        is_current = np.arange(n_lines) == prefs.current[:, None]
        with np.errstate(divide="ignore"):
            logits = np.where(left > 0, np.log(np.maximum(mass, 1e-300)), -np.inf)
        logits += by_pref[:, None] * bonus + stays[:, None] * _STAY_BONUS * is_current
        line = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)  # Gumbel-max sampling
        cand = members[line]  # (users, largest line)
        fresh = (cand >= 0) & ~(cand[:, :, None] == seqs[:, None, :t]).any(axis=2)
        item_logits = np.where(fresh, log_pop[cand], -np.inf) + rng.gumbel(size=cand.shape)
        item = cand[users, item_logits.argmax(axis=1)]
        seqs[:, t] = item
        mass[users, line] -= pop[item]
        left[users, line] -= 1
        prefs.current = np.where(by_pref, line, prefs.current)
        likes = fav_brand[users, line] | (cat.line_theme[line] == prefs.theme)
        consistent += int((likes & (t < lengths)).sum())
        prefs.drift(rng, cat, len(cat.brand_pop), drift)
    return seqs, consistent
