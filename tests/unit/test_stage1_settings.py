"""MPOD123 stage 1 as the references run it: regularisers against closed forms,
shading, timestep schedules over run fractions, parameter-group learning rates,
Adam moments through save -> load -> resume, coarse-to-fine levels, and the
two-pass (bounded-memory) backward against the plain one."""
import math

import pytest
import torch

from mpod_core.cameras import orbit_cameras
from mpod_core.encoding import HashGridConfig
from mpod_core.fields import NeRFFieldConfig, RadianceField, load_radiance_field, save_radiance_field
from mpod_core.fields import regularizers as reg
from mpod_core.fields.backprop import _block_bounds, render_and_backprop
from mpod_core.fields.shading import Shading, shade
from mpod_core.guidance import OracleDenoiser, timestep_bounds
from mpod_core.guidance.schedules import TIMESTEP_PRESETS, TimestepSchedule
from mpod_core.pipelines.mpod123 import (MAX_GUIDANCE_PIXELS, Stage1Config, draw_shading, fit_stage1,
                                         regularization, stage1_optimizer)
from mpod_core.volume import render_rays
from mpod_core.volume.rendering import hashed_uniform

TINY = NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12))
BOX = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)


def _tiny_field(seed=0, spr=32):
    torch.manual_seed(seed)
    return RadianceField(TINY, samples_per_ray=spr, backend="torch")


def _slab_rays(n=16):
    """Rays along -z through x, y in [-0.5, 0.5], from z = 2."""
    xy = torch.rand(n, 2) - 0.5
    o = torch.cat([xy, torch.full((n, 1), 2.0)], 1)
    d = torch.tensor([0.0, 0.0, -1.0]).expand(n, 3).contiguous()
    return o, d


def _slab_field(sigma, normal_sign):
    """Uniform density ``sigma`` in |z| < 0.25 with normals ``normal_sign * d`` (d = -z)."""
    def fn(p, d):
        s = torch.where(p[:, 2].abs() < 0.25, torch.full_like(p[:, 0], sigma), torch.zeros_like(p[:, 0]))
        n = normal_sign * torch.nn.functional.normalize(d, dim=-1)
        facing_away = (n * torch.nn.functional.normalize(d, dim=-1)).sum(-1).clamp_min(0).square()
        return s, torch.ones_like(p), {"normal": n, "orientation": facing_away}
    return fn


# ----------------------------------------------------------------- regularisers


@pytest.mark.parametrize("sign,expect_zero", [(-1.0, True), (1.0, False)])
def test_orientation_is_zero_for_normals_facing_the_camera_and_the_opacity_otherwise(sign, expect_zero):
    o, d = _slab_rays(32)
    sigma = 4.0
    out = render_rays(_slab_field(sigma, sign), o, d, BOX, 0.01, detached_weight_extras=("orientation",))
    opacity = out["opacity"].reshape(1, 4, 8)
    loss = reg.orientation_loss(out["orientation"].reshape(1, 4, 8), opacity)
    closed = 1.0 - math.exp(-sigma * 0.5)  # every ray crosses the 0.5-thick slab
    assert torch.allclose(opacity, torch.full_like(opacity, closed), atol=2e-3)
    if expect_zero:
        assert float(loss) == 0.0
    else:  # normals along the ray: (n . d)^2 = 1, so the per-pixel sum is the opacity
        assert abs(float(loss) - closed) < 2e-3


def test_orientation_weights_are_detached_so_only_normals_get_gradients():
    o, d = _slab_rays(8)
    sigma = torch.tensor(3.0, requires_grad=True)

    def fn(p, dd):
        s = torch.where(p[:, 2].abs() < 0.25, sigma.expand(p.shape[0]), torch.zeros_like(p[:, 0]))
        return s, torch.ones_like(p), {"orientation": torch.ones_like(s)}

    out = render_rays(fn, o, d, BOX, 0.01, detached_weight_extras=("orientation",))
    assert out["orientation"].grad_fn is None or not out["orientation"].requires_grad
    out_attached = render_rays(fn, o, d, BOX, 0.01)
    out_attached["orientation"].sum().backward()
    assert sigma.grad is not None and float(sigma.grad) > 0  # control: attached weights do carry it


