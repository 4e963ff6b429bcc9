"""Crop Objects' core (mpod_core.layout.crop): centring, fill, padding, masking."""
import json

import pytest
import torch

from mpod_core.layout.crop import crop_objects, mask_box


def _scene():
    """A 160x100 image: a red 40x20 object, and a green 30x40 one touching the right and bottom borders."""
    img = torch.zeros(100, 160, 3)
    masks = torch.zeros(2, 100, 160)
    masks[0, 10:30, 20:60] = 1
    img[10:30, 20:60] = torch.tensor([1.0, 0.0, 0.0])
    masks[1, 60:100, 130:160] = 1
    img[60:100, 130:160] = torch.tensor([0.0, 1.0, 0.0])
    return img, masks


def _extent(mask):
    ys, xs = (mask > 0.5).nonzero(as_tuple=True)
    return xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1


def test_objects_are_centred_and_fill_the_crop():
    img, masks = _scene()
    crops, cmasks, boxes, _ = crop_objects(img, masks, size=64, fill=0.8)
    assert crops.shape == (2, 64, 64, 3) and cmasks.shape == (2, 64, 64)
    # object 0: 40 x 20 px in a 50 px square -> 51.2 x 25.6 px in the 64 px crop, centred
    x0, x1, y0, y1 = _extent(cmasks[0])
    assert abs((x1 - x0) - 51.2) <= 1.5 and abs((y1 - y0) - 25.6) <= 1.5
    assert abs((x0 + x1) / 2 - 32) <= 0.5 and abs((y0 + y1) / 2 - 32) <= 0.5
    # object 1 touches two borders: the square is padded, the object still centred
    x0, x1, y0, y1 = _extent(cmasks[1])
    assert abs((y1 - y0) - 51.2) <= 1.5 and abs((x1 - x0) - 38.4) <= 1.5
    assert abs((x0 + x1) / 2 - 32) <= 0.5 and abs((y0 + y1) / 2 - 32) <= 0.5
    # colours: the object inside its mask, the background (white) elsewhere, the other object nowhere
    inside = cmasks[0] > 0.99
    assert torch.allclose(crops[0][inside], torch.tensor([1.0, 0.0, 0.0]).expand(int(inside.sum()), 3), atol=1e-5)
    outside = cmasks[1] < 0.01
    assert torch.allclose(crops[1][outside], torch.ones(int(outside.sum()), 3), atol=1e-5)
    assert boxes[0].object_box == (20, 10, 60, 30) and boxes[0].crop_box == (15.0, -5.0, 65.0, 45.0)
    assert boxes[1].image_size == (160, 100)
    assert json.loads(json.dumps([b.to_dict() for b in boxes]))[1]["object_box"] == [130, 60, 160, 100]


def test_big_objects_are_shrunk_without_losing_thin_parts():
    img = torch.zeros(1000, 1000, 3)
    mask = torch.zeros(1, 1000, 1000)
    mask[0, 100:900, 498:502] = 1  # a 4 px wide pole, 800 px tall: 12.5x shrink to 64 px
    img[100:900, 498:502] = 1.0
    crops, cmasks, _, _ = crop_objects(img, mask, size=64, fill=0.8, background=0.0)
    # The pole is 4 / 15.625 = 0.256 output pixels wide: each row must keep that much mask
    # (area preserved); point sampling every 15.6 px would see it in few rows or none.
    rows = cmasks[0, 20:44].sum(dim=1)
    assert torch.allclose(rows, torch.full_like(rows, 4 / 15.625), atol=0.03), rows


def test_mask_box_and_errors():
    m = torch.zeros(5, 7)
    m[1:3, 2:6] = 1
    assert mask_box(m) == (2, 1, 6, 3)
    img, masks = _scene()
    with pytest.raises(ValueError, match="object_01: its mask is empty"):
        crop_objects(img, torch.stack([masks[0], torch.zeros(100, 160)]))
    with pytest.raises(ValueError, match="no objects"):
        crop_objects(img, masks[:0])
    with pytest.raises(ValueError, match="does not match the image size"):
        crop_objects(img, masks[:, :50])
    with pytest.raises(ValueError, match="fill"):
        crop_objects(img, masks, fill=0.0)


# --------------------------------------------------------------------------- memory

