"""High-level mesh renderer: world-space mesh + orbit cameras -> colour, alpha, depth, normals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ..cameras import Cameras, get_rays, world_to_clip

from . import ops
from . import rasterize as _torch_raster

#: Base grey of untextured, uncoloured meshes and the share of ambient light in its shading.
PLAIN_GREY = 0.8
PLAIN_AMBIENT = 0.3
#: Pixels rendered together at most by :func:`render_mesh` (its default ``chunk_pixels``).
#: 2**22 = one 2048^2 view, or 64 views of 256^2. The pure-PyTorch renderer peaks at
#: about 300 bytes per covered pixel (measured on a sphere filling 85% of a 1024^2 view
#: with antialiasing: 261 MiB; at 512^2 x 4 views: 308 MiB): the rasterizer's int64
#: depth keys and per-pixel barycentric work, interpolation, shading rays, the antialias
#: pair lists and the outputs. A chunk therefore stays near 1.2 GiB whatever the image
#: size: views are grouped up to this many pixels, and a bigger view is rendered in
#: bands of rows (torch backend; nvdiffrast renders whole views, ~16 bytes a pixel).
RENDER_CHUNK_PIXELS = 2 ** 22
#: Largest ``views x width x height`` the Render Mesh Views node accepts. The outputs
#: cannot be chunked away: the returned :class:`MeshRender` holds 56 bytes a pixel
#: (colour, alpha, depth, normal, triangle id, rast) and the node's four images 40 more,
#: so 2**25 pixels (two 4096^2 views, or 512 views of 256^2) end near 3 GiB, plus one chunk.
MAX_RENDER_PIXELS = 2 ** 25


@dataclass
class MeshRender:
    """Images of one :func:`render_mesh` call (row 0 = top of the image)."""

    color: torch.Tensor
    """(N, H, W, 3) in [0, 1], composited over the background (with the default
    black background this is colour premultiplied by ``alpha``)."""
    alpha: torch.Tensor
    """(N, H, W) coverage in [0, 1]; antialiased (with silhouette gradients) if requested."""
    depth: torch.Tensor
    """(N, H, W) view-space depth, distance along the camera's -z axis; 0 on background."""
    normal: torch.Tensor
    """(N, H, W, 3) world-space unit geometric face normals (winding order: counter-clockwise
    seen from the front gives the outward normal); 0 on background."""
    triangle_id: torch.Tensor
    """(N, H, W) int64 index into ``faces``, -1 on background."""
    rast: torch.Tensor
    """(N, H, W, 4) raw rasterizer output (u, v, z_ndc, triangle_id + 1); see :func:`ops.rasterize`."""


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_vertex_array(x, name: str, n_verts: int, widths: Sequence[int]) -> torch.Tensor:
    expected = " or ".join(f"({'V' if n_verts is None else n_verts}, {c})" for c in widths)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {expected}, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] not in widths or x.shape[0] != n_verts:
        raise ValueError(f"{name}: expected {expected}, got {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(F, 3) unit normals of the faces (zero for degenerate faces), differentiable."""
    v = vertices[faces]
    n = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
    length = n.norm(dim=-1, keepdim=True)
    return n / torch.where(length > 0, length, torch.ones_like(length))


def render_mesh(vertices: torch.Tensor, faces: torch.Tensor, cameras: Cameras, width: int, height: int,
                *, vertex_colors: Optional[torch.Tensor] = None, uv: Optional[torch.Tensor] = None,
                texture: Optional[torch.Tensor] = None,
                color_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                background: Union[Sequence[float], torch.Tensor] = (0.0, 0.0, 0.0),
                antialias: bool = True, backend: str = "auto",
                chunk_pixels: int = RENDER_CHUNK_PIXELS,
                progress: Optional[Callable[[int, int, Optional[torch.Tensor]], None]] = None) -> MeshRender:
    """Render a triangle mesh from N cameras.

    Colour is ``color_fn`` of each covered pixel's surface point if given (a
    neural texture field), else the texture if ``uv`` and ``texture`` are given,
    else the vertex colours, else a plain light grey shaded by |n . view
    direction| so the geometry reads. Everything is differentiable w.r.t.
    ``vertices``, ``vertex_colors``, ``texture`` (and ``uv``) and what
    ``color_fn`` computes from; silhouettes get gradients only with
    ``antialias=True``.

    Args:
        vertices: (V, 3) float world positions (glTF frame, see :mod:`mpod_core.cameras`).
        faces: (F, 3) int64 vertex indices, F >= 1.
        cameras: N :class:`~mpod_core.cameras.Cameras` (moved to the vertices'
            device and dtype).
        width, height: image size in pixels.
        vertex_colors: optional (V, 3) or (V, 4) float in [0, 1] (alpha ignored).
        uv: optional (V, 2) texture coordinates, trimesh convention (v = 0 at the
            bottom of the image; see :func:`ops.texture_sample`).
        texture: optional (H_t, W_t, 3) or (H_t, W_t, 4) float in [0, 1], row 0 =
            top (alpha ignored). Needs ``uv``.
        color_fn: optional ``points (P, 3) world positions -> (P, 3) RGB in [0, 1]``,
            called once per chunk of views with the covered pixels' interpolated
            surface points only.
        background: RGB in [0, 1], a sequence of 3 floats, a (3,) tensor or an
            (N, 3) tensor (one per view).
        antialias: blend silhouette pixels analytically (gives ``alpha`` and
            ``color`` gradients w.r.t. vertex positions at silhouettes).
        backend: one of :data:`ops.BACKENDS`.
        chunk_pixels: pixels rendered together at most (bounds the working memory,
            see :data:`RENDER_CHUNK_PIXELS`): ``chunk_pixels // (width * height)``
            views at a time, or, with the torch backend, one view in bands of
            ``chunk_pixels // width`` rows when a view is bigger. The result does
            not depend on it (bands overlap by one row for antialiasing).
        progress: optional ``progress(views_done, n_views, preview)`` called after each
            chunk of views with the chunk's first colour image (H, W, 3); it may raise
            to stop the render (ComfyUI's interrupt).

    Returns:
        :class:`MeshRender` with (N, H, W, ...) images.

    Raises:
        ValueError: wrong shapes, no faces, out-of-range indices, ``uv`` without
            ``texture`` (or the reverse), bad sizes.
    """
    if not isinstance(vertices, torch.Tensor):
        raise TypeError(f"vertices: expected a torch.Tensor (V, 3), got {type(vertices).__name__}")
    if vertices.dim() != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices: expected (V, 3), got {_shape(vertices)}")
    if not vertices.is_floating_point():
        raise TypeError(f"vertices: expected a floating-point tensor, got dtype {vertices.dtype}")
    n_verts = vertices.shape[0]
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"faces: expected a torch.Tensor (F, 3), got {type(faces).__name__}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected (F, 3), got {_shape(faces)}")
    if faces.shape[0] == 0:
        raise ValueError("faces: the mesh has no faces (expected (F, 3) with F >= 1, got (0, 3))")
    if faces.is_floating_point():
        raise TypeError(f"faces: expected an integer tensor, got dtype {faces.dtype}")
    faces = faces.to(device=vertices.device, dtype=torch.long)
    lo, hi = int(faces.min()), int(faces.max())
    if lo < 0 or hi >= n_verts:
        raise ValueError(f"faces: vertex indices must be in [0, {n_verts}), got [{lo}, {hi}]")
    if not isinstance(cameras, Cameras):
        raise TypeError(f"cameras: expected mpod_core.cameras.Cameras, got {type(cameras).__name__}")
    if len(cameras) == 0:
        raise ValueError("cameras: expected at least one camera, got 0")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    chunk_pixels = int(chunk_pixels)
    if chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be >= 1, got {chunk_pixels}")
    if vertex_colors is not None:
        vertex_colors = _check_vertex_array(vertex_colors, "vertex_colors", n_verts, (3, 4))
    if color_fn is not None and (vertex_colors is not None or texture is not None):
        raise ValueError("give one colour source: color_fn, or vertex_colors, or uv + texture")
    if (uv is None) != (texture is None):
        raise ValueError("uv and texture must be given together (got only "
                         f"{'uv' if texture is None else 'texture'})")
    if uv is not None:
        uv = _check_vertex_array(uv, "uv", n_verts, (2,))
        if not isinstance(texture, torch.Tensor) or texture.dim() != 3 or texture.shape[-1] not in (3, 4):
            got = _shape(texture) if isinstance(texture, torch.Tensor) else type(texture).__name__
            raise ValueError(f"texture: expected (H_t, W_t, 3) or (H_t, W_t, 4), got {got}")
        if not texture.is_floating_point():
            raise TypeError(f"texture: expected a floating-point tensor in [0, 1], got dtype {texture.dtype}")
    n_views = len(cameras)
    dtype, device = vertices.dtype, vertices.device
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.shape not in ((3,), (n_views, 3)):
        raise ValueError(f"background: expected 3 values or ({n_views}, 3), got {_shape(bg)}")
    bg = bg.expand(n_views, 3)

    cams = cameras.to(device=device, dtype=dtype)
    fnormals = face_normals(vertices, faces)
    args = (vertices, faces, width, height, fnormals, vertex_colors, uv, texture, antialias, backend, color_fn)
    views_per_chunk = max(1, chunk_pixels // (width * height))
    banded = width * height > chunk_pixels and ops.resolve_backend(backend, vertices) == "torch"
    if views_per_chunk >= n_views and not banded:
        out = _render_views(cams, bg, *args)
        if progress is not None:
            progress(n_views, n_views, out.color[0].detach())
        return out
    halo = 1 if antialias else 0  # antialiasing blends each pixel with its 4 neighbours
    band_rows = max(1, chunk_pixels // width - 2 * halo) if banded else height
    out = None
    for s in range(0, n_views, views_per_chunk):
        e = min(s + views_per_chunk, n_views)
        sub = Cameras(cams.c2w[s:e], cams.fovy[s:e], cams.near, cams.far)
        for r0 in range(0, height, band_rows):
            r1 = min(r0 + band_rows, height)
            rows = (max(r0 - halo, 0), min(r1 + halo, height)) if banded else None
            piece = _render_views(sub, bg[s:e], *args, rows=rows)
            if out is None:  # written in place: concatenating would hold every output twice
                out = MeshRender(*(torch.empty((n_views, height, width) + t.shape[3:], dtype=t.dtype,
                                               device=t.device) for t in _fields(piece)))
            keep = slice(r0 - rows[0], r1 - rows[0]) if banded else slice(None)
            for dst, src in zip(_fields(out), _fields(piece)):
                dst[s:e, r0:r1] = src[:, keep]
            del piece
        if progress is not None:
            progress(e, n_views, out.color[s].detach())
    return out


def _fields(r: MeshRender) -> Tuple[torch.Tensor, ...]:
    return r.color, r.alpha, r.depth, r.normal, r.triangle_id, r.rast


def _render_views(cams, bg, vertices, faces, width, height, fnormals, vertex_colors, uv, texture,
                  do_antialias, backend, color_fn=None, rows: Optional[Tuple[int, int]] = None) -> MeshRender:
    """Render ``cams`` (n views), or only the image rows ``rows`` = (r0, r1) with the torch backend."""
    clip = world_to_clip(vertices, cams, width, height)  # (n, V, 4)
    if rows is None:
        rast = ops.rasterize(clip, faces, (height, width), backend=backend)
    else:
        rast = _torch_raster.rasterize_torch(clip, faces, (height, width), rows=rows)
    tid = rast[..., 3].detach().long() - 1
    covered = (tid >= 0)[..., None]
    cov = covered.to(vertices.dtype)
    depth = ops.interpolate(clip[..., 3:4], rast, faces, backend=backend)[..., 0]  # clip w = view depth
    normal = fnormals[tid.clamp(min=0)] * cov
    if color_fn is not None:
        points = ops.interpolate(vertices, rast, faces, backend=backend)
        hit = covered[..., 0]
        values = color_fn(points[hit]).to(vertices.dtype)
        if values.shape != (int(hit.sum()), 3):
            raise ValueError(f"color_fn: expected ({int(hit.sum())}, 3) colours, got {tuple(values.shape)}")
        base = torch.zeros(points.shape, dtype=vertices.dtype, device=vertices.device).index_put((hit,), values)
    elif texture is not None:
        uv_img = ops.interpolate(uv, rast, faces, backend=backend)
        base = ops.texture_sample(texture, uv_img, backend=backend)[..., :3].to(vertices.dtype)
    elif vertex_colors is not None:
        base = ops.interpolate(vertex_colors[:, :3], rast, faces, backend=backend)
    else:
        _, dirs = get_rays(cams, width, height, rows=rows)
        shade = (normal * dirs).sum(-1, keepdim=True).abs()
        base = PLAIN_GREY * (PLAIN_AMBIENT + (1.0 - PLAIN_AMBIENT) * shade)
    color = base * cov + bg[:, None, None, :] * (1 - cov)
    alpha = cov
    if do_antialias:
        both = torch.cat([color, alpha], dim=-1)
        if rows is None:
            both = ops.antialias(both, rast, clip, faces, backend=backend)
        else:
            both = _torch_raster.antialias_torch(both, rast, clip, faces, row0=rows[0], image_height=height)
        color, alpha = both[..., :3], both[..., 3:]
    return MeshRender(color=color.clamp(0.0, 1.0), alpha=alpha[..., 0].clamp(0.0, 1.0), depth=depth,
                      normal=normal, triangle_id=tid, rast=rast)