def test_sparsity_is_the_mean_opacity_and_entropy_vanishes_for_a_binary_mask():
    opacity = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
    assert float(reg.sparsity_loss(opacity)) == pytest.approx(0.4375)
    binary = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    eps = 1e-3
    floor = -(eps * math.log(eps) + (1 - eps) * math.log(1 - eps))
    assert float(reg.opacity_entropy(binary)) == pytest.approx(floor, rel=1e-5)
    assert float(reg.opacity_entropy(torch.full((1, 2, 2), 0.5))) == pytest.approx(math.log(2), rel=1e-6)
    p = torch.full((1, 3, 3), 0.3, requires_grad=True)
    reg.opacity_entropy(p).backward()  # d/dp of -(p log p + (1-p) log(1-p)) = log((1-p)/p) / 9
    assert torch.allclose(p.grad, torch.full_like(p, math.log(0.7 / 0.3) / 9), rtol=1e-5)


def test_normal_map_and_smoothness_closed_forms():
    n_hat = torch.nn.functional.normalize(torch.tensor([0.3, -0.4, 0.5]), dim=0)
    opacity = torch.full((1, 4, 4), 0.8)
    nm = reg.normal_map(opacity[..., None] * n_hat, opacity)
    assert torch.allclose(nm, ((n_hat + 1) / 2 * 0.8).expand(1, 4, 4, 3), atol=1e-6)
    assert float(reg.normal_smoothness_2d(nm)) == 0.0  # constant image
    stripes = torch.zeros(1, 4, 4, 3)
    stripes[:, :, 1::2] = 1.0  # columns alternate 0 / 1: every horizontal pair differs by 1 per channel
    assert float(reg.normal_smoothness_2d(stripes)) == pytest.approx(1.0)
    assert torch.equal(reg.normal_map(torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2, 3))


def test_every_regulariser_gives_finite_gradients_on_a_real_field():
    field = _tiny_field()
    cams = orbit_cameras([0.0, 30.0], [0.0, 120.0])
    out = field.render(cams, 12, 12, background=1.0, with_normals=True)
    total, terms = regularization(out, Stage1Config(), novel=True)
    assert set(terms) == {"orient", "normal_smooth", "sparsity", "opaque"}
    total.backward()
    grads = [p.grad for p in field.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


# ----------------------------------------------------------------------- shading


def test_shading_modes():
    albedo = torch.tensor([[0.2, 0.4, 0.6], [0.5, 0.5, 0.5]])
    normals = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    light = torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(shade(albedo, None, Shading()), albedo)
    assert torch.allclose(shade(albedo, normals, Shading("normal")), (normals + 1) / 2)
    lam = shade(albedo, normals, Shading("lambertian", light, 0.25))
    assert torch.allclose(lam[0], albedo[0]) and torch.allclose(lam[1], albedo[1] * 0.25)
    assert torch.allclose(shade(albedo, normals, Shading("lambertian", light, 1.0)), albedo)
    tex = shade(albedo, normals, Shading("textureless", light, 0.25))
    assert torch.allclose(tex, torch.tensor([[1.0] * 3, [0.25] * 3]))
    with pytest.raises(ValueError, match="light direction"):
        Shading("lambertian")


def test_shading_schedule_normals_first_then_random_lambertian_or_textureless():
    cfg = Stage1Config()
    gen = torch.Generator().manual_seed(0)
    center = torch.tensor([0.0, 0.0, 2.5])
    assert all(draw_shading(cfg, f, center, gen).mode == "normal" for f in (0.0, 0.1, 0.199))
    later = [draw_shading(cfg, 0.5, center, gen) for _ in range(2000)]
    share = sum(s.mode == "textureless" for s in later) / len(later)
    assert abs(share - 0.2) < 0.03, share  # binomial(2000, 0.2): 3.4 sigma
    assert all(s.mode in ("lambertian", "textureless") and 0.1 <= s.ambient <= 1.0 for s in later)
    # the light sits around the camera: on average in front of the object
    lights = torch.stack([s.light_dir for s in later])
    assert float(lights[:, 2].mean()) > 0.8 and torch.allclose(lights.norm(dim=1), torch.ones(2000))
    off = Stage1Config(shading_augmentation=False)
    assert draw_shading(off, 0.5, center, gen).mode == "albedo"


# ------------------------------------------------------------ timestep schedule


@pytest.mark.parametrize("run_length", [600, 5000])
def test_stable_zero123_schedule_anneals_between_8_and_33_percent_of_any_run(run_length):
    cfg = Stage1Config(timestep_preset="stable-zero123")
    sds = cfg.sds_for_run(run_length)

    def at(fraction):
        return timestep_bounds(sds, int(round(fraction * run_length)), 1000)

    assert at(0.0) == (700, 980)
    assert at(0.08) == (700, 980)          # before the anneal starts (at 50/600 = 8.3%)
    assert at(1 / 3) == (300, 800)         # annealed range reached at 200/600 = 33.3%
    assert at(1.0) == (300, 800)
    lo, hi = at((50 / 600 + 200 / 600) / 2)  # half-way through the anneal
    assert abs(lo - 500) <= 2 and abs(hi - 890) <= 2


def test_other_presets_and_custom():
    xl = Stage1Config(timestep_preset="zero123-xl").sds_for_run(1000)
    assert timestep_bounds(xl, 0, 1000) == (400, 850) and timestep_bounds(xl, 334, 1000) == (200, 500)
    magic = Stage1Config(timestep_preset="magic123").sds_for_run(1000)
    assert timestep_bounds(magic, 0, 1000) == timestep_bounds(magic, 999, 1000) == (200, 600)
    custom = Stage1Config(timestep_preset="custom",
                          custom_timesteps=TimestepSchedule(0.5, 0.9, 0.1, 0.3, 0.5, 0.5)).sds_for_run(100)
    assert timestep_bounds(custom, 49, 1000) == (500, 900) and timestep_bounds(custom, 50, 1000) == (100, 300)
    assert set(TIMESTEP_PRESETS) == {"stable-zero123", "zero123-xl", "magic123"}
    with pytest.raises(ValueError, match="timestep_preset"):
        Stage1Config(timestep_preset="nope").validate()
    with pytest.raises(ValueError, match="anneal_end"):
        Stage1Config(timestep_preset="custom",
                     custom_timesteps=TimestepSchedule(0.2, 0.6, 0.1, 0.2, 0.5, 0.2)).validate()


# ------------------------------------------------------ optimiser and resuming


def test_parameter_groups_give_the_hash_grid_ten_times_the_base_rate():
    field = _tiny_field()
    opt = stage1_optimizer(field, Stage1Config(learning_rate=1e-3))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoding"]["lr"] == pytest.approx(1e-2) and groups["mlp"]["lr"] == pytest.approx(1e-3)
    assert [id(p) for p in groups["encoding"]["params"]] == [id(field.field.encoding.table)]
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in field.field.parameters()}
    assert len(groups["mlp"]["params"]) == len(list(field.field.mlp.parameters()))


