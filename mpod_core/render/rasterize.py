"""Pure-PyTorch mesh rasterizer: the reference twin of :mod:`.nvdiffrast_backend`.

Same outputs and conventions as nvdiffrast (``rast`` = (u, v, z_ndc,
triangle_id + 1), attribute = u*a0 + v*a1 + (1-u-v)*a2, perspective-correct),
except that the image row order is the pack's (:mod:`mpod_core.cameras`): row 0
is the top of the image (NDC y = +1), column 0 the left, pixel centres at
half-integers.

How :func:`rasterize_torch` works (no Python loop over triangles, pixels or
views; only over memory-bounded chunks):

1. *Discrete part, under no_grad* (:func:`coverage_torch`). Vertices are
   projected to pixel coordinates and snapped to a fixed-point grid of 1/256
   pixel (8 sub-pixel bits, as GPUs do). The edge functions are then integers
   below 2**53, evaluated exactly in float64, so two triangles sharing an edge
   never leave a crack or depend on rounding. Each triangle's bounding box of
   pixel centres is enumerated as (triangle, pixel) candidate pairs with
   ``repeat_interleave`` over the folded (view, triangle) list, in chunks of at
   most ``max_pairs`` pairs split by cumulative box area. An inside test (all
   three edge functions >= 0, double-sided) keeps the covered pairs, their
   depth is interpolated in screen space, and the nearest triangle per pixel is
   resolved with one ``scatter_reduce('amin')`` of a packed int64 key
   (31-bit quantised z_ndc << 32 | triangle index); ties go to the lower
   triangle index. The running key buffer carries across chunks.
2. *Differentiable part* (:func:`rast_from_coverage`). For every covered
   pixel, u, v and z are recomputed from ``pos_clip`` of the winning triangle
   with autograd on: the perspective-correct barycentrics of the pixel centre
   are the normalised cross product of (x_i - X w_i) and (y_i - Y w_i) over the
   three vertices (X, Y = the centre's NDC), i.e. the weights of the clip-space
   point of the triangle that projects onto the centre. Gradients flow from u,
   v, z to the vertex positions, as in nvdiffrast; coverage itself has no
   gradient (:func:`antialias_torch` gives silhouettes one).

Clipping: there is no geometric near-plane clipping. Triangles with any vertex
at clip w <= :data:`W_EPSILON` (at or behind the camera plane) are dropped
whole. Triangles entirely in front of the camera are exact, including the
parts in front of the near plane or beyond the far plane, which are removed
per pixel by the depth test -1 <= z_ndc <= 1 (for such triangles that is the
same as clipping). Projected vertices are clamped to +-2**16 pixels, which
only matters for vertices almost in the camera plane (coverage of such
triangles is then approximate).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

#: Clip-space w at or below which a vertex counts as behind the camera.
W_EPSILON = 1e-6
#: Sub-pixel precision of the coverage test (1/256 pixel, like GPU rasterizers).
SUBPIXEL_BITS = 8
#: Projected vertex coordinates are clamped to this many pixels (keeps the edge
#: functions exact in float64).
COORD_LIMIT = 2 ** 16
#: Default bound on (triangle, pixel) candidate pairs processed at once
#: (about 100 bytes each at the peak of a chunk).
DEFAULT_MAX_PAIRS = 2 ** 21

_DEPTH_LEVELS = 2 ** 31 - 1
_EMPTY = torch.iinfo(torch.int64).max
_LOW32 = 0xFFFFFFFF
# Antialiasing tolerates this much (in pixels) disagreement between the
# fixed-point coverage and the float edge crossing, like nvdiffrast's 1/16.
_AA_EPS = 1.0 / 16.0


# --------------------------------------------------------------------------- rasterize
@torch.no_grad()
def coverage_torch(pos_clip: torch.Tensor, tri: torch.Tensor, resolution: Tuple[int, int],
                   max_pairs: Optional[int] = None, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Discrete part of :func:`rasterize_torch`: the nearest triangle per pixel.

    Args:
        pos_clip: (N, V, 4) clip coordinates (not differentiated).
        tri: (F, 3) int64 vertex indices.
        resolution: (H, W).
        max_pairs: bound on candidate (triangle, pixel) pairs per chunk
            (default :data:`DEFAULT_MAX_PAIRS`); the result does not depend on it.
        rows: optional (r0, r1): rasterize only rows r0 <= row < r1 of the
            (H, W) image (a band, to bound memory); the result equals those
            rows of the whole image's (pixel coordinates are shifted by whole
            rows on the fixed-point grid, which is exact).

    Returns:
        (N, r1 - r0, W) int64 triangle index into ``tri`` (-1 where nothing
        covers the pixel centre); (N, H, W) without ``rows``.
    """
    full_height, width = int(resolution[0]), int(resolution[1])
    row0, row1 = _check_rows(rows, full_height)
    height = row1 - row0
    n_views, n_verts = pos_clip.shape[0], pos_clip.shape[1]
    n_faces = tri.shape[0]
    device = pos_clip.device
    hw = height * width
    max_pairs = int(max_pairs or DEFAULT_MAX_PAIRS)
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    if n_faces >= 2 ** 32:
        raise ValueError(f"too many triangles for one call: {n_faces}")
    if max(width, full_height) > 2 ** 15:
        raise ValueError(f"resolution: at most 32768 pixels a side, got ({full_height}, {width})")
    buf = torch.full((n_views * hw,), _EMPTY, dtype=torch.int64, device=device)
    if n_faces == 0 or n_views == 0:
        return buf.fill_(-1).view(n_views, height, width)

    # Per vertex: pixel coordinates snapped to the fixed-point grid. They are
    # integers held in float64; every edge-function value below stays under
    # 2**53, so float64 arithmetic on them is exact (and faster than int64).
    f64 = torch.float64
    p = pos_clip.detach().to(f64).reshape(-1, 4)
    w = p[:, 3]
    front = w > W_EPSILON
    inv_w = torch.where(front, 1.0 / torch.where(front, w, torch.ones_like(w)), torch.zeros_like(w))
    scale = float(1 << SUBPIXEL_BITS)
    half = scale / 2
    lim = COORD_LIMIT * scale
    fx = torch.round((p[:, 0] * inv_w + 1) * (0.5 * width * scale)).clamp_(-lim, lim)
    fy = torch.round((1 - p[:, 1] * inv_w) * (0.5 * full_height * scale)).clamp_(-lim, lim)
    if row0:
        fy -= row0 * scale  # integers below 2**53: exact
    z = p[:, 2] * inv_w

    # Per triangle, over the folded (view, triangle) list k = n * F + f, as (3, K) rows.
    vidx = tri.t().reshape(1, 3, n_faces)
    if n_views > 1:
        vidx = vidx + (torch.arange(n_views, device=device) * n_verts).view(n_views, 1, 1)
    vidx = vidx.transpose(0, 1).reshape(-1)  # corner-major: [corner0 of all k, corner1, corner2]
    X = fx.index_select(0, vidx).view(3, -1)
    Y = fy.index_select(0, vidx).view(3, -1)
    Z = z.index_select(0, vidx).view(3, -1)
    ok = front.index_select(0, vidx).view(3, -1).all(0)
    ok &= ~(((Z[0] > 1) & (Z[1] > 1) & (Z[2] > 1)) | ((Z[0] < -1) & (Z[1] < -1) & (Z[2] < -1)))
    x0, x1, x2 = X
    y0, y1, y2 = Y
    area2 = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    ok &= area2 != 0
    # Bounding box of the covered pixel centres (pixel i's centre is at i*scale + half).
    xmin = torch.ceil((torch.minimum(torch.minimum(x0, x1), x2) - half) / scale).clamp_(min=0)
    xmax = torch.floor((torch.maximum(torch.maximum(x0, x1), x2) - half) / scale).clamp_(max=width - 1)
    ymin = torch.ceil((torch.minimum(torch.minimum(y0, y1), y2) - half) / scale).clamp_(min=0)
    ymax = torch.floor((torch.maximum(torch.maximum(y0, y1), y2) - half) / scale).clamp_(max=height - 1)
    bw = (xmax - xmin + 1).clamp_(min=0)
    bh = (ymax - ymin + 1).clamp_(min=0)
    counts = (bw * bh).masked_fill_(~ok, 0)
    sel = counts.nonzero().squeeze(1)
    if sel.numel() == 0:
        return buf.fill_(-1).view(n_views, height, width)

    counts = counts.index_select(0, sel).long()
    X = X.index_select(1, sel)
    Y = Y.index_select(1, sel)
    Z = Z.index_select(1, sel)
    area2 = area2.index_select(0, sel)
    sign = torch.where(area2 > 0, 1.0, -1.0).to(f64)
    area = area2 * sign  # > 0
    bw = bw.index_select(0, sel)
    xmin = xmin.index_select(0, sel)
    ymin = ymin.index_select(0, sel)
    view = torch.div(sel, n_faces, rounding_mode="floor")
    base = view * hw + (ymin * width + xmin).long()  # flat pixel index of the box origin
    face_id = sel - view * n_faces  # the pixel index already holds the view
    # Oriented edge functions E_k (edge opposite corner k) as affine functions of
    # the box-local pixel offsets (lx, ly): E_k = c_k + ex_k * lx + ey_k * ly.
    cx0 = xmin * scale + half
    cy0 = ymin * scale + half
    tabs = []
    for k in (0, 1):  # E_2 = area - E_0 - E_1
        i, j = (k + 1) % 3, (k + 2) % 3
        dx = X[j] - X[i]
        dy = Y[j] - Y[i]
        c = (dx * (cy0 - Y[i]) - dy * (cx0 - X[i])) * sign
        tabs.append((c, -dy * (sign * scale), dx * (sign * scale)))
    # Depth is affine in screen space: z = zc + zx * lx + zy * ly.
    (c0, ex0, ey0), (c1, ex1, ey1) = tabs
    d0 = (Z[0] - Z[2]) / area
    d1 = (Z[1] - Z[2]) / area
    zc = Z[2] + c0 * d0 + c1 * d1
    zx = ex0 * d0 + ex1 * d1
    zy = ey0 * d0 + ey1 * d1
    tables = (bw, tabs, area, (zc, zx, zy), base, face_id)

    # Chunk the triangle list by cumulative candidate count.
    csum_host = counts.cumsum(0).cpu()
    n_sel = counts.shape[0]
    start = 0
    while start < n_sel:
        done = int(csum_host[start - 1]) if start > 0 else 0
        end = int(torch.searchsorted(csum_host, done + max_pairs, right=True))
        end = min(max(end, start + 1), n_sel)
        n_pairs = int(csum_host[end - 1]) - done
        _raster_chunk(buf, start, end, n_pairs, counts, tables, width)
        start = end

    ids = torch.where(buf != _EMPTY, buf & _LOW32, torch.full_like(buf, -1))
    return ids.view(n_views, height, width)


