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

import math
from typing import Tuple

import torch
import torch.nn.functional as F

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


def gaussian_blur(images: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images blurred by a Gaussian of std ``radius[b]`` pixels each (separable, reflect padding;
    radius 0 leaves a sample as it is)."""
    b, c, h, w = images.shape
    r = radius.to(images.dtype).reshape(b)
    half = int(min(max(math.ceil(3 * float(r.max())), 1), (min(h, w) - 1)))
    x = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x[None] / r.clamp_min(1e-6)[:, None]) ** 2)
    k = torch.where(r[:, None] > 1e-6, k, (x[None] == 0).to(images.dtype))
    k = k / k.sum(1, keepdim=True)                                                 # (B, K)
    weight_h = k.repeat_interleave(c, 0)[:, None, None, :]                          # (B*C, 1, 1, K)
    weight_v = k.repeat_interleave(c, 0)[:, None, :, None]
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"), weight_h, groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"), weight_v, groups=b * c)
    return flat.reshape(b, c, h, w)


class CoarseToFineOracle:
    """A prior that knows its target only at scales finer than a noise-dependent radius: a synthetic model of
    what the timestep range of score distillation selects (high noise: the target's structure up to a large
    scale; low noise: its finest detail only), for the dual-score-distillation tests.

    Denoised estimate at timestep t, in pixel space (``encode(img) = 2 img - 1``)::

        x0^ = blur_r(x_t / sqrt(abar)) + (mu - blur_r(mu)),   r = radius_per_sigma * sqrt((1 - abar) / abar) pixels

    (the input's coarse structure kept, the target ``mu`` = ``2 target(views) - 1`` supplying everything finer
    than r); ``eps_c = (x_t - sqrt(abar) x0^) / sqrt(1 - abar)``. The unconditional estimate keeps the input at
    every scale (``eps_u = 0``), so guidance s gives ``s * eps_c``. Averaged over the noise, the SDS gradient is
    ``sqrt(abar (1 - abar)) (I - blur_r)(x - mu)``: a pull towards the target at scales finer than r only.

    Args:
        target_fn: ``target_fn(views) -> (B, 3, H, W)`` images in [0, 1] (a known mesh rendered from each view).
        radius_per_sigma: pixels of blur per unit of the noise's standard deviation in x0 units.
        alphas_cumprod: (T,) schedule (default Stable Diffusion's).
    """

    def __init__(self, target_fn, radius_per_sigma: float = 2.0, alphas_cumprod: torch.Tensor | None = None):
        from .oracle import scaled_linear_alphas_cumprod  # noqa: PLC0415
        self.target_fn = target_fn
        self.radius_per_sigma = float(radius_per_sigma)
        self.alphas_cumprod = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0

    def radius(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) blur radius in pixels at timesteps ``t``."""
        abar = self.alphas_cumprod[t.cpu()].double()
        return (self.radius_per_sigma * ((1 - abar) / abar).sqrt()).float()

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, guidance_scale: float, views=None):
        b = latents_t.shape[0]
        abar = self.alphas_cumprod.to(latents_t.device)[t.to(latents_t.device)].to(latents_t.dtype).reshape(b, 1, 1, 1)
        mu = self.target_fn(views).to(latents_t) * 2.0 - 1.0
        r = self.radius(t)
        x0 = gaussian_blur(latents_t / abar.sqrt(), r) + mu - gaussian_blur(mu, r)
        eps_c = (latents_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()
        return guidance_scale * eps_c