def _reference(res=16):
    from mpod_core.guidance.mesh_oracle import MeshViewOracle
    return MeshViewOracle(res).reference(res)


def test_adam_moments_survive_save_load_and_resume_continues_them(tmp_path):
    image, mask = _reference(16)
    config = Stage1Config(iterations=3, resolution=16, guidance_resolution=None, seed=3, shading_augmentation=False)
    oracle = OracleDenoiser(target=torch.zeros(3, 16, 16))
    first = fit_stage1(image, mask, oracle, config, field=_tiny_field()).field
    assert set(first.optimizer_state) == {n for n, _ in first.field.named_parameters()}
    assert all(float(m["step"]) == 3 for m in first.optimizer_state.values())
    path = save_radiance_field(first, tmp_path / "f.safetensors")
    loaded = load_radiance_field(path, backend="torch")
    for name, m in first.optimizer_state.items():
        for k, v in m.items():
            assert torch.equal(loaded.optimizer_state[name][k].reshape(v.shape), v), (name, k)

    def resume(field):
        return fit_stage1(image, mask, oracle, Stage1Config(**{**config.__dict__, "iterations": 2}), field=field).field

    in_process = resume(first)
    from_file = resume(loaded)
    assert all(torch.equal(a, b) for a, b in zip(in_process.parameters(), from_file.parameters()))
    # control: the same resume without the moments ends elsewhere
    again = load_radiance_field(path, backend="torch")
    again.optimizer_state = {}
    fresh_moments = resume(again)
    assert not all(torch.equal(a, b) for a, b in zip(in_process.parameters(), fresh_moments.parameters()))


# -------------------------------------------------------------- coarse to fine


def test_coarse_levels_mask_the_fine_levels_features_and_gradients():
    field = _tiny_field()
    pts = torch.rand(500, 3) * 1.6 - 0.8
    field.field.active_levels = 2
    field.field.density(pts).sum().backward()
    g = field.field.encoding.table.grad
    offsets = field.field.encoding.layout.offsets
    assert float(g[offsets[2]:].abs().max()) == 0.0 and float(g[:offsets[2]].abs().max()) > 0
    field.zero_grad()
    field.field.active_levels = None
    field.field.density(pts).sum().backward()
    assert float(field.field.encoding.table.grad[offsets[2]:].abs().max()) > 0


