"""Tests for mpod_core.volume: ray-box intersection, opacity of a homogeneous
slab and of an empty scene against the closed form, two-slab colour mixing,
depth, the packed segment cumsum against a per-ray loop, gradcheck, the
occupancy grid (EMA update, lossless empty-space skipping) and chunking."""
from __future__ import annotations

import math

import pytest
import torch

from mpod_core.volume.rendering import jitter_seed_from
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


# --- occupancy on sigma * delta, pruning (alpha threshold, early stop), determinism -------------------

def test_grid_thresholds_sigma_delta_closed_form():
    # Density 3 for x < 0, 0.5 for x > 0 (x = 0 is a cell face of the 8^3 grid). With step 0.01 the
    # estimates are 0.03 and 0.005; their mean 0.0175 is above the threshold 0.01, so it applies:
    # the x < 0 half is occupied, the x > 0 half is not (raw density 0.5 > 0.01 would keep it).
    h = 0.01
    density = lambda p: torch.where(p[:, 0] < 0, 3.0, 0.5).to(p.dtype)  # noqa: E731
    grid = OccupancyGrid(BOX, 8, threshold=0.01)
    grid.update(0, density, step_size=h)
    centres = grid.cell_points(torch.arange(8 ** 3)).reshape(8, 8, 8, 3)
    left = centres[..., 0] < 0
    torch.testing.assert_close(grid.density[left], torch.full((int(left.sum()),), 3.0 * h))
    torch.testing.assert_close(grid.density[~left], torch.full((int((~left).sum()),), 0.5 * h))
    assert grid.mask[left].all() and not grid.mask[~left].any()
    # Step 0.004: 0.5 * 0.004 = 0.002 is still below, 3 * 0.004 = 0.012 still above.
    g2 = OccupancyGrid(BOX, 8, threshold=0.01)
    g2.update(0, density, step_size=0.004)
    assert torch.equal(g2.mask, left)
    # Step 0.0025: 3 * 0.0025 = 0.0075 < 0.01, but the mean cap (0.0044) keeps the dense half.
    g3 = OccupancyGrid(BOX, 8, threshold=0.01)
    g3.update(0, density, step_size=0.0025)
    assert torch.equal(g3.mask, left)
    # Step 0.05: both above (0.15, 0.025): everything occupied.
    g4 = OccupancyGrid(BOX, 8, threshold=0.01)
    g4.update(0, density, step_size=0.05)
    assert g4.mask.all()
    # Without step_size (1) the raw density is thresholded, as before.
    g5 = OccupancyGrid(BOX, 8, threshold=0.01)
    g5.update(0, density)
    assert g5.mask.all()
    # A uniform density whose sigma * step is below the threshold stays occupied (mean cap),
    # and a fresh grid drops nothing.
    g6 = OccupancyGrid(BOX, 8, threshold=0.01)
    assert g6.mask.all()
    g6.update(0, lambda p: torch.full_like(p[:, 0], 0.2), step_size=h)
    assert g6.mask.all()
    with pytest.raises(ValueError, match="step_size"):
        g6.update(1, density, step_size=0.0)


def _gauss_density(peak=40.0, std=0.15):
    return lambda p: peak * torch.exp(-p.pow(2).sum(-1) / (2 * std ** 2))


def _reference_keep(sigma, ts, te, ridx, n_rays, alpha_threshold, early_stop_eps):
    """Per-ray loop (float64): alpha >= threshold and transmittance before the sample >= eps."""
    keep = torch.zeros(sigma.shape[0], dtype=torch.bool)
    for r in range(n_rays):
        idx = (ridx == r).nonzero(as_tuple=True)[0].tolist()
        depth = 0.0
        for i in idx:
            tau = float(sigma[i]) * float(te[i] - ts[i])
            keep[i] = (1 - math.exp(-tau)) >= alpha_threshold and math.exp(-depth) >= early_stop_eps
            depth += tau
    return keep


