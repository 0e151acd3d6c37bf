"""Interpolation between conditioning vectors: LERP, SLERP, vSLERP and random points on the sphere.

All functions work on the last dimension and broadcast over the others: `a`, `b` are `[..., dim]`
(e.g. one text-encoder output `[tokens, dim]`, so each token position is interpolated on its own),
`t` is a float or a tensor broadcastable to `[..., 1]` (e.g. `[samples, 1, 1]`).

SLERP uses the true angle between the two vectors, from the normalised dot product c = â·b̂ and the
length s of the part of b̂ orthogonal to â: Ω = atan2(s, c), the same angle as arccos(clamp(c, -1, 1))
but accurate near 0 and π, where arccos of a float32 dot product loses half its digits (an error of
~3e-4 rad, enough to send nearly antiparallel endpoints off course). The classic formula is applied
to the raw vectors (Shoemake 1985):

    slerp(a, b, t) = sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b

For equal norms the path stays on the sphere of that radius; for unequal norms the norm varies
smoothly between ‖a‖ and ‖b‖. It is exactly `a` at t=0 and exactly `b` at t=1. It is NOT the
element-wise `acos` of some community pipelines (which treats each coordinate as an angle).
Computed in float32 at least, whatever the input dtype (fp16 angles are too coarse).
"""

import torch

# Below this value of sin Ω the endpoints count as parallel (or antiparallel) and LERP is used:
# the SLERP weights become 0/0 there. For near-parallel vectors LERP equals SLERP to O(Ω²).
DEFAULT_EPS = 1e-4
# Norms below this are treated as zero vectors (no direction, so no angle).
_TINY_NORM = 1e-12


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.ndim == 0:
        raise ValueError("interpolation works on vectors (last dimension); got 0-d tensors.")


def _working(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor):
    """`a`, `b`, `t` in a common float dtype of at least float32, and the dtype to return."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    work = torch.promote_types(out_dtype, torch.float32)
    t = torch.as_tensor(t, dtype=work, device=a.device)
    return a.to(work), b.to(work), t, out_dtype


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Linear interpolation `(1-t)·a + t·b`, exact at both endpoints.

    Args:
        a (`torch.Tensor`): start, `[..., dim]`.
        b (`torch.Tensor`): end, same shape as `a`.
        t (`float` or `torch.Tensor`): position on the path, broadcastable to `[..., 1]`.
    """
    _check_pair(a, b)
    a_w, b_w, t_w, out_dtype = _working(a, b, t)
    # (1-t)·a + t·b rather than a + t·(b-a): the latter is not exactly b at t=1 in floating point.
    return ((1 - t_w) * a_w + t_w * b_w).to(out_dtype)


def angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle Ω in radians between `a` and `b` along the last dimension, `[..., 1]`, in [0, π].

    Ω = atan2(‖b̂ - (â·b̂)â‖, â·b̂): the normalised dot product gives the cosine, the orthogonal
    remainder the sine, so no clamping is needed and small / near-π angles stay accurate.
    A zero vector has no direction; its angle to anything is reported as π/2.
    """
    work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a_w, b_w = a.to(work), b.to(work)
    a_hat = a_w / a_w.norm(dim=-1, keepdim=True).clamp_min(_TINY_NORM)
    b_hat = b_w / b_w.norm(dim=-1, keepdim=True).clamp_min(_TINY_NORM)
    cos = (a_hat * b_hat).sum(dim=-1, keepdim=True)
    sin = (b_hat - cos * a_hat).norm(dim=-1, keepdim=True)
    return torch.atan2(sin, cos)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Spherical linear interpolation of the raw vectors, per vector along the last dimension.

    Falls back to LERP where sin Ω < `eps` or either vector is zero: near-parallel endpoints (where
    LERP and SLERP agree) and exactly antiparallel ones. Antiparallel endpoints have no unique great
    circle between them; rather than pick an arbitrary plane, the result is then the chord through
    the origin (at t=0.5 with equal norms: the zero vector). It never returns NaN for finite inputs.

    Args:
        a (`torch.Tensor`): start, `[..., dim]`.
        b (`torch.Tensor`): end, same shape as `a`.
        t (`float` or `torch.Tensor`): position on the path (0 gives `a`, 1 gives `b`), broadcastable
            to `[..., 1]`.
        eps (`float`): threshold on sin Ω below which LERP is used.
    """
    _check_pair(a, b)
    a_w, b_w, t_w, out_dtype = _working(a, b, t)
    omega = angle_between(a_w, b_w)  # [..., 1]
    sin_omega = torch.sin(omega)
    zero = (a_w.norm(dim=-1, keepdim=True) < _TINY_NORM) | (b_w.norm(dim=-1, keepdim=True) < _TINY_NORM)
    degenerate = (sin_omega < eps) | zero
    # Divide by 1 where degenerate so the unused branch holds no inf/NaN (torch.where would pass
    # NaN gradients through it otherwise).
    safe_sin = torch.where(degenerate, torch.ones_like(sin_omega), sin_omega)
    # At t=0: sin(Ω)/sin(Ω) is exactly 1 and sin(0) exactly 0, so the endpoints are exact.
    w_a = torch.where(degenerate, 1 - t_w, torch.sin((1 - t_w) * omega) / safe_sin)
    w_b = torch.where(degenerate, t_w, torch.sin(t_w * omega) / safe_sin)
    return (w_a * a_w + w_b * b_w).to(out_dtype)


