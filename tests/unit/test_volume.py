"""Tests for mpod_core.volume: ray-box intersection, opacity of a homogeneous
slab and of an empty scene against the closed form, two-slab colour mixing,
depth, the packed segment cumsum against a per-ray loop, gradcheck, the
occupancy grid (EMA update, lossless empty-space skipping) and chunking."""
from __future__ import annotations

import math

import pytest
import torch

from mpod_core.volume import (OccupancyGrid, accumulate, opacity_from_density, ray_aabb, render_rays,
                              render_weights, sample_along_rays)

F64 = torch.float64
BOX = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)


def _down_rays(xy, z0=3.0, dtype=torch.float32):
    """Rays from (x, y, z0) looking down -z."""
    xy = torch.as_tensor(xy, dtype=dtype)
    o = torch.cat([xy, torch.full((xy.shape[0], 1), z0, dtype=dtype)], -1)
    d = torch.zeros_like(o)
    d[:, 2] = -1
    return o, d


def _slab_density(sigma, z_lo, z_hi):
    return lambda p: torch.where((p[:, 2] > z_lo) & (p[:, 2] < z_hi), sigma, 0.0).to(p.dtype)


def _field(density_fn, color_fn):
    return lambda p, d: (density_fn(p), color_fn(p))


def test_ray_aabb_closed_form():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.5, 0.5, 0.0], [2.0, 0.0, 3.0], [0.0, 0.0, 3.0], [1.0, 0.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -2.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    tn, tf, hit = ray_aabb(o, d, BOX)
    assert hit.tolist() == [True, True, False, False, True]  # last: grazing the x = 1 face
    torch.testing.assert_close(tn[:2], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(tf[:2], torch.tensor([4.0, 0.5]))  # |d| = 2: t in units of |d|
    assert tn[2:4].eq(0).all() and tf[2:4].eq(0).all()


@pytest.mark.parametrize("sigma", [0.5, 3.0, 20.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-10)])
def test_slab_perpendicular_closed_form(sigma, dtype, tol):
    # Slab z in [-0.25, 0.25] inside the empty box [-1, 1]^3; rays enter at t = 2, the
    # slab spans t in [2.75, 3.25]: multiples of the step, so the quadrature is exact.
    L, h = 0.5, 0.01
    o, d = _down_rays([[0.0, 0.0], [0.3, -0.7], [-0.9, 0.9]], dtype=dtype)
    op = opacity_from_density(_slab_density(sigma, -0.25, 0.25), o, d, BOX, h)
    expected = torch.full((3,), 1 - math.exp(-sigma * L), dtype=dtype)
    torch.testing.assert_close(op, expected, atol=tol, rtol=0)
    # render_rays gives the same opacity.
    out = render_rays(_field(_slab_density(sigma, -0.25, 0.25), lambda p: torch.ones_like(p)), o, d, BOX, h)
    torch.testing.assert_close(out["opacity"], expected, atol=tol, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 3.0, 20.0])
@pytest.mark.parametrize("theta_deg", [0.0, 30.0, 60.0])
def test_slab_oblique_thickness(sigma, theta_deg):
    # The box is the slab itself (z in [-0.25, 0.25], wide in x, y) with constant density:
    # a ray at angle theta to the normal crosses L / cos(theta); the step divides it exactly.
    L = 0.5
    box = (-5.0, -5.0, -0.25, 5.0, 5.0, 0.25)
    th = math.radians(theta_deg)
    d = torch.tensor([[math.sin(th), 0.0, -math.cos(th)]], dtype=F64).repeat(2, 1)
    o = torch.tensor([[0.0, 0.0, 1.0], [0.3, 0.2, 2.0]], dtype=F64)
    path = L / math.cos(th)
    op = opacity_from_density(lambda p: torch.full_like(p[:, 0], sigma), o, d, box, path / 40)
    torch.testing.assert_close(op, torch.full((2,), 1 - math.exp(-sigma * path), dtype=F64), atol=1e-10, rtol=0)
    # Jittered positions: constant density, so still exact.
    g = torch.Generator().manual_seed(0)
    op_j = opacity_from_density(lambda p: torch.full_like(p[:, 0], sigma), o, d, box, path / 40, generator=g)
    torch.testing.assert_close(op_j, op, atol=1e-10, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 3.0, 20.0])