def _grid_rays(n=9, half=0.45, z0=3.0):
    xy = torch.stack(torch.meshgrid(torch.linspace(-half, half, n, dtype=F64),
                                    torch.linspace(-half, half, n, dtype=F64), indexing="ij"), -1).reshape(-1, 2)
    return _down_rays(xy, z0=z0, dtype=F64)


@pytest.mark.parametrize("jitter", [False, True])
def test_pruning_keeps_exactly_the_visible_samples_and_bounds_the_error(jitter):
    density = _gauss_density()
    colour = lambda p: torch.sigmoid(3 * p)  # noqa: E731  (in [0, 1])
    o, d = _grid_rays()
    n, h, a_thr, eps = o.shape[0], 0.01, 0.01, 1e-4
    tn, tf, _ = ray_aabb(o, d, BOX)
    gen = (lambda: torch.Generator().manual_seed(7)) if jitter else (lambda: None)
    full = sample_along_rays(o, d, tn, tf, h, generator=gen())
    pruned = sample_along_rays(o, d, tn, tf, h, generator=gen(), density_fn=density, alpha_threshold=a_thr,
                               early_stop_eps=eps)
    sig = density(full.positions)
    keep = _reference_keep(sig, full.t_starts, full.t_ends, full.ray_indices, n, a_thr, eps)
    alpha = 1 - torch.exp(-sig * (full.t_ends - full.t_starts))
    by_alpha = alpha < a_thr
    # Both rules really drop something here, and the sets differ.
    assert by_alpha.sum() > 100 and (~by_alpha & ~keep).sum() > 100
    # Exactly the reference set is kept (in particular every sample with alpha >= threshold
    # before the transmittance falls below eps).
    assert torch.equal(pruned.positions, full.positions[keep])
    assert torch.equal(pruned.ray_indices, full.ray_indices[keep])
    assert torch.equal(pruned.t_starts, full.t_starts[keep]) and torch.equal(pruned.t_ends, full.t_ends[keep])

    # Rendering: pruned vs all samples. Bound per ray: early_stop_eps (everything behind the
    # stop weighs < eps) + the sum of the alphas dropped by the threshold (removing one sample
    # of alpha a moves a composite of values in [0, 1] by at most T a <= a).
    field = _field(density, colour)
    kw = dict(generator=None)
    out_full = render_rays(field, o, d, BOX, h, **kw)
    out_pruned = render_rays(field, o, d, BOX, h, **kw, density_fn=density, alpha_threshold=a_thr,
                             early_stop_eps=eps)
    full_mid = sample_along_rays(o, d, tn, tf, h)
    sig_mid = density(full_mid.positions)
    alpha_mid = 1 - torch.exp(-sig_mid * (full_mid.t_ends - full_mid.t_starts))
    low = torch.where(alpha_mid < a_thr, alpha_mid, torch.zeros_like(alpha_mid))
    bound = eps + torch.zeros(n, dtype=F64).index_add(0, full_mid.ray_indices, low)
    d_op = (out_full["opacity"] - out_pruned["opacity"]).abs()
    d_col = (out_full["color"] - out_pruned["color"]).abs().amax(-1)
    assert (d_op <= bound + 1e-12).all() and (d_col <= bound + 1e-12).all()
    # The bound is nearly attained (rays grazing the blob, where every step has alpha < 1%,
    # lose up to ~0.25 of opacity: nerfacc's pruning drops faint matter whole), so a looser
    # pruning (a larger threshold, a late stop) would break it.
    assert d_op.max() > 0.7 * bound.max() and bound.max() < 0.35
    # ... and it is exactly the composite of the kept samples.
    keep_mid = _reference_keep(sig_mid, full_mid.t_starts, full_mid.t_ends, full_mid.ray_indices, n, a_thr, eps)
    ri = full_mid.ray_indices[keep_mid]
    w, _, _ = render_weights(sig_mid[keep_mid], full_mid.t_starts[keep_mid], full_mid.t_ends[keep_mid], ri, n)
    torch.testing.assert_close(out_pruned["opacity"], accumulate(w, None, ri, n), atol=1e-12, rtol=0)
    torch.testing.assert_close(out_pruned["color"], accumulate(w, colour(full_mid.positions[keep_mid]), ri, n),
                               atol=1e-12, rtol=0)
    # opacity_from_density prunes the same way.
    op = opacity_from_density(density, o, d, BOX, h, alpha_threshold=a_thr, early_stop_eps=eps)
    torch.testing.assert_close(op, out_pruned["opacity"], atol=1e-12, rtol=0)


