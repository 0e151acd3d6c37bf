"""Synthetic vectors with known answers for norm statistics (tests, docs/norm-stats.md).

Offset shells and ellipsoids with closed-form `ShellStats`, and LayerNorm outputs, whose raw norms
are fixed by construction and whose exact centre is the LayerNorm's bias.
"""

import math

import torch

from .geometry import ShellStats


def synthetic_shell(num: int, centre, radii, thickness: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Points `c + r·A·v` on an offset ellipsoid shell, float64 `[num, dim]`.

    v is uniform on the unit sphere, A = diag(`radii`), and r = 1 + thickness·N(0, 1) makes the
    shell thick (a fraction `thickness` of each radius).

    Args:
        num (`int`): number of points.
        centre (`torch.Tensor`): `[dim]` centre c.
        radii (`torch.Tensor` or `float`): semi-axes `[dim]` (a float gives a sphere).
        thickness (`float`): relative radial standard deviation.
        seed (`int`): random seed.
    """
    generator = torch.Generator().manual_seed(seed)
    centre = torch.as_tensor(centre, dtype=torch.float64)
    radii = torch.as_tensor(radii, dtype=torch.float64).expand_as(centre)
    v = torch.randn(num, centre.shape[0], generator=generator, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    r = 1 + thickness * torch.randn(num, 1, generator=generator, dtype=torch.float64)
    return centre + r * v * radii


def shell_expectations(centre, radii, thickness: float = 0.0) -> dict[str, ShellStats]:
    """Closed-form `ShellStats` ("raw", "centred") of `synthetic_shell`'s distribution.

    var(‖x‖²) and the along-mean share are exact (moments of the uniform sphere:
    E v_i² = 1/d, E v_i⁴ = 3/(d(d+2)), E v_i²v_j² = 1/(d(d+2))); the mean and std of ‖x‖ are
    second-order delta-method approximations from E‖x‖² and var(‖x‖²). With y = r·A·v,
    ‖x‖² = ‖c‖² + 2‖c‖⟨y,u⟩ + ‖y‖², so centring removes exactly the along-mean terms.

    Args:
        centre (`torch.Tensor`): `[dim]` centre.
        radii (`torch.Tensor` or `float`): semi-axes.
        thickness (`float`): relative radial standard deviation.
    """
    c = torch.as_tensor(centre, dtype=torch.float64)
    a2 = torch.as_tensor(radii, dtype=torch.float64).expand_as(c) ** 2
    d, s = c.shape[0], thickness
    er2, er4 = 1 + s**2, 1 + 6 * s**2 + 3 * s**4  # E r², E r⁴ for r = 1 + s·N(0,1)
    s2, s4 = a2.sum().item(), (a2**2).sum().item()
    eq, eq2 = s2 / d, (2 * s4 + s2**2) / (d * (d + 2))  # E‖Av‖², E‖Av‖⁴
    cn2 = (c**2).sum().item()
    u2 = c**2 / cn2 if cn2 > 0 else torch.zeros_like(c)
    w = (a2 * u2).sum().item() / d  # E⟨Av, u⟩²
    along_var = er2 * w  # var of ⟨y, u⟩ (its mean is 0)
    # cov(⟨y,u⟩², ‖y‖²): E⟨Av,u⟩²‖Av‖² = Σ a_i² u_i² (2a_i² + Σa²) / (d(d+2)), odd moments vanish.
    cov_b2 = er4 * (a2 * u2 * (2 * a2 + s2)).sum().item() / (d * (d + 2)) - er2**2 * w * eq
    var_centred = er4 * eq2 - er2**2 * eq**2
    var_raw = var_centred + 4 * cn2 * along_var

    def stats(mean_sq: float, var: float, share: float) -> ShellStats:
        mean = math.sqrt(mean_sq) - var / (8 * mean_sq**1.5)
        std = math.sqrt(var) / (2 * math.sqrt(mean_sq))
        return ShellStats(mean, std, std / mean, var, share)

    return {
        "raw": stats(cn2 + er2 * eq, var_raw, (4 * cn2 * along_var + cov_b2) / var_raw),
        "centred": stats(er2 * eq, var_centred, cov_b2 / var_centred if var_centred > 0 else math.nan),
    }


def synthetic_layernorm(num: int, dim: int, spread: float = 1.0, weight=None, bias=None, seed: int = 0) -> torch.Tensor:
    """LayerNorm outputs of Gaussian inputs around a random mean, float64 `[num, dim]`.

    With unit gain and zero bias every output has norm √dim (up to LayerNorm's eps) whatever the
    input: the raw norms are fixed by construction, as in CLIP's `hidden` and `pooled` spaces.
    In general every output is γ ⊙ ẑ + β with ‖ẑ‖ = √dim: ‖(x − β)/γ‖ is constant, and β is the
    exact centre (`stats_of_vectors(x, layernorm_bias=bias)`).

    Args:
        num (`int`): number of vectors.
        dim (`int`): width.
        spread (`float`): input standard deviation around the (standard normal) input mean.
        weight (`torch.Tensor`, *optional*): LayerNorm gain `[dim]`.
        bias (`torch.Tensor`, *optional*): LayerNorm bias `[dim]`.
        seed (`int`): random seed.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=generator, dtype=torch.float64)
    inputs = mean + spread * torch.randn(num, dim, generator=generator, dtype=torch.float64)
    as64 = (lambda t: None if t is None else torch.as_tensor(t, dtype=torch.float64))
    return torch.nn.functional.layer_norm(inputs, (dim,), as64(weight), as64(bias))
