"""LERP / SLERP / vSLERP / random sphere points against closed-form cases."""

import math

import pytest
import torch

from pti_ops.interpolation import angle_between, lerp, rotate_towards_random, slerp, vslerp


def _random_pair(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def _equal_norm_pair(*shape, radius=3.0, seed=0):
    a, b = _random_pair(*shape, seed=seed)
    return radius * a / a.norm(dim=-1, keepdim=True), radius * b / b.norm(dim=-1, keepdim=True)


def test_orthogonal_unit_vectors_halfway_is_45_degrees_and_unit_norm():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]), atol=1e-6)
    assert mid.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert angle_between(mid, a).item() == pytest.approx(math.pi / 4, abs=1e-5)
    assert angle_between(mid, b).item() == pytest.approx(math.pi / 4, abs=1e-5)


def test_equal_norm_endpoints_keep_the_norm_and_angle_grows_linearly():
    a, b = _equal_norm_pair(5, 64)  # 5 independent position vectors
    omega = angle_between(a, b)
    for t in (0.1, 0.25, 0.5, 0.9):
        p = slerp(a, b, t)
        assert torch.allclose(p.norm(dim=-1), torch.full((5,), 3.0), atol=1e-5)
        assert torch.allclose(angle_between(a, p), t * omega, atol=1e-4)


def test_endpoints_are_exact_also_in_half_precision():
    a, b = _random_pair(7, 32)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    assert torch.equal(slerp(a.half(), b.half(), 1.0), b.half())
    assert torch.equal(lerp(a, b, 0.0), a) and torch.equal(lerp(a, b, 1.0), b)


def test_batched_t_matches_scalar_calls():
    a, b = _random_pair(4, 16)
    t = torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1)
    out = slerp(a, b, t)
    assert out.shape == (3, 4, 16)
    for i, ti in enumerate((0.0, 0.3, 1.0)):
        assert torch.allclose(out[i], slerp(a, b, ti), atol=1e-6)


def test_near_parallel_vectors_are_stable_and_close_to_lerp():
    a, _ = _random_pair(10, 768)
    b = a + 1e-6 * torch.randn(10, 768, generator=torch.Generator().manual_seed(1))
    for candidate in (b, 2.0 * a):  # almost parallel, and exactly parallel with another norm
        p = slerp(a, candidate, 0.3)
        assert torch.isfinite(p).all()
        assert torch.allclose(p, lerp(a, candidate, 0.3), atol=1e-5)


def test_no_nan_gradient_at_degenerate_inputs():
    a = torch.randn(3, 8, requires_grad=True)
    slerp(a, 2.0 * a.detach(), 0.5).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_antiparallel_and_zero_vectors_fall_back_to_lerp_without_nan():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    # Antiparallel: no unique great circle; documented fallback is the chord through the origin.
    assert torch.allclose(slerp(a, -a, 0.5), torch.zeros_like(a), atol=1e-6)
    assert torch.allclose(slerp(a, -a, 0.25), lerp(a, -a, 0.25))
    zero = torch.zeros_like(a)
    assert torch.allclose(slerp(zero, a, 0.4), 0.4 * a)


def test_slerp_is_not_the_elementwise_acos_variant():
    # Element-wise versions give a different point for this pair; the true-angle formula lies on the
    # unit circle at 30 degrees from a.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    p = slerp(a, b, 1 / 3)
    assert torch.allclose(p, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="different shapes"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)


def test_vslerp_with_zero_centre_equals_slerp():
    a, b = _random_pair(6, 32)
    assert torch.allclose(vslerp(a, b, 0.4, torch.zeros(32)), slerp(a, b, 0.4), atol=1e-6)


def test_vslerp_keeps_the_distance_to_the_centre():
    centre = torch.full((32,), 5.0)
    a, b = _equal_norm_pair(6, 32, radius=2.0)
    a, b = a + centre, b + centre
    for t in (0.0, 0.3, 0.5, 1.0):
        p = vslerp(a, b, t, centre)
        assert torch.allclose((p - centre).norm(dim=-1), torch.full((6,), 2.0), atol=1e-5)
    # Around the origin instead, the path would cut inside the shell.
    assert ((slerp(a, b, 0.5) - centre).norm(dim=-1) < 2.0 - 1e-3).all()


def test_random_sphere_points_share_the_path_points_angle_and_norm():
    a, b = _random_pair(5, 48)
    path = slerp(a, b, 0.5)
    g = torch.Generator().manual_seed(3)
    q = rotate_towards_random(a, b, 0.5, g)
    assert torch.allclose(angle_between(a, q), angle_between(a, path), atol=1e-4)
    assert torch.allclose(q.norm(dim=-1), path.norm(dim=-1), atol=1e-4)
    assert not torch.allclose(q, path, atol=1e-2)  # a different point on the same cone


def test_random_sphere_points_follow_the_seed():
    a, b = _random_pair(5, 48)
    first = rotate_towards_random(a, b, 0.5, torch.Generator().manual_seed(1))
    again = rotate_towards_random(a, b, 0.5, torch.Generator().manual_seed(1))
    other = rotate_towards_random(a, b, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)


def test_random_sphere_point_at_t0_is_a():
    a, b = _random_pair(4, 16)
    q = rotate_towards_random(a, b, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(q, a, atol=1e-5)


@pytest.mark.parametrize("omega", [1e-3, math.pi - 1e-3])
def test_angle_is_accurate_near_zero_and_pi(omega):
    # float32 arccos of a dot product would be off by ~3e-4 here.
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([math.cos(omega), math.sin(omega), 0.0])
    assert angle_between(a, b).item() == pytest.approx(omega, abs=1e-6)
    mid = slerp(a, b, 0.5)
    # Near π the weights are ~1/sin Ω = 1000, amplifying b's float32 rounding: 2e-4, not 1e-6.
    assert angle_between(a, mid).item() == pytest.approx(omega / 2, abs=2e-4)
    assert mid.norm().item() == pytest.approx(1.0, abs=2e-4)
