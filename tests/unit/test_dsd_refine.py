"""DSD Refine in the core (mpod_core.pipelines.dsd_refine) on synthetic priors with known answers.

* Coarse-to-fine: two :class:`CoarseToFineOracle` priors, each knowing one mesh's renders at scales finer than a
  noise-dependent radius (high noise: up to a large scale; low noise: the finest detail only). The concept mesh
  has a coarse colour layout (left half red, right half blue), the reference mesh fine horizontal stripes; the
  initial model is a grey sphere. With ThemeStation's ranges (concept high t, reference low t) the refined
  texture takes the concept's layout *and* the reference's stripes; with the ranges swapped (the control) the
  layout is lost. Measured on the texture field at the refined surface (correlations with the known patterns).
* The loop: renders (colour on white, normal map on black), loss map terms, previews (colour | normal), VSD
  scores trained every step, cancel keeps a consistent state, resume continues the count, bad settings.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import trimesh

from mpod_core.cameras import orbit_cameras
from mpod_core.encoding.hashgrid import HashGridConfig
from mpod_core.exemplars import smooth_vertex_normals
from mpod_core.fields import NeRFFieldConfig
from mpod_core.guidance.dsd import DSDConfig, themestation_terms
from mpod_core.guidance.mesh_oracle import CoarseToFineOracle, gaussian_blur
from mpod_core.guidance.vsd import VSDConfig, VSDScore
from mpod_core.pipelines.dsd_init import init_state_from_mesh
from mpod_core.pipelines.dsd_refine import DSDRefineConfig, fit_dsd, render_dsd_views
from mpod_core.render import render_mesh

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RES, FOV = 64, 75.0
TINY_FIELD = NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=6, log2_hashmap_size=14))


def _sphere(radius=0.42, scale=(1.0, 1.0, 1.0)):
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    mesh.apply_scale(scale)
    return mesh


def _stripes(y):
    """Horizontal bands of period 0.12 (about 4 pixels in these renders)."""
    return 0.5 + 0.35 * np.sign(np.sin(2 * np.pi * y / 0.12))


def _target(mesh, colors, kind):
    """``target_fn(views)``: the mesh's colour render on white, or its normal map on black, from each view."""
    v, f = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    col = (smooth_vertex_normals(v, f) + 1) / 2 if kind == "normal" else torch.tensor(colors, dtype=torch.float32)
    bg = (0.0, 0.0, 0.0) if kind == "normal" else (1.0, 1.0, 1.0)

    def fn(views):
        cams = orbit_cameras(views.elevation.float(), views.azimuth.float(), views.distance.float(), FOV)
        return render_mesh(v, f, cams, RES, RES, vertex_colors=col, background=bg).color.permute(0, 3, 1, 2)
    return fn


def _priors():
    concept = _sphere(scale=(1.4, 1.0, 1.0))
    concept_colors = np.where(concept.vertices[:, :1] < 0, [[0.9, 0.2, 0.2]], [[0.2, 0.3, 0.9]])
    reference = _sphere()
    s = _stripes(reference.vertices[:, 1])
    reference_colors = np.stack([s, s, s], 1) * np.array([0.4, 0.7, 1.0]) + 0.1
    return (CoarseToFineOracle(_target(concept, concept_colors, "color"), 5.0),
            CoarseToFineOracle(_target(reference, reference_colors, "color"), 5.0),
            CoarseToFineOracle(_target(reference, reference_colors, "normal"), 5.0))


def _initial():
    mesh = _sphere()
    mesh.visual.vertex_colors = np.tile([150, 150, 150, 255], (len(mesh.vertices), 1))
    state, _ = init_state_from_mesh(mesh, 16, backend="torch", texture_steps=20, field_config=TINY_FIELD)
    return state


def _config(dsd: DSDConfig, iterations: int, **kw) -> DSDRefineConfig:
    base = dict(iterations=iterations, resolution=RES, guidance_resolution=None, grid_cells=16, learning_rate=0.05,
                fov_range=(FOV, FOV), dsd=dsd, lambda_normal_consistency=10.0, lambda_sparsity=0.0,
                lambda_opaque=0.0, seed=0)
    return DSDRefineConfig(**{**base, **kw})


def _patterns(result):
    """(coarse, fine): correlations of the refined texture at the surface with the concept's left/right layout
    (red minus blue against -sign(x)) and with the reference's stripes (blue channel against the bands)."""
    v = result.vertices
    with torch.no_grad():
        albedo = result.state.albedo(v).numpy()
    x, y = v[:, 0].numpy(), v[:, 1].numpy()
    coarse = np.corrcoef(albedo[:, 0] - albedo[:, 2], -np.sign(x))[0, 1]
    fine = np.corrcoef(albedo[:, 2], _stripes(y))[0, 1]
    return float(coarse), float(fine)


def test_oracle_blur_is_the_known_low_pass():
    img = torch.zeros(2, 1, 33, 33)
    img[:, :, 16, 16] = 1.0
    out = gaussian_blur(img, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out[1], img[1])                               # radius 0: unchanged
    g = torch.exp(-0.5 * (torch.arange(-6, 7.0) / 2.0) ** 2)
    g = g / g.sum()
    torch.testing.assert_close(out[0, 0, 10:23, 10:23], g[:, None] * g[None, :], atol=1e-6, rtol=1e-4)
    oracle = CoarseToFineOracle(lambda views: torch.zeros(1, 3, 8, 8))
    r = oracle.radius(torch.tensor([100, 750]))
    assert 0.6 < float(r[0]) < 0.8 and 8 < float(r[1]) < 8.4                  # 2 px per sigma: sqrt((1-a)/a)


