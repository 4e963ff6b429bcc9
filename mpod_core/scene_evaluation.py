"""REPARO's evaluation (paper §4): a generated multi-object scene against the ground truth from N views.

Both scenes are rendered from the same orbit cameras, on white, in the same world frame (neither is
renormalised, so a misplaced or mis-scaled object shows in the figures). The orbit is centred on the
*reference* scene's bounding-box centre at the distance that frames the reference's bounding sphere for
the field of view. Per view and as means over the views:

* PSNR on [0, 1] colours (identical views give :data:`PSNR_CAP_DB`, so the figures stay finite);
* SSIM, the pack's one (:func:`mpod_core.metrics.ssim_per_view`: Wang et al.'s 11 x 11 Gaussian, sigma 1.5);
* LPIPS with the ``lpips`` package's AlexNet (the paper's default network, version 0.1 linear layers, which
  ship in its wheel); the AlexNet backbone comes from a torchvision weights file the caller names
  (:func:`load_lpips`), never from a download;
* CLIP score: the cosine similarity between the image embeddings of the two renders of each view
  (:func:`mpod_core.metrics.cosine_similarities`), given an image encoder.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .cameras import Cameras, orbit_cameras
from .configdoc import limits
from .mesh import MeshLike, check_mesh, mesh_to_tensors
from .metrics import check_pixels, cosine_similarities, render_on_white, ssim_per_view
from .progress import ProgressFn

__all__ = ["SceneEvalConfig", "SceneEvaluation", "EvaluationCameras", "evaluation_cameras", "psnr_per_view",
           "load_lpips", "lpips_per_view", "evaluate_scene", "evaluation_plot", "render_pairs", "PSNR_CAP_DB",
           "LPIPS_BACKBONE_FILE", "LPIPS_BACKBONE_URL", "METRICS"]

#: PSNR of identical views (mean squared error <= 10^-10), in dB: keeps the per-view figures, their mean and
#: the JSON finite. A mean over views that includes capped ones is a lower bound of "infinitely close".
PSNR_CAP_DB = 100.0
#: torchvision's ImageNet AlexNet weights, the backbone LPIPS' "alex" network is calibrated on.
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_BACKBONE_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
#: Metric names, in report order (the JSON keys too).
METRICS = ("psnr", "ssim", "lpips", "clip")
_TITLES = {"psnr": "PSNR, dB (higher = closer)", "ssim": "SSIM (higher = closer)", "lpips": "LPIPS (lower = closer)",
           "clip": "CLIP score (higher = closer)"}
#: Smallest render side: LPIPS' AlexNet pools a 31-pixel image down to nothing.
MIN_RESOLUTION = 32


@dataclass
class SceneEvalConfig:
    """Cameras and renders of the evaluation; each default names its source."""

    views: int = field(default=18, metadata=limits(1, 64))
    """Views at azimuths i · 360° / views (REPARO §4: "images from 18 views")."""
    resolution: int = field(default=256, metadata=limits(MIN_RESOLUTION, 1024, 8))
    """Render side in pixels (256, the official layout configs' render size; CLIP resizes to its 224)."""
    elevation: float = field(default=15.0, metadata=limits(-89.0, 89.0, 0.5))
    """Camera elevation in degrees (15: our choice; the paper does not give its elevations)."""
    fov: float = field(default=40.0, metadata=limits(5.0, 120.0, 0.5))
    """Vertical field of view in degrees (40, the pack's reference view, cameras.REFERENCE_VIEW; the paper does
    not give its cameras). The distance follows: the reference's bounding sphere just fills the view."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if int(self.views) < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if int(self.resolution) < MIN_RESOLUTION:
            raise ValueError(f"resolution must be >= {MIN_RESOLUTION} (LPIPS' AlexNet), got {self.resolution}")
        if not (-90 < self.elevation < 90 and 0 < self.fov < 180):
            raise ValueError(f"elevation must be in (-90, 90) and fov in (0, 180), got {self.elevation}, {self.fov}")


@dataclass
class EvaluationCameras:
    """The shared cameras: an orbit around the reference's bounding-box centre."""

    cameras: Cameras
    """N cameras (float32)."""
    azimuths: torch.Tensor
    """(N,) float64 degrees."""
    centre: torch.Tensor
    """(3,) float64 world position the cameras look at: the reference's bounding-box centre."""
    radius: float
    """The reference's bounding-sphere radius (half its bounding-box diagonal)."""
    distance: float
    """Camera distance from ``centre``: radius / sin(fov / 2)."""


def evaluation_cameras(reference_vertices: torch.Tensor, config: SceneEvalConfig, device=None) -> EvaluationCameras:
    """The orbit every view of both scenes is rendered from.

    Args:
        reference_vertices: (V, 3) world positions of the reference scene (all objects, placed).
        config: views, elevation, fov.

    Raises:
        ValueError: a reference of zero extent.
    """
    v = torch.as_tensor(reference_vertices).detach().to(torch.float64).cpu()
    lo, hi = v.min(0).values, v.max(0).values
    centre, radius = (lo + hi) / 2, float((hi - lo).norm()) / 2
    if not radius > 0:
        raise ValueError("reference_scene has zero extent (all vertices coincide)")
    distance = radius / math.sin(math.radians(config.fov) / 2)
    azimuths = torch.arange(int(config.views), dtype=torch.float64) * (360.0 / int(config.views))
    # near/far scale with the orbit, so a scene of any size (or an object far outside it) is not clipped
    cams = orbit_cameras(config.elevation, azimuths, distance, config.fov, near=distance * 1e-2, far=distance * 1e2,
                         dtype=torch.float64)
    cams.c2w[:, :3, 3] += centre
    return EvaluationCameras(cams.to(device=device, dtype=torch.float32), azimuths, centre, radius, distance)


def psnr_per_view(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR of each pair of views, peak 1: 10 log10(1 / MSE), capped at :data:`PSNR_CAP_DB`.

    Args:
        a, b: (V, H, W, C) in [0, 1], the same shape.

    Returns:
        (V,) float64 dB.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"psnr_per_view: expected two (V, H, W, C) images of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    mse = (a.to(torch.float64) - b.to(torch.float64)).square().flatten(1).mean(1)
    floor = 10.0 ** (-PSNR_CAP_DB / 10)
    return torch.where(mse > floor, -10.0 * torch.log10(mse.clamp(min=floor)), torch.full_like(mse, PSNR_CAP_DB))


def _read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    name = os.path.basename(path)
    try:
        if str(path).lower().endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: name it, whatever the reader raised
        raise ValueError(f"{name}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{name}: expected a state dict (torchvision's {LPIPS_BACKBONE_FILE}), got "
                         f"{type(state).__name__}")
    return state


def load_lpips(backbone_path: str | os.PathLike, device=None) -> torch.nn.Module:
    """LPIPS v0.1 with the AlexNet backbone read from a torchvision weights file (nothing is downloaded).

    The linear layers come with the ``lpips`` package; the backbone is built randomly, then every
    convolution is loaded from the file's ``features.{i}.weight/bias`` (torchvision's ``alexnet()``
    state dict, e.g. :data:`LPIPS_BACKBONE_FILE`; its classifier keys are ignored).

    Args:
        backbone_path: a ``.pth``/``.pt`` (torch.load, weights only) or ``.safetensors`` file.
        device: where the network goes.

    Returns:
        The ``lpips.LPIPS`` module in eval mode, without gradients.

    Raises:
        ImportError: the ``lpips`` package is missing, with the install hint.
        ValueError: an unreadable file, or one that is not torchvision's AlexNet (the missing or
            mis-shaped keys named).
    """
    try:
        import lpips
    except ImportError as exc:
        raise ImportError("LPIPS needs the lpips package (`pip install lpips==0.1.4`, in requirements.txt)") from exc
    state = _read_state_dict(backbone_path)
    with warnings.catch_warnings():  # lpips passes torchvision the deprecated `pretrained=False` for a random net
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    backbone = {}
    for key, target in model.net.state_dict().items():  # slice{s}.{i}.{weight,bias} <- features.{i}.{...}
        source = "features." + key.split(".", 1)[1]
        if source not in state:
            raise ValueError(f"{os.path.basename(backbone_path)}: not torchvision's AlexNet ({LPIPS_BACKBONE_FILE}): "
                             f"no '{source}'")
        if tuple(state[source].shape) != tuple(target.shape):
            raise ValueError(f"{os.path.basename(backbone_path)}: '{source}' has shape {tuple(state[source].shape)}, "
                             f"AlexNet's is {tuple(target.shape)}")
        backbone[key] = state[source].to(target.dtype)
    model.net.load_state_dict(backbone, strict=True)
    return model.eval().requires_grad_(False).to(device)


def lpips_per_view(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS distance of each pair of views (0 for identical views).

    Args:
        model: from :func:`load_lpips`.
        a, b: (V, H, W, 3) in [0, 1], H and W >= 32.

    Returns:
        (V,) float64, on the CPU.
    """
    param = next(model.parameters())
    x, y = (t.permute(0, 3, 1, 2).to(device=param.device, dtype=param.dtype) for t in (a, b))
    with torch.no_grad():
        return model(x, y, normalize=True).reshape(-1).to(torch.float64).cpu()


@dataclass
class SceneEvaluation:
    """What :func:`evaluate_scene` returns: per-view figures (V,) float64, the renders and the cameras."""

    config: SceneEvalConfig
    cameras: EvaluationCameras
    psnr: torch.Tensor
    ssim: torch.Tensor
    lpips: Optional[torch.Tensor]
    """None when no LPIPS network was given (see ``notes``)."""
    clip: Optional[torch.Tensor]
    """None when no image encoder was given (see ``notes``)."""
    renders: torch.Tensor
    """(V, R, R, 3) the evaluated scene's views."""
    reference_renders: torch.Tensor
    """(V, R, R, 3) the reference's views, same cameras."""
    notes: List[str] = field(default_factory=list)

    def per_view(self, name: str) -> Optional[torch.Tensor]:
        """(V,) figures of metric ``name`` (one of :data:`METRICS`), or None when it was left out."""
        return getattr(self, name)

    def means(self) -> Dict[str, Optional[float]]:
        """Mean of each metric over the views (None when left out)."""
        return {name: None if self.per_view(name) is None else float(self.per_view(name).mean()) for name in METRICS}

    def to_dict(self) -> dict:
        """Settings, means, per-view figures and notes (JSON-ready: plain floats, None for a metric left out)."""
        c, cams = self.config, self.cameras
        rows = []
        for k in range(len(cams.azimuths)):
            row = {"view": k, "azimuth": float(cams.azimuths[k]), "elevation": float(c.elevation)}
            row.update({name: None if self.per_view(name) is None else float(self.per_view(name)[k])
                        for name in METRICS})
            rows.append(row)
        return {"evaluation": "REPARO sec. 4: generated scene vs reference from shared cameras",
                "views": int(c.views), "resolution": int(c.resolution), "elevation": float(c.elevation),
                "fov": float(c.fov), "distance": cams.distance, "centre": [float(x) for x in cams.centre],
                "radius": cams.radius, "psnr_cap_db": PSNR_CAP_DB, "mean": self.means(), "per_view": rows,
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def report(self) -> str:
        """The means, each view's figures and the notes, as text."""
        c, cams = self.config, self.cameras
        present = [name for name in METRICS if self.per_view(name) is not None]
        lines = [f"Scene evaluation (REPARO sec. 4): {c.views} views at {c.resolution}x{c.resolution}, elevation "
                 f"{c.elevation:g}, fov {c.fov:g}, distance {cams.distance:.4g} around the reference's centre "
                 f"({', '.join(f'{float(x):.4g}' for x in cams.centre)})",
                 "mean: " + ", ".join(f"{name.upper()} {value:.4f}" if value is not None else f"{name.upper()} -"
                                      for name, value in self.means().items())]
        lines.append("view  azimuth " + "".join(f"{name.upper():>10}" for name in present))
        for k in range(len(cams.azimuths)):
            lines.append(f"{k:>4} {float(cams.azimuths[k]):>8.1f} "
                         + "".join(f"{float(self.per_view(name)[k]):>10.4f}" for name in present))
        lines.append(f"(PSNR of identical views is capped at {PSNR_CAP_DB:g} dB.)")
        lines += self.notes
        return "\n".join(lines)


def evaluate_scene(scene: MeshLike, reference: MeshLike, config: SceneEvalConfig, *,
                   lpips_model: Optional[torch.nn.Module] = None,
                   embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, clip_chunk: int = 4,
                   notes: Sequence[str] = (), device=None, backend: str = "auto",
                   progress: Optional[ProgressFn] = None) -> SceneEvaluation:
    """REPARO's multi-view figures of ``scene`` against ``reference`` (see the module docstring).

    Args:
        scene: the evaluated Trimesh or Scene, in the reference's world frame.
        reference: the ground-truth Trimesh or Scene; the cameras orbit its bounding-box centre.
        config: :class:`SceneEvalConfig`.
        lpips_model: from :func:`load_lpips`, or None to leave LPIPS out.
        embed: ``images (B, H, W, 3) in [0, 1] -> (B, D)`` image embeddings (a CLIP vision model's), or
            None to leave the CLIP score out.
        clip_chunk: views whose renders go through ``embed`` together (2 x clip_chunk images a call).
        notes: lines added to the report and the JSON (e.g. why LPIPS was left out).
        device: where to render.
        backend: rasterizer backend.
        progress: ``progress(done, 3 * views, preview)``: after each chunk of views rendered, for the
            scene and then the reference, and after each view's figures; it may raise to stop.

    Raises:
        ValueError: bad settings, an empty or unusable scene (named ``scene`` or ``reference_scene``),
            too many pixels, embeddings of the wrong shape.
    """
    config.validate()
    check_pixels(2, config)
    scene_t = mesh_to_tensors(check_mesh(scene, "scene"), device=device)
    reference_t = mesh_to_tensors(check_mesh(reference, "reference_scene"), device=device)
    cams = evaluation_cameras(reference_t.vertices, config, device=device)
    n = int(config.views)
    total = 3 * n

    def stage(offset: int) -> Optional[ProgressFn]:
        return None if progress is None else (lambda done, _n, preview: progress(offset + done, total, preview))

    renders = render_on_white(scene_t, cams.cameras, config.resolution, backend=backend, progress=stage(0))
    reference_renders = render_on_white(reference_t, cams.cameras, config.resolution, backend=backend,
                                        progress=stage(n))
    psnr = psnr_per_view(renders, reference_renders)
    ssim = torch.as_tensor(ssim_per_view(renders, reference_renders), dtype=torch.float64)
    lpips_values = torch.zeros(n, dtype=torch.float64) if lpips_model is not None else None
    clip_values = torch.zeros(n, dtype=torch.float64) if embed is not None else None
    clip_chunk = max(1, int(clip_chunk))
    for k in range(n):
        pair = (renders[k:k + 1], reference_renders[k:k + 1])
        if lpips_values is not None:
            lpips_values[k] = lpips_per_view(lpips_model, *pair)[0]
        if clip_values is not None and k % clip_chunk == 0:  # a few views per encoder call: fewer, larger batches
            end = min(k + clip_chunk, n)
            embeds = torch.as_tensor(embed(torch.cat([renders[k:end], reference_renders[k:end]]))).detach().cpu()
            if embeds.ndim != 2 or embeds.shape[0] != 2 * (end - k):
                raise ValueError(f"embed: expected ({2 * (end - k)}, D) embeddings of {end - k} views' two renders, "
                                 f"got {tuple(embeds.shape)}")
            clip_values[k:end] = cosine_similarities(embeds[:end - k], embeds[end - k:], "CLIP score")
        if progress is not None:
            progress(2 * n + k + 1, total, torch.cat(pair, dim=2)[0])
    return SceneEvaluation(config, cams, psnr, ssim, lpips_values, clip_values, renders, reference_renders,
                           list(notes))


def render_pairs(result: SceneEvaluation, gap: int = 2) -> torch.Tensor:
    """Each view's two renders side by side: the evaluated scene left, the reference right, a grey gap between.

    Returns:
        (V, R, 2R + gap, 3) float32 in [0, 1].
    """
    v, r = result.renders.shape[:2]
    divider = torch.full((v, r, gap, 3), 0.5)
    return torch.cat([result.renders, divider, result.reference_renders], dim=2)


def _font():
    return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _panel(draw: ImageDraw.ImageDraw, box, title: str, values: Optional[np.ndarray], azimuths: np.ndarray,
           font, colour) -> None:
    """One metric's per-view line chart in ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(160, 160, 160))
    if values is None:
        draw.text((x0 + 8, y0 + 6), f"{title}: left out (see the report)", fill=(120, 120, 120), font=font)
        return
    draw.text((x0 + 8, y0 + 6), f"{title}  mean {values.mean():.4f}", fill=(0, 0, 0), font=font)
    left, right, top, bottom = x0 + 56, x1 - 12, y0 + 26, y1 - 24
    lo, hi = float(values.min()), float(values.max())
    pad = 0.1 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 0.05)
    lo, hi = lo - pad, hi + pad
    for value in (lo, (lo + hi) / 2, hi):
        y = bottom - (value - lo) / (hi - lo) * (bottom - top)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        label = f"{value:.3g}"
        draw.text((left - 6 - _text_width(draw, label, font), y - 6), label, fill=(80, 80, 80), font=font)
    n = len(values)
    xs = [left + (right - left) * (k + 0.5) / n for k in range(n)]
    ys = [bottom - (float(v) - lo) / (hi - lo) * (bottom - top) for v in values]
    if n > 1:
        draw.line(list(zip(xs, ys)), fill=colour, width=2)
    step = max(1, math.ceil(n / 9))  # at most ~9 azimuth labels
    for k, (x, y) in enumerate(zip(xs, ys)):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if k % step == 0:
            label = f"{azimuths[k]:g}°"
            draw.text((x - _text_width(draw, label, font) / 2, bottom + 6), label, fill=(80, 80, 80), font=font)


def evaluation_plot(result: SceneEvaluation, width: int = 960) -> torch.Tensor:
    """A picture of the figures: one per-view line chart per metric (x = azimuth), then the two render strips
    (the evaluated scene above the reference, view by view).

    Returns:
        (H, width, 3) float32 in [0, 1].
    """
    font = _font()
    n = len(result.cameras.azimuths)
    margin, panel_h = 12, 190
    panel_w = (width - 3 * margin) // 2
    thumb = max(8, min(96, (width - 2 * margin - 80) // n))
    strips_top = margin + 2 * (panel_h + margin)
    height = strips_top + 2 * (thumb + 6) + margin
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    azimuths = result.cameras.azimuths.numpy()
    colours = {"psnr": (31, 119, 180), "ssim": (44, 160, 44), "lpips": (214, 39, 40), "clip": (148, 103, 189)}
    for i, name in enumerate(METRICS):
        x0 = margin + (i % 2) * (panel_w + margin)
        y0 = margin + (i // 2) * (panel_h + margin)
        values = result.per_view(name)
        _panel(draw, (x0, y0, x0 + panel_w, y0 + panel_h), _TITLES[name],
               None if values is None else values.numpy(), azimuths, font, colours[name])
    for row, (label, renders) in enumerate((("scene", result.renders), ("reference", result.reference_renders))):
        y = strips_top + row * (thumb + 6)
        draw.text((margin, y + thumb / 2 - 6), label, fill=(0, 0, 0), font=font)
        small = torch.nn.functional.interpolate(renders.permute(0, 3, 1, 2), size=(thumb, thumb), mode="area")
        pixels = (small.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        for k in range(n):
            x = margin + 80 + k * thumb
            image.paste(Image.fromarray(pixels[k]), (x, y))
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=(200, 200, 200))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
