"""Orbit cameras: the one camera convention of the pack.

World frame (glTF's): right-handed, +y up, the reference (front) camera on +z
looking at the origin. An orbit camera is given by elevation ``e`` (degrees,
positive above the horizon), azimuth ``a`` (degrees, counter-clockwise seen
from above, i.e. a right-handed rotation about +y), distance ``d`` from the
origin and vertical field of view ``fovy`` (degrees). Its centre is::

    C = d * (cos e * sin a,  sin e,  cos e * cos a)

so ``(e, a) = (0, 0)`` is the front view on +z and ``a = 90`` looks at the
object from +x. Cameras follow OpenGL: they look down their local -z, +x is
image-right and +y image-up. Camera-to-world is ``[right | up | back | C]``
with ``back = C / |C|``, ``right = (cos a, 0, -sin a)`` (horizontal at every
elevation, so the poles are not singular) and ``up = back x right``.

Pixels: row 0 is the top of the image, column 0 the left; pixel ``(i, j)``
(column i, row j) has its centre at ``(i + 0.5, j + 0.5)``. With focal length
``f = 0.5 * H / tan(fovy / 2)`` (square pixels) the camera-space direction of
that pixel is ``((i + .5 - W/2) / f, -(j + .5 - H/2) / f, -1)``.

Clip space follows OpenGL too (NDC x right, y up, z in [-1, 1] from near to
far), so ``ndc_y = +1`` is the top row of the image. Rasterizers that use
another row order convert at their own boundary.

The papers' reference view (MPOD123, Magic123, Zero123) is elevation 0,
azimuth 0, distance 2.5, fov 40: see :data:`REFERENCE_VIEW`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

Number = Union[float, int]
AngleLike = Union[Number, Sequence[Number], torch.Tensor]

#: The papers' reference view: elevation, azimuth, distance, vertical fov (degrees).
REFERENCE_VIEW = {"elevation": 0.0, "azimuth": 0.0, "distance": 2.5, "fov": 40.0}
DEFAULT_NEAR = 0.05
DEFAULT_FAR = 100.0


@dataclass
class Cameras:
    """A batch of N pinhole cameras sharing one image size convention.

    Attributes:
        c2w: (N, 4, 4) camera-to-world matrices (OpenGL camera axes).
        fovy: (N,) vertical field of view in degrees.
        near, far: clip planes used by :meth:`projection`.
    """

    c2w: torch.Tensor
    fovy: torch.Tensor
    near: float = DEFAULT_NEAR
    far: float = DEFAULT_FAR

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def centers(self) -> torch.Tensor:
        """(N, 3) camera centres in world space."""
        return self.c2w[:, :3, 3]

    @property
    def w2c(self) -> torch.Tensor:
        """(N, 4, 4) world-to-camera matrices (rigid inverse of ``c2w``)."""
        rot = self.c2w[:, :3, :3]
        t = self.c2w[:, :3, 3:]
        w2c = torch.zeros_like(self.c2w)
        w2c[:, :3, :3] = rot.transpose(1, 2)
        w2c[:, :3, 3:] = -rot.transpose(1, 2) @ t
        w2c[:, 3, 3] = 1.0
        return w2c

    def focal(self, height: int) -> torch.Tensor:
        """(N,) focal length in pixels for an image ``height`` rows tall."""
        return 0.5 * height / torch.tan(torch.deg2rad(self.fovy) / 2)

    def projection(self, width: int, height: int) -> torch.Tensor:
        """(N, 4, 4) OpenGL perspective matrices (camera space -> clip space).

        Square pixels: the horizontal fov follows from the aspect ratio.
        """
        n, f = self.near, self.far
        t = torch.tan(torch.deg2rad(self.fovy) / 2)
        aspect = width / height
        proj = torch.zeros(len(self), 4, 4, dtype=self.c2w.dtype, device=self.c2w.device)
        proj[:, 0, 0] = 1.0 / (aspect * t)
        proj[:, 1, 1] = 1.0 / t
        proj[:, 2, 2] = -(f + n) / (f - n)
        proj[:, 2, 3] = -2.0 * f * n / (f - n)
        proj[:, 3, 2] = -1.0
        return proj

    def full_projection(self, width: int, height: int) -> torch.Tensor:
        """(N, 4, 4) world -> clip matrices, ``projection @ w2c``."""
        return self.projection(width, height) @ self.w2c

    def select(self, index) -> "Cameras":
        """The cameras at ``index`` (a list, slice or bool/long tensor), as a new batch."""
        return Cameras(self.c2w[index], self.fovy[index], self.near, self.far)

    def to(self, device=None, dtype=None) -> "Cameras":
        return Cameras(self.c2w.to(device=device, dtype=dtype),
                       self.fovy.to(device=device, dtype=dtype), self.near, self.far)


def _as_tensor(x: AngleLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name}: expected at least one value, got none")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: values must be finite, got {t.tolist()}")
    return t


def orbit_cameras(elevation: AngleLike, azimuth: AngleLike, distance: AngleLike = 2.5,
                  fov: AngleLike = 40.0, *, near: float = DEFAULT_NEAR, far: float = DEFAULT_FAR,
                  dtype: torch.dtype = torch.float32, device=None) -> Cameras:
    """Orbit cameras looking at the origin (see the module docstring).

    Args:
        elevation: degrees above the horizon, scalar or (N,).
        azimuth: degrees, counter-clockwise seen from above, scalar or (N,).
        distance: distance from the origin, > 0, scalar or (N,).
        fov: vertical field of view in degrees, in (0, 180), scalar or (N,).
        near, far: clip planes for :meth:`Cameras.projection`.

    Scalars broadcast against (N,) arguments; (N,) arguments must agree in N.

    Returns:
        :class:`Cameras` with N cameras.

    Raises:
        ValueError: non-positive distance, fov outside (0, 180), mismatched N.
    """
    elev, azim = _as_tensor(elevation, "elevation"), _as_tensor(azimuth, "azimuth")
    dist, fovy = _as_tensor(distance, "distance"), _as_tensor(fov, "fov")
    if (dist <= 0).any():
        raise ValueError(f"distance must be > 0, got {dist.tolist()}")
    if ((fovy <= 0) | (fovy >= 180)).any():
        raise ValueError(f"fov must be in (0, 180) degrees, got {fovy.tolist()}")
    sizes = {t.numel() for t in (elev, azim, dist, fovy)} - {1}
    if len(sizes) > 1:
        raise ValueError(
            "elevation, azimuth, distance and fov must have one value or the same number "
            f"of values; got {elev.numel()}, {azim.numel()}, {dist.numel()}, {fovy.numel()}")
    n = sizes.pop() if sizes else 1
    elev, azim, dist, fovy = (t.expand(n) for t in (elev, azim, dist, fovy))

    e, a = torch.deg2rad(elev), torch.deg2rad(azim)
    back = torch.stack([torch.cos(e) * torch.sin(a), torch.sin(e), torch.cos(e) * torch.cos(a)], -1)
    right = torch.stack([torch.cos(a), torch.zeros_like(a), -torch.sin(a)], -1)
    up = torch.cross(back, right, dim=-1)
    c2w = torch.zeros(n, 4, 4, dtype=torch.float64)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2] = right, up, back
    c2w[:, :3, 3] = dist[:, None] * back
    c2w[:, 3, 3] = 1.0
    return Cameras(c2w.to(device=device, dtype=dtype), fovy.to(device=device, dtype=dtype), near, far)


def reference_camera(**kwargs) -> Cameras:
    """The papers' front reference view (elevation 0, azimuth 0, distance 2.5, fov 40)."""
    view = dict(REFERENCE_VIEW)
    view.update({k: kwargs.pop(k) for k in list(kwargs) if k in view})
    return orbit_cameras(view["elevation"], view["azimuth"], view["distance"], view["fov"], **kwargs)


