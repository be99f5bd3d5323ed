"""The project's error for a user's mistake: a bad config value, bad input data, a missing, incomplete or
broken file. Its message names the config key or file and the fix.

``train.py`` and ``evaluate.py`` print it as one line (``error: ...``) and exit with status 1, without a
traceback (``HYDRA_FULL_ERROR=1`` shows it); any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A user's mistake; the message says which key or file, and what to do."""


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}


def checked(cls, values, where: str, error: type[UserError] = UserError):
    """``cls(**values)`` for a dataclass of settings, checked first: an unknown key or a value of the wrong
    type (``str``, ``int``, ``float``, ``bool``, ``X | None`` fields) or a missing key (a field without a
    default) is a UserError naming ``<where>.<key>`` and the known keys, before anything heavy runs."""
    from dataclasses import MISSING, fields

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
        kinds = [_TYPES.get(t.strip()) for t in str(known[key].type).split("|")]
        if any(k is None for k in kinds):  # a type this check does not know (a list, a mapping): not checked
            continue
        ok = any(isinstance(value, k) and not (bool not in k and isinstance(value, bool)) for k in kinds)
        if not ok:
            raise error(f"{where}.{key}={value!r} must be {known[key].type}")
    return cls(**values)
