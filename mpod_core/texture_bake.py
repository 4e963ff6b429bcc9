"""UV unwrapping (xatlas) and baking a colour function into a texture image.

Turns a mesh and a colour field ``colour_fn(points (N, 3)) -> RGB (N, 3)``
(e.g. a radiance field's albedo) into a mesh with a UV texture that glTF
viewers show:

1. :func:`unwrap_uv` cuts the mesh into charts and packs them in [0, 1]^2
   with xatlas (optional dependency, run in a child process so that its known
   crashes cannot take ComfyUI down). Vertices on seams are duplicated;
   ``vmapping`` leads back to the input vertices.
2. :func:`rasterize_uv` rasterizes the UV triangles with the pack's exact
   pure-torch rasterizer (UVs as clip coordinates, w = 1): each texel whose
   centre lies in a triangle gets that triangle's id.
3. :func:`sample_texels` maps every covered texel centre to its 3D point by
   barycentric interpolation and evaluates ``colour_fn`` there, at most
   ``chunk`` points per call.
4. :func:`fill_padding` extends each chart by ``padding`` texels (repeated
   3x3 averaging of the texels filled so far), so bilinear filtering and
   mipmaps near a seam read the chart's own colours, not the background.

UV convention: trimesh's and OpenGL's, v = 0 at the *bottom* row of the image;
texel (row r, column c) has its centre at ``u = (c + 0.5) / W``,
``v = 1 - (r + 0.5) / H``. trimesh's glTF exporter writes ``1 - v``, which is
glTF's convention (uv (0, 0) = the image's top-left), so a saved GLB samples
the same texels (tests/unit/test_texture_bake.py checks it on the file's raw
accessors). :func:`mpod_core.render.texture_sample` reads textures the same way.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image

from .configdoc import limits
from .progress import ProgressFn
from .render.rasterize import coverage_torch

ColorFn = Callable[[torch.Tensor], torch.Tensor]

#: What :func:`textured_mesh` may produce.
FALLBACKS = ("texture", "vertex_colors")
#: Largest texture side (8192^2 RGB float32 is 0.8 GiB; the rasterizer allows 32768).
MAX_SIZE = 8192
XATLAS_HINT = ("UV unwrapping needs the 'xatlas' package: pip install xatlas (it is in the pack's "
               "requirements.txt), or use fallback='vertex_colors', which needs no unwrapping")


@dataclass
class TextureBakeConfig:
    """How a mesh gets its colours (:func:`textured_mesh`)."""

    fallback: Literal["texture", "vertex_colors"] = field(default="texture", metadata=limits(options=FALLBACKS))
    """'texture': unwrap UVs with xatlas and bake the colours into a size x size image (detail
    finer than the triangles survives); 'vertex_colors': one colour per vertex, no unwrapping."""
    size: int = field(default=1024, metadata=limits(16, MAX_SIZE, 16))
    """Side of the square texture in texels."""
    padding: int = field(default=4, metadata=limits(0, 64, 1))
    """Texels around each UV chart: xatlas keeps this margin around every chart (at its own texel
    scale, close to ``size``) and the bake extends each chart's colours over it, so filtering at
    seams never reads the background."""
    chunk: int = field(default=2 ** 18, metadata=limits(1024, 2 ** 24, 1024))
    """Most points per ``colour_fn`` call (bounds the field's peak memory)."""


# --------------------------------------------------------------------------- checks
def _as_points(x, name: str, width: int, dtype=torch.float64) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{name}: expected shape (N, {width}), got {tuple(t.shape)}")
    t = t.detach().to("cpu", dtype)
    if dtype.is_floating_point and not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return t


def _as_faces(faces, n_vertices: int) -> torch.Tensor:
    f = _as_points(faces, "faces", 3, torch.int64)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= n_vertices):
        raise ValueError(f"faces: indices must be in [0, {n_vertices}), got [{int(f.min())}, {int(f.max())}]")
    return f


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= int(size) <= MAX_SIZE:
        raise ValueError(f"size: expected an int in [1, {MAX_SIZE}], got {size!r}")
    return int(size)