def pixel_directions_camera(width: int, height: int, focal: torch.Tensor,
                            rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Un-normalised camera-space ray directions of every pixel centre.

    Args:
        width, height: image size in pixels.
        focal: (N,) focal lengths in pixels.
        rows: optional (r0, r1): only the image rows r0 <= row < r1.

    Returns:
        (N, H, W, 3) directions with z = -1 ((N, r1 - r0, W, 3) with ``rows``).
    """
    r0, r1 = (0, height) if rows is None else (int(rows[0]), int(rows[1]))
    focal = focal.reshape(-1, 1, 1)
    i = torch.arange(width, dtype=focal.dtype, device=focal.device) + 0.5 - width / 2
    j = torch.arange(r0, r1, dtype=focal.dtype, device=focal.device) + 0.5 - height / 2
    x = (i[None, None, :] / focal).expand(-1, r1 - r0, width)
    y = (-j[None, :, None] / focal).expand(-1, r1 - r0, width)
    return torch.stack([x, y, -torch.ones_like(x)], dim=-1)


def get_rays(cameras: Cameras, width: int, height: int, normalize: bool = True,
             rows: Optional[Tuple[int, int]] = None):
    """World-space rays through every pixel centre.

    Args:
        cameras: N cameras.
        width, height: image size in pixels (> 0).
        normalize: unit-length directions (else camera-space z component = -1,
            so the ray parameter equals view depth).
        rows: optional (r0, r1): only the image rows r0 <= row < r1 (a band of
            the image, to bound memory).

    Returns:
        origins (N, H, W, 3) and directions (N, H, W, 3) ((N, r1 - r0, W, 3) with ``rows``).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    dirs_cam = pixel_directions_camera(width, height, cameras.focal(height), rows)
    rot = cameras.c2w[:, :3, :3]
    dirs = torch.einsum("nij,nhwj->nhwi", rot, dirs_cam)
    if normalize:
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cameras.centers[:, None, None, :].expand_as(dirs)
    return origins, dirs


def world_to_clip(points: torch.Tensor, cameras: Cameras, width: int, height: int) -> torch.Tensor:
    """Project world points to homogeneous clip coordinates.

    Args:
        points: (P, 3) world points shared by all cameras, or (N, P, 3).
        cameras: N cameras.
        width, height: image size (sets the aspect ratio).

    Returns:
        (N, P, 4) clip coordinates (OpenGL convention; divide by w for NDC).
    """
    if points.shape[-1] != 3:
        raise ValueError(f"points: expected (..., 3), got {tuple(points.shape)}")
    mvp = cameras.full_projection(width, height).to(points.dtype)
    homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    if homo.dim() == 2:
        return torch.einsum("nij,pj->npi", mvp, homo)
    return torch.einsum("nij,npj->npi", mvp, homo)


def ndc_to_pixel(ndc_xy: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """NDC (x right, y up, in [-1, 1]) -> continuous pixel coordinates (x = column, y = row).

    Pixel centres sit at half-integers: NDC -1 is the left/bottom image border.
    """
    x = (ndc_xy[..., 0] + 1) * 0.5 * width
    y = (1 - ndc_xy[..., 1]) * 0.5 * height
    return torch.stack([x, y], dim=-1)


def parse_angle_list(text: str, name: str) -> list[float]:
    """Parse a comma/space separated list of numbers (a widget string) into floats.

    Raises:
        ValueError: naming the widget, when an entry is not a finite number or the list is empty.
    """
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ValueError(f"{name}: expected a list of numbers such as '0, 90, 180, 270', got '{text}'")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"{name}: '{p}' is not a number (in '{text}')") from None
        if not math.isfinite(v):
            raise ValueError(f"{name}: '{p}' is not a finite number")
        values.append(v)
    return values


def parse_view_lists(elevations: str, azimuths: str) -> tuple[list[float], list[float]]:
    """Parse the elevation and azimuth widget strings of a set of orbit views.

    One elevation applies to every azimuth; otherwise there must be one per azimuth.

    Returns:
        (elevations, azimuths) of equal length.
    """
    azim = parse_angle_list(azimuths, "azimuths")
    elev = parse_angle_list(elevations, "elevations")
    if len(elev) == 1:
        elev = elev * len(azim)
    if len(elev) != len(azim):
        raise ValueError(f"elevations: give one value or one per azimuth ({len(azim)}), got {len(elev)}")
    return elev, azim
