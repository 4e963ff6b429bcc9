"""RealFusion's image augmentations for textual inversion, batched in torch.

RealFusion's ``textual-inversion/textual_inversion.py`` (``--use_augmentations``,
which Magic123's ``scripts/textual_inversion/textual_inversion.sh`` passes)
builds each training image from the one reference image with torchvision on PIL
images, one sample at a time::

    Resize(5/4 S), CenterCrop(5/4 S)
    RandomApply([RandomRotation(10, fill=white), CenterCrop(5/6 of that), Resize(S)], p=0.75)
    RandomResizedCrop(S, scale=(0.85, 1.15))           # ratio (3/4, 4/3), torchvision's default
    RandomApply([ColorJitter(0.04, 0.04, 0.04, 0.04)], p=0.75)
    RandomGrayscale(p=0.10)
    RandomApply([GaussianBlur(5, sigma=(0.1, 2))], p=0.10)
    RandomHorizontalFlip()

:func:`augment` draws the same distribution for a whole batch at once: the
rotation, the crops and the flip compose into one affine map per sample, sampled
with a single ``grid_sample`` from the 5/4 S square (:func:`prepare_square`); the
colour operations are per-sample tensor arithmetic; the blur is one grouped
convolution. Differences from torchvision, all deliberate: what the rotation and
the crops uncover is filled with the background the reference is composited on
(RealFusion fills white, the background of its references); ColorJitter's four
operations run in a fixed order (brightness, contrast, saturation, hue) instead
of a random one (at +-4% they nearly commute); the bilinear resample of the crop
is not antialiased (it never shrinks by more than 1/0.85 x 6/5 from the 5/4 S
square, which is itself resized with antialiasing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """RealFusion's augmentation parameters (``textual-inversion/textual_inversion.py``)."""

    base_scale: float = 5 / 4
    """The reference is resized to this many times the training resolution before anything else."""
    rotation_p: float = 0.75
    """Probability of the rotate-then-centre-crop step."""
    rotation_degrees: float = 10.0
    """Rotation angle drawn uniformly in [-this, this]."""
    rotation_crop: float = 5 / 6
    """Centre crop after the rotation, as a fraction of the rotated square's side."""
    crop_scale: tuple = (0.85, 1.15)
    """RandomResizedCrop's area range (fractions of the image's area)."""
    crop_ratio: tuple = (3 / 4, 4 / 3)
    """RandomResizedCrop's aspect ratio range (torchvision's default)."""
    crop_attempts: int = 10
    """Crop draws tried before falling back to the whole image, as torchvision does."""
    jitter_p: float = 0.75
    """Probability of colour jitter."""
    jitter: float = 0.04
    """Brightness, contrast and saturation factors in [1 - this, 1 + this]; hue shift in [-this, this] turns."""
    grayscale_p: float = 0.10
    """Probability of converting to grey (ITU-R 601 luma, as torchvision)."""
    blur_p: float = 0.10
    """Probability of a Gaussian blur."""
    blur_kernel: int = 5
    """Gaussian blur kernel size."""
    blur_sigma: tuple = (0.1, 2.0)
    """Gaussian blur sigma range."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""


REALFUSION = Augmentation()

_LUMA = (0.299, 0.587, 0.114)


def prepare_square(images: torch.Tensor, resolution: int, scale: float = REALFUSION.base_scale) -> torch.Tensor:
    """Centre square of each image, resized (antialiased bilinear) to ``round(scale * resolution)``.

    Args:
        images: (N, 3, H, W) in [0, 1].
        resolution: the training resolution S.

    Returns:
        (N, 3, S', S') with ``S' = round(scale * S)``: RealFusion's ``Resize(5/4 S), CenterCrop(5/4 S)``.
    """
    n, _, h, w = images.shape
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    square = images[:, :, top:top + m, left:left + m]
    side = int(round(scale * resolution))
    return F.interpolate(square, size=(side, side), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _chance(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _crop_boxes(n: int, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) RandomResizedCrop boxes as (centre x, centre y, half width, half height) in [-1, 1] coordinates.

    torchvision's rule: draw an area fraction and a log-uniform aspect ratio, keep the first of
    ``crop_attempts`` draws that fits inside the image (offset uniform over the positions that fit),
    else take the whole image.
    """
    k = aug.crop_attempts
    area = _uniform(n * k, *aug.crop_scale, generator).reshape(n, k)
    log_r = _uniform(n * k, math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), generator).reshape(n, k)
    ratio = log_r.exp()
    w = (area * ratio).sqrt()  # fractions of the side
    h = (area / ratio).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    idx = first.clamp(min=0)
    w = torch.where(first >= 0, w.gather(1, idx[:, None])[:, 0], torch.ones(n))
    h = torch.where(first >= 0, h.gather(1, idx[:, None])[:, 0], torch.ones(n))
    # The crop's corner is uniform over the positions inside the image: its centre then is too.
    cx = (1 - w) * (2 * torch.rand(n, generator=generator) - 1)
    cy = (1 - h) * (2 * torch.rand(n, generator=generator) - 1)
    return torch.stack([cx, cy, w, h], dim=1)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(1)
    minc, _ = rgb.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    hue = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb)) / 6
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _color_jitter(x: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """ColorJitter(j, j, j, j) on every sample (the caller picks which to keep), torchvision's formulas."""
    b = x.shape[0]
    j = aug.jitter
    shape = (b, 1, 1, 1)
    bright = _uniform(b, 1 - j, 1 + j, generator).to(x).reshape(shape)
    contrast = _uniform(b, 1 - j, 1 + j, generator).to(x).reshape(shape)
    sat = _uniform(b, 1 - j, 1 + j, generator).to(x).reshape(shape)
    hue = _uniform(b, -j, j, generator).to(x).reshape(b, 1, 1)
    x = (x * bright).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * sat + gray).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + hue) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (reflect padding, as torchvision)."""
    b, c, h, w = x.shape
    r = kernel // 2
    offsets = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k1 = torch.exp(-0.5 * (offsets[None] / sigma.to(x)[:, None]) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k1[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k1[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(squares: torch.Tensor, resolution: int, generator: torch.Generator,
            background: Sequence[float] = (1.0, 1.0, 1.0), aug: Augmentation = REALFUSION) -> torch.Tensor:
    """One batch of RealFusion-augmented training images (see the module docstring).

    Args:
        squares: (B, 3, S', S') in [0, 1], one (already chosen) reference square per sample, from
            :func:`prepare_square`.
        resolution: output side S.
        generator: a CPU generator; every random draw comes from it, so a seeded generator gives
            the same batch on any device.
        background: RGB in [0, 1] that fills what the rotation and the crops uncover.
        aug: the parameters (RealFusion's by default).

    Returns:
        (B, 3, S, S) in [0, 1], on the device of ``squares``.
    """
    b = squares.shape[0]
    dev, dt = squares.device, squares.dtype
    # Output pixel (x, y) in [-1, 1] -> source coordinates: flip, crop box, then rotation + centre crop.
    flip = torch.where(_chance(b, aug.flip_p, generator), -1.0, 1.0)
    box = _crop_boxes(b, aug, generator)
    rotate = _chance(b, aug.rotation_p, generator)
    angle = torch.deg2rad(_uniform(b, -aug.rotation_degrees, aug.rotation_degrees, generator))
    angle = torch.where(rotate, angle, torch.zeros_like(angle))
    shrink = torch.where(rotate, torch.full((b,), aug.rotation_crop), torch.ones(b))
    cos, sin = angle.cos() * shrink, angle.sin() * shrink
    # Crop: p = c + diag(w, h) * (flip * x, y). Rotation crop: q = shrink * R(angle) p.
    crop = torch.zeros(b, 3, 3)
    crop[:, 0, 0], crop[:, 0, 2] = box[:, 2] * flip, box[:, 0]
    crop[:, 1, 1], crop[:, 1, 2] = box[:, 3], box[:, 1]
    crop[:, 2, 2] = 1
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
    rot[:, 2, 2] = 1
    theta = (rot @ crop)[:, :2].to(device=dev, dtype=dt)
    grid = F.affine_grid(theta, (b, 3, resolution, resolution), align_corners=False)
    out = F.grid_sample(squares, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(squares[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    bg = torch.tensor(list(background), dtype=dt, device=dev).reshape(1, 3, 1, 1)
    out = out + (1 - inside) * bg

    jitter = _chance(b, aug.jitter_p, generator).to(dev).reshape(b, 1, 1, 1)
    out = torch.where(jitter, _color_jitter(out, aug, generator), out)
    gray = _chance(b, aug.grayscale_p, generator).to(dev).reshape(b, 1, 1, 1)
    out = torch.where(gray, _gray(out).expand_as(out), out)
    blur = _chance(b, aug.blur_p, generator).to(dev).reshape(b, 1, 1, 1)
    sigma = _uniform(b, *aug.blur_sigma, generator)
    out = torch.where(blur, _gaussian_blur(out, sigma, aug.blur_kernel), out)
    return out.clamp(0, 1)
