"""The stage-1 NeRF field, the RadianceField container and its file format."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mpod_core.cameras import orbit_cameras
from mpod_core.encoding import HashGridConfig
from mpod_core.fields import (FORMAT_VERSION, NeRFField, NeRFFieldConfig, RadianceField, load_radiance_field,
                              read_settings, save_radiance_field)
from mpod_core.fields import io as field_io
from mpod_core.volume import OccupancyGrid

SMALL = NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12))


def _field(seed=0, **kw):
    torch.manual_seed(seed)
    return RadianceField(SMALL, backend="torch", samples_per_ray=64, **kw)


def _perturbed(seed=0):
    """A field whose MLP and table are far from the init, so renders are not just the blob."""
    f = _field(seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in f.field.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return f


def test_blob_init_is_a_ball_of_radius_blob_std():
    f = _field()
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.9, 0.0], [0.7, 0.7, 0.0]])
    sigma = f.field.density(pts)
    assert sigma[0] > 9.0 and sigma[1] > 4.0  # softplus(10 * (1 - r / 0.5)) + small MLP output
    assert sigma[2] < 1e-2 and sigma[3] < 1e-2
    # A ray through the centre crosses optical depth ~ int softplus(10 (1 - |s| / 0.5)) ds ~ 5
    # (plus the small MLP output): opacity ~ 1 - e^-5 = 0.993. Rays 0.8 from the centre are clear.
    cams = orbit_cameras([0.0, 40.0], [0.0, 123.0])
    opa = f.opacity(cams, 32, 32)
    centre = opa[:, 15:17, 15:17]
    assert (centre > 0.985).all() and (centre < 0.998).all(), centre
    assert (opa[:, :3, :3] < 0.01).all()


def test_density_is_zero_outside_the_box_and_forward_agrees():
    f = _perturbed()
    pts = torch.tensor([[1.2, 0.0, 0.0], [0.0, -1.01, 0.0], [0.3, 0.2, -0.1]])
    sigma, rgb = f.field(pts)
    assert sigma[0] == 0 and sigma[1] == 0 and sigma[2] > 0
    torch.testing.assert_close(sigma, f.field.density(pts))
    torch.testing.assert_close(rgb, f.field.albedo(pts))
    assert rgb.shape == (3, 3) and ((rgb > 0) & (rgb < 1)).all()


def test_normals_of_the_blob_point_radially_outwards():
    f = _field()
    g = torch.Generator().manual_seed(1)
    d = torch.nn.functional.normalize(torch.randn(500, 3, generator=g), dim=-1)
    pts = d * (0.2 + 0.5 * torch.rand(500, 1, generator=g))
    n = f.field.normals(pts)
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(500))
    cos = (n * d).sum(-1)
    assert cos.min() > 0.99, float(cos.min())  # inverted or permuted normals give <= 0


def test_normals_match_autograd_gradient_on_a_perturbed_field():
    f = _perturbed(3)
    pts = torch.tensor([[0.1, 0.2, 0.3], [-0.3, 0.1, 0.05]], requires_grad=True)
    grad, = torch.autograd.grad(f.field.density(pts).sum(), pts)
    exact = -torch.nn.functional.normalize(grad, dim=-1)
    torch.testing.assert_close(f.field.normals(pts.detach()), exact)  # analytic (the default)
    with torch.no_grad():  # analytic normals work without recording too
        torch.testing.assert_close(f.field.normals(pts.detach()), exact)
    f.field.config.normal_type = "finite_difference"
    fd = f.field.normals(pts.detach())
    # finite differences over 0.01 against the exact gradient of a piecewise-trilinear field
    cos = (fd * exact).sum(-1)
    assert cos.min() > 0.95, cos


@pytest.mark.slow
def test_losses_on_analytic_normals_reach_the_weights_gradcheck():
    """Double backward through the hash grid and the MLP, float64 gradcheck on the first layer."""
    torch.manual_seed(0)
    f = NeRFField(NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4)),
                  backend="torch").double()
    with torch.no_grad():
        f.encoding.table.uniform_(-0.5, 0.5)
    pts = torch.tensor([[0.1, 0.2, 0.3], [-0.3, 0.1, 0.05], [0.2, -0.25, 0.1]], dtype=torch.float64)
    target = torch.nn.functional.normalize(torch.randn(3, 3, dtype=torch.float64), dim=-1)
    weight = f.mlp[0].weight.detach().clone().requires_grad_(True)

    class Normals(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, x):
            return self.f.normals(x)

    wrapper = Normals()

    def loss(w):
        normals = torch.func.functional_call(wrapper, {"f.mlp.0.weight": w}, (pts,))
        return ((normals - target) ** 2).sum()

    assert torch.autograd.gradcheck(loss, (weight,), eps=1e-6, atol=1e-5)


def test_render_shapes_and_gradients_reach_the_field():
    f = _perturbed()
    out = f.render(orbit_cameras([0.0, 30.0], [0.0, 90.0]), 12, 10, background=1.0, with_normals=True)
    assert out["color"].shape == (2, 10, 12, 3) and out["opacity"].shape == (2, 10, 12)
    assert out["depth"].shape == (2, 10, 12) and out["normal"].shape == (2, 10, 12, 3)
    (out["color"].sum() + out["opacity"].sum()).backward()
    assert f.field.encoding.table.grad.abs().sum() > 0
    assert all(p.grad is not None for p in f.field.mlp.parameters())


def test_opacity_mask_is_the_threshold_of_the_rendered_opacity():
    f = _perturbed(5)
    f.update_grid(0)
    cams = orbit_cameras([10.0, -20.0, 60.0], [0.0, 150.0, -70.0])
    mask, opacity = f.opacity_mask(cams, 24, 24, threshold=0.5)
    with torch.no_grad():
        rendered = f.render(cams, 24, 24)["opacity"]
    torch.testing.assert_close(opacity, rendered, rtol=0, atol=1e-6)
    assert torch.equal(mask, (rendered > 0.5).float())
    assert 0 < mask.mean() < 1  # the test would be vacuous on an all-empty or all-full mask
    m2, _ = f.opacity_mask(cams, 24, 24, threshold=0.9)
    assert m2.sum() < mask.sum()
    with pytest.raises(ValueError, match="threshold"):
        f.opacity_mask(cams, 8, 8, threshold=1.0)


def test_save_load_gives_identical_renders(tmp_path):
    f = _perturbed(7)
    for step in (0, 16):
        f.update_grid(step)
    f.meta["steps_done"] = 123
    path = save_radiance_field(f, tmp_path / "sub" / "field.safetensors")
    g = load_radiance_field(path, backend="torch")
    assert g.meta["steps_done"] == 123 and g.meta["camera_convention"] == f.meta["camera_convention"]
    assert g.samples_per_ray == 64 and g.grid.resolution == f.grid.resolution
    assert torch.equal(g.grid.mask, f.grid.mask) and torch.equal(g.grid.density, f.grid.density)
    cams = orbit_cameras([5.0, 50.0], [10.0, 200.0])
    with torch.no_grad():
        a, b = f.render(cams, 16, 16, background=1.0), g.render(cams, 16, 16, background=1.0)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["field.safetensors"]


def test_field_from_another_version_or_not_a_field_is_rejected(tmp_path):
    f = _field()
    path = save_radiance_field(f, tmp_path / "f.safetensors")
    settings = read_settings(path)
    settings["version"] = FORMAT_VERSION + 1
    state = field_io._state_for_file(f)
    save_file(state, str(tmp_path / "future.safetensors"), metadata={field_io.SETTINGS_KEY: json.dumps(settings)})
    with pytest.raises(ValueError, match=r"version %d; this version of the pack reads versions 1, %d"
                       % (FORMAT_VERSION + 1, FORMAT_VERSION)):
        load_radiance_field(tmp_path / "future.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an MPOD3D radiance field"):
        load_radiance_field(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_radiance_field(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_radiance_field(tmp_path / "missing.safetensors")


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    f = _field()
    target = tmp_path / "f.safetensors"

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")  # the partial write an interrupt would leave
        raise KeyboardInterrupt

    monkeypatch.setattr(field_io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_radiance_field(f, target)
    assert list(tmp_path.iterdir()) == []


def test_config_round_trip_and_validation():
    cfg = NeRFFieldConfig(radius=1.5, mlp_width=32, hash_grid=HashGridConfig(n_levels=6))
    assert NeRFFieldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown field settings"):
        NeRFFieldConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="radius"):
        NeRFField(NeRFFieldConfig(radius=0.0))
    with pytest.raises(ValueError, match="samples_per_ray"):
        RadianceField(SMALL, samples_per_ray=2, backend="torch")


def test_grid_tracks_density_times_step_and_pruning_settings_round_trip(tmp_path):
    f = _perturbed(3)
    f.update_grid(0, generator=torch.Generator().manual_seed(9))
    raw = OccupancyGrid(f.aabb, resolution=f.grid.resolution)
    raw.update(0, f.field.density, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(f.grid.density, raw.density * f.step_size)
    assert f.alpha_threshold == 0.01 and f.early_stop_eps == 1e-4
    # Pruning changes the render by little (these thresholds, this field) and only where it prunes.
    cams = orbit_cameras([15.0], [40.0])
    with torch.no_grad():
        pruned = f.render(cams, 20, 20)
        f.alpha_threshold, f.early_stop_eps = 0.0, 0.0
        full = f.render(cams, 20, 20)
    assert 0 < (pruned["opacity"] - full["opacity"]).abs().max() < 0.1
    f.alpha_threshold, f.early_stop_eps = 0.02, 1e-3
    g = load_radiance_field(save_radiance_field(f, tmp_path / "f.safetensors"), backend="torch")
    assert (g.alpha_threshold, g.early_stop_eps) == (0.02, 1e-3)
    assert torch.equal(g.grid.density, f.grid.density)
    with pytest.raises(ValueError, match="alpha_threshold"):
        RadianceField(SMALL, backend="torch", alpha_threshold=1.0)


def test_older_field_file_loads_with_default_pruning_and_rescaled_grid(tmp_path):
    f = _perturbed(4)
    for step in (0, 16):
        f.update_grid(step)
    settings = field_io.settings_of(f)
    del settings["pruning"], settings["grid"]["estimate"]  # what the previous version wrote
    state = field_io._state_for_file(f)
    state["grid.density"] = state["grid.density"] / f.step_size  # it stored the raw density
    save_file(state, str(tmp_path / "old.safetensors"), metadata={field_io.SETTINGS_KEY: json.dumps(settings)})
    g = load_radiance_field(tmp_path / "old.safetensors", backend="torch")
    assert (g.alpha_threshold, g.early_stop_eps) == (0.01, 1e-4)
    torch.testing.assert_close(g.grid.density, f.grid.density)
    assert torch.equal(g.grid.mask, f.grid.mask)


def test_copy_is_independent_trainable_and_renders_the_same():
    src = _perturbed(3)
    src.meta["training"] = {"seed": 3}
    src.grid.threshold = 0.02
    src.update_grid(0)
    src.optimizer_state = {n: {"exp_avg": torch.full_like(p, 0.125), "exp_avg_sq": torch.full_like(p, 0.25),
                               "step": torch.tensor(4.0)} for n, p in src.field.named_parameters()}
    with torch.inference_mode():  # ComfyUI hands nodes inference tensors
        frozen = src.copy(backend="torch")
    copy = frozen.copy(backend="torch")
    cams = orbit_cameras([10.0], [30.0])
    with torch.no_grad():
        a, b = src.render(cams, 16, 16)["color"], copy.render(cams, 16, 16)["color"]
    assert torch.equal(a, b)
    assert copy.grid.threshold == 0.02 and torch.equal(copy.grid.mask, src.grid.mask)
    assert copy.meta == src.meta and copy.meta is not src.meta
    assert {n: {k: v.reshape(-1)[0].item() for k, v in m.items()} for n, m in copy.optimizer_state.items()} == \
        {n: {"exp_avg": 0.125, "exp_avg_sq": 0.25, "step": 4.0} for n, _ in src.field.named_parameters()}
    loss = copy.render(cams, 8, 8)["color"].sum()  # autograd accepts the copy (no inference tensors)
    loss.backward()
    with torch.no_grad():
        for p in copy.field.parameters():
            p.add_(1.0)
        copy.meta["training"]["seed"] = 9
    with torch.no_grad():
        assert torch.equal(src.render(cams, 16, 16)["color"], a)  # the source is untouched
    assert src.meta["training"]["seed"] == 3
