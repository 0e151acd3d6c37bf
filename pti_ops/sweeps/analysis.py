"""The numbers a learning-rate sweep is read by (METHOD.md, "Experiments").

- `fit_through_origin`: the slope of measured distance against lr × steps, to check the notes'
  "distance ≈ lr × steps". With Adam every coordinate moves by at most about lr per step, so
  ‖e − e0‖ ≤ ≈ lr · steps · √(n_vectors · dim): a slope near √dim means the token kept one
  direction, a much smaller one that its steps partly cancelled.
- `find_knee`: on the inversion's (distance, reconstruction, editability) curve, the point past
  which reconstruction gains little per unit of distance while editability keeps falling.
- `position_learning_onset`: the smallest LoRA learning rate at which the subject's position stops
  varying across seeds (the model learned the training images' positions).
"""

import math
from dataclasses import asdict, dataclass

from ..errors import InvalidInputError

DEFAULT_KNEE_THRESHOLD = 0.5  # knee: gain per unit distance below half the initial gain
DEFAULT_ONSET_FRACTION = 0.5  # onset: position spread below half the base model's


def check_learning_rates(learning_rates, what: str = "learning_rates") -> list[float]:
    """The learning rates as floats, in the given order; raise on an empty list, a non-positive, a repeat.

    Args:
        learning_rates (`list[float]`): the sweep's learning rates.
        what (`str`): the input's name as the user sees it (`learning_rates`, `--lrs`).
    """
    values = list(learning_rates or [])
    if not values:
        raise InvalidInputError(f"`{what}` is empty: give at least one learning rate, e.g. 1e-4,5e-4,2e-3,5e-3.")
    out = []
    for i, value in enumerate(values, 1):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidInputError(f"`{what}` must hold positive finite numbers, got {value!r} at position {i}.")
        if float(value) in out:
            raise InvalidInputError(f"`{what}` lists {value!r} twice: give each learning rate once.")
        out.append(float(value))
    return out


