"""A multi-view oracle for image-to-3D loops: a known mesh whose render from
each sampled camera is the Gaussian oracle's per-view target.

Score distillation with :class:`MeshViewOracle` as the denoiser pulls every
novel view towards the mesh's appearance from that view, so an image-to-3D
optimiser must recover the mesh: its silhouettes and colours at held-out views
are the known answer. A wrong camera convention anywhere (view sampling,
:class:`~mpod_core.guidance.protocol.ViewCondition`, rays) gives inconsistent
targets and fails it.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..cameras import orbit_cameras
from ..render import render_mesh
from .oracle import OracleDenoiser


def asymmetric_scene() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A box with a ball on its upper right front: no mirror or rotation symmetry.

    Returns:
        vertices (V, 3), faces (F, 3) long, vertex colours (V, 3) (a gradient over the box).
    """
    import trimesh  # noqa: PLC0415 (a dependency of the pack; kept out of module import time)

    box = trimesh.creation.box(extents=(0.9, 0.5, 0.5))
    box.apply_translation((-0.1, -0.15, 0.0))
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    ball.apply_translation((0.25, 0.25, 0.1))
    mesh = trimesh.util.concatenate([box, ball])
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    colors = (v - v.min(0).values) / (v.max(0).values - v.min(0).values) * 0.8 + 0.1
    return v, torch.tensor(mesh.faces, dtype=torch.long), colors


class MeshViewOracle:
    """Renders of a mesh on white from orbit cameras, as per-view oracle targets.

    Args:
        vertices, faces, colors: the mesh (default :func:`asymmetric_scene`).
        resolution: render size of the targets (the loop's render size).
        distance, fov: the orbit cameras' distance and vertical fov.
    """

    def __init__(self, resolution: int, vertices=None, faces=None, colors=None, distance: float = 2.5,
                 fov: float = 40.0):
        if vertices is None:
            vertices, faces, colors = asymmetric_scene()
        self.v, self.f, self.c = vertices, faces, colors
        self.resolution = int(resolution)
        self.distance, self.fov = float(distance), float(fov)

    def render(self, elevation, azimuth, resolution: int | None = None):
        """:class:`~mpod_core.render.MeshRender` of the mesh from (elevation, azimuth) views."""
        res = resolution or self.resolution
        cams = orbit_cameras(elevation, azimuth, self.distance, self.fov)
        return render_mesh(self.v, self.f, cams, res, res, vertex_colors=self.c, background=(1.0, 1.0, 1.0))

    def target_fn(self, views, batch):
        """(B, 3, H, W) latent targets ``2 * render - 1`` of each view (OracleDenoiser's ``target_fn``)."""
        r = self.render(views.elevation.float(), views.azimuth.float())
        return r.color.permute(0, 3, 1, 2) * 2.0 - 1.0

    def denoiser(self, sigma: float = 0.05) -> OracleDenoiser:
        """An :class:`OracleDenoiser` whose per-view targets are this mesh's renders."""
        return OracleDenoiser(target_fn=self.target_fn, sigma=sigma)

    def reference(self, resolution: int, elevation: float = 0.0, azimuth: float = 0.0):
        """(H, W, 3) colour and (H, W) alpha of the reference view."""
        r = self.render(elevation, azimuth, resolution)
        return r.color[0], r.alpha[0]

    @torch.no_grad()
    def compare(self, field, elevations, azimuths, resolution: int | None = None) -> dict:
        """How well a radiance field reproduces the mesh at the given views.

        Args:
            field: a :class:`~mpod_core.fields.RadianceField` (duck-typed: ``opacity_mask``, ``render``).
            elevations, azimuths: N views (degrees).
            resolution: image size (default: the oracle's).

        Returns:
            ``iou`` (N,) of the 0.5-thresholded opacity against the mesh's silhouette,
            ``psnr`` (N,) of the colour on white (dB), and ``haze``: the share of
            the rendered opacity that lies outside the true silhouettes.
        """
        res = resolution or self.resolution
        cams = orbit_cameras(elevations, azimuths, self.distance, self.fov)
        mask, opacity = field.opacity_mask(cams, res, res, 0.5)
        color = field.render(cams, res, res, background=1.0)["color"]
        truth = self.render(elevations, azimuths, res)
        gt = truth.alpha > 0.5
        pred = mask > 0.5
        iou = (gt & pred).sum((1, 2)).float() / (gt | pred).sum((1, 2)).float()
        psnr = -10 * torch.log10(((color - truth.color) ** 2).mean((1, 2, 3)))
        total = opacity.sum().clamp_min(1e-8)
        haze = float((opacity * (~gt)).sum() / total)
        # the same beyond a 2-pixel band around the silhouette: edge softness excluded
        near = torch.nn.functional.max_pool2d(gt[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0
        haze_far = float((opacity * (~near)).sum() / total)
        return {"iou": iou, "psnr": psnr, "haze": haze, "haze_beyond_2px": haze_far}
