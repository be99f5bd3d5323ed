"""The project's error for a user's mistake: a bad config value, bad input data, a missing, incomplete or
broken file. Its message names the config key or file and the fix.

``train.py`` and ``evaluate.py`` print it as one line (``error: ...``) and exit with status 1, without a
traceback (``HYDRA_FULL_ERROR=1`` shows it); any other exception is a bug and keeps its traceback.

Typed settings (``checked``): a dataclass whose fields say their type and, through ``setting``, their
allowed values (``choices``) or range (``at_least``, ``above``, ``at_most``, ``below``); ``require`` applies
the same rules to one value outside a dataclass, so every message reads the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields


class UserError(ValueError):
    """A user's mistake; the message says which key or file, and what to do."""


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}
_SEQUENCES = {"list[str]": (list, tuple), "tuple[str, ...]": (list, tuple)}  # sequences of names
_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "None": "null"}
_MAPPINGS = ("dict", "Mapping[str, Any]", "dict[str, dict]", "Mapping[str, Mapping]")


@dataclass(frozen=True)
class Rule:
    """The allowed values of a setting: one of ``choices``, or a number in the range."""

    choices: tuple = ()
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def problem(self, value) -> str | None:
        """Why ``value`` breaks the rule ("must be >= 1", "is unknown: use one of a, b"), None if it does not."""
        bounds = (self.at_least, self.above, self.at_most, self.below)
        if value is None or (not self.choices and all(b is None for b in bounds)):
            return None
        if self.choices:
            return None if value in self.choices else f"is unknown: use one of {', '.join(map(str, self.choices))}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number {self.describe()}"
        ok = ((self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
              and (self.at_most is None or value <= self.at_most) and (self.below is None or value < self.below))
        return None if ok else f"must be {self.describe()}"

    def describe(self) -> str:
        low = (f"[{self.at_least}" if self.at_least is not None else f"({self.above}" if self.above is not None else None)
        high = (f"{self.at_most}]" if self.at_most is not None else f"{self.below})" if self.below is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.at_least is not None else '>'} {low[1:]}"
        return f"{'<=' if self.at_most is not None else '<'} {high[:-1]}"


def setting(default=MISSING, *, factory=MISSING, choices=(), at_least=None, above=None, at_most=None, below=None):
    """A dataclass field with its allowed values, which ``checked`` enforces (None always passes: a field
    typed ``X | None`` means "not set")."""
    rule = Rule(tuple(choices), at_least, above, at_most, below)
    return field(default=default, default_factory=factory, metadata={"rule": rule})


def require(key: str, value, error: type[UserError] = UserError, **rule) -> None:
    """UserError ``<key>=<value> <why>`` unless ``value`` keeps the rule (``choices=``, ``at_least=`` ...)."""
    why = Rule(**{k: tuple(v) if k == "choices" else v for k, v in rule.items()}).problem(value)
    if why:
        raise error(f"{key}={value!r} {why}")


def _type_problem(kind: str, value) -> str | None:
    kinds = [k.strip() for k in kind.split("|")]
    if any(k not in _TYPES and k not in _SEQUENCES and k not in _MAPPINGS for k in kinds):
        return None  # a type this check does not know: not checked
    for k in kinds:
        if k in _TYPES and isinstance(value, _TYPES[k]) and not (bool not in _TYPES[k] and isinstance(value, bool)):
            return None
        if k in _SEQUENCES and isinstance(value, _SEQUENCES[k]) and all(isinstance(v, str) for v in value):
            return None
        if k in _MAPPINGS and isinstance(value, Mapping):
            return None
    if any(k in _SEQUENCES for k in kinds):
        return "must be a list of names, e.g. [a,b] (quoted on the command line: 'key=[a,b]')"
    return "must be " + " or ".join(_NAMES.get(k, k) for k in kinds)


def checked(cls, values, where: str, error: type[UserError] = UserError):
    """``cls(**values)`` for a dataclass of settings, checked first: an unknown key, a missing key (a field
    without a default), a value of the wrong type (``str``, ``int``, ``float``, ``bool``, lists of names,
    mappings, ``X | None``) or out of its ``setting`` rule is a UserError naming ``<where>.<key>``, and the
    known keys or the allowed values, before anything heavy runs."""
    values = dict(values or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise error(f"{where} has unknown keys {unknown}: known are {sorted(known)}")
    missing = sorted(k for k, f in known.items() if k not in values and f.default is MISSING
                     and f.default_factory is MISSING)
    if missing:
        raise error(f"{where} lacks the keys {missing}: set them (known are {sorted(known)})")
    for key, value in values.items():
        kind = known[key].type if isinstance(known[key].type, str) else getattr(known[key].type, "__name__", "")
        why = _type_problem(kind, value)
        rule = known[key].metadata.get("rule")
        why = why or (rule.problem(value) if rule is not None else None)
        if why:
            raise error(f"{where}.{key}={value!r} {why}")
    return cls(**values)