def test_slab_oblique_unaligned_discretisation_bound(sigma):
    # Slab boundaries not on the step grid: each boundary interval is in or out by its
    # midpoint, so the optical depth is off by at most sigma * h.
    h = 0.005
    th = math.radians(35.0)
    o = torch.tensor([[-3 * math.tan(th), 0.0, 3.0]], dtype=F64)
    d = torch.tensor([[math.sin(th), 0.0, -math.cos(th)]], dtype=F64)
    op = opacity_from_density(_slab_density(sigma, -0.25, 0.25), o, d, BOX, h)
    tau_true = sigma * 0.5 / math.cos(th)
    tau = -torch.log1p(-op)
    assert abs(float(tau) - tau_true) <= sigma * h + 1e-12
    assert abs(float(tau) - tau_true) > 0  # the test really is unaligned


def test_empty_scene():
    o, d = _down_rays(torch.rand(20, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    o = torch.cat([o, torch.tensor([[5.0, 5.0, 3.0]])])  # and one ray missing the box
    d = torch.cat([d, torch.tensor([[0.0, 0.0, -1.0]])])
    bg = torch.tensor([0.2, 0.5, 0.9])
    field = _field(lambda p: torch.zeros_like(p[:, 0]), lambda p: torch.ones_like(p))
    out = render_rays(field, o, d, BOX, 0.01, background=bg)
    assert out["opacity"].eq(0).all() and out["depth"].eq(0).all()
    torch.testing.assert_close(out["color"], bg.expand(21, 3))
    # An empty occupancy grid drops every sample: same result, no field call needed.
    grid = OccupancyGrid(BOX, 8)
    grid.update(0, lambda p: torch.zeros_like(p[:, 0]))
    assert not grid.mask.any()
    assert len(sample_along_rays(o, d, *ray_aabb(o, d, BOX)[:2], 0.01, grid)) == 0
    out_g = render_rays(lambda p, d: pytest.fail("field called"), o, d, BOX, 0.01, grid, background=bg)
    torch.testing.assert_close(out_g["color"], bg.expand(21, 3))
    assert out_g["opacity"].eq(0).all()


def test_two_slabs_colour_mix_and_depth():
    s1, s2 = 2.0, 5.0
    c1, c2, bg = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.1, 0.1, 0.1])
    front, back = _slab_density(s1, 0.25, 0.5), _slab_density(s2, -0.5, -0.25)

    def field(p, d):
        sig = front(p) + back(p)
        col = torch.where((p[:, 2] > 0)[:, None], c1, c2)
        return sig, col

    o, d = _down_rays([[0.0, 0.0], [0.5, 0.1]])
    out = render_rays(field, o, d, BOX, 0.01, background=bg)
    a1, a2 = 1 - math.exp(-s1 * 0.25), 1 - math.exp(-s2 * 0.25)
    expected = a1 * c1 + (1 - a1) * a2 * c2 + (1 - a1) * (1 - a2) * bg
    torch.testing.assert_close(out["color"], expected.expand(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["opacity"], torch.full((2,), 1 - (1 - a1) * (1 - a2)), atol=1e-5, rtol=0)


def test_depth_of_thin_dense_slab():
    # Dense slab z in [0, 0.02] seen from z = 2: the surface is at distance 1.98.
    o, d = _down_rays([[0.0, 0.0], [0.4, -0.3]], z0=2.0)
    out = render_rays(_field(_slab_density(1000.0, 0.0, 0.02), lambda p: torch.ones_like(p)), o, d, BOX, 0.01,
                      normal_fn=lambda p: torch.tensor([0.0, 0.0, 1.0]).expand_as(p))
    torch.testing.assert_close(out["opacity"], torch.ones(2), atol=1e-5, rtol=0)
    assert (out["depth"] - 1.98).abs().max() <= 0.01  # within one step
    torch.testing.assert_close(out["normal"], out["opacity"][:, None] * torch.tensor([0.0, 0.0, 1.0]))


def _random_packed(n_rays, gen, dtype=F64):
    counts = torch.randint(0, 7, (n_rays,), generator=gen)
    counts[0] = 0  # rays without samples, first and in the middle
    counts[n_rays // 2] = 0
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    s = ray_indices.shape[0]
    deltas = torch.rand(s, generator=gen, dtype=dtype) * 0.3 + 0.01
    t_starts = torch.rand(s, generator=gen, dtype=dtype)
    sigmas = torch.rand(s, generator=gen, dtype=dtype) * 4
    return sigmas, t_starts, t_starts + deltas, ray_indices, counts


def test_packed_cumsum_matches_per_ray_loop():
    gen = torch.Generator().manual_seed(3)
    # Many rays so the global running sum is large: float32 must still match.
    sigmas, ts, te, ri, counts = _random_packed(3000, gen)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        w, T, a = render_weights(sigmas.to(dtype), ts.to(dtype), te.to(dtype), ri, 3000)
        start = 0
        for r, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            tau = sigmas[start:start + c] * (te - ts)[start:start + c]
            T_ref = torch.exp(-torch.cat([tau.new_zeros(1), torch.cumsum(tau, 0)[:-1]]))
            a_ref = 1 - torch.exp(-tau)
            torch.testing.assert_close(T[start:start + c].double(), T_ref, atol=tol, rtol=0)
            torch.testing.assert_close(w[start:start + c].double(), T_ref * a_ref, atol=tol, rtol=0)
            start += c
        # Opacity is 1 - exp(-total optical depth) per ray.
        tau_tot = torch.zeros(3000, dtype=F64).index_add(0, ri, sigmas * (te - ts))
        torch.testing.assert_close(accumulate(w, None, ri, 3000).double(), 1 - torch.exp(-tau_tot),
                                   atol=tol, rtol=0)


def test_gradcheck_render_weights_and_accumulate():
    gen = torch.Generator().manual_seed(4)
    sigmas, ts, te, ri, _ = _random_packed(5, gen)
    values = torch.rand(ri.shape[0], 3, generator=gen, dtype=F64)
    sigmas.requires_grad_(True)
    values.requires_grad_(True)

    def fn(s, v):
        w, T, a = render_weights(s, ts, te, ri, 5)
        return accumulate(w, v, ri, 5), accumulate(w, None, ri, 5), T, a

    assert torch.autograd.gradcheck(fn, (sigmas, values))


def _sphere_density(radius, sigma=5.0):
    return lambda p: torch.where(p.norm(dim=-1) < radius, sigma, 0.0).to(p.dtype)


def test_occupancy_grid_sphere_and_ema():
    res = 16
    cell = 2.0 / res
    half_diag = math.sqrt(3) * cell / 2
    grid = OccupancyGrid(BOX, res, ema_decay=0.5, warmup_steps=5)
    assert grid.mask.all()  # fresh grid drops nothing
    for step in range(5):
        grid.update(step, _sphere_density(0.5))
    centres = grid.cell_points(torch.arange(res ** 3)).reshape(res, res, res, 3)
    dist = centres.norm(dim=-1)
    assert grid.mask[dist < 0.5 - half_diag].all()
    assert not grid.mask[dist > 0.5 + half_diag].any()
    assert torch.equal(grid.occupied(centres.reshape(-1, 3)), grid.mask.reshape(-1))
    assert not grid.occupied(torch.tensor([[1.5, 0.0, 0.0]])).any()  # outside the box
    # After warm-up only a subset is visited; shrink the object: the shell decays away.
    for step in range(5, 40):
        grid.update(step, _sphere_density(0.15))
    assert grid.mask[dist < 0.15 - half_diag].all()
    assert not grid.mask[dist > 0.15 + half_diag].any()
    assert int(grid.step) == 40
    # state_dict round trip.
    other = OccupancyGrid(BOX, res)
    other.load_state_dict(grid.state_dict())
    assert torch.equal(other.mask, grid.mask) and torch.equal(other.density, grid.density)


def test_empty_space_skipping_is_lossless():
    # A small cube aligned with the 16^3 cells (a sphere's sliver cells can be missed by the
    # random points, which is the grid being wrong, not the skipping).
    density = lambda p: torch.where(p.abs().amax(-1) < 0.25, 5.0, 0.0).to(p.dtype)  # noqa: E731
    grid = OccupancyGrid(BOX, 16, warmup_steps=4)
    for step in range(4):
        grid.update(step, density)
    xy = torch.stack(torch.meshgrid(torch.linspace(-0.6, 0.6, 13), torch.linspace(-0.6, 0.6, 13),
                                    indexing="ij"), -1).reshape(-1, 2)
    o, d = _down_rays(xy)
    tn, tf, _ = ray_aabb(o, d, BOX)
    full = sample_along_rays(o, d, tn, tf, 0.01)
    kept = sample_along_rays(o, d, tn, tf, 0.01, grid)
    assert len(kept) <= 0.1 * len(full)  # a small sphere in a large box: >= 90% skipped
    # The grid is right here: every dropped sample has zero density ...
    dropped = ~grid.occupied(full.positions)
    assert density(full.positions)[dropped].eq(0).all()
    # ... so the opacity is unchanged.
    op_full = opacity_from_density(density, o, d, BOX, 0.01)
    op_grid = opacity_from_density(density, o, d, BOX, 0.01, grid)
    assert op_full.max() > 0.5
    torch.testing.assert_close(op_grid, op_full, atol=1e-5, rtol=0)


def test_chunking_gives_identical_results():
    gen = torch.Generator().manual_seed(5)
    o = torch.randn(37, 3, generator=gen) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    d = torch.nn.functional.normalize(torch.randn(37, 3, generator=gen) * 0.2 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)

    def field(p, dirs):
        return torch.exp(-4 * p.pow(2).sum(-1)) * 3, torch.sigmoid(p + dirs)

    big = render_rays(field, o, d, BOX, 0.02, background=1.0, chunk=4096)
    small = render_rays(field, o, d, BOX, 0.02, background=1.0, chunk=3)
    for k in ("color", "opacity", "depth"):
        torch.testing.assert_close(small[k], big[k], atol=1e-6, rtol=0)
    tn, tf, _ = ray_aabb(o, d, BOX)
    a, b = sample_along_rays(o, d, tn, tf, 0.02, chunk=4096), sample_along_rays(o, d, tn, tf, 0.02, chunk=5)
    assert torch.equal(a.ray_indices, b.ray_indices) and torch.equal(a.positions, b.positions)


def test_gradients_reach_the_field():
    o, d = _down_rays([[0.0, 0.0], [0.2, 0.1]])
    s = torch.tensor(2.0, requires_grad=True)
    out = render_rays(lambda p, dd: (s * torch.ones_like(p[:, 0]), torch.ones_like(p)), o, d, BOX, 0.05, chunk=1)
    out["opacity"].sum().backward()
    # d/ds (1 - exp(-2 s)) = 2 exp(-2 s) per ray.
    torch.testing.assert_close(s.grad, torch.tensor(4 * math.exp(-4.0)), atol=1e-5, rtol=0)


def test_input_checks():
    o, d = _down_rays([[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"origins: expected a floating \(R, 3\)"):
        ray_aabb(o[:, :2], d, BOX)
    with pytest.raises(ValueError, match="aabb"):
        ray_aabb(o, d, (0, 0, 0, 1, 1))
    with pytest.raises(ValueError, match="max_samples_per_ray"):
        opacity_from_density(lambda p: p[:, 0], o, d, BOX, 1e-4, max_samples_per_ray=100)
    with pytest.raises(ValueError, match="field_fn must return"):
        render_rays(lambda p, dd: (p, p), o, d, BOX, 0.1)
    with pytest.raises(ValueError, match="resolution"):
        OccupancyGrid(BOX, (4, 4))
