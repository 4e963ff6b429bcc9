"""SAM object segmentation core (mpod_core.segment): box parsing, boxes from masks,
checkpoint loading in the official format, and the box / mask coordinate plumbing
of segment_boxes against a known answer."""
import copy
import json

import pytest
import torch
from torch import nn

from harness.sam import TINY_SAM, random_sam, write_sam_checkpoint
from mpod_core.layout.crop import crop_objects
from mpod_core.segment import (OFFICIAL_CONFIGS, SamConfig, boxes_from_masks, boxes_to_json, build_sam,
                               infer_sam_config, load_sam, overlay_masks, parse_boxes, sam_from_state_dict,
                               segment_boxes)

pytest.importorskip("segment_anything")

W, H = 300, 200


# ----------------------------------------------------------------------------- parse_boxes
def test_parse_list_single_and_dict_forms():
    boxes = parse_boxes("[[10, 20, 110, 120], [0.5, 1.5, 30, 40]]", W, H)
    assert boxes.dtype == torch.float32
    torch.testing.assert_close(boxes, torch.tensor([[10, 20, 110, 120], [0.5, 1.5, 30, 40]]))
    torch.testing.assert_close(parse_boxes("[1, 2, 3, 4]", W, H), torch.tensor([[1.0, 2, 3, 4]]))
    torch.testing.assert_close(parse_boxes('[{"box": [1, 2, 3, 4]}]', W, H), torch.tensor([[1.0, 2, 3, 4]]))
    torch.testing.assert_close(parse_boxes(boxes_to_json(boxes), W, H), boxes)


def test_parse_reads_crop_objects_json():
    img = torch.zeros(H, W, 3)
    masks = torch.zeros(2, H, W)
    masks[0, 10:30, 20:60] = 1
    masks[1, 150:200, 250:300] = 1
    _, _, crop_boxes, _ = crop_objects(img, masks, size=32)
    text = json.dumps([b.to_dict() for b in crop_boxes])
    torch.testing.assert_close(parse_boxes(text, W, H), torch.tensor([[20.0, 10, 60, 30], [250, 150, 300, 200]]))
    with pytest.raises(ValueError, match=r"object_00: box: it was made for a 300x200 image, this image is 150x100"):
        parse_boxes(text, 150, 100)


def test_parse_clips_boxes_partly_outside():
    boxes = parse_boxes("[[-10, -5, 50, 60], [250, 150, 400, 260]]", W, H)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0, 50, 60], [250, 150, 300, 200]]))


@pytest.mark.parametrize("text, message", [
    ("", r"no boxes given"),
    ("   ", r"no boxes given"),
    ("[]", r"zero boxes"),
    ("[[1, 2, 3, 4]", r"malformed JSON \(.* at line 1 column"),
    ("{'a': 1}", r"malformed JSON"),
    ('"box"', r"expected a JSON list of boxes, got str"),
    ("[[1, 2, 3]]", r"object_00: box: expected 4 numbers \[x0, y0, x1, y1\], got \[1, 2, 3\]"),
    ("[[1, 2, 3, 4], [1, 2, 3, 4, 5]]", r"object_01: box: expected 4 numbers"),
    ('[[1, 2, "a", 4]]', r"object_00: box: expected 4 numbers"),
    ("[[1, 2, true, 4]]", r"object_00: box: expected 4 numbers"),
    ("[[50, 10, 50, 20]]", r"object_00: box \[50, 10, 50, 20\]: needs x1 > x0 and y1 > y0"),
    ("[[1, 2, 3, 4], [10, 30, 20, 5]]", r"object_01: box \[10, 30, 20, 5\]: needs x1 > x0 and y1 > y0"),
    ("[[1, 2, 3, 4], [400, 10, 500, 50]]", r"object_01: box \[400, 10, 500, 50\] is entirely outside the 300x200 image"),
    ("[[10, -50, 20, 0]]", r"object_00: box \[10, -50, 20, 0\] is entirely outside the 300x200 image"),
    ('[{"crop_box": [1, 2, 3, 4]}]', r"object_00: box: a dict needs an 'object_box' or 'box' key"),
    ('[{"box": [1, 2, 3, 4], "image_size": 7}]', r"object_00: box: image_size must be \[width, height\]"),
])
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_boxes(text, W, H)


# ----------------------------------------------------------------------------- boxes_from_masks
def test_boxes_from_a_mask_batch():
    masks = torch.zeros(2, H, W)
    masks[0, 10:30, 20:60] = 1
    masks[1, 100:101, 5:6] = 1  # a single pixel is still a mask of the batch
    masks[1, 150:200, 250:300] = 0.9
    torch.testing.assert_close(boxes_from_masks(masks), torch.tensor([[20.0, 10, 60, 30], [5, 100, 300, 200]]))


