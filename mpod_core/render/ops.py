"""Public rasterization ops: input checks and backend choice.

Each op has a pure-torch twin in :mod:`.rasterize` and an nvdiffrast twin in
:mod:`.nvdiffrast_backend` with the same arguments. ``backend`` is one of
:data:`BACKENDS`:

- ``"torch"``: always the pure-PyTorch implementation (CPU or GPU).
- ``"nvdiffrast"``: nvdiffrast; ImportError with an install hint when it is
  missing, ValueError for CPU tensors.
- ``"auto"`` (default): nvdiffrast when the inputs are CUDA tensors and
  nvdiffrast imports, else the torch one, with a single warning per process.

Image conventions (all backends): images are (N, H, W, C), row 0 is the top
of the image (NDC y = +1), column 0 the left, pixel centres at half-integers
(see :mod:`mpod_core.cameras`).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from . import nvdiffrast_backend as _nv
from . import rasterize as _torch
from ..lazy_cuda import warn_fallback_once

#: Accepted values of every ``backend`` argument.
BACKENDS = ("auto", "torch", "nvdiffrast")


def _resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map ``backend`` to "torch" or "nvdiffrast" (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "nvdiffrast":
        _nv._dr()  # ImportError with the install hint
        return "nvdiffrast"
    if all(t.is_cuda for t in tensors) and _nv.is_available():
        return "nvdiffrast"
    if not torch.cuda.is_available():
        reason = "CUDA is not available"
    elif not all(t.is_cuda for t in tensors):
        reason = "the inputs are not on the GPU"
    else:
        reason = "nvdiffrast is not installed"
    warn_fallback_once("nvdiffrast", f"mpod_core.render: backend='auto' uses the pure-PyTorch rasterizer ({reason})",
                       stacklevel=3)
    return "torch"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The implementation the ops use for ``backend`` and these tensors: "torch" or "nvdiffrast"."""
    return _resolve_backend(backend, *tensors)


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def _check_float(x: torch.Tensor, name: str, expected: str) -> None:
    _check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {expected}, got dtype {x.dtype}")


def _check_tri(tri, n_verts: int) -> torch.Tensor:
    _check_tensor(tri, "tri")
    if tri.dim() != 2 or tri.shape[1] != 3:
        raise ValueError(f"tri: expected (F, 3), got {_shape(tri)}")
    if tri.is_floating_point() or tri.dtype == torch.bool or tri.is_complex():
        raise TypeError(f"tri: expected an integer tensor, got dtype {tri.dtype}")
    tri = tri.long()
    if tri.numel():
        lo, hi = int(tri.min()), int(tri.max())
        if lo < 0 or hi >= n_verts:
            raise ValueError(f"tri: vertex indices must be in [0, {n_verts}), got [{lo}, {hi}]")
    return tri


