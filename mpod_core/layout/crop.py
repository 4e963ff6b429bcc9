"""Crop Objects: cut each object out of a multi-object image, centred on a
square canvas, as image-to-3D models expect (their training views show one
centred object; REPARO section 3.1).

For an object whose mask has bounding box ``(x0, y0, x1, y1)`` (pixels, x1/y1
exclusive), the crop is the square of side ``max(x1 - x0, y1 - y0) / fill``
centred on the box, so the object's longer side covers ``fill`` of the output.
Parts of the square outside the image are filled with the background. Pixels
outside the object's mask become background too, so neighbours and occluders
do not leak into the crop. The crop box is returned for the layout's initial
placement.

Occluded objects are completed afterwards by an inpainting model (REPARO
section 3.1, Fig. 2(a)); the region to inpaint in object k's crop is where
the OTHER objects are: the union (pixel-wise max) of the masks j != k, minus
k's own mask, resampled into k's square exactly as k's mask is (the same
call, one more channel). k's own mask is subtracted because SAM masks may
overlap: a pixel both masks claim is shown in k's crop as k's, so it is not
to be painted over, and the crop mask and the hidden region then add up to
at most 1 (a mask of the completed object is their sum). Pixels of the
square outside the image are not marked (nothing is known to hide them), and
a neighbour inside the square that does not actually cover k is marked too
(the masks alone cannot tell the two apart): the inpainting prompt is
expected to paint background there.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.nn import functional as F

from ..mesh import object_name


@dataclass
class CropBox:
    """Where a crop came from, in the source image's pixels.

    Attributes:
        object_box: (x0, y0, x1, y1) bounding box of the object's mask (x1, y1 exclusive).
        crop_box: (x0, y0, x1, y1) the square that was cropped (may extend past the image).
        image_size: (width, height) of the source image.
    """

    object_box: Tuple[int, int, int, int]
    crop_box: Tuple[float, float, float, float]
    image_size: Tuple[int, int]

    def to_dict(self) -> dict:
        return asdict(self)


class Crops(NamedTuple):
    """What :func:`crop_objects` returns (K objects, S = ``size``).

    Attributes:
        crops: (K, S, S, 3) RGB, each object centred on the background.
        masks: (K, S, S) each object's own mask in its crop.
        boxes: the K :class:`CropBox` es.
        occluded: (K, S, S) the region of each crop hidden by the other objects (the union of their
            masks minus the object's own, resampled as ``masks``): the inpainting region. Zero for an
            object nothing overlaps; ``masks + occluded <= 1``.
    """

    crops: torch.Tensor
    masks: torch.Tensor
    boxes: List[CropBox]
    occluded: torch.Tensor


def occluder_masks(masks: torch.Tensor) -> torch.Tensor:
    """Per object k, where the other objects are and k is not: ``max_{j != k} m_j * (1 - m_k)``.

    Vectorised over j with the two largest values per pixel: the max over j != k is the largest
    value unless k holds it, then the second largest (ties pick one index, so two masks at 1 both
    see the other's 1).

    Args:
        masks: (K, H, W) masks, clamped to [0, 1].

    Returns:
        (K, H, W) in [0, 1]; zeros when K = 1.
    """
    m = masks.clamp(0, 1)
    if m.shape[0] < 2:
        return torch.zeros_like(m)
    top, index = m.topk(2, dim=0)  # (2, H, W) each
    own = torch.arange(m.shape[0], device=m.device)[:, None, None]
    others = torch.where(index[0] == own, top[1], top[0])
    return others * (1 - m)


def mask_box(mask: torch.Tensor, threshold: float = 0.5) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) bounding box of ``mask > threshold`` (exclusive max); ValueError when empty."""
    fg = mask > threshold
    rows = fg.any(dim=1).nonzero()
    cols = fg.any(dim=0).nonzero()
    if rows.numel() == 0:
        raise ValueError("empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_objects(image: torch.Tensor, masks: torch.Tensor, size: int = 256, fill: float = 0.8,
                 background: float = 1.0) -> Crops:
    """Crop every object of ``image`` to a centred square, with the part of it the others hide.

    Args:
        image: (H, W, 3) RGB in [0, 1].
        masks: (K, H, W) one mask per object (1 = object).
        size: side of the output crops in pixels.
        fill: fraction of the output side covered by the object's longer side, in (0, 1].
        background: grey level outside the object.

    Returns:
        :class:`Crops`: crops (K, size, size, 3), crop masks (K, size, size), the K
        :class:`CropBox` es and the occluded regions (K, size, size) (see the module docstring).
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected (H, W, 3) RGB, got {tuple(image.shape)}")
    if masks.ndim != 3:
        raise ValueError(f"masks: expected (K, H, W), got {tuple(masks.shape)}")
    h, w = image.shape[:2]
    if masks.shape[0] == 0:
        raise ValueError("no objects: the mask batch is empty")
    if masks.shape[1:] != (h, w):
        raise ValueError(f"mask size {masks.shape[2]}x{masks.shape[1]} does not match the image size {w}x{h}")
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    hidden = occluder_masks(masks.to(image.dtype))  # the union first, then one resample per crop
    crops, crop_masks, occluded, boxes = [], [], [], []
    for k in range(masks.shape[0]):
        try:
            box = mask_box(masks[k])
        except ValueError:
            raise ValueError(f"{object_name(k)}: its mask is empty (no pixel above 0.5); remove it or fix its "
                             "box / segmentation") from None
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0) / fill
        cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
        square = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        out = _resample_square(image, masks[k], square, size, background, extra=hidden[k])
        crops.append(out[..., :3])
        crop_masks.append(out[..., 3])
        occluded.append(out[..., 4])
        boxes.append(CropBox(object_box=box, crop_box=tuple(float(v) for v in square), image_size=(w, h)))
    return Crops(torch.stack(crops), torch.stack(crop_masks), boxes, torch.stack(occluded))


def _resample_square(image: torch.Tensor, mask: torch.Tensor, square, size: int, background: float,
                     extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample the axis-aligned ``square`` (x0, y0, x1, y1) of the masked object onto a size x size grid.

    The object's RGBA (colour outside ``mask`` set to ``background``, alpha =
    ``mask``) is placed on a canvas of the integer window covering the square,
    padded with (background, background, background, 0) where the square leaves
    the image, box-filtered by the integer shrink factor k when the crop is
    reduced (so thin parts do not alias away), then sampled bilinearly at the
    output pixel centres (sub-pixel exact centring). An ``extra`` channel (the
    occluded region) rides along as a fifth channel, padded with 0, so it is
    resampled exactly as the mask is.

    Only the k x k blocks of the canvas that overlap the image are built and
    pooled; every other block holds nothing but padding, so its pooled value is
    the padding itself. Memory is therefore bounded by the image (plus k rows
    and columns) and the pooled canvas (about 2 ``size`` a side), whatever
    ``fill``: the whole canvas at source resolution would be (side / fill)^2
    pixels (25 GB for a 4000 px object at fill 0.1).

    Args:
        image: (H, W, 3); mask: (H, W) in [0, 1] (clamped); square: floats, may leave the image;
        extra: optional (H, W), taken as is.

    Returns:
        (size, size, 4) RGBA, or (size, size, 5) RGBA + the extra channel.
    """
    h, w, _ = image.shape
    x0, y0, x1, y1 = square
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = math.ceil(x1), math.ceil(y1)
    k = max(1, int((x1 - x0) / size))  # integer shrink factor of the box filter
    ch, cw = iy1 - iy0, ix1 - ix0  # the canvas at source resolution (never allocated)
    hp, wp = -(-ch // k), -(-cw // k)  # the pooled canvas (avg_pool2d with ceil_mode)
    pad = (background, background, background, 0.0) + ((0.0,) if extra is not None else ())
    pad = torch.tensor(pad, dtype=image.dtype, device=image.device)
    src = pad[:, None, None].repeat(1, hp, wp)
    sx0, sy0, sx1, sy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
    if sx1 > sx0 and sy1 > sy0:
        # Pooling blocks [by0, by1) x [bx0, bx1) overlap the image; their canvas rows [r0, r1) and
        # columns [c0, c1) (the last block clipped at the canvas edge, as ceil_mode pooling does).
        by0, bx0 = (sy0 - iy0) // k, (sx0 - ix0) // k
        by1, bx1 = -(-(sy1 - iy0) // k), -(-(sx1 - ix0) // k)
        r0, c0 = iy0 + by0 * k, ix0 + bx0 * k
        r1, c1 = min(iy0 + by1 * k, iy1), min(ix0 + bx1 * k, ix1)
        m = mask[sy0:sy1, sx0:sx1].to(image.dtype).clamp(0, 1)[None]
        rgb = image[sy0:sy1, sx0:sx1].permute(2, 0, 1) * m + background * (1 - m)
        part = pad[:, None, None].repeat(1, r1 - r0, c1 - c0)
        channels = [rgb, m] if extra is None else [rgb, m, extra[sy0:sy1, sx0:sx1].to(image.dtype)[None]]
        part[:, sy0 - r0:sy1 - r0, sx0 - c0:sx1 - c0] = torch.cat(channels)
        if k > 1:
            part = F.avg_pool2d(part[None], k, ceil_mode=True)[0]
        src[:, by0:by1, bx0:bx1] = part
    centres = (torch.arange(size, device=image.device, dtype=image.dtype) + 0.5) / size
    xs = (x0 - ix0 + centres * (x1 - x0)) / k   # in pooled-canvas pixels
    ys = (y0 - iy0 + centres * (y1 - y0)) / k
    grid = torch.stack(torch.meshgrid(xs / wp * 2 - 1, ys / hp * 2 - 1, indexing="xy"), -1)[None]
    out = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0)