def test_early_stop_behind_an_opaque_slab_closed_form():
    # Slab z in (0, 0.4) of density 50 and a second one behind it, step 0.01 (tau 0.5 per
    # step), midpoints: the j-th sample in the slab has T = exp(-0.5 j), so exactly
    # j = 0..18 are kept (exp(-9) >= 1e-4 > exp(-9.5)); nothing of the second slab, nothing
    # in empty space (alpha 0 < 0.01).
    front, back = _slab_density(50.0, 0.0, 0.4), _slab_density(50.0, -0.6, -0.2)
    density = lambda p: front(p) + back(p)  # noqa: E731
    o, d = _down_rays([[0.0, 0.0], [0.3, -0.6], [-0.8, 0.7]], dtype=F64)
    tn, tf, _ = ray_aabb(o, d, BOX)
    smp = sample_along_rays(o, d, tn, tf, 0.01, density_fn=density, alpha_threshold=0.01, early_stop_eps=1e-4)
    assert torch.bincount(smp.ray_indices, minlength=3).tolist() == [19, 19, 19]
    z = smp.positions[:, 2]
    assert (z < 0.4).all() and z.min() > 0.4 - 0.01 * 19 and z.min() < 0.4 - 0.01 * 18
    op = opacity_from_density(density, o, d, BOX, 0.01, alpha_threshold=0.01, early_stop_eps=1e-4)
    torch.testing.assert_close(op, torch.full((3,), 1 - math.exp(-9.5), dtype=F64), atol=1e-12, rtol=0)
    op_full = opacity_from_density(density, o, d, BOX, 0.01)
    assert ((op_full - op).abs() <= 1e-4).all()  # the early-stop bound
    # Early stop alone (alpha threshold 0) keeps the empty space in front too.
    only = sample_along_rays(o, d, tn, tf, 0.01, density_fn=density, early_stop_eps=1e-4)
    assert torch.bincount(only.ray_indices, minlength=3).tolist() == [60 + 19] * 3
    with pytest.raises(ValueError, match="density_fn"):
        sample_along_rays(o, d, tn, tf, 0.01, alpha_threshold=0.01)