def _check_resolution(resolution: Sequence[int]) -> Tuple[int, int]:
    try:
        h, w = (int(r) for r in resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution: expected (H, W), got {resolution!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution: expected positive (H, W), got ({h}, {w})")
    return h, w


def _check_rast(rast, name: str = "rast") -> None:
    _check_float(rast, name, "(N, H, W, 4)")
    if rast.dim() != 4 or rast.shape[-1] != 4:
        raise ValueError(f"{name}: expected (N, H, W, 4), got {_shape(rast)}")


def rasterize(pos_clip: torch.Tensor, tri: torch.Tensor, resolution: Sequence[int],
              backend: str = "auto") -> torch.Tensor:
    """Rasterize triangles given in clip space.

    Nearest triangle per pixel centre wins (smallest z_ndc), double-sided (no
    culling). Fragments outside -1 <= z_ndc <= 1 are discarded. There is no
    near-plane clipping in the torch backend: triangles with any vertex at
    clip w <= 1e-6 (at or behind the camera) are dropped whole (nvdiffrast
    clips them instead).

    Args:
        pos_clip: (N, V, 4) float clip coordinates, OpenGL convention
            (e.g. from :func:`mpod_core.cameras.world_to_clip`).
        tri: (F, 3) integer vertex indices (int64 preferred).
        resolution: (H, W) image size.
        backend: one of :data:`BACKENDS`.

    Returns:
        rast (N, H, W, 4), dtype of ``pos_clip``: (u, v, z_ndc,
        triangle_id + 1) with u, v the perspective-correct barycentrics of the
        pixel centre (attribute = u*a0 + v*a1 + (1-u-v)*a2) and all four
        channels 0 where no triangle covers the pixel centre. u, v (and z) are
        differentiable w.r.t. ``pos_clip``; coverage is not (see
        :func:`antialias`). The triangle id is stored as a float, exact below
        2**24 triangles in float32.
    """
    _check_float(pos_clip, "pos_clip", "(N, V, 4)")
    if pos_clip.dim() != 3 or pos_clip.shape[-1] != 4:
        raise ValueError(f"pos_clip: expected (N, V, 4), got {_shape(pos_clip)}")
    tri = _check_tri(tri, pos_clip.shape[1])
    resolution = _check_resolution(resolution)
    if _resolve_backend(backend, pos_clip) == "nvdiffrast":
        return _nv.rasterize(pos_clip, tri, resolution)
    return _torch.rasterize_torch(pos_clip, tri.to(pos_clip.device), resolution)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """Interpolate per-vertex attributes over the rasterized pixels.

    Args:
        attr: (V, C) shared by all views, or (N, V, C) per view (N may be 1).
        rast: (N, H, W, 4) from :func:`rasterize`.
        tri: (F, 3) the triangles given to :func:`rasterize`.
        backend: one of :data:`BACKENDS`.

    Returns:
        (N, H, W, C): u*a0 + v*a1 + (1-u-v)*a2 of the pixel's triangle, zero
        where ``rast[..., 3] == 0``. Differentiable w.r.t. ``attr`` and, through
        u and v, w.r.t. the positions given to :func:`rasterize`.
    """
    _check_float(attr, "attr", "(V, C) or (N, V, C)")
    if attr.dim() not in (2, 3):
        raise ValueError(f"attr: expected (V, C) or (N, V, C), got {_shape(attr)}")
    _check_rast(rast)
    if attr.dim() == 3 and attr.shape[0] not in (1, rast.shape[0]):
        raise ValueError(f"attr: expected (N, V, C) with N = 1 or {rast.shape[0]} (rast's N), "
                         f"got {_shape(attr)}")
    tri = _check_tri(tri, attr.shape[-2])
    if _resolve_backend(backend, attr, rast) == "nvdiffrast":
        return _nv.interpolate(attr, rast, tri)
    return _torch.interpolate_torch(attr, rast, tri.to(attr.device))


def antialias(color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor,
              backend: str = "auto") -> torch.Tensor:
    """Analytic antialiasing of silhouettes, which gives them position gradients.

    nvdiffrast's method, vectorised: for every horizontally or vertically
    adjacent pixel pair (p, q) with different triangles, p being the covered
    one (or the nearer if both are), the segment from p's centre towards q's is
    followed out of p's triangle T. If it leaves T through a silhouette or
    occlusion edge (a boundary edge, or one whose neighbour face folds away,
    i.e. the neighbour's far vertex lies on T's side of the edge; and not an
    edge of q's triangle), at parameter t in [0, 1] from p's centre, then if
    t > 0.5, q += (t - 0.5)(c_p - c_q), and if t < 0.5, p += (0.5 - t)(c_q - c_p).
    If it leaves T through an interior edge, the torch backend follows it into
    the neighbour face (up to 16 faces) until it meets a silhouette edge, meets
    q's triangle or reaches q; nvdiffrast only looks at T's own edges, which
    misses most silhouettes once triangles are about a pixel or smaller.
    Horizontal pairs use only steep edges (|dy| >= |dx|), vertical pairs only
    flat ones, so each edge is counted once. t is computed differentiably from
    ``pos_clip`` (only the crossing edge's two vertices get gradients).
    Vertices at identical positions are welded for the topology test, so
    UV seams are not taken for silhouettes.

    Args:
        color: (N, H, W, C) image to antialias (e.g. shaded colour, coverage).
        rast: (N, H, W, 4) from :func:`rasterize` of the same ``pos_clip``, ``tri``.
        pos_clip: (N, V, 4) clip coordinates given to :func:`rasterize`.
        tri: (F, 3).
        backend: one of :data:`BACKENDS`.

    Returns:
        (N, H, W, C) antialiased image, differentiable w.r.t. ``color`` and
        ``pos_clip``.
    """
    _check_float(color, "color", "(N, H, W, C)")
    if color.dim() != 4:
        raise ValueError(f"color: expected (N, H, W, C), got {_shape(color)}")
    _check_rast(rast)
    if rast.shape[:3] != color.shape[:3]:
        raise ValueError(f"rast: expected (N, H, W, 4) = {_shape(color)[:3] + (4,)} to match color, "
                         f"got {_shape(rast)}")
    _check_float(pos_clip, "pos_clip", "(N, V, 4)")
    if pos_clip.dim() != 3 or pos_clip.shape[-1] != 4 or pos_clip.shape[0] != color.shape[0]:
        raise ValueError(f"pos_clip: expected (N, V, 4) with N = {color.shape[0]}, got {_shape(pos_clip)}")
    tri = _check_tri(tri, pos_clip.shape[1])
    if _resolve_backend(backend, color, rast, pos_clip) == "nvdiffrast":
        return _nv.antialias(color, rast, pos_clip, tri)
    return _torch.antialias_torch(color, rast, pos_clip, tri.to(color.device))


def texture_sample(texture: torch.Tensor, uv: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Bilinear texture lookup with wrap (repeat) addressing.

    uv convention (trimesh's, checked against a GLB exported and reloaded by
    trimesh 4): u = 0 is the left column, v = 0 the *bottom* row of the image,
    texel centres at (i + 0.5) / W_t. trimesh flips glTF's stored v (where
    v = 0 is the top) on load and back on export, and keeps the PIL image
    as is (row 0 = top), so ``TextureVisuals.uv`` with ``np.asarray(image)``
    can be passed here unchanged.

    Args:
        texture: (H_t, W_t, C) float texture, row 0 = top of the image
            (``np.asarray(pil_image) / 255``).
        uv: (N, H, W, 2) texture coordinates (any real values; wrapped).
        backend: one of :data:`BACKENDS`.

    Returns:
        (N, H, W, C), differentiable w.r.t. ``texture`` and ``uv``.
    """
    _check_float(texture, "texture", "(H_t, W_t, C)")
    if texture.dim() != 3:
        raise ValueError(f"texture: expected (H_t, W_t, C), got {_shape(texture)}")
    _check_float(uv, "uv", "(N, H, W, 2)")
    if uv.dim() != 4 or uv.shape[-1] != 2:
        raise ValueError(f"uv: expected (N, H, W, 2), got {_shape(uv)}")
    if _resolve_backend(backend, texture, uv) == "nvdiffrast":
        return _nv.texture_sample(texture, uv)
    return _torch.texture_sample_torch(texture, uv)