def vslerp(
    a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, centre: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """SLERP around `centre`: `centre + slerp(a - centre, b - centre, t)`.

    For endpoints at equal distance from the centre, the path keeps that distance (it moves on
    the shell around the centre, as CLIP embeddings do; see METHOD.md step 3).

    Args:
        a (`torch.Tensor`): start, `[..., dim]`.
        b (`torch.Tensor`): end, same shape as `a`.
        t (`float` or `torch.Tensor`): position on the path, broadcastable to `[..., 1]`.
        centre (`torch.Tensor`): the shell's centre, broadcastable to `a` (`[dim]` or `[tokens, dim]`).
        eps (`float`): threshold on sin Ω below which LERP is used (see `slerp`).
    """
    centre = centre.to(device=a.device)
    return (centre + slerp(a - centre, b - centre, t, eps)).to(torch.promote_types(a.dtype, b.dtype))


def rotate_towards_random(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float | torch.Tensor,
    generator: torch.Generator | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """A random point at the same angle from `a`, and with the same norm, as `slerp(a, b, t)`.

    The path point p is split into its part along `a` and its part orthogonal to `a`; the
    orthogonal part is replaced by one of the same length along a random direction orthogonal
    to `a` (uniform on that sphere). So ‖result‖ = ‖p‖ and angle(a, result) = angle(a, p): the
    "sphere" of note 003, one independent direction per vector (per token position).

    Args:
        a (`torch.Tensor`): the centre of the cone (the placeholder's encoding), `[..., dim]`, dim ≥ 2.
        b (`torch.Tensor`): the other endpoint; with `t` it fixes the angle and the norm.
        t (`float` or `torch.Tensor`): position of the path point, broadcastable to `[..., 1]`.
        generator (`torch.Generator`, *optional*): source of the random directions (seed it).
        eps (`float`): passed to `slerp`.
    """
    if a.shape[-1] < 2:
        raise ValueError(f"random directions orthogonal to a vector need dim >= 2, got {a.shape[-1]}.")
    path = slerp(a, b, t, eps)
    work = torch.promote_types(path.dtype, torch.float32)
    path_w, a_w = path.to(work), a.to(work).expand_as(path)
    a_hat = a_w / a_w.norm(dim=-1, keepdim=True).clamp_min(_TINY_NORM)  # zero where a is zero
    along = (path_w * a_hat).sum(dim=-1, keepdim=True) * a_hat
    across_len = (path_w - along).norm(dim=-1, keepdim=True)
    # Gaussian noise projected off â, normalised: uniform direction orthogonal to a.
    device = generator.device if generator is not None else a.device
    noise = torch.randn(path_w.shape, generator=generator, dtype=work, device=device).to(a.device)
    noise = noise - (noise * a_hat).sum(dim=-1, keepdim=True) * a_hat
    direction = noise / noise.norm(dim=-1, keepdim=True).clamp_min(_TINY_NORM)
    return (along + across_len * direction).to(path.dtype)
