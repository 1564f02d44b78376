"""Validation shared by the typed configs of the model and trainer layer."""

from __future__ import annotations

from collections.abc import Iterable


def check_ints(config: object, names: Iterable[str], minimum: int = 1, optional: Iterable[str] = ()) -> None:
    """Raise ValueError naming the field unless every named attribute of `config` is an int (not a
    bool) >= minimum; the `optional` ones may also be None."""
    optional = set(optional)
    for name in [*names, *optional]:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            allowed = " or None" if name in optional else ""
            raise ValueError(f"{name} must be an int >= {minimum}{allowed}, got {value!r}")