def _raster_chunk(buf, start, end, n_pairs, counts, tables, width):
    """Inside test + nearest-depth resolve for selected triangles [start, end) (see coverage_torch)."""
    bw, ((c0, ex0, ey0), (c1, ex1, ey1)), area, (zc, zx, zy), base, face_id = tables
    device = buf.device
    cnt = counts[start:end]
    t = torch.repeat_interleave(torch.arange(start, end, device=device), cnt, output_size=n_pairs)
    first = (cnt.cumsum(0) - cnt).to(torch.float64)
    local = torch.arange(n_pairs, device=device, dtype=torch.float64)
    local -= first.index_select(0, t - start)
    bwt = bw.index_select(0, t)
    # Row / column inside the box (exact: small integers in float64).
    ly = torch.floor((local + 0.5) / bwt)
    lx = local.sub_(ly * bwt)
    del bwt, first

    e0 = torch.addcmul(c0.index_select(0, t), ex0.index_select(0, t), lx)
    e0.addcmul_(ey0.index_select(0, t), ly)
    e1 = torch.addcmul(c1.index_select(0, t), ex1.index_select(0, t), lx)
    e1.addcmul_(ey1.index_select(0, t), ly)
    inside = (e0 >= 0) & (e1 >= 0)
    e0 += e1
    inside &= e0 <= area.index_select(0, t)  # E_2 = area - E_0 - E_1 >= 0
    del e0, e1
    keep = inside.nonzero().squeeze(1)
    del inside
    if keep.numel() == 0:
        return
    t = t.index_select(0, keep)
    lx = lx.index_select(0, keep)
    ly = ly.index_select(0, keep)
    depth = torch.addcmul(zc.index_select(0, t), zx.index_select(0, t), lx)
    depth.addcmul_(zy.index_select(0, t), ly)
    pix = base.index_select(0, t) + (ly * width + lx).long()
    vis = (depth >= -1) & (depth <= 1)
    if not bool(vis.all()):
        keep = vis.nonzero().squeeze(1)
        t, depth, pix = t.index_select(0, keep), depth.index_select(0, keep), pix.index_select(0, keep)
    q = depth.add_(1.0).mul_(0.5 * _DEPTH_LEVELS).long().clamp_(0, _DEPTH_LEVELS)
    key = q.bitwise_left_shift_(32).bitwise_or_(face_id.index_select(0, t))
    buf.scatter_reduce_(0, pix, key, reduce="amin")