def _reference_crop(image, mask, square, size, background):
    """The crop as computed before memory was bounded: the whole square canvas at source resolution."""
    import math
    from torch.nn import functional as F
    h, w, c = image.shape[0], image.shape[1], 4
    m = mask.clamp(0, 1)
    rgba = torch.cat([image * m[..., None] + background * (1 - m[..., None]), m[..., None]], -1)
    x0, y0, x1, y1 = square
    ix0, iy0, ix1, iy1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
    canvas = torch.empty(c, iy1 - iy0, ix1 - ix0)
    canvas[:] = torch.tensor((background,) * 3 + (0.0,))[:, None, None]
    sx0, sy0, sx1, sy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
    canvas[:, sy0 - iy0:sy1 - iy0, sx0 - ix0:sx1 - ix0] = rgba.permute(2, 0, 1)[:, sy0:sy1, sx0:sx1]
    src = canvas[None]
    k = max(1, int((x1 - x0) / size))
    if k > 1:
        src = F.avg_pool2d(src, k, ceil_mode=True)
    hp, wp = src.shape[2:]
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    xs = (x0 - ix0 + centres * (x1 - x0)) / k
    ys = (y0 - iy0 + centres * (y1 - y0)) / k
    grid = torch.stack(torch.meshgrid(xs / wp * 2 - 1, ys / hp * 2 - 1, indexing="xy"), -1)[None]
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0].permute(1, 2, 0)


@pytest.mark.parametrize("size,fill,background", [
    (64, 0.8, 1.0),    # shrink factor 1 at the corner object, 1 or 2 elsewhere
    (32, 0.5, 0.3),    # k > 1, squares past two borders, an odd grey
    (16, 0.1, 0.0),    # k in the tens, squares far past every border, partial last blocks
    (100, 0.9, 0.7),   # upscaling (k = 1), non-integer square corners
])
def test_bounded_crop_equals_the_whole_canvas_crop(size, fill, background):
    g = torch.Generator().manual_seed(size)
    img = torch.rand(97, 151, 3, generator=g)
    masks = torch.zeros(3, 97, 151)
    masks[0, 10:31, 20:61] = torch.rand(21, 41, generator=g) * 1.4 - 0.2  # soft, out-of-range values clamp
    masks[1, 60:97, 129:151] = 1                                          # touches the right and bottom borders
    masks[2, 0:5, 0:90] = 1                                               # wide, at the top-left corner
    crops, cmasks, boxes, _ = crop_objects(img, masks, size=size, fill=fill, background=background)
    for k in range(3):
        ref = _reference_crop(img, masks[k], boxes[k].crop_box, size, background)
        torch.testing.assert_close(crops[k], ref[..., :3], atol=1e-6, rtol=0)
        torch.testing.assert_close(cmasks[k], ref[..., 3], atol=1e-6, rtol=0)


def test_smallest_fill_at_the_largest_size_stays_within_memory():
    """Crop Objects' extreme widgets (size 2048, fill 0.1) on a 1000 px object: the square is 10,000 px a
    side, a 1.6 GB canvas at source resolution before this was bounded; now <= 512 MiB above the inputs
    (the 2048^2 outputs, sampling grid and pooled canvas alone are about 200 MiB)."""
    from harness.memory import peak_rss_growth
    img = torch.rand(1000, 1000, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1000, 1000)
    mask[0, 2:998, 300:700] = 1
    (crops, cmasks, boxes, _), growth = peak_rss_growth(lambda: crop_objects(img, mask, size=2048, fill=0.1))
    assert crops.shape == (1, 2048, 2048, 3)
    assert boxes[0].crop_box[2] - boxes[0].crop_box[0] == pytest.approx(9960.0)
    # the object covers 0.1 of the side, centred: 204.8 px tall in the crop
    x0, x1, y0, y1 = _extent(cmasks[0])
    assert abs((y1 - y0) - 204.8) <= 2 and abs((y0 + y1) / 2 - 1024) <= 1
    assert growth <= 512 * 2 ** 20, f"peak {growth / 2 ** 20:.0f} MiB"


# --------------------------------------------------------------------------- occluded regions (inpainting)

