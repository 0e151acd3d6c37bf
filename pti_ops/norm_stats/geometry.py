"""Shell statistics: the spread of norms raw and around a centre, evaluated on held-out vectors.

The centre is either fitted (the mean of one half of the vectors, the spread then measured on the
other half, so a centre cannot shrink the spread of the very vectors it was fitted to) or given
(a LayerNorm's bias β, the exact centre of the shell its outputs lie on). Spreads are compared as
CV = std/mean, never as absolute variances: centring changes the mean norm.
"""

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

# Spreads below this fraction of the mean are float32 rounding (a unit-gain LayerNorm's outputs
# at width 32 show ~4e-6 on ‖x‖²): the along-centre share of such a "variance" is reported as
# undefined (NaN, `null` in JSON), and centred norms this small mean every vector is the same.
ROUNDING = 1e-4


@dataclass
class ShellStats:
    """Spread of one set of vectors' norms.

    Args:
        mean_norm (`float`): mean of ‖x‖.
        std_norm (`float`): standard deviation of ‖x‖ (population, ddof 0).
        cv (`float`): std_norm / mean_norm: the spread relative to the radius (NaN if the mean is 0).
        var_sq_norm (`float`): variance of ‖x‖².
        along_mean_share (`float`): share of var(‖x‖²) carried by the component along the centre
            direction u (the mean's, or β's): cov(⟨x,u⟩², ‖x‖²) / var(‖x‖²). Perpendicular parts
            are untouched by centring, so this share is where raw and centred spreads differ. NaN
            when var(‖x‖²) is rounding noise (norms fixed by a LayerNorm).
    """

    mean_norm: float
    std_norm: float
    cv: float
    var_sq_norm: float
    along_mean_share: float


def shell_stats(vectors: torch.Tensor, direction: torch.Tensor) -> ShellStats:
    """Norm spread of `vectors` `[n, dim]`, with the share of var(‖x‖²) along the unit `direction`.

    Args:
        vectors (`torch.Tensor`): `[n, dim]`, any float dtype (computed in float64).
        direction (`torch.Tensor`): `[dim]` unit vector (the centre direction), or zeros.
    """
    x = vectors.double()
    norms = x.norm(dim=1)
    mean, std = norms.mean().item(), norms.std(correction=0).item()
    sq = norms**2
    var_sq = sq.var(correction=0).item()
    share = math.nan
    if math.sqrt(var_sq) > ROUNDING * sq.mean().item():
        along_sq = (x @ direction.double()) ** 2
        share = ((along_sq - along_sq.mean()) * (sq - sq.mean())).mean().item() / var_sq
    cv = std / mean if mean > 0 else math.nan
    return ShellStats(mean_norm=mean, std_norm=std, cv=cv, var_sq_norm=var_sq, along_mean_share=share)


def held_out_stats(
    vectors: torch.Tensor, centre: torch.Tensor | None = None
) -> tuple[ShellStats, ShellStats, float, torch.Tensor, torch.Tensor]:
    """Raw and centred spreads of the odd rows, around the mean of the even rows or a given centre.

    Interleaving (rather than first/second half) keeps both halves alike when the caption file
    is sorted. A given centre is not fitted, but the spreads are still those of the odd rows, so
    the raw numbers are the same whichever centre is used. Returns
    `(raw, centred, ‖centre‖, raw_norms, centred_norms)`.

    Args:
        vectors (`torch.Tensor`): `[n, dim]`, n ≥ 2.
        centre (`torch.Tensor`, *optional*): `[dim]` fixed centre (e.g. a LayerNorm's bias).
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise InvalidInputError(
            f"norm statistics need at least 2 vectors (one half fits the centre, the other is measured); "
            f"got shape {tuple(vectors.shape)}."
        )
    x = vectors.double()
    fit, held = x[0::2], x[1::2]
    if centre is None:
        centre = fit.mean(dim=0)
    elif tuple(centre.shape) != (x.shape[1],):
        raise InvalidInputError(f"the centre must have shape ({x.shape[1]},), got {tuple(centre.shape)}.")
    centre = centre.double().to(x.device)
    centre_norm = centre.norm().item()
    direction = centre / centre_norm if centre_norm > 0 else torch.zeros_like(centre)
    raw, centred = shell_stats(held, direction), shell_stats(held - centre, direction)
    return raw, centred, centre_norm, held.norm(dim=1).float(), (held - centre).norm(dim=1).float()


def all_identical(vectors: torch.Tensor) -> bool:
    """True when the vectors' spread around their own mean is rounding (the same token, same context)."""
    x = vectors.double()
    spread = (x - x.mean(dim=0)).norm(dim=1).mean().item()
    return not spread > ROUNDING * x.norm(dim=1).mean().item()