def test_pruned_gradients_equal_the_gradients_of_the_kept_samples():
    o, d = _grid_rays(n=6)
    n, h = o.shape[0], 0.01
    s = torch.tensor(1.0, dtype=F64, requires_grad=True)
    c = torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True)
    base = _gauss_density()

    def density(p):
        return s * base(p)

    def field(p, dirs):
        return density(p), torch.sigmoid(c + 2 * p)

    def loss(out):
        return (out["color"] * torch.tensor([1.0, 2.0, 3.0], dtype=F64)).sum() + out["opacity"].pow(2).sum()

    out = render_rays(field, o, d, BOX, h, density_fn=density, alpha_threshold=0.01, early_stop_eps=1e-4)
    g_pruned = torch.autograd.grad(loss(out), (s, c))
    # Reference: all samples, composited over the kept ones only (same autograd graph otherwise).
    tn, tf, _ = ray_aabb(o, d, BOX)
    full = sample_along_rays(o, d, tn, tf, h)
    with torch.no_grad():
        keep = _reference_keep(density(full.positions), full.t_starts, full.t_ends, full.ray_indices, n, 0.01, 1e-4)
    assert 0 < keep.sum() < 0.5 * len(full)
    sig, rgb = field(full.positions[keep], None)
    ri = full.ray_indices[keep]
    w, _, _ = render_weights(sig, full.t_starts[keep], full.t_ends[keep], ri, n)
    ref = {"color": accumulate(w, rgb, ri, n), "opacity": accumulate(w, None, ri, n)}
    g_ref = torch.autograd.grad(loss(ref), (s, c))
    for a, b in zip(g_pruned, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert g_pruned[0].abs() > 1e-3 and g_pruned[1].abs().min() > 1e-3


def test_samples_depend_only_on_rays_grid_field_and_generator_state():
    gen = torch.Generator().manual_seed(11)
    o = torch.randn(40, 3, generator=gen) * 0.2 + torch.tensor([0.0, 0.0, 3.0])
    d = torch.nn.functional.normalize(torch.randn(40, 3, generator=gen) * 0.15 + torch.tensor([0.0, 0.0, -1.0]),
                                      dim=-1)
    density = _gauss_density(peak=30.0, std=0.3)
    grid = OccupancyGrid(BOX, 16, warmup_steps=1)
    grid.update(0, density, step_size=0.02)
    assert 0 < grid.mask.float().mean() < 0.5
    seen = []

    def field(p, dirs):
        seen.append(p.clone())
        return density(p), torch.sigmoid(p)

    kw = dict(grid=grid, density_fn=density, alpha_threshold=0.01, early_stop_eps=1e-4, chunk=10)

    def render(lo, hi, g):
        seen.clear()
        out = render_rays(field, o[lo:hi], d[lo:hi], BOX, 0.02, generator=g, **kw)
        return out, torch.cat(seen)

    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out1, pos1 = render(0, 40, g)
    after_one = g.get_state()
    g.set_state(state)
    out2, pos2 = render(0, 40, g)
    assert torch.equal(pos1, pos2) and all(torch.equal(out1[k], out2[k]) for k in out1)
    # Rays [0, 17) then [17, 40) in two calls (any split, chunk boundaries not aligned), each with the
    # seed the one call drew and its ray offset, = one call over all (counter-based jitter).
    g.set_state(state)
    seed = jitter_seed_from(g)
    assert torch.equal(g.get_state(), after_one)  # one call draws exactly one seed

    def render_part(lo, hi):
        seen.clear()
        out = render_rays(field, o[lo:hi], d[lo:hi], BOX, 0.02, jitter_seed=seed, ray_offset=lo, **kw)
        return out, torch.cat(seen)

    a, pa = render_part(0, 17)
    b, pb = render_part(17, 40)
    assert torch.equal(torch.cat([pa, pb]), pos1)
    for k in out1:
        assert torch.allclose(torch.cat([a[k], b[k]]), out1[k], atol=1e-6), k
    # Pruning draws the same random numbers as no pruning: same generator state afterwards,
    # and the pruned samples are a subset of the unpruned ones at the same positions.
    g.set_state(state)
    seen.clear()
    render_rays(field, o, d, BOX, 0.02, generator=g, grid=grid, chunk=10)
    assert torch.equal(g.get_state(), after_one)
    all_pos = torch.cat(seen)
    assert len(all_pos) > len(pos1) > 0
    tn, tf, _ = ray_aabb(o, d, BOX)
    g.set_state(state)
    unpruned = sample_along_rays(o, d, tn, tf, 0.02, grid, generator=g, chunk=10)
    g.set_state(state)
    pruned = sample_along_rays(o, d, tn, tf, 0.02, grid, generator=g, chunk=10, density_fn=density,
                               alpha_threshold=0.01, early_stop_eps=1e-4)
    assert torch.equal(unpruned.positions, all_pos) and torch.equal(pruned.positions, pos1)