def rast_from_coverage(pos_clip: torch.Tensor, tri: torch.Tensor, ids: torch.Tensor, row0: int = 0,
                       image_height: Optional[int] = None) -> torch.Tensor:
    """Differentiable part of :func:`rasterize_torch`.

    Args:
        pos_clip: (N, V, 4) clip coordinates (may require grad).
        tri: (F, 3) int64.
        ids: (N, H_b, W) int64 triangle per pixel, -1 for background: the
            rows row0 <= row < row0 + H_b of an image ``image_height`` rows
            tall (default: the whole image, row0 = 0, image_height = H_b).

    Returns:
        rast (N, H_b, W, 4) = (u, v, z_ndc, id + 1), zeros on background.
    """
    n_views, height, width = ids.shape
    full_height = height if image_height is None else int(image_height)
    flat = ids.reshape(-1)
    pix = (flat >= 0).nonzero().squeeze(1)
    out = torch.zeros(flat.shape[0], 4, dtype=pos_clip.dtype, device=pos_clip.device)
    if pix.numel() == 0:
        return out.view(n_views, height, width, 4)
    face = flat[pix]
    hw = height * width
    view = torch.div(pix, hw, rounding_mode="floor")
    rem = pix - view * hw
    row = torch.div(rem, width, rounding_mode="floor")
    col = rem - row * width
    dtype = pos_clip.dtype
    cx = (2.0 * col.to(dtype) + 1.0) / width - 1.0   # NDC of the pixel centre
    cy = 1.0 - (2.0 * (row + int(row0)).to(dtype) + 1.0) / full_height
    corners = tri.index_select(0, face) + (view * pos_clip.shape[1])[:, None]
    v = pos_clip.reshape(-1, 4).index_select(0, corners.reshape(-1)).view(-1, 3, 4)
    a = v[..., 0] - cx[:, None] * v[..., 3]
    c = v[..., 1] - cy[:, None] * v[..., 3]
    b = torch.linalg.cross(a, c, dim=-1)  # (M, 3), proportional to the barycentrics
    s = b.sum(-1, keepdim=True)
    s = torch.where(s.abs() > 0, s, torch.ones_like(s))
    b = b / s
    zc = (b * v[..., 2]).sum(-1)
    wc = (b * v[..., 3]).sum(-1)
    z_ndc = zc / torch.where(wc.abs() > 0, wc, torch.ones_like(wc))
    vals = torch.stack([b[:, 0], b[:, 1], z_ndc, (face + 1).to(dtype)], dim=-1)
    out = out.index_put((pix,), vals)
    return out.view(n_views, height, width, 4)