def test_boxes_from_masks_errors():
    masks = torch.zeros(3, H, W)
    masks[0, 5:9, 5:9] = 1
    masks[2, 5:9, 5:9] = 1
    masks[1, 5:9, 5:9] = 0.4  # below the threshold
    with pytest.raises(ValueError, match=r"object_01: mask is empty"):
        boxes_from_masks(masks)
    with pytest.raises(ValueError, match=r"object_00: mask is empty"):
        boxes_from_masks(torch.zeros(H, W))
    with pytest.raises(ValueError, match=r"zero masks"):
        boxes_from_masks(torch.zeros(0, H, W))
    with pytest.raises(ValueError, match=r"expected \(K, H, W\)"):
        boxes_from_masks(torch.zeros(1, 1, H, W))


def test_a_single_mask_splits_into_connected_objects():
    mask = torch.zeros(H, W)
    mask[120:180, 10:50] = 1   # lower-left object
    mask[20:60, 200:290] = 1   # upper-right object: first in reading order
    mask[20:22, 100:102] = 1   # a 4 px speck (< the 60 px floor of a 300x200 image): ignored
    mask[60:70, 290:291] = 1   # touches the upper-right one only diagonally: part of it (8-connected)
    boxes = boxes_from_masks(mask[None])
    torch.testing.assert_close(boxes, torch.tensor([[200.0, 20, 291, 70], [10, 120, 50, 180]]))
    # A lower floor keeps the speck, in reading order (row 20, column 100 comes before column 200).
    boxes = boxes_from_masks(mask, min_component_area=4)
    torch.testing.assert_close(boxes[:2], torch.tensor([[100.0, 20, 102, 22], [200, 20, 291, 70]]))
    # Only specks: the largest one is kept rather than nothing.
    specks = torch.zeros(H, W)
    specks[5:7, 5:7] = 1
    specks[50:53, 50:53] = 1
    torch.testing.assert_close(boxes_from_masks(specks), torch.tensor([[50.0, 50, 53, 53]]))


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def tiny_sam():
    return random_sam(seed=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, tiny_sam, suffix):
    path = write_sam_checkpoint(tmp_path / f"sam{suffix}", seed=0)
    sam = load_sam(path)
    assert type(sam).__name__ == "Sam" and type(sam).__module__.startswith("segment_anything")
    assert not sam.training and not any(p.requires_grad for p in sam.parameters())
    assert sam.mpod_config == SamConfig(**TINY_SAM)
    assert sam.image_encoder.img_size == 1024
    want = tiny_sam.state_dict()
    got = sam.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(sam.pixel_mean, tiny_sam.pixel_mean)


def test_the_official_format_is_a_plain_state_dict(tmp_path):
    path = write_sam_checkpoint(tmp_path / "sam.pth")
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and "image_encoder.patch_embed.proj.weight" in state
    assert "mask_decoder.iou_prediction_head.layers.2.weight" in state


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_full_size_architectures_are_recognised(name):
    # Built on the meta device: the real key names and shapes, no memory, nothing written.
    state = build_sam(OFFICIAL_CONFIGS[name], device="meta").state_dict()
    assert infer_sam_config(state) == OFFICIAL_CONFIGS[name]
    if name == "vit_b":
        assert state["image_encoder.patch_embed.proj.weight"].shape[0] == 768
        sam = sam_from_state_dict(state, "auto")
        assert sam.mpod_config.name == "vit_b" and len(sam.image_encoder.blocks) == 12
        assert sam.image_encoder.blocks[0].attn.num_heads == 12
        assert [i for i, b in enumerate(sam.image_encoder.blocks) if b.window_size == 0] == [2, 5, 8, 11]
        sam_from_state_dict(state, "vit_b")


def test_custom_architectures_are_inferred():
    config = SamConfig(96, 3, 3, (0, 2))
    state = build_sam(config, device="meta").state_dict()
    assert infer_sam_config(state) == config
    sam = sam_from_state_dict(state)
    assert sam.image_encoder.blocks[1].attn.num_heads == 3 and sam.image_encoder.blocks[1].window_size == 14


