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
    crops, cmasks, boxes = crop_objects(img, masks, size=64, fill=0.8)
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
    crops, cmasks, _ = crop_objects(img, mask, size=64, fill=0.8, background=0.0)
    # The pole is 4 / 15.625 = 0.256 output pixels wide: each row must keep that much mask
    # (area preserved); point sampling every 15.6 px would see it in few rows or none.
    rows = cmasks[0, 20:44].sum(dim=1)
    assert torch.allclose(rows, torch.full_like(rows, 4 / 15.625), atol=0.03), rows


def test_mask_box_and_errors():
    m = torch.zeros(5, 7)
    m[1:3, 2:6] = 1
    assert mask_box(m) == (2, 1, 6, 3)
    img, masks = _scene()
    with pytest.raises(ValueError, match="object 1: its mask is empty"):
        crop_objects(img, torch.stack([masks[0], torch.zeros(100, 160)]))
    with pytest.raises(ValueError, match="no objects"):
        crop_objects(img, masks[:0])
    with pytest.raises(ValueError, match="does not match the image size"):
        crop_objects(img, masks[:, :50])
    with pytest.raises(ValueError, match="fill"):
        crop_objects(img, masks, fill=0.0)