def rasterize_torch(pos_clip: torch.Tensor, tri: torch.Tensor, resolution: Tuple[int, int],
                    max_pairs: Optional[int] = None, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Rasterize triangles (pure torch). See :func:`mpod_core.render.rasterize`.

    Args:
        pos_clip: (N, V, 4) float clip coordinates.
        tri: (F, 3) int64 vertex indices.
        resolution: (H, W).
        max_pairs: candidate-pair budget per chunk (memory bound), default
            :data:`DEFAULT_MAX_PAIRS`. The result does not depend on it.
        rows: optional (r0, r1): only rows r0 <= row < r1 of the image (see
            :func:`coverage_torch`); the others are never allocated.

    Returns:
        rast (N, H, W, 4) = (u, v, z_ndc, triangle_id + 1), differentiable
        w.r.t. ``pos_clip`` through u, v, z; (N, r1 - r0, W, 4) with ``rows``.
    """
    ids = coverage_torch(pos_clip, tri, resolution, max_pairs, rows)
    row0 = 0 if rows is None else int(rows[0])
    return rast_from_coverage(pos_clip, tri, ids, row0=row0, image_height=int(resolution[0]))


def _check_rows(rows, height: int) -> Tuple[int, int]:
    """(r0, r1) of a row band, checked against the image height; (0, height) for None."""
    if rows is None:
        return 0, height
    r0, r1 = int(rows[0]), int(rows[1])
    if not 0 <= r0 < r1 <= height:
        raise ValueError(f"rows: expected 0 <= r0 < r1 <= {height}, got ({r0}, {r1})")
    return r0, r1


# --------------------------------------------------------------------------- interpolate
def interpolate_torch(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Interpolate vertex attributes (pure torch). See :func:`mpod_core.render.interpolate`.

    Args:
        attr: (V, C) or (N, V, C) (N may be 1 to broadcast).
        rast: (N, H, W, 4) from a rasterize call.
        tri: (F, 3) int64.

    Returns:
        (N, H, W, C), zero on background.
    """
    n_views, height, width, _ = rast.shape
    channels = attr.shape[-1]
    flat = rast.reshape(-1, 4)
    tid = flat[:, 3].detach()
    pix = (tid > 0).nonzero().squeeze(1)
    dtype = torch.promote_types(attr.dtype, rast.dtype)
    out = torch.zeros(flat.shape[0], channels, dtype=dtype, device=attr.device)
    if pix.numel() == 0:
        return out.view(n_views, height, width, channels)
    face = tid[pix].long() - 1
    vi = tri.index_select(0, face)  # (M, 3)
    if attr.dim() == 2 or attr.shape[0] == 1:
        table = attr if attr.dim() == 2 else attr[0]
    else:
        view = torch.div(pix, height * width, rounding_mode="floor")
        vi = vi + (view * attr.shape[1])[:, None]
        table = attr.reshape(-1, channels)
    a = table.index_select(0, vi.reshape(-1)).view(-1, 3, channels)
    uv = flat[pix, :2].to(dtype)
    u, v = uv[:, :1], uv[:, 1:]
    a = a.to(dtype)
    vals = a[:, 2] + u * (a[:, 0] - a[:, 2]) + v * (a[:, 1] - a[:, 2])
    out = out.index_put((pix,), vals)
    return out.view(n_views, height, width, channels)


# --------------------------------------------------------------------------- antialias
def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrap-around multiplication, arithmetic shifts)."""
    z = (z ^ (z >> 30)) * -4658895280553007687  # 0xbf58476d1ce4e5b9
    z = (z ^ (z >> 27)) * -7723592293110705685  # 0x94d049bb133111eb
    return z ^ (z >> 31)


def _weld(pos: torch.Tensor) -> torch.Tensor:
    """Canonical vertex ids: vertices at identical positions map to one representative.

    Meshes split at UV seams or normal creases duplicate vertices; welding by
    position keeps such seams from being taken for silhouettes.

    Args:
        pos: (V, D) positions (e.g. one view's clip coordinates).

    Returns:
        (V,) int64: for each vertex, the index of a vertex at the same position.
    """
    v = (pos.detach() + 0.0).to(torch.float64).contiguous()  # -0.0 -> +0.0
    n = v.shape[0]
    # Sort by a hash of the exact bit patterns, then split runs of equal rows.
    # A hash collision can only leave vertices unwelded, never weld distinct ones.
    bits = v.view(torch.int64)
    h = torch.zeros_like(bits[:, 0])
    for c in range(v.shape[1]):
        h = _mix64(h ^ bits[:, c])
    order = torch.sort(h).indices
    sv = v.index_select(0, order)
    new = torch.ones(n, dtype=torch.bool, device=v.device)
    new[1:] = (sv[1:] != sv[:-1]).any(1)
    rep = order[new]
    canon = torch.empty_like(order)
    canon[order] = rep[new.cumsum(0) - 1]
    return canon


def _opposite_vertices(tri_w: torch.Tensor, n_verts: int) -> torch.Tensor:
    """For each face edge k (the edge opposite corner k), the far corner of the face across it.

    Args:
        tri_w: (F, 3) welded vertex ids (< ``n_verts``).

    Returns:
        (F, 3) int64 vertex id of the opposite vertex across edge k and (F, 3)
        int64 index of the face across it; -1 where the edge is a boundary,
        degenerate, or shared by more than two faces (all treated as potential
        silhouettes, like nvdiffrast).
    """
    a = tri_w[:, [1, 2, 0]]
    b = tri_w[:, [2, 0, 1]]
    key = (torch.minimum(a, b) * n_verts + torch.maximum(a, b)).reshape(-1)
    m = key.shape[0]
    slots = torch.arange(m, device=key.device)
    key = torch.where((a == b).reshape(-1), -1 - slots, key)  # degenerate edges never pair
    skey, order = torch.sort(key)
    eq = skey[1:] == skey[:-1]
    no = torch.zeros(1, dtype=torch.bool, device=key.device)
    lone_pair = eq & ~torch.cat([no, eq[:-1]]) & ~torch.cat([eq[1:], no])  # groups of exactly two
    i = lone_pair.nonzero().squeeze(1)
    sa, sb = order[i], order[i + 1]
    flat = tri_w.reshape(-1)
    opp = torch.full((m,), -1, dtype=torch.long, device=key.device)
    opp[sa] = flat[sb]  # the partner edge's opposite corner = the far vertex across our edge
    opp[sb] = flat[sa]
    face = torch.full((m,), -1, dtype=torch.long, device=key.device)
    face[sa] = torch.div(sb, 3, rounding_mode="floor")
    face[sb] = torch.div(sa, 3, rounding_mode="floor")
    return opp.view(-1, 3), face.view(-1, 3)


_NEXT = [1, 2, 0]
_PREV = [2, 0, 1]
#: How many interior edges the antialiasing walk may cross between two pixel centres.
AA_MAX_HOPS = 16


def _segment_exit(corners, vsx, vsy, pcx, pcy, dqx, dqy):
    """Where the segment from p's centre towards q leaves each triangle (screen space).

    Args:
        corners: (P, 3) rows of the per-vertex pixel-coordinate arrays ``vsx``, ``vsy``.
        pcx, pcy: (P,) p's pixel centre; dqx, dqy: (P,) unit step from p to q.

    Returns:
        t (P,) exit parameter (inf if none), k (P,) exit edge (opposite corner k),
        sgn (P,) orientation of the triangle (+-1), and the (P,) edge vectors ex, ey
        and start points xi, yi of the exit edge.
    """
    sx, sy = vsx[corners], vsy[corners]
    area = (sx[:, 1] - sx[:, 0]) * (sy[:, 2] - sy[:, 0]) - (sx[:, 2] - sx[:, 0]) * (sy[:, 1] - sy[:, 0])
    sgn = torch.where(area >= 0, 1.0, -1.0).to(sx.dtype)
    # Edge k joins corners k+1 -> k+2; the oriented edge function is >= 0 inside.
    xi, yi = sx[:, _NEXT], sy[:, _NEXT]
    ex, ey = sx[:, _PREV] - xi, sy[:, _PREV] - yi
    ep = (ex * (pcy[:, None] - yi) - ey * (pcx[:, None] - xi)) * sgn[:, None]
    de = (ex * dqy[:, None] - ey * dqx[:, None]) * sgn[:, None]  # E(q) - E(p)
    # Along the segment E(t) = ep + t de: the triangle is left where a decreasing one hits 0.
    cand = de < 0
    tk = torch.where(cand, ep / torch.where(cand, -de, torch.ones_like(de)), torch.full_like(ep, float("inf")))
    t, k = tk.min(dim=1)
    k1 = k[:, None]
    pick = lambda a: a.gather(1, k1)[:, 0]  # noqa: E731
    return t, k, sgn, pick(ex), pick(ey), pick(xi), pick(yi)


def antialias_torch(color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor,
                    tri: torch.Tensor, row0: int = 0, image_height: Optional[int] = None) -> torch.Tensor:
    """Analytic silhouette antialiasing (pure torch). See :func:`mpod_core.render.antialias`.

    For each adjacent pixel pair (p, q) with different triangles, p the front
    one, the segment from p's centre towards q is followed through p's triangle
    and, across interior (non-silhouette) edges, through its neighbours (at most
    :data:`AA_MAX_HOPS`), until it leaves the surface through a silhouette edge
    at parameter t; the pair is then blended as nvdiffrast does. With triangles
    of about a pixel or smaller the silhouette edge is rarely in p's own
    triangle, which is why the walk matters.

    Args:
        color: (N, H, W, C).
        rast: (N, H, W, 4) from rasterizing ``pos_clip``, ``tri``.
        pos_clip: (N, V, 4).
        tri: (F, 3) int64.
        row0, image_height: ``color`` and ``rast`` are the rows row0 <= row <
            row0 + H of an image ``image_height`` rows tall (default: the whole
            image). Only pairs inside the band are blended: its first and last
            rows lack their outer neighbours, so a caller rendering an image
            band by band adds one row of overlap on each side and drops it.

    Returns:
        (N, H, W, C), differentiable w.r.t. ``color`` and ``pos_clip``.
    """
    n_views, height, width, channels = color.shape
    full_height = height if image_height is None else int(image_height)
    n_verts = pos_clip.shape[1]
    hw = height * width
    if tri.shape[0] == 0:
        return color
    with torch.no_grad():
        ids = rast[..., 3].detach().round().long() - 1
        # Horizontally and vertically adjacent pixel pairs (a, b) with different triangles.
        hn, hy, hx = (ids[:, :, :-1] != ids[:, :, 1:]).nonzero().unbind(1)
        vn, vy, vx = (ids[:, :-1, :] != ids[:, 1:, :]).nonzero().unbind(1)
        if hn.numel() + vn.numel() == 0:
            return color
        a = torch.cat([(hn * height + hy) * width + hx, (vn * height + vy) * width + vx])
        vertical = torch.cat([torch.zeros_like(hn, dtype=torch.bool), torch.ones_like(vn, dtype=torch.bool)])
        b = a + torch.where(vertical, width, 1)
        flat_ids = ids.reshape(-1)
        flat_z = rast[..., 2].detach().reshape(-1)
        ia, ib = flat_ids[a], flat_ids[b]
        # Front pixel p: the covered one, or the nearer of two (ties: b, like nvdiffrast).
        a_front = (ia >= 0) & ((ib < 0) | (flat_z[a] < flat_z[b]))
        p = torch.where(a_front, a, b)
        q = torch.where(a_front, b, a)
        face = torch.where(a_front, ia, ib)
        fq = torch.where(a_front, ib, ia)
        dtype = pos_clip.dtype
        step = torch.where(a_front, 1.0, -1.0).to(dtype)  # q - p along the pair axis
        dqx = torch.where(vertical, torch.zeros_like(step), step)
        dqy = torch.where(vertical, step, torch.zeros_like(step))
        view = torch.div(p, hw, rounding_mode="floor")
        rem = p - view * hw
        prow = torch.div(rem, width, rounding_mode="floor")
        pcx = (rem - prow * width).to(dtype) + 0.5
        pcy = prow.to(dtype) + 0.5

        # Pixel coordinates of every vertex in every view.
        pos_d = pos_clip.detach().reshape(-1, 4)
        w = pos_d[:, 3]
        w_ok = w > W_EPSILON
        inv_w = 1.0 / torch.where(w_ok, w, torch.ones_like(w))
        vsx = (pos_d[:, 0] * inv_w + 1) * (0.5 * width)
        vsy = (1 - pos_d[:, 1] * inv_w) * (0.5 * full_height) - row0  # band rows
        # Topology on welded vertices: far vertex and face across each edge.
        canon = _weld(pos_clip[0])
        tri_w = canon[tri]
        opp_v, opp_f = _opposite_vertices(tri_w, n_verts)
        opp_v, opp_f = opp_v.reshape(-1), opp_f.reshape(-1)
        flat_w = tri_w.reshape(-1)

        # Walk from p's triangle towards q until a silhouette edge is crossed.
        idx = torch.arange(p.shape[0], device=p.device)
        cur = face
        found = []  # (pair index, face, edge k, sgn)
        for hop in range(AA_MAX_HOPS):
            vb = view[idx] * n_verts
            t, k, sgn, ex, ey, xi, yi = _segment_exit(tri.index_select(0, cur) + vb[:, None], vsx, vsy,
                                                      pcx[idx], pcy[idx], dqx[idx], dqy[idx])
            live = t < 1 + _AA_EPS  # else q's centre is still inside: no silhouette between
            if hop == 0:
                live &= t > -_AA_EPS
            slot = cur * 3 + k
            o = opp_v[slot]
            og = vb + o.clamp(min=0)
            wing = (ex * (vsy[og] - yi) - ey * (vsx[og] - xi)) * sgn
            # nvdiffrast's silhouette test: no neighbour, or its far vertex on our side (a fold).
            sil = (o < 0) | ~w_ok[og] | (wing >= 0)
            # Horizontal pairs take steep edges, vertical pairs flat ones (each edge one way).
            vert = vertical[idx]
            steep = torch.where(vert, ex.abs() >= ey.abs(), ey.abs() >= ex.abs())
            # The stated rule: q's own triangle must not share the crossing edge.
            fqi = fq[idx]
            qtri = tri_w[fqi.clamp(min=0)]
            wi, wj = flat_w[cur * 3 + (k + 1) % 3], flat_w[cur * 3 + (k + 2) % 3]
            shares = (fqi >= 0) & (qtri == wi[:, None]).any(1) & (qtri == wj[:, None]).any(1)
            hit = live & sil & steep & ~shares
            if bool(hit.any()):
                found.append((idx[hit], cur[hit], k[hit], sgn[hit]))
            nxt = opp_f[slot]
            go = live & ~sil & (nxt >= 0) & (nxt != fqi)
            idx, cur = idx[go], nxt[go]
            if idx.numel() == 0:
                break
        if not found:
            return color
        sel, fsel, k, sgn = (torch.cat(x) for x in zip(*found))
        p, q, view = p[sel], q[sel], view[sel]
        pcx, pcy, dqx, dqy = pcx[sel], pcy[sel], dqx[sel], dqy[sel]
        corners = tri.index_select(0, fsel) + (view * n_verts)[:, None]
        ci = corners.gather(1, ((k + 1) % 3)[:, None])[:, 0]
        cj = corners.gather(1, ((k + 2) % 3)[:, None])[:, 0]

    # Differentiable crossing parameter t of the selected pairs.
    flat_pos = pos_clip.reshape(-1, 4)
    vi, vj = flat_pos.index_select(0, ci), flat_pos.index_select(0, cj)
    xi = (vi[:, 0] / vi[:, 3] + 1) * (0.5 * width)
    yi = (1 - vi[:, 1] / vi[:, 3]) * (0.5 * full_height) - row0
    xj = (vj[:, 0] / vj[:, 3] + 1) * (0.5 * width)
    yj = (1 - vj[:, 1] / vj[:, 3]) * (0.5 * full_height) - row0
    ex, ey = xj - xi, yj - yi
    ep = (ex * (pcy - yi) - ey * (pcx - xi)) * sgn
    de = (ex * dqy - ey * dqx) * sgn
    t = (ep / -de).clamp(0.0, 1.0)
    alpha = (0.5 - t).to(color.dtype)[:, None]
    # alpha > 0: p is only partly covered and takes (0.5 - t) of q's colour;
    # alpha < 0: q is partly covered and takes (t - 0.5) of p's colour.
    target = torch.where(alpha[:, 0] > 0, p, q)
    flat = color.reshape(-1, channels)
    contrib = alpha * (flat.index_select(0, q) - flat.index_select(0, p))
    return flat.index_add(0, target, contrib).view(n_views, height, width, channels)


# --------------------------------------------------------------------------- texture
def texture_sample_torch(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear texture lookup with wrap addressing (pure torch).

    See :func:`mpod_core.render.texture_sample` for the uv convention.

    Args:
        texture: (Ht, Wt, C).
        uv: (N, H, W, 2).

    Returns:
        (N, H, W, C).
    """
    th, tw, channels = texture.shape
    n_views, height, width, _ = uv.shape
    # Circular 1-texel padding makes bilinear filtering across the wrap seam exact.
    dtype = torch.promote_types(texture.dtype, uv.dtype)
    tex = F.pad(texture.to(dtype).permute(2, 0, 1)[None], (1, 1, 1, 1), mode="circular")
    u = uv[..., 0] - torch.floor(uv[..., 0].detach())
    v = uv[..., 1] - torch.floor(uv[..., 1].detach())
    # Texel coordinates in the padded image (row 0 = top = v of 1).
    x = u * tw + 1.0
    y = (1.0 - v) * th + 1.0
    grid = torch.stack([2.0 * x / (tw + 2) - 1.0, 2.0 * y / (th + 2) - 1.0], dim=-1)
    grid = grid.to(tex.dtype).reshape(1, n_views * height, width, 2)
    out = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(n_views, height, width, channels)