def _occlusion_scene():
    """A 100x120 image: object A's 40x40 box at x 20..60, y 20..60 with B in front of its lower-right corner
    (B's rectangle x 45..80, y 40..70; A's visible mask is its box minus B), and C alone at x 95..115,
    y 80..95, far from both squares."""
    img = torch.rand(100, 120, 3, generator=torch.Generator().manual_seed(3))
    a, b, c = torch.zeros(3, 100, 120)
    a[20:60, 20:60] = 1
    b[40:70, 45:80] = 1
    a = a * (1 - b)  # B occludes A: A's visible mask
    c[80:95, 95:115] = 1
    return img, torch.stack([a, b, c])


def test_occluded_region_is_the_other_objects_at_an_integer_copy():
    """fill 0.8 and size 50: A's square is x, y 15..65, 50 px, so crop pixel (i, j) is source pixel (15 + i, 15 + j)
    exactly: A's occluded region is B's rectangle there, pixel for pixel; C has no occluder: all zeros."""
    img, masks = _occlusion_scene()
    out = crop_objects(img, masks, size=50, fill=0.8)
    assert out.boxes[0].crop_box == (15.0, 15.0, 65.0, 65.0)
    expected = masks[1, 15:65, 15:65]
    assert expected.sum() == 25 * 20  # B's rows 40..65 (20 in A's box, 5 below it) x its columns 45..65
    torch.testing.assert_close(out.occluded[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.masks[0], masks[0, 15:65, 15:65], atol=1e-6, rtol=0)
    assert torch.equal(out.occluded[2], torch.zeros(50, 50))
    assert out.occluded.shape == out.masks.shape == (3, 50, 50)
    assert (out.masks + out.occluded).max() <= 1 + 1e-6


@pytest.mark.parametrize("size", [16, 37, 64])  # B's square (43.75 px, non-integer corners): k = 2, 1, 1
def test_occluded_region_is_resampled_as_the_mask(size):
    """B's occluded region is A's visible mask resampled into B's square: compared with the whole-canvas
    reference resampling of that known mask (and of B's own mask), both as the crop's alpha."""
    img, masks = _occlusion_scene()
    out = crop_objects(img, masks, size=size, fill=0.8, background=1.0)
    square = out.boxes[1].crop_box
    assert square[0] != int(square[0])
    ref_hidden = _reference_crop(img, masks[0], square, size, 1.0)[..., 3]
    ref_own = _reference_crop(img, masks[1], square, size, 1.0)[..., 3]
    torch.testing.assert_close(out.occluded[1], ref_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.masks[1], ref_own, atol=1e-6, rtol=0)
    assert ref_hidden.sum() > 0.05 * size ** 2  # A is really in B's crop
    assert torch.equal(out.occluded[2], torch.zeros(size, size))


def test_overlapping_masks_leave_the_objects_own_pixels_out():
    """SAM masks may overlap: a pixel both A and B claim stays A's in A's crop (not to be inpainted) and B's in
    B's; soft masks take the max of the others; the vectorised union equals a loop over j."""
    from mpod_core.layout.crop import occluder_masks
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 30, 40, generator=g) * 1.4 - 0.2  # soft, out of range, with ties at the clamps
    masks[:, :5] = 1.0    # all four claim the top rows: no region of any is occluded there
    masks[1:, 5:8] = 0.0  # only object 0 there, fully
    masks[0, 5:8] = 1.0
    hidden = occluder_masks(masks)
    m = masks.clamp(0, 1)
    for k in range(4):
        others = torch.stack([m[j] for j in range(4) if j != k]).amax(0)
        torch.testing.assert_close(hidden[k], others * (1 - m[k]), atol=0, rtol=0)
    assert torch.equal(hidden[:, :5], torch.zeros(4, 5, 40))
    assert torch.equal(hidden[0, 5:8], torch.zeros(3, 40)) and torch.equal(hidden[1:, 5:8], torch.ones(3, 3, 40))
    assert torch.equal(occluder_masks(masks[:1]), torch.zeros(1, 30, 40))
    # Through the crop: A's mask also covers B's top-left strip (x 45..50, y 40..45).
    img, scene = _occlusion_scene()
    scene[0, 40:45, 45:50] = 1
    out = crop_objects(img, scene, size=50, fill=0.8)
    assert torch.equal(out.occluded[0][25:30, 30:35], torch.zeros(5, 5))  # A's own: shown, not inpainted
    torch.testing.assert_close(out.occluded[0][30:35, 30:35], torch.ones(5, 5), atol=1e-6, rtol=0)