def test_load_errors_name_the_problem(tmp_path, tiny_sam):
    state = dict(tiny_sam.state_dict())
    with pytest.raises(ValueError, match=r"model_type is vit_b but the checkpoint is a custom SAM \(embed_dim 64, "
                                         r"depth 2, 2 heads, global attention in blocks \[1\]\)"):
        sam_from_state_dict(state, "vit_b")
    with pytest.raises(ValueError, match=r"model_type must be one of auto, vit_b, vit_l, vit_h"):
        sam_from_state_dict(state, "vit_x")
    broken = dict(state)
    broken.pop("mask_decoder.iou_token.weight")
    broken["extra_head.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 missing keys \(mask_decoder\.iou_token\.weight\); "
                                         r"1 unexpected keys \(extra_head\.bias\)"):
        sam_from_state_dict(broken)
    bad_shape = dict(state)
    bad_shape["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    with pytest.raises(ValueError, match=r"another shape .*mask_decoder\.iou_token\.weight \(1, 128\) vs \(1, 256\)"):
        sam_from_state_dict(bad_shape)
    with pytest.raises(ValueError, match=r"not a Segment Anything checkpoint: no 'image_encoder\.patch_embed"
                                         r"\.proj\.weight' \(first keys: model\.diffusion\.weight\)"):
        sam_from_state_dict({"model.diffusion.weight": torch.zeros(2)})
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read garbage\.pth"):
        load_sam(garbage)
    with pytest.raises(FileNotFoundError, match=r"SAM checkpoint not found: .*absent\.pth"):
        load_sam(tmp_path / "absent.pth")


def test_training_checkpoint_wrapper_is_unwrapped(tiny_sam):
    sam = sam_from_state_dict({"model": tiny_sam.state_dict(), "epoch": 3})
    assert sam.mpod_config.embed_dim == 64


# ----------------------------------------------------------------------------- segment_boxes
class _BoxEcho(nn.Module):
    """Stands in for the prompt encoder: passes the (already 1024-frame) boxes through."""

    def forward(self, points, boxes, masks):
        return boxes.reshape(-1, 2, 2), torch.zeros(boxes.shape[0], 1, 1, 1)

    def get_dense_pe(self):
        return torch.zeros(1)


class _BoxPainter(nn.Module):
    """Stands in for the mask decoder: 256 x 256 low-res logits = the signed distance (in
    1024-frame pixels, positive inside) to the box it is given, sampled at low-res pixel
    centres. A piecewise-linear field survives the bilinear resizes, so its zero level is the
    box edge at the original resolution exactly when the crop and scales are right."""

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        b = sparse_prompt_embeddings.reshape(-1, 4)
        c = (torch.arange(256, dtype=torch.float32) + 0.5) * 4
        x, y = c[None, None, :], c[None, :, None]
        x0, y0, x1, y1 = (b[:, i, None, None] for i in range(4))
        d = torch.minimum(torch.minimum(x - x0, x1 - x), torch.minimum(y - y0, y1 - y))
        return d[:, None], torch.ones(b.shape[0], 1)


def _rect(box, h=H, w=W):
    m = torch.zeros(h, w)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return m


@pytest.mark.parametrize("size", [(H, W), (W, H)])
def test_segment_boxes_known_answer_at_the_original_resolution(tiny_sam, size):
    h, w = size
    sam = copy.deepcopy(tiny_sam)  # the real image encoder and pre/post-processing
    sam.prompt_encoder, sam.mask_decoder = _BoxEcho(), _BoxPainter()
    boxes = [(30, 20, 120, 90), (5, 110, 60, 150), (140, 10, 190, 180)]
    calls = []
    masks = segment_boxes(sam, torch.rand(h, w, 3), torch.tensor(boxes, dtype=torch.float32), chunk=2,
                          progress=lambda done, total: calls.append((done, total)))
    assert masks.shape == (3, h, w) and masks.dtype == torch.float32
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for k, box in enumerate(boxes):  # each box its own mask, in order
        want = _rect(box, h, w)
        wrong = (masks[k] != want).nonzero()
        assert len(wrong) == 0, f"box {k}: {len(wrong)} pixels differ, e.g. {wrong[:5].tolist()}"


@pytest.mark.slow
def test_segment_boxes_with_the_real_decoder_keeps_box_order(tiny_sam):
    image = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[10.0, 10, 100, 100], [50, 60, 250, 190], [200, 5, 290, 80]])
    masks = segment_boxes(tiny_sam, image, boxes)
    assert masks.shape == (3, H, W) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks[0] != masks[1]).float().mean() > 0.01  # random weights, but a mask per prompt
    again = segment_boxes(tiny_sam, image, boxes[[2, 0]], chunk=1, threshold=0.5)
    for got, want in ((again[0], masks[2]), (again[1], masks[0])):
        assert (got != want).float().mean() < 1e-3
    tight = segment_boxes(tiny_sam, image, boxes[:1], threshold=0.9)
    assert tight.sum() <= masks[0].sum()


def test_segment_boxes_checks_its_inputs(tiny_sam):
    with pytest.raises(ValueError, match=r"image: expected \(H, W, 3\)"):
        segment_boxes(tiny_sam, torch.rand(1, H, W, 3), torch.tensor([[0.0, 0, 5, 5]]))
    with pytest.raises(ValueError, match=r"boxes: expected \(K, 4\) with K >= 1, got \(0, 4\)"):
        segment_boxes(tiny_sam, torch.rand(H, W, 3), torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        segment_boxes(tiny_sam, torch.rand(H, W, 3), torch.tensor([[0.0, 0, 5, 5]]), threshold=1.0)


def test_overlay_tints_masks_and_outlines_boxes():
    image = torch.full((H, W, 3), 0.5)
    masks = torch.stack([_rect((30, 20, 120, 90)), _rect((140, 10, 190, 180))])
    out = overlay_masks(image, masks, torch.tensor([[30.0, 20, 120, 90], [140, 10, 190, 180]]))
    assert out.shape == (H, W, 3)
    assert torch.equal(out[150, 10], image[150, 10])        # outside every mask and box
    assert not torch.allclose(out[50, 60], out[100, 160])   # two masks, two tints
    assert not torch.allclose(out[50, 60], image[50, 60])
    assert torch.allclose(out[20, 60], out[21, 31]) and not torch.allclose(out[20, 60], out[50, 60])  # outline
