"""ThemeStation's evaluation figures (paper §4.1.3) for generated meshes: diversity and concept fidelity.

* Geometry diversity: the mean pairwise voxel IoU distance (1 − IoU) among the generated models.
* Visual diversity: per-view image distances between renders of the models from the same cameras,
  averaged over pairs and views. The paper uses LPIPS, whose network weights cannot be downloaded
  here; this module reports per-pixel MSE and 1 − SSIM instead (LPIPS figures are not comparable
  with these). The paper's sentence pairs the two diversities the other way round ("…
  respectively"), a slip: IoU measures shape, image distances appearance.
* CLIP score: the cosine similarity of CLIP image embeddings between the input (concept) view and
  rendered views of the model, averaged over the views.

Every mesh is first normalised as Render Exemplars does (bounding box centred at the origin, longest
side 1: :func:`mpod_core.mesh.normalize_mesh`), so diversity measures shape and appearance, not
scale or placement. Renders use :class:`MetricConfig`'s orbit cameras on white.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import trimesh

from .cameras import Cameras, orbit_cameras
from .configdoc import limits
from .mesh import MeshLike, MeshTensors, check_mesh, flatten_scene, mesh_to_tensors, normalize_mesh
from .progress import ProgressFn
from .render import render_mesh

__all__ = ["MetricConfig", "DiversityResult", "voxelize", "mesh_occupancy", "pairwise_voxel_iou_distance",
           "render_metric_views", "render_on_white", "ssim_per_view", "pairwise_image_distance",
           "clip_similarity", "cosine_similarities", "mesh_diversity",
           "similarity_report", "concept_similarity", "check_pixels", "MAX_METRIC_PIXELS", "WINDING_CHUNK"]

#: Most rendered pixels one call holds (meshes x views x resolution^2): 2^25 is 400 MiB of float32 RGB.
MAX_METRIC_PIXELS = 2 ** 25
#: Query points per call of libigl's fast winding number (bounds its working memory; each call rebuilds
#: the mesh's tree, cheap next to 2^20 queries).
WINDING_CHUNK = 2 ** 20


@dataclass
class MetricConfig:
    """How meshes are voxelised and rendered for the metrics; each default names its source."""

    voxel_resolution: int = field(default=64, metadata=limits(8, 256))
    """Voxels per side of the unit cube the normalised meshes are sampled in, for 1 − IoU (64: a common
    choice for shape IoU; the paper does not state its grid)."""
    views: int = field(default=8, metadata=limits(1, 64))
    """Rendered views per mesh at azimuths i · 360° / views (8, every 45°; the paper renders "different
    views" without a number)."""
    resolution: int = field(default=256, metadata=limits(32, 1024, 8))
    """Render side in pixels (256; CLIP resizes to its own 224)."""
    elevation: float = field(default=15.0, metadata=limits(-89.0, 89.0, 0.5))
    """Camera elevation in degrees (15, inside Render Exemplars' official [−5, 30])."""
    distance: float = field(default=1.5, metadata=limits(0.1, 100.0, 0.05))
    """Camera distance from the unit box's centre (Render Exemplars' official 1.5)."""
    fov: float = field(default=49.1, metadata=limits(1.0, 179.0, 0.1))
    """Vertical field of view, degrees (Render Exemplars' official ≈ 49.1)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not 2 <= self.voxel_resolution <= 1024:
            raise ValueError(f"voxel_resolution must be in [2, 1024], got {self.voxel_resolution}")
        if self.views < 1 or self.resolution < 8:
            raise ValueError(f"views must be >= 1 and resolution >= 8, got {self.views} and {self.resolution}")
        if not (-90 < self.elevation < 90 and self.distance > 0 and 0 < self.fov < 180):
            raise ValueError(f"elevation must be in (-90, 90), distance > 0 and fov in (0, 180), got "
                             f"{self.elevation}, {self.distance}, {self.fov}")


def _voxel_centres(resolution: int) -> np.ndarray:
    """(R^3, 3) float64 centres of the R^3 voxels of [-0.5, 0.5]^3, index order (x, y, z)."""
    c = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution - 0.5
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)


def voxelize(vertices, faces, resolution: int = 64, *, chunk_points: int = WINDING_CHUNK) -> torch.Tensor:
    """Occupancy of a mesh at the voxel centres of the unit cube, after normalising the mesh.

    The mesh is normalised as Render Exemplars does (:func:`~mpod_core.mesh.normalize_mesh`: bounding
    box centred at the origin, longest side 1), so the result, and every diversity figure built on it,
    measures shape, not scale or placement. A voxel is inside when the generalised winding number of
    its centre (libigl's ``fast_winding_number``, evaluated in chunks) has magnitude > 0.5: robust to
    small holes and self-intersections, and to a mesh whose faces all point inward (winding −1);
    an open surface without an inside (a single plane) gives no occupied voxel.

    Args:
        vertices: (V, 3) float positions (numpy or torch).
        faces: (F, 3) integer vertex indices, F >= 1.
        resolution: R, voxels per side.
        chunk_points: query points per winding-number call (bounds memory).

    Returns:
        (R, R, R) bool tensor on the CPU, indexed [x, y, z], voxel i's centre at −0.5 + (i + 0.5) / R.

    Raises:
        ValueError: bad shapes, no faces, out-of-range indices, non-finite or coincident vertices,
            resolution < 1.
        ImportError: libigl is missing, with the install hint.
    """
    v = np.asarray(vertices.detach().cpu() if isinstance(vertices, torch.Tensor) else vertices, dtype=np.float64)
    f = np.asarray(faces.detach().cpu() if isinstance(faces, torch.Tensor) else faces)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"voxelize: expected vertices (V, 3) and faces (F, 3), got {v.shape} and {f.shape}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"voxelize: faces must be integer indices, got dtype {f.dtype}")
    if int(resolution) < 1:
        raise ValueError(f"voxelize: resolution must be >= 1, got {resolution}")
    try:
        import igl
    except ImportError as exc:
        raise ImportError("voxelize needs libigl (`pip install libigl==2.6.3`, in requirements.txt)") from exc
    unit = normalize_mesh(trimesh.Trimesh(v, f.astype(np.int64), process=False))  # validates the mesh
    uv = np.ascontiguousarray(unit.vertices, dtype=np.float64)
    uf = np.ascontiguousarray(unit.faces, dtype=np.int64)
    query = _voxel_centres(int(resolution))
    step = max(1, int(chunk_points))
    inside = np.concatenate([np.abs(igl.fast_winding_number(uv, uf, query[i:i + step])) > 0.5
                             for i in range(0, len(query), step)])
    return torch.from_numpy(inside.reshape((int(resolution),) * 3))


def mesh_occupancy(mesh: MeshLike, resolution: int = 64) -> torch.Tensor:
    """:func:`voxelize` of a Trimesh, or of a Scene's objects together (flattened at their places)."""
    mesh = flatten_scene(check_mesh(mesh))
    return voxelize(np.asarray(mesh.vertices), np.asarray(mesh.faces), resolution)


def _pairs(n: int) -> List[Tuple[int, int]]:
    return list(itertools.combinations(range(n), 2))


def _occupancy_distance(grids: Sequence[torch.Tensor]) -> Tuple[float, torch.Tensor]:
    """Mean 1 − IoU over pairs and the symmetric (N, N) float64 matrix (zero diagonal) of bool grids."""
    flat = [g.reshape(-1) for g in grids]
    counts = [int(g.sum()) for g in flat]
    for k, count in enumerate(counts):
        if count == 0:
            raise ValueError(f"mesh {k + 1} has no inside voxel: an open surface or thinner than one voxel of "
                             f"{round(len(flat[k]) ** (1 / 3))}^3; 1 - IoU needs closed meshes (raise "
                             "voxel_resolution for thin ones)")
    matrix = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for i, j in _pairs(len(flat)):
        inter = int(torch.logical_and(flat[i], flat[j]).sum())
        matrix[i, j] = matrix[j, i] = 1.0 - inter / (counts[i] + counts[j] - inter)
    return _mean_off_diagonal(matrix), matrix


def _mean_off_diagonal(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    return float(matrix.sum() / (n * (n - 1)))


def _check_count(meshes: Sequence, what: str) -> None:
    if len(meshes) < 2:
        raise ValueError(f"{what}: pairwise distances need at least 2, got {len(meshes)}")


def pairwise_voxel_iou_distance(meshes: Sequence[MeshLike], resolution: int = 64) -> Tuple[float, torch.Tensor]:
    """ThemeStation's geometry diversity: 1 − IoU of the normalised meshes' occupancy for every pair.

    Args:
        meshes: N >= 2 meshes (Trimesh or Scene).
        resolution: voxels per side (:func:`voxelize`).

    Returns:
        (mean of 1 − IoU over the N(N−1)/2 pairs, (N, N) symmetric float64 matrix, zero diagonal).

    Raises:
        ValueError: fewer than 2 meshes, an unusable mesh, a mesh without inside voxels.
    """
    _check_count(meshes, "meshes")
    return _occupancy_distance([mesh_occupancy(m, resolution) for m in meshes])


def check_pixels(meshes: int, config: MetricConfig) -> None:
    """Raise ValueError when ``meshes`` x views x resolution^2 exceeds :data:`MAX_METRIC_PIXELS`."""
    pixels = meshes * config.views * config.resolution ** 2
    if pixels > MAX_METRIC_PIXELS:
        raise ValueError(f"{meshes} meshes x {config.views} views x {config.resolution}^2 = {pixels} pixels exceed "
                         f"{MAX_METRIC_PIXELS}, the most the renders may hold in memory; lower views or resolution")


def render_metric_views(mesh: MeshLike, config: MetricConfig, *, device=None, backend: str = "auto",
                        progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """Colour renders of the normalised mesh from ``config.views`` orbit cameras on white.

    Cameras: azimuth i · 360° / views, ``config.elevation``, ``distance``, ``fov`` (Render Exemplars'
    framing); colours from the mesh's texture or vertex colours (shaded grey when it has neither).

    Returns:
        (views, resolution, resolution, 3) float32 in [0, 1], on the CPU.
    """
    config.validate()
    check_pixels(1, config)
    t = mesh_to_tensors(normalize_mesh(check_mesh(mesh)), device=device)
    azimuths = torch.arange(config.views, dtype=torch.float64) * (360.0 / config.views)
    cams = orbit_cameras(config.elevation, azimuths, config.distance, config.fov, device=device)
    return render_on_white(t, cams, config.resolution, backend=backend, progress=progress)


def render_on_white(mesh: MeshTensors, cameras: Cameras, resolution: int, *, backend: str = "auto",
                    progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """Colour renders of a mesh (as it is placed: no normalisation) on a white background, the metrics' renders.

    Args:
        mesh: :class:`~mpod_core.mesh.MeshTensors` (texture, vertex colours, or shaded grey without either).
        cameras: N cameras (moved to the mesh's device).
        resolution: R, the square image side in pixels.
        progress: passed to :func:`~mpod_core.render.render_mesh` (after each chunk of views).

    Returns:
        (N, R, R, 3) float32 in [0, 1], on the CPU.
    """
    with torch.no_grad():
        out = render_mesh(mesh.vertices, mesh.faces, cameras, resolution, resolution, vertex_colors=mesh.vertex_colors,
                          uv=mesh.uv, texture=mesh.texture, background=(1.0, 1.0, 1.0), backend=backend,
                          progress=progress)
    return out.color.clamp(0, 1).float().cpu()


def _as_images(renders: Sequence) -> List[np.ndarray]:
    images = [np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r, dtype=np.float64) for r in renders]
    first = images[0].shape
    for k, im in enumerate(images):
        if im.ndim != 4 or im.shape[-1] != 3 or im.shape != first or min(im.shape) < 1:
            raise ValueError(f"renders {k + 1}: expected (V, H, W, 3) like renders 1 {first}, got {im.shape}")
    return images


#: SSIM's Gaussian window (Wang et al.: sigma 1.5, scikit-image truncates at 3.5 sigma): 11 x 11 pixels.
SSIM_WINDOW = 11


def ssim_per_view(a, b) -> np.ndarray:
    """SSIM of each pair of same-camera views, with Wang et al.'s settings (the pack's one SSIM).

    scikit-image's ``structural_similarity``: Gaussian window sigma = 1.5 (11 x 11, truncated at 3.5
    sigma), population covariance, data range 1, averaged over the colour channels.

    Args:
        a, b: (V, H, W, 3) float arrays or tensors in [0, 1], the same shape, H and W >= 11.

    Returns:
        (V,) float64 SSIM per view, 1 for identical views.

    Raises:
        ValueError: shapes that differ, or images smaller than the window.
    """
    from skimage.metrics import structural_similarity
    a, b = _as_images([a, b])
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"renders of {a.shape[2]}x{a.shape[1]} are too small for SSIM's "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    return np.array([structural_similarity(a[k], b[k], data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False) for k in range(a.shape[0])])


def pairwise_image_distance(renders_list: Sequence) -> Dict[str, object]:
    """ThemeStation's visual diversity without LPIPS: per-view distances between every pair of meshes' renders.

    View k of mesh i is compared with view k of mesh j (same camera). LPIPS, the paper's metric, needs
    downloaded network weights, so two weight-free distances are reported instead: per-pixel MSE and
    1 − SSIM (scikit-image's ``structural_similarity`` with Wang et al.'s settings: Gaussian window
    σ = 1.5, population covariance, data range 1, over the colour channels).

    Args:
        renders_list: N >= 2 arrays or tensors (V, H, W, 3) in [0, 1], all the same shape.

    Returns:
        ``{"mse": mean over pairs and views, "ssim_distance": mean 1 − SSIM, "mse_matrix": (N, N),
        "ssim_matrix": (N, N)}``; matrices are symmetric float64 tensors, each entry the mean over views.

    Raises:
        ValueError: fewer than 2 render sets, or shapes that differ.
    """
    _check_count(renders_list, "renders_list")
    images = _as_images(renders_list)
    n = len(images)
    mse, ssim = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i, j in _pairs(n):
        a, b = images[i], images[j]
        mse[i, j] = mse[j, i] = float(np.mean((a - b) ** 2))
        ssim[i, j] = ssim[j, i] = max(0.0, 1.0 - float(np.mean(ssim_per_view(a, b))))
    return {"mse": _mean_off_diagonal(mse), "ssim_distance": _mean_off_diagonal(ssim),
            "mse_matrix": mse, "ssim_matrix": ssim}


def clip_similarity(render_embeds: torch.Tensor, concept_embed: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """The paper's CLIP score: cosine similarity between the concept image's CLIP embedding and each
    rendered view's, averaged over the views.

    Args:
        render_embeds: (N, D) image embeddings of N rendered views.
        concept_embed: (D,) (or (1, D)) image embedding of the concept (input) view.

    Returns:
        (mean cosine over the views, (N,) float64 per-view cosines), each in [−1, 1].

    Raises:
        ValueError: shapes that do not match, a zero or non-finite embedding.
    """
    r = torch.as_tensor(render_embeds).detach().to(torch.float64).cpu()
    c = torch.as_tensor(concept_embed).detach().to(torch.float64).cpu()
    c = c.reshape(-1) if c.ndim == 2 and c.shape[0] == 1 else c
    if r.ndim != 2 or c.ndim != 1 or r.shape[1] != c.shape[0] or r.shape[0] < 1:
        raise ValueError(f"clip_similarity: expected render_embeds (N, D) and concept_embed (D,), got "
                         f"{tuple(r.shape)} and {tuple(c.shape)}")
    per_view = cosine_similarities(r, c[None].expand_as(r), "clip_similarity")
    return float(per_view.mean()), per_view


def cosine_similarities(a: torch.Tensor, b: torch.Tensor, what: str = "cosine_similarities") -> torch.Tensor:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (REPARO's and ThemeStation's CLIP score).

    Args:
        a, b: (N, D) embeddings, N >= 1.
        what: names the caller in errors.

    Returns:
        (N,) float64 cosines in [−1, 1], on the CPU.

    Raises:
        ValueError: shapes that differ, a zero or non-finite embedding.
    """
    a = torch.as_tensor(a).detach().to(torch.float64).cpu()
    b = torch.as_tensor(b).detach().to(torch.float64).cpu()
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ValueError(f"{what}: expected two (N, D) embeddings of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    norms = torch.cat([a.norm(dim=1), b.norm(dim=1)])
    if not (torch.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError(f"{what}: an embedding is zero or not finite")
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1.0, 1.0)


def similarity_report(per_view: torch.Tensor, config: MetricConfig) -> str:
    """Text of a CLIP score: the mean and each view's cosine with its azimuth."""
    lines = [f"CLIP score (mean cosine over {len(per_view)} views, elevation {config.elevation:g}): "
             f"{float(per_view.mean()):.4f}"]
    lines += [f"azimuth {k * 360.0 / len(per_view):g}: {float(v):.4f}" for k, v in enumerate(per_view)]
    return "\n".join(lines)


@dataclass
class DiversityResult:
    """What :func:`mesh_diversity` returns."""

    voxel_diversity: float
    """Mean pairwise 1 − IoU of the voxelised meshes."""
    image_distance: float
    """Mean pairwise per-pixel MSE of same-camera renders."""
    ssim_distance: float
    """Mean pairwise 1 − SSIM of same-camera renders."""
    voxel_matrix: torch.Tensor
    """(N, N) 1 − IoU."""
    mse_matrix: torch.Tensor
    """(N, N) MSE (mean over views)."""
    ssim_matrix: torch.Tensor
    """(N, N) 1 − SSIM (mean over views)."""
    config: MetricConfig

    def report(self, names: Optional[Sequence[str]] = None) -> str:
        """The three means and pairwise matrices as text; ``names`` label the meshes (default mesh_1, …)."""
        n = self.voxel_matrix.shape[0]
        names = list(names) if names is not None else [f"mesh_{k + 1}" for k in range(n)]
        c = self.config
        parts = [(f"voxel 1 - IoU ({c.voxel_resolution}^3), geometry diversity", self.voxel_diversity,
                  self.voxel_matrix),
                 (f"image MSE ({c.views} views, {c.resolution}x{c.resolution})", self.image_distance, self.mse_matrix),
                 (f"1 - SSIM ({c.views} views)", self.ssim_distance, self.ssim_matrix)]
        width = max(8, *(len(s) for s in names))
        lines = []
        for title, mean, matrix in parts:
            lines.append(f"{title}: mean {mean:.4f}")
            lines.append(" " * width + "".join(f"{s:>{width + 1}}" for s in names))
            lines += [f"{names[i]:<{width}}" + "".join(f"{float(matrix[i, j]):>{width + 1}.4f}" for j in range(n))
                      for i in range(n)]
        lines.append("(LPIPS, the paper's visual metric, needs downloaded weights: MSE and 1 - SSIM stand in.)")
        return "\n".join(lines)


def mesh_diversity(meshes: Sequence[MeshLike], config: MetricConfig, *, device=None, backend: str = "auto",
                   progress: Optional[ProgressFn] = None) -> DiversityResult:
    """Geometry and visual diversity of N >= 2 generated meshes (ThemeStation §4.1.3, LPIPS replaced).

    Each mesh is normalised (shape, not scale or placement, is compared), voxelised for 1 − IoU and
    rendered from the same ``config.views`` cameras for MSE and 1 − SSIM.

    Args:
        meshes: N >= 2 Trimesh or Scene values.
        config: :class:`MetricConfig`.
        device: where to render (voxelisation runs on the CPU).
        backend: rasterizer backend.
        progress: ``progress(done, 2N, preview)`` after each voxelisation and each mesh's renders.

    Raises:
        ValueError: fewer than 2 meshes, bad settings, too many pixels, a mesh without inside voxels.
    """
    config.validate()
    _check_count(meshes, "meshes")
    check_pixels(len(meshes), config)
    for k, mesh in enumerate(meshes):
        check_mesh(mesh, f"mesh {k + 1}")
    total = 2 * len(meshes)
    grids, renders = [], []
    for k, mesh in enumerate(meshes):
        grids.append(mesh_occupancy(mesh, config.voxel_resolution))
        if progress is not None:
            progress(2 * k + 1, total, None)
        renders.append(render_metric_views(mesh, config, device=device, backend=backend))
        if progress is not None:
            progress(2 * k + 2, total, renders[-1][0])
    voxel, voxel_matrix = _occupancy_distance(grids)
    images = pairwise_image_distance(renders)
    return DiversityResult(voxel_diversity=voxel, image_distance=images["mse"], ssim_distance=images["ssim_distance"],
                           voxel_matrix=voxel_matrix, mse_matrix=images["mse_matrix"],
                           ssim_matrix=images["ssim_matrix"], config=config)


def concept_similarity(mesh: MeshLike, concept_image: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                       config: MetricConfig, *, device=None, backend: str = "auto", chunk: int = 8,
                       progress: Optional[ProgressFn] = None) -> Tuple[float, torch.Tensor]:
    """The paper's CLIP score of a mesh against its concept image (:func:`clip_similarity` of the embeddings).

    Args:
        mesh: a Trimesh or Scene, rendered by :func:`render_metric_views` (normalised, on white).
        concept_image: (H, W, 3) or (1, H, W, 3) in [0, 1].
        embed: ``images (B, H, W, 3) -> (B, D)`` image embeddings (e.g. a CLIP vision model's).
        config: :class:`MetricConfig` (views, resolution, cameras).
        chunk: views embedded per ``embed`` call (bounds the encoder's memory).
        progress: ``progress(done, views + 1, preview)`` after the renders and each chunk embedded.

    Returns:
        (mean cosine, (views,) per-view cosines).

    Raises:
        ValueError: a concept image that is not one (H, W, 3) image, embeddings of the wrong shape.
    """
    image = concept_image[0] if concept_image.ndim == 4 and concept_image.shape[0] == 1 else concept_image
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"concept_image: expected one (H, W, 3) image, got {tuple(concept_image.shape)}")
    renders = render_metric_views(mesh, config, device=device, backend=backend)
    total = config.views + 1
    if progress is not None:
        progress(1, total, renders[0])
    embeds = []
    for start in range(0, config.views, max(1, chunk)):
        embeds.append(torch.as_tensor(embed(renders[start:start + chunk])).float().cpu())
        if progress is not None:
            progress(1 + min(start + chunk, config.views), total, None)
    embeds = torch.cat(embeds)
    if embeds.ndim != 2 or embeds.shape[0] != config.views:
        raise ValueError(f"embed: expected ({config.views}, D) embeddings of the renders, got {tuple(embeds.shape)}")
    concept = torch.as_tensor(embed(image[None].float())).float().cpu()
    return clip_similarity(embeds, concept)
