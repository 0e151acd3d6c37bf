"""The checks every config's `__post_init__` uses, so a bad setting reads the same everywhere,
and `default_of`, so every face shows the config's own defaults. A bad setting reads:
``raise InvalidInputError("`steps` must be a positive integer, got 0.")``.

Each returns the checked value (converted where that is safe), so a config can write
`self.steps = check_positive_int("steps", self.steps)`.
"""

import math
from typing import Any, Sequence

from .errors import InvalidInputError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> int:
    """A whole number of at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"`{name}` must be a positive integer, got {value!r}.", field=name)
    return value


def check_positive_number(name: str, value: Any, optional: bool = False) -> float | None:
    """A finite number above 0 (or None when `optional`)."""
    if value is None and optional:
        return None
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise InvalidInputError(f"`{name}` must be a positive finite number, got {value!r}.", field=name)
    return value


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite number, within [low, high] where given."""
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidInputError(f"`{name}` must be a finite number, got {value!r}.", field=name)
    if low is not None and value < low or high is not None and value > high:
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidInputError(f"`{name}` must be {bounds}, got {value}.", field=name)
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of `choices`."""
    if value not in choices:
        raise InvalidInputError(f"`{name}` must be one of {', '.join(choices)}; got {value!r}.", field=name)
    return value


def check_range(name: str, value: Any, low: float, high: float | None, kind: type = float) -> tuple:
    """A pair (min, max) with low <= min <= max <= high, of whole numbers when `kind` is int."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidInputError(f"`{name}` must be a pair (min, max), got {value!r}.", field=name)
    lo, hi = (check_number(name, v, low, high) for v in value)
    if kind is int and not all(float(v).is_integer() for v in value):
        raise InvalidInputError(f"`{name}` must hold whole numbers, got {value!r}.", field=name)
    if lo > hi:
        raise InvalidInputError(f"`{name}` must be (min, max) with min <= max, got {value!r}.", field=name)
    return kind(lo), kind(hi)


def default_of(config_class: type, name: str) -> Any:
    """The default of a config dataclass's field, so the CLI and the nodes show the core's defaults."""
    import dataclasses

    for f in dataclasses.fields(config_class):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{config_class.__name__}.{name} has no default")
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def check_finite(tensor, what: str) -> None:
    """Raise unless every value of `tensor` is finite; `what` names the tensor and the file it came from."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InvalidInputError(
            f"{what} holds {bad} NaN or infinite value(s): the file is damaged or comes from a diverged run, "
            "so it is not used."
        )
