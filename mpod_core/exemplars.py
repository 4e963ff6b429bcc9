"""ThemeStation's exemplar renders: the images and captions its reference prior is fine-tuned on.

The official code (REFERENCE.md "ThemeStation") renders each exemplar mesh, normalised to a unit
box, from 30 views at azimuth ``i · 12°``, elevation a random integer in [−5, 30], distance 1.5 and
fov ≈ 49.1°, on white: a colour image captioned "a 3d model of {object}, in the style of {token}"
and a normal map ((n + 1) / 2 of the world normals, y up) captioned "…, normal map".

Here the azimuths are ``i · 360° / views`` (12° for 30 views), the elevations are drawn per mesh
from one generator seeded with ``seed`` (so a seed gives the same cameras every run), and the
normal map shows the smooth surface normal: vertex normals averaged over every face that meets at
a position (area-weighted, seams and duplicated vertices merged), interpolated across each
triangle and renormalised per pixel, so a smooth exemplar gets a smooth normal map, not facets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .cameras import orbit_cameras
from .configdoc import limits
from .mesh import MeshLike, mesh_to_tensors, normalize_mesh
from .progress import ProgressFn
from .render import render_mesh

__all__ = ["ExemplarConfig", "ExemplarRenders", "exemplar_angles", "exemplar_captions", "images_per_view",
           "smooth_vertex_normals", "render_exemplars", "MAX_EXEMPLAR_PIXELS"]

#: Most output pixels of one call (colour + normal images of every mesh): 2^26 is 1.5 GiB of float32 RGB.
MAX_EXEMPLAR_PIXELS = 2 ** 26


@dataclass
class ExemplarConfig:
    """How exemplars are rendered and captioned; each default names its source."""

    views: int = field(default=30, metadata=limits(1, 360))
    """Views per mesh, at azimuths i · 360° / views (ThemeStation's official renders: 30, i · 12°)."""
    resolution: int = field(default=512, metadata=limits(64, 2048, 8))
    """Image side in pixels (the official fine-tune's 512²)."""
    elevation_min: int = field(default=-5, metadata=limits(-89, 89))
    """Lowest elevation, degrees; each view's is a random integer in [min, max] (official: −5)."""
    elevation_max: int = field(default=30, metadata=limits(-89, 89))
    """Highest elevation, degrees (official: 30)."""
    distance: float = field(default=1.5, metadata=limits(0.1, 100.0, 0.05))
    """Camera distance from the unit box's centre (official: 1.5)."""
    fov: float = field(default=49.1, metadata=limits(1.0, 179.0, 0.1))
    """Vertical field of view, degrees (official: ≈ 49.1)."""
    object: str = "object"
    """What the exemplars are, for the captions ("a 3d model of {object}, …")."""
    token: str = "sks"
    """The theme's rare token (official: "sks"), for "…, in the style of {token}"."""
    caption: str = "a 3d model of {object}, in the style of {token}"
    """Caption of the colour renders, {object} and {token} filled in; the normal maps' adds ", normal map"
    (official reference prior). The concept prior's renders of the initial model use
    "a 3d model of {token} {object}" (official)."""
    normal_maps: bool = True
    """Also render a normal map of each view (official reference prior: colour and normal renders; the concept
    prior trains on colour renders of the initial model only)."""
    seed: int = field(default=0, metadata=limits(0, 2 ** 63 - 1))
    """Seed of the elevations."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if not -90 < self.elevation_min <= self.elevation_max < 90:
            raise ValueError(f"elevations must satisfy -90 < elevation_min <= elevation_max < 90, got "
                             f"[{self.elevation_min}, {self.elevation_max}]")
        if not (self.distance > 0 and 0 < self.fov < 180):
            raise ValueError(f"distance must be > 0 and fov in (0, 180), got {self.distance}, {self.fov}")
        for name in ("object", "token", "caption"):
            text = getattr(self, name)
            if not text.strip() or "\n" in text or "\r" in text:
                raise ValueError(f"{name} must be one line of text, not empty, got {text!r}")
        try:
            self.caption.format(object="", token="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"caption: {self.caption!r} may hold only {{object}} and {{token}} as fields "
                             f"({type(exc).__name__}: {exc})") from None


@dataclass
class ExemplarRenders:
    """What :func:`render_exemplars` returns; images and captions in step."""

    images: torch.Tensor
    """(M · 2 · V, H, W, 3) per mesh: its V colour renders, then its V normal maps; on white."""
    captions: List[str]
    """One caption per image, in the same order."""
    elevations: torch.Tensor
    """(M, V) elevation of each view, degrees (integers)."""
    azimuths: torch.Tensor
    """(V,) azimuths, degrees (the same for every mesh)."""


def exemplar_angles(config: ExemplarConfig, meshes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, V) integer elevations drawn row by row from one generator seeded with ``config.seed`` (mesh k's
    do not change when meshes are added after it), and (V,) azimuths ``i · 360 / V``."""
    generator = torch.Generator().manual_seed(int(config.seed))
    elevations = torch.randint(int(config.elevation_min), int(config.elevation_max) + 1, (meshes, config.views),
                               generator=generator).to(torch.float64)
    azimuths = torch.arange(config.views, dtype=torch.float64) * (360.0 / config.views)
    return elevations, azimuths


def exemplar_captions(config: ExemplarConfig, views: int) -> List[str]:
    """The captions of one mesh: V colour captions, then (``normal_maps``) V normal-map captions."""
    colour = config.caption.strip().format(object=config.object.strip(), token=config.token.strip())
    return [colour] * views + ([f"{colour}, normal map"] * views if config.normal_maps else [])


def images_per_view(config: ExemplarConfig) -> int:
    """2 with normal maps, else 1."""
    return 2 if config.normal_maps else 1


def smooth_vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) unit normals: the area-weighted face normals summed over every face meeting at each
    position (vertices at the same position, e.g. duplicated along UV seams, share one normal)."""
    _, group = torch.unique(vertices, dim=0, return_inverse=True)
    v = vertices.double()
    face_n = torch.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]], dim=1)  # 2 · area
    summed = torch.zeros(int(group.max()) + 1, 3, dtype=torch.float64, device=vertices.device)
    summed.index_add_(0, group[faces].reshape(-1), face_n.repeat_interleave(3, dim=0))
    return F.normalize(summed[group], dim=1, eps=1e-20).to(vertices.dtype)


def _check_pixels(config: ExemplarConfig, meshes: int) -> None:
    per_view = images_per_view(config)
    pixels = meshes * per_view * config.views * config.resolution ** 2
    if pixels > MAX_EXEMPLAR_PIXELS:
        raise ValueError(f"{meshes} meshes x {config.views} views x {per_view} images x {config.resolution}^2 = "
                         f"{pixels} "
                         f"pixels exceed {MAX_EXEMPLAR_PIXELS}, the most the output images may hold in memory; "
                         "lower views or resolution, or render the exemplars in several nodes")


def render_exemplars(meshes: Sequence[MeshLike], config: ExemplarConfig, *, device=None, backend: str = "auto",
                     antialias: bool = True, progress: Optional[ProgressFn] = None) -> ExemplarRenders:
    """Colour renders and (``normal_maps``) normal maps of every mesh (each normalised to the unit box) with captions.

    Args:
        meshes: M >= 1 meshes (a Scene counts as one mesh, flattened).
        config: :class:`ExemplarConfig`.
        device: where to render (default CPU); the images come back on the CPU.
        backend: rasterizer backend.
        antialias: blend silhouette pixels with the white background.
        progress: ``progress(done, total, preview)`` per chunk of views; may raise to stop.

    Raises:
        ValueError: no mesh, bad settings, or more output pixels than :data:`MAX_EXEMPLAR_PIXELS`.
    """
    config.validate()
    if not meshes:
        raise ValueError("no exemplar mesh: connect one mesh, a Mesh List or a scene")
    _check_pixels(config, len(meshes))
    res, views = config.resolution, config.views
    elevations, azimuths = exemplar_angles(config, len(meshes))
    white = (1.0, 1.0, 1.0)
    total, done = images_per_view(config) * views * len(meshes), 0
    images: List[torch.Tensor] = []
    captions: List[str] = []
    for k, mesh in enumerate(meshes):
        t = mesh_to_tensors(normalize_mesh(mesh, 1.0), device=device)
        cams = orbit_cameras(elevations[k], azimuths, config.distance, config.fov, device=device)

        def step(done_here, _total, preview, offset=done):
            if progress is not None:
                progress(offset + done_here, total, preview)
        with torch.no_grad():
            colour = render_mesh(t.vertices, t.faces, cams, res, res, vertex_colors=t.vertex_colors, uv=t.uv,
                                 texture=t.texture, background=white, antialias=antialias, backend=backend,
                                 progress=step)
            done += views
        images.append(colour.color.clamp(0, 1).cpu())
        captions += exemplar_captions(config, views)
        if not config.normal_maps:
            continue
        with torch.no_grad():
            normals = smooth_vertex_normals(t.vertices, t.faces)
            # Interpolated (n + 1) / 2 over black is alpha · (n + 1) / 2; undo both, renormalise, then over white.
            shaded = render_mesh(t.vertices, t.faces, cams, res, res, vertex_colors=(normals + 1) / 2,
                                 background=(0.0, 0.0, 0.0), antialias=antialias, backend=backend,
                                 progress=lambda d, n, p, offset=done: step(d, n, p, offset))
            done += views
            alpha = shaded.alpha[..., None]
            n = F.normalize(shaded.color / alpha.clamp_min(1e-6) * 2 - 1, dim=-1, eps=1e-12)
            normal_map = torch.where(alpha > 0, alpha * (n + 1) / 2 + (1 - alpha), torch.ones_like(n))
        images.append(normal_map.clamp(0, 1).cpu())
    return ExemplarRenders(images=torch.cat(images), captions=captions, elevations=elevations, azimuths=azimuths)