# ------------------------------------------------------------ two-pass backward


def test_two_pass_backward_equals_the_plain_backward():
    field = _tiny_field()
    cams = orbit_cameras([10.0, -20.0], [30.0, 200.0])
    target = torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(1))

    def loss_fn(out):
        loss = ((out["color"] - target) ** 2).mean() + reg.orientation_loss(out["orientation"], out["opacity"]) \
            + reg.normal_smoothness_2d(reg.normal_map(out["normal"], out["opacity"])) \
            + reg.opacity_entropy(out["opacity"])
        return loss, {}

    shadings = [Shading("lambertian", torch.tensor([0.0, 0.6, 0.8]), 0.3), Shading("normal")]

    def run(budget, expected=None):
        field.zero_grad()
        loss, _, out = render_and_backprop(field, cams, 20, 20, loss_fn, shadings=shadings, background=1.0,
                                           with_normals=True, generator=torch.Generator().manual_seed(3),
                                           grad_sample_budget=budget, chunk=64, expected_samples=expected)
        return loss, out, [p.grad.clone() for p in field.parameters()]

    loss_a, out_a, grads_a = run(10 ** 9)   # one pass with autograd
    loss_b, out_b, grads_b = run(300)       # no-grad render, then many small blocks
    assert torch.equal(out_a["samples"], out_b["samples"]) and int(out_a["samples"].sum()) > 600
    _, _, grads_c = run(300, expected=100)  # an estimate within half the budget: one pass again
    assert all(torch.equal(a, c) for a, c in zip(grads_a, grads_c))
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7 * float(a.abs().max())), float((a - b).abs().max())
    # control: another jitter seed changes the gradients (the comparison can fail)
    field.zero_grad()
    render_and_backprop(field, cams, 20, 20, loss_fn, shadings=shadings, background=1.0, with_normals=True,
                        generator=torch.Generator().manual_seed(4), grad_sample_budget=300, chunk=64)
    assert not torch.allclose(field.field.encoding.table.grad, grads_a[0], rtol=1e-3)


def test_blocks_follow_the_sample_budget():
    samples = torch.tensor([5, 5, 5, 0, 10, 1, 1])
    blocks = _block_bounds(samples, 10)
    assert blocks == [(0, 2), (2, 5), (5, 7)]  # cut where the running total crosses a multiple of 10
    assert all(int(samples[lo:hi].sum()) <= 10 + int(samples.max()) for lo, hi in blocks)
    assert _block_bounds(samples, 1000) == [(0, 7)]
    assert _block_bounds(torch.zeros(0, dtype=torch.long), 10) == []


def test_ray_jitter_depends_only_on_the_seed_and_the_ray():
    rays = torch.arange(1000)
    k = torch.arange(1000) % 7
    u = hashed_uniform(12345, rays, k)
    assert torch.equal(u, hashed_uniform(12345, rays, k))
    assert torch.equal(u[400:600], hashed_uniform(12345, rays[400:600], k[400:600]))
    assert not torch.equal(u, hashed_uniform(12346, rays, k))
    big = hashed_uniform(7, torch.arange(200_000), torch.zeros(200_000, dtype=torch.long))
    assert float(big.min()) >= 0 and float(big.max()) < 1
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002
    field = _tiny_field()
    o, d = field.rays(orbit_cameras(10.0, 40.0), 16, 16)
    full = field.render_rays(o, d, jitter_seed=99)
    part = field.render_rays(o[100:180], d[100:180], jitter_seed=99, ray_offset=100, chunk=7)
    assert torch.allclose(full["color"][100:180], part["color"], atol=1e-6)


# ------------------------------------------------------------------- validation


def test_sizes_the_machine_cannot_hold_are_refused_with_the_limit():
    with pytest.raises(ValueError, match=str(MAX_GUIDANCE_PIXELS)):
        Stage1Config(batch_size=4, guidance_resolution=512).validate()
    Stage1Config(batch_size=4, guidance_resolution=256).validate()
    with pytest.raises(ValueError, match="1024"):
        RadianceField(TINY, samples_per_ray=2048, backend="torch")
    with pytest.raises(ValueError, match="2048"):
        Stage1Config(resolution=4096).validate()