# --------------------------------------------------------------------------- unwrap
def unwrap_uv(vertices, faces, resolution: int = 1024, padding: int = 4
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut a mesh into charts and pack them into the unit square (xatlas).

    Args:
        vertices: (V, 3) float positions (torch or numpy).
        faces: (F, 3) int vertex indices.
        resolution: texture side the packing aims at (xatlas picks its texel density
            from it and the surface area).
        padding: texels xatlas keeps free around each chart (at its own texel scale,
            which is within a few tens of percent of ``resolution``).

    Returns:
        vertices' (V', 3) float64 (input vertices, duplicated along seams), faces'
        (F, 3) int64 (face i is input face i, same corner order, so same winding),
        uvs (V', 2) float32 in [0, 1] (trimesh convention, see the module docstring)
        and vmapping (V',) int64 with ``vertices' == vertices[vmapping]``.

    Raises:
        ImportError: xatlas is not installed (the message says how to get it).
        ValueError: malformed inputs.
        RuntimeError: xatlas failed or crashed on this mesh (its process, not ours).
    """
    if importlib.util.find_spec("xatlas") is None:
        raise ImportError(XATLAS_HINT)
    verts = _as_points(vertices, "vertices", 3)
    tri = _as_faces(faces, verts.shape[0])
    if tri.shape[0] == 0:
        raise ValueError("unwrap_uv: the mesh has no faces")
    vmapping, new_faces, uv, (width, height) = _run_xatlas(verts.numpy(), tri.numpy(), int(resolution), int(padding))
    # xatlas divides by its own width and height, which differ from each other and from
    # `resolution`; one scale for both axes keeps texels square and the charts' padding
    # the same in u and v. xatlas counts rows from the top like an image, hence 1 - v.
    side = float(max(width, height, 1))
    uv = torch.from_numpy(np.asarray(uv, dtype=np.float64) * np.array([width, height]) / side)
    uv[:, 1] = 1.0 - uv[:, 1]
    vmap = torch.from_numpy(np.asarray(vmapping, dtype=np.int64))
    out_faces = torch.from_numpy(np.asarray(new_faces, dtype=np.int64))
    # Callers rely on face i staying input face i with its corners in order (winding,
    # per-face data); xatlas keeps both, and this says so loudly if a version does not.
    if out_faces.shape != tri.shape or not torch.equal(vmap[out_faces], tri):
        raise RuntimeError("xatlas returned faces that do not map back onto the input faces in order")
    return verts[vmap], out_faces, uv.clamp_(0.0, 1.0).float(), vmap


# xatlas runs in a child interpreter: it segfaults on some inputs (jpcy/xatlas#151; here on
# trimesh's exact icosphere(6), while the same sphere jittered by 1e-4 unwraps), and a crash
# in-process would take ComfyUI down with it. The child imports only numpy and xatlas
# (~0.2 s), and arrays travel through one .npz each way.
_XATLAS_WORKER = """
import sys
import numpy as np
import xatlas
with np.load(sys.argv[1]) as d:
    positions, indices = d["positions"], d["indices"]
    resolution, padding = int(d["resolution"]), int(d["padding"])
atlas = xatlas.Atlas()
atlas.add_mesh(positions, indices)
pack = xatlas.PackOptions()
# resolution > 0 with texels_per_unit = 0: ONE atlas, its texel density estimated for that
# size, its width/height whatever the packing needs (a fixed density with a fixed
# resolution may spill charts into a second atlas, which one texture cannot hold).
pack.resolution = resolution
pack.padding = padding
pack.bilinear = True
atlas.generate(pack_options=pack)
vmapping, faces, uv = atlas[0]
np.savez(sys.argv[2], vmapping=vmapping, faces=faces, uv=uv, size=np.array([atlas.width, atlas.height]))
"""


def _run_xatlas(positions: np.ndarray, indices: np.ndarray, resolution: int, padding: int):
    """xatlas in a child process -> (vmapping (V',), faces (F, 3), uv (V', 2) / atlas size, (W, H))."""
    with tempfile.TemporaryDirectory(prefix="mpod3d_xatlas_") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, positions=np.ascontiguousarray(positions, dtype=np.float32),
                 indices=np.ascontiguousarray(indices, dtype=np.uint32),
                 resolution=np.int64(resolution), padding=np.int64(padding))
        proc = subprocess.run([sys.executable, "-c", _XATLAS_WORKER, str(src), str(dst)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not dst.is_file():
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            raise RuntimeError(
                f"xatlas failed to unwrap this mesh ({len(positions)} vertices, {len(indices)} faces; {how}): "
                f"{proc.stderr.strip()[-1500:] or 'no message'}. xatlas is known to crash on some meshes "
                "(jpcy/xatlas#151): remeshing or jittering the vertices slightly usually helps, or use "
                "fallback='vertex_colors'")
        with np.load(dst) as out:
            return out["vmapping"], out["faces"], out["uv"], tuple(int(x) for x in out["size"])


# --------------------------------------------------------------------------- bake
def rasterize_uv(uvs, faces, size: int) -> torch.Tensor:
    """Which triangle covers each texel centre of a ``size`` x ``size`` texture.

    Args:
        uvs: (V, 2) texture coordinates (v = 0 at the bottom row).
        faces: (F, 3) int indices into ``uvs``.
        size: texture side.

    Returns:
        (size, size) int64 face index, -1 where no triangle covers the texel centre.
        Where UV triangles overlap, the lower face index wins.
    """
    size = _check_size(size)
    uv = _as_points(uvs, "uvs", 2)
    tri = _as_faces(faces, uv.shape[0])
    # UVs as clip coordinates with w = 1: NDC x = 2u - 1, y = 2v - 1; the rasterizer's row 0
    # is NDC y = +1 (v = 1), so texel centres land exactly on the convention above.
    pos = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], 1)
    return coverage_torch(pos[None], tri, (size, size))[0]


def _eval_colors(colour_fn: ColorFn, points: torch.Tensor, device) -> torch.Tensor:
    """``colour_fn(points)`` (one call) as (N, 3) float32 CPU clamped to [0, 1]; checks shape and values."""
    n = points.shape[0]
    with torch.no_grad():
        out = torch.as_tensor(colour_fn(points.to(device) if device is not None else points))
    if out.numel() != n * 3:
        raise ValueError(f"colour_fn must return (N, 3) colours for {n} points, got {tuple(out.shape)}")
    out = out.detach().to("cpu", torch.float32).reshape(n, 3)
    if not torch.isfinite(out).all():
        raise ValueError(f"colour_fn returned {int((~torch.isfinite(out)).sum())} non-finite values")
    return out.clamp_(0.0, 1.0)


def vertex_colors(vertices, colour_fn: ColorFn, chunk: int = 2 ** 18, device=None) -> torch.Tensor:
    """``colour_fn`` at the vertices, at most ``chunk`` points a call.

    Args:
        vertices: (V, 3) positions.

    Returns:
        (V, 3) float32 RGB in [0, 1] (clamped).
    """
    pts = _as_points(vertices, "vertices", 3, torch.float32)
    chunk = _check_chunk(chunk)
    out = torch.empty(pts.shape[0], 3, dtype=torch.float32)
    for start in range(0, pts.shape[0], chunk):  # loop over chunks only
        out[start:start + chunk] = _eval_colors(colour_fn, pts[start:start + chunk], device)
    return out


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    return int(chunk)


def sample_texels(vertices, faces, uvs, ids: torch.Tensor, colour_fn: ColorFn, chunk: int = 2 ** 18,
                  device=None, progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """Evaluate ``colour_fn`` at the 3D point of every covered texel centre.

    Args:
        vertices: (V, 3) positions; faces: (F, 3); uvs: (V, 2) (same vertex order).
        ids: (H, W) from :func:`rasterize_uv`.
        colour_fn: ``points (N, 3) float32 -> (N, 3)`` RGB in [0, 1], called without
            grad with N <= ``chunk``, points on ``device`` (default CPU).
        progress: optional ``(done texels, covered texels, None)`` after each chunk; what it
            raises (ComfyUI's Cancel) propagates.

    Returns:
        (H, W, 3) float32 colours, zero where ``ids < 0``.
    """
    verts = _as_points(vertices, "vertices", 3)
    uv = _as_points(uvs, "uvs", 2)
    if uv.shape[0] != verts.shape[0]:
        raise ValueError(f"uvs: expected one per vertex ({verts.shape[0]}), got {uv.shape[0]}")
    tri = _as_faces(faces, verts.shape[0])
    chunk = _check_chunk(chunk)
    height, width = ids.shape
    flat = ids.reshape(-1)
    texels = (flat >= 0).nonzero().squeeze(1)
    out = torch.zeros(height * width, 3, dtype=torch.float32)
    for start in range(0, texels.shape[0], chunk):  # loop over chunks of texels only
        t = texels[start:start + chunk]
        corners = tri[flat[t]]  # (M, 3)
        row, col = t // width, t % width
        p = torch.stack([(col + 0.5) / width, 1.0 - (row + 0.5) / height], 1).to(torch.float64)
        a, b, c = (uv[corners[:, k]] for k in range(3))
        e1, e2, q = b - a, c - a, p - a
        den = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        den = torch.where(den != 0, den, torch.ones_like(den))
        wb = (q[:, 0] * e2[:, 1] - q[:, 1] * e2[:, 0]) / den
        wc = (e1[:, 0] * q[:, 1] - e1[:, 1] * q[:, 0]) / den
        w = torch.stack([1 - wb - wc, wb, wc], 1)
        # Coverage is decided on a 1/256-texel grid, so a centre on an edge may sit a hair
        # outside in float: clamp onto the triangle so the point stays on the surface.
        w = w.clamp_(min=0)
        w = w / w.sum(1, keepdim=True).clamp_(min=1e-300)
        pts = torch.einsum("mk,mkd->md", w, verts[corners]).float()
        out[t] = _eval_colors(colour_fn, pts, device)
        if progress is not None:
            progress(int(start + t.shape[0]), int(texels.shape[0]), None)
    return out.view(height, width, 3)


def fill_padding(texture: torch.Tensor, mask: torch.Tensor, padding: int,
                 background: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Extend each chart's colours ``padding`` texels into the background.

    Each of ``padding`` rounds gives every still-empty texel with a filled 8-neighbour
    the mean of its filled 3x3 neighbours (sum-pool of colour x mask over sum-pool of
    mask), so after the loop every texel within Chebyshev distance ``padding`` of a
    covered one is filled.

    Args:
        texture: (H, W, C) float colours (only those under ``mask`` are read).
        mask: (H, W) bool, True where a texel is covered.
        padding: rounds of growth (texels).
        background: (C,) colour of the texels still empty after that; default the mean
            covered colour (coarse mipmap levels average those texels into the seams,
            where a mean colour shows least).

    Returns:
        (H, W, 3) float32 texture; covered texels unchanged.
    """
    if texture.dim() != 3 or mask.shape != texture.shape[:2]:
        raise ValueError(f"fill_padding: expected texture (H, W, C) and mask (H, W), got "
                         f"{tuple(texture.shape)} and {tuple(mask.shape)}")
    if int(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    # Colour x mask and the mask as one (1, C + 1, H, W) stack: one pooling call a round.
    m = mask.to(torch.float32)[None, None]
    x = torch.cat([texture.to(torch.float32).permute(2, 0, 1)[None] * m, m], 1)
    for _ in range(int(padding)):  # loop over padding rounds only
        sums = F.avg_pool2d(x, 3, stride=1, padding=1)  # the 1/9 cancels in the ratio
        den = sums[:, -1:]
        grow = (x[:, -1:] == 0) & (den > 0)
        sums[:, :-1] /= den.clamp(min=1e-30)
        sums[:, -1:] = 1.0
        x = torch.where(grow, sums, x)
    col, m = x[:, :-1], x[:, -1:]
    if background is not None:
        fill = torch.as_tensor(background, dtype=torch.float32).reshape(-1)
    elif bool(mask.any()):
        fill = texture[mask].to(torch.float32).mean(0)
    else:
        fill = torch.zeros(texture.shape[-1])
    col = torch.where(m > 0, col, fill.view(1, -1, 1, 1))
    return col[0].permute(1, 2, 0).contiguous()


def bake_texture(vertices, faces, uvs, colour_fn: ColorFn, size: int = 1024, padding: int = 4,
                 chunk: int = 2 ** 18, device=None, progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """Bake ``colour_fn`` on the surface into a ``size`` x ``size`` texture.

    Args:
        vertices: (V, 3) positions; faces: (F, 3) int; uvs: (V, 2) in [0, 1] (v = 0 at the
            image's bottom row, trimesh's convention), e.g. from :func:`unwrap_uv`.
        colour_fn: ``points (N, 3) float32 -> RGB (N, 3)`` in [0, 1] (clamped), called
            without grad with N <= ``chunk``.
        size: texture side in texels.
        padding: texels to extend each chart by (:func:`fill_padding`).
        chunk: most points per ``colour_fn`` call.
        device: where the points handed to ``colour_fn`` live (default CPU).
        progress: optional callback per chunk of texels (:func:`sample_texels`).

    Returns:
        (size, size, 3) float32 texture, row 0 = the image's top (v = 1).
    """
    ids = rasterize_uv(uvs, faces, size)
    texture = sample_texels(vertices, faces, uvs, ids, colour_fn, chunk, device, progress)
    return fill_padding(texture, ids >= 0, padding)


# --------------------------------------------------------------------------- mesh
def textured_mesh(vertices, faces, colour_fn: ColorFn, size: int = 1024,
                  fallback: Literal["texture", "vertex_colors"] = "texture", padding: int = 4,
                  chunk: int = 2 ** 18, device=None, progress: Optional[ProgressFn] = None) -> trimesh.Trimesh:
    """A mesh coloured by ``colour_fn``: UV-unwrapped with a baked texture, or vertex colours.

    Args:
        vertices: (V, 3) positions; faces: (F, 3) int (kept as wound).
        colour_fn: ``points (N, 3) float32 -> RGB (N, 3)`` in [0, 1].
        size, padding, chunk: see :func:`bake_texture` (:class:`TextureBakeConfig`).
        fallback: "texture" (xatlas + bake) or "vertex_colors" (``colour_fn`` at the
            vertices; no xatlas, no seams).
        device: where the points handed to ``colour_fn`` live (default CPU).
        progress: optional callback per chunk of baked texels (not during xatlas, which
            cannot report or be stopped; it runs in a child process).

    Returns:
        ``trimesh.Trimesh`` (``process=False``). "texture": vertices duplicated along
        seams, ``TextureVisuals`` with a ``PBRMaterial`` whose baseColorTexture is an
        RGB ``PIL.Image`` (factor 1, non-metallic, fully rough: the colour as baked).
        "vertex_colors": the input vertices with uint8 RGBA vertex colours.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    verts = _as_points(vertices, "vertices", 3)
    tri = _as_faces(faces, verts.shape[0])
    if fallback == "vertex_colors":
        rgb = vertex_colors(verts, colour_fn, chunk, device)
        rgba = torch.cat([rgb, torch.ones_like(rgb[:, :1])], 1)
        return trimesh.Trimesh(verts.numpy(), tri.numpy(), process=False,
                               vertex_colors=(rgba * 255).round().to(torch.uint8).numpy())
    size = _check_size(size)
    new_verts, new_faces, uv, _ = unwrap_uv(verts, tri, resolution=size, padding=padding)
    texture = bake_texture(new_verts, new_faces, uv, colour_fn, size, padding, chunk, device, progress)
    image = Image.fromarray((texture * 255).round().to(torch.uint8).numpy())
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, baseColorFactor=[255, 255, 255, 255],
                                                   metallicFactor=0.0, roughnessFactor=1.0)
    return trimesh.Trimesh(new_verts.double().numpy(), new_faces.numpy(), process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv.double().numpy(), material=material))


def bake_mesh(vertices, faces, colour_fn: ColorFn, config: TextureBakeConfig, device=None,
              progress: Optional[ProgressFn] = None) -> Tuple[trimesh.Trimesh, str]:
    """:func:`textured_mesh` with ``config``, never losing the mesh to an unwrapping failure.

    With ``config.fallback == "texture"``, a missing xatlas or an xatlas crash on this mesh gives
    the vertex-colour mesh instead (the result of a long optimisation is not thrown away for its
    texture); the returned line says which happened.

    Returns:
        (mesh, one line for the user: what colours the mesh has, or a warning with the reason).
    """
    def make(fallback: str) -> trimesh.Trimesh:
        return textured_mesh(vertices, faces, colour_fn, size=config.size, fallback=fallback, padding=config.padding,
                             chunk=config.chunk, device=device, progress=progress)
    if config.fallback == "vertex_colors":
        return make("vertex_colors"), "colours: vertex colours"
    try:
        return make("texture"), f"colours: UV texture {config.size}x{config.size} (xatlas)"
    except (ImportError, RuntimeError) as exc:
        return make("vertex_colors"), f"WARNING: texture bake failed ({exc}); vertex colours instead"