def check_fraction(name: str, value) -> float:
    """`value` as a float in (0, 1], else a clear error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InvalidInputError(f"`{name}` must be a fraction in (0, 1], got {value!r}.")
    return float(value)


@dataclass
class LineFit:
    """A least-squares line through the origin, y ≈ slope · x.

    Args:
        slope (`float`): Σxy / Σx².
        r_squared (`float`, *optional*): 1 − SS_res / SS_tot, SS_tot about the mean of y (so it is
            negative when the line through the origin fits worse than the constant mean); None when
            y is constant or there are fewer than 2 points.
        points (`int`): points fitted.
    """

    slope: float
    r_squared: float | None
    points: int

    def to_dict(self) -> dict:
        return asdict(self)


def fit_through_origin(x, y) -> LineFit:
    """Fit y ≈ slope · x by least squares without intercept (distance vs lr × steps).

    Args:
        x (`list[float]`): lr × steps of each record.
        y (`list[float]`): measured distance of each record.
    """
    xs, ys = [float(v) for v in x], [float(v) for v in y]
    if len(xs) != len(ys):
        raise InvalidInputError(f"the fit needs as many x as y values, got {len(xs)} and {len(ys)}.")
    sxx = sum(v * v for v in xs)
    if not xs or sxx == 0:
        raise InvalidInputError("the distance fit needs at least one record with lr × steps > 0.")
    slope = sum(a * b for a, b in zip(xs, ys)) / sxx
    mean = sum(ys) / len(ys)
    ss_tot = sum((b - mean) ** 2 for b in ys)
    ss_res = sum((b - slope * a) ** 2 for a, b in zip(xs, ys))
    r_squared = 1.0 - ss_res / ss_tot if len(ys) >= 2 and ss_tot > 0 else None
    return LineFit(slope, r_squared, len(xs))


@dataclass
class Knee:
    """The knee of an inversion curve.

    Args:
        index (`int`): the knee point's index in the arrays given to `find_knee`.
        distance (`float`): its distance from the initializer.
        reconstruction (`float`): its reconstruction score (higher = better, as given).
        editability (`float`): its editability score (higher = better, as given).
        initial_slope (`float`): reconstruction gain per unit distance on the first segment.
        slope_after (`float`): gain per unit distance on the segment that starts at the knee.
        threshold (`float`): the fraction of the initial slope below which the gain counts as fallen.
    """

    index: int
    distance: float
    reconstruction: float
    editability: float
    initial_slope: float
    slope_after: float
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def find_knee(distance, reconstruction, editability, threshold: float = DEFAULT_KNEE_THRESHOLD) -> tuple[Knee | None, str]:
    """The point past which reconstruction gains less than `threshold` × the initial gain per unit
    distance while editability falls; `(knee, "")`, or `(None, reason)`.

    Both scores must be oriented "higher = better" (negate LPIPS, L2 or drift before calling).
    Points are sorted by distance; points at the same distance are averaged (several runs can
    measure the same distance). With `s_i` the gain per unit distance on segment i (point i to
    i + 1), the knee is the first point i ≥ 1 with `s_i < threshold · s_0` and editability lower at
    i + 1 than at i: the last point before further distance stops paying for itself.

    Args:
        distance (`list[float]`): ‖e − e0‖ of each point.
        reconstruction (`list[float]`): reconstruction score of each point, higher = better.
        editability (`list[float]`): editability score of each point, higher = better.
        threshold (`float`): fraction in (0, 1] of the initial slope.
    """
    threshold = check_fraction("knee_threshold", threshold)
    if not len(distance) == len(reconstruction) == len(editability):
        raise InvalidInputError("the knee needs one distance, reconstruction and editability value per point.")
    points = _merge_equal_distances(distance, reconstruction, editability)
    if len(points) < 3:
        return None, f"needs at least 3 points at different distances, got {len(points)}"
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(points, points[1:])]
    if not slopes[0] > 0:
        return None, f"reconstruction did not improve on the first segment (slope {slopes[0]:.4g}): no gain to fall from"
    for i in range(1, len(slopes)):
        if slopes[i] < threshold * slopes[0] and points[i + 1][2] < points[i][2]:
            d, r, e, index = points[i]
            return Knee(index, d, r, e, slopes[0], slopes[i], threshold), ""
    return None, f"the gain per unit distance never fell below {threshold:g} × the initial slope while editability fell"


def _merge_equal_distances(distance, reconstruction, editability) -> list[tuple[float, float, float, int]]:
    """`(d, r, e, index)` sorted by d, one per distinct distance (r and e averaged; index of the first)."""
    order = sorted(range(len(distance)), key=lambda i: float(distance[i]))
    merged: list[list] = []
    for i in order:
        d, r, e = float(distance[i]), float(reconstruction[i]), float(editability[i])
        if merged and d == merged[-1][0]:
            merged[-1][1].append(r)
            merged[-1][2].append(e)
        else:
            merged.append([d, [r], [e], i])
    return [(d, sum(r) / len(r), sum(e) / len(e), i) for d, r, e, i in merged]


def position_learning_onset(learning_rates, spreads, base_spread: float | None,
                            fraction: float = DEFAULT_ONSET_FRACTION) -> tuple[float | None, str]:
    """The smallest learning rate whose position spread is below `fraction` × the base model's:
    `(lr, "")`, or `(None, reason)`.

    Args:
        learning_rates (`list[float]`): the LoRA learning rates (any order).
        spreads (`list[float | None]`): position spread across seeds at each lr (None = not measured).
        base_spread (`float`, *optional*): the spread of the model without LoRA.
        fraction (`float`): collapse threshold as a fraction in (0, 1] of `base_spread`.
    """
    fraction = check_fraction("onset_fraction", fraction)
    if len(learning_rates) != len(spreads):
        raise InvalidInputError("the onset needs one position spread per learning rate.")
    if base_spread is None or not base_spread > 0:
        return None, f"the base model's position spread is {base_spread!r}: nothing to fall from"
    limit = fraction * base_spread
    measured = sorted((lr, s) for lr, s in zip(learning_rates, spreads) if s is not None)
    if not measured:
        return None, "no position spread was measured"
    for lr, spread in measured:
        if spread < limit:
            return lr, ""
    return None, f"the spread stayed at or above {fraction:g} × the base spread ({limit:.4g}) at every learning rate"