@pytest.mark.slow  # about 45 s: two 100-iteration refines
def test_concept_sets_the_coarse_layout_and_reference_the_fine_detail_and_swapping_ranges_fails():
    concept, reference, reference_normal = _priors()
    figures = {}
    for name, dsd in (("themestation", DSDConfig(guidance_scale=1.0, score="sds")),
                      ("swapped", DSDConfig(guidance_scale=1.0, score="sds", concept_min_step=0.1, concept_max_step=0.25,
                                            reference_min_step=0.5, reference_max_step=0.75))):
        state = _initial()
        start = _patterns(type("R", (), {"vertices": state.surface()[0].detach(), "state": state})())
        result = fit_dsd(state, concept.encode, themestation_terms(dsd, concept, reference, reference_normal),
                         _config(dsd, 100), backend="torch")
        figures[name] = (start, _patterns(result))
    print(f"\n(coarse, fine) correlations before -> after: {figures}")
    (c0, f0), (coarse, fine) = figures["themestation"]
    assert abs(c0) < 0.1 and abs(f0) < 0.1                                     # the grey start has neither
    assert coarse > 0.4 and fine > 0.4                                         # measured: 0.58, 0.67
    swapped_coarse, _ = figures["swapped"][1]
    assert swapped_coarse < 0.2 and coarse - swapped_coarse > 0.3              # measured: 0.05


class _PixelScore(torch.nn.Module):
    """A minimal trainable score model on 3-channel pixel 'latents': a per-pixel linear map (LoRA-able)."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(3, 3)
        self.mix.requires_grad_(False)
        self.alphas_cumprod = CoarseToFineOracle(None).alphas_cumprod
        self.prediction_type = "eps"

    def predict(self, x_t, t, context):
        return self.mix(x_t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def lora_targets(self, text_encoder=False):
        return {"mix": self.mix}


def test_the_loop_trains_vsd_scores_logs_every_term_and_previews_both_renders():
    concept, reference, reference_normal = _priors()
    dsd = DSDConfig()
    ctx = torch.zeros(1, 1, 4)
    scores = {"concept": VSDScore(_PixelScore(), {"color": ctx}, VSDConfig(rank=1), "concept"),
              "reference": VSDScore(_PixelScore(), {"color": ctx, "normal": ctx}, VSDConfig(rank=1), "reference")}
    baselines = {"concept_color": scores["concept"].baseline("color"),
                 "reference_color": scores["reference"].baseline("color"),
                 "reference_normal": scores["reference"].baseline("normal")}
    terms = themestation_terms(dsd, concept, reference, reference_normal, baselines)
    state = _initial()
    previews = []
    result = fit_dsd(state, concept.encode, terms, _config(dsd, 3, preview_every=1, opaque_start=1,
                                                          lambda_sparsity=10.0, lambda_opaque=1000.0),
                     scores=scores, backend="torch", progress=lambda i, n, p: previews.append(p))
    assert set(result.loss_map) >= {"loss", "concept_color", "reference_color", "reference_normal", "vsd_concept",
                                    "vsd_reference", "normal_consistency", "sparsity", "opaque"}
    assert result.loss_map["opaque"][0] == 0 and result.loss_map["opaque"][1] > 0   # from step opaque_start on
    assert all(s.steps == 3 for s in scores.values())
    assert all(layer.up.abs().max() > 0 for s in scores.values() for layer in s.lora.layers.values())
    assert len(previews) == 3 and previews[0].shape == (RES, 2 * RES, 3)
    assert state.steps_done == 3
    # colour on white, normal map on black: the corners of the first preview
    assert previews[0][0, 0].min() > 0.99 and previews[0][0, RES].max() < 0.01
    with pytest.raises(ValueError, match="missing: concept, reference"):
        fit_dsd(state, concept.encode, terms, _config(dsd, 1), backend="torch")


def test_cancel_keeps_a_consistent_state_and_resume_continues_the_count():
    concept, reference, reference_normal = _priors()
    dsd = DSDConfig(score="sds")
    terms = themestation_terms(dsd, concept, reference, reference_normal)
    state = _initial()

    def stop(i, n, preview):
        if i == 2:
            raise InterruptedError("cancelled")
    with pytest.raises(InterruptedError):
        fit_dsd(state, concept.encode, terms, _config(dsd, 5), backend="torch", progress=stop)
    assert state.steps_done == 2 and set(state.optimizer_state) >= {"sdf", "delta"}
    result = fit_dsd(state, concept.encode, terms, _config(dsd, 1), backend="torch")
    assert result.state.steps_done == 3


def test_renders_and_bad_settings():
    state = _initial()
    v, f = state.surface()
    color, normal, alpha = render_dsd_views(state, v, f, orbit_cameras(0.0, 0.0, 1.5, FOV), 32, 1.0, "torch")
    assert color.shape == normal.shape == (1, 32, 32, 3) and alpha.shape == (1, 32, 32)
    centre = normal[0, 16, 16]
    torch.testing.assert_close(centre, torch.tensor([0.5, 0.5, 1.0]), atol=0.05, rtol=0)  # facing +z: (n+1)/2
    for kw, match in ((dict(resolution=4), "resolution"), (dict(distance_range=(0.0, 1.0)), "distance_range"),
                      (dict(fov_range=(70.0, 190.0)), "fov_range"), (dict(lambda_sparsity=-1.0), "lambda_sparsity"),
                      (dict(dsd=dataclasses.replace(DSDConfig(), reference_max_step=0.05)), "reference")):
        with pytest.raises(ValueError, match=match):
            _config(kw.pop("dsd", DSDConfig()), 1, **kw).validate()
