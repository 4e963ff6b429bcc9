"""mpod_core.depth_estimation: Depth Anything and DPT folders read offline, pre-processing that is the
processor's own (checked against transformers' processor and its depth-estimation pipeline), the output
at the image's size, batches, the refusals, metric models inverted, constant maps flagged.

The models are tiny random ones in the real folder format (tests/harness/depth.py)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from harness.depth import write_depth_anything, write_dpt, write_vit_classifier
from mpod_core import depth_estimation as de

pytest.importorskip("transformers")

H, W = 70, 100  # a non-square image: 100 wide, 70 high
#: uint8 rounding of the processor's resize (its width pass and its height pass), in pixel levels:
#: measured 1.10 (Depth Anything, bicubic) and 1.00 (DPT, bilinear) on a noise image.
PIXEL_LEVELS = 1.5
#: End-to-end difference from the pipeline's predicted_depth, as a share of the map's range: measured
#: 0.32% (Depth Anything) and 0.03% (DPT); the controls below (a wrong resample, no per-pass clip) give
#: 3-100x more in pixel values.
E2E_SHARE = 0.01


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing may come from the Hub: a test that needed a download fails instead."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth_models")
    return {"depth_anything": write_depth_anything(root / "Depth-Anything-tiny"),
            "dpt": write_dpt(root / "dpt-tiny"),
            "metric": write_depth_anything(root / "Depth-Anything-metric-tiny", metric=True, max_depth=20),
            "vit": write_vit_classifier(root / "vit-classifier")}


@pytest.fixture(scope="module")
def models(folders):
    return {name: de.load_depth_model(folders[name]) for name in ("depth_anything", "dpt", "metric")}


@pytest.fixture(scope="module")
def picture():
    """A noise picture (the worst case for resampling) as uint8 and as the [0, 1] float ComfyUI holds."""
    array = (np.random.RandomState(0).rand(H, W, 3) * 255).astype(np.uint8)
    return array, torch.from_numpy(array).float()[None] / 255


def test_folders_load_as_their_family(models):
    assert type(models["depth_anything"].model).__name__ == "DepthAnythingForDepthEstimation"
    assert type(models["dpt"].model).__name__ == "DPTForDepthEstimation"
    assert not models["depth_anything"].metric and models["metric"].metric
    da = models["depth_anything"].preprocess
    assert (da.height, da.width, da.keep_aspect_ratio, da.ensure_multiple_of, da.resample) == \
        (518, 518, True, 14, "bicubic")
    assert da.mean == pytest.approx((0.485, 0.456, 0.406)) and da.std == pytest.approx((0.229, 0.224, 0.225))
    assert models["dpt"].preprocess.resample == "bilinear" and models["dpt"].default_resolution == 384
    assert all(not p.requires_grad for p in models["dpt"].model.parameters())


@pytest.mark.parametrize("family", ["depth_anything", "dpt"])
def test_matches_the_transformers_pipeline(family, folders, models, picture):
    """Pixel values against the processor's own, the model output from identical pixel values, and the
    whole estimate against `pipeline("depth-estimation")`'s predicted_depth (post-processed to the image)."""
    from transformers import pipeline

    array, image = picture
    dm = models[family]
    pipe = pipeline("depth-estimation", model=str(folders[family]))
    ref_pixels = pipe.image_processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    pixels = de.preprocess_images(image, dm.preprocess)
    assert pixels.shape == ref_pixels.shape
    level = 1 / 255 / min(dm.preprocess.std)  # one uint8 level in normalised units
    assert (pixels - ref_pixels).abs().max() <= PIXEL_LEVELS * level
    assert (pixels - ref_pixels).abs().mean() <= 0.5 * level

    expected = pipe(Image.fromarray(array))["predicted_depth"]
    assert expected.shape == (H, W)
    with torch.no_grad():
        same_input = de.predict_depth(dm.model, ref_pixels, (H, W))[0]
    span = (expected.max() - expected.min()).item()
    assert span > 0
    torch.testing.assert_close(same_input, expected, rtol=0, atol=1e-6 * span)

    raw = de.estimate_depth(dm.model, dm.processor, image, normalise=False)[0]
    assert (raw - expected).abs().max() <= E2E_SHARE * span


def test_a_broken_preprocessing_misses_the_pixel_bound(models, picture):
    """Controls for the bound above: the wrong resample, or a 2D resize clipped once (not per pass)."""
    from transformers import AutoImageProcessor

    array, image = picture
    dm = models["depth_anything"]
    proc = AutoImageProcessor.from_pretrained(str(dm.path), local_files_only=True)
    ref = proc(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    level = 1 / 255 / min(dm.preprocess.std)
    wrong = de.preprocess_images(image, dataclasses.replace(dm.preprocess, resample="bilinear"))
    assert (wrong - ref).abs().max() > 3 * PIXEL_LEVELS * level
    x = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), size=ref.shape[-2:], mode="bicubic",
                                        antialias=True, align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(dm.preprocess.mean).view(1, 3, 1, 1), torch.tensor(dm.preprocess.std).view(1, 3, 1, 1)
    assert ((x - mean) / std - ref).abs().max() > 3 * PIXEL_LEVELS * level


@pytest.mark.parametrize("size", [(70, 100), (100, 70), (700, 1000), (30, 600), (518, 518)])
@pytest.mark.parametrize("resolution", [None, 140])
def test_input_size_is_the_processors(models, size, resolution):
    from transformers import AutoImageProcessor

    dm = models["depth_anything"]
    proc = AutoImageProcessor.from_pretrained(str(dm.path), local_files_only=True)
    kwargs = {"size": {"height": resolution, "width": resolution}} if resolution else {}
    picture = torch.zeros(3, *size, dtype=torch.uint8)
    if size == (30, 600) and resolution == 140:  # the processor rounds the height to 0 and fails; ours is 14
        with pytest.raises(ValueError):
            proc(images=picture, return_tensors="pt", **kwargs)
        assert dm.preprocess.input_size(*size, resolution) == (14, 140)
        return
    ref = proc(images=picture, return_tensors="pt", **kwargs)["pixel_values"]
    assert dm.preprocess.input_size(*size, resolution) == tuple(ref.shape[-2:])
    assert de.preprocess_images(torch.zeros(1, *size, 3), dm.preprocess, resolution).shape == ref.shape


@pytest.mark.parametrize("family", ["depth_anything", "dpt"])
def test_output_is_the_image_size_and_normalised(family, models):
    image = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(1))
    depth = de.estimate_depth(models[family].model, models[family].processor, image, resolution=70)
    assert depth.shape == (1, H, W)
    assert depth.min() == 0 and depth.max() == 1


def test_a_batch_equals_its_images_one_by_one(models):
    dm = models["depth_anything"]
    images = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(2))
    steps = []
    batch = de.estimate_depth(dm.model, dm.preprocess, images, resolution=70, normalise=False)
    one_by_one = de.estimate_depth(dm.model, dm.preprocess, images, resolution=70, normalise=False, batch_size=1,
                                   progress=lambda i, n, preview: steps.append((i, n, tuple(preview.shape))))
    singles = torch.cat([de.estimate_depth(dm.model, dm.preprocess, images[i:i + 1], resolution=70,
                                           normalise=False) for i in range(2)])
    span = (batch.amax() - batch.amin()).item()
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-5 * span)
    torch.testing.assert_close(one_by_one, singles, rtol=0, atol=1e-5 * span)
    assert not torch.allclose(batch[0], batch[1], rtol=0, atol=1e-3 * span)  # two different maps
    assert steps == [(1, 2, (H, W, 3)), (2, 2, (H, W, 3))]


def test_rgba_is_composited_on_white(models):
    dm = models["dpt"]
    rgb = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(3))
    opaque = torch.cat([rgb, torch.ones(1, H, W, 1)], -1)
    clear = torch.cat([rgb, torch.zeros(1, H, W, 1)], -1)
    torch.testing.assert_close(de.preprocess_images(opaque, dm.preprocess), de.preprocess_images(rgb, dm.preprocess))
    torch.testing.assert_close(de.preprocess_images(clear, dm.preprocess),
                               de.preprocess_images(torch.ones(1, H, W, 3), dm.preprocess))


def test_metric_depth_becomes_inverse_depth(folders, models, picture):
    """A metric Depth Anything (metres, far = large) comes out as 1 / depth (near = large), the relative
    models' convention: against the pipeline's metric predicted_depth, inverted."""
    from transformers import pipeline

    array, image = picture
    dm = models["metric"]
    metres = pipeline("depth-estimation", model=str(folders["metric"]))(Image.fromarray(array))["predicted_depth"]
    assert metres.min() > de.METRIC_MIN_DEPTH and metres.max() < 20  # sigmoid x max_depth
    inverse = de.estimate_depth(dm.model, dm.processor, image, normalise=False)[0]
    expected = 1 / metres
    assert (inverse - expected).abs().max() <= E2E_SHARE * (expected.max() - expected.min())
    near = de.normalise_depth_maps(inverse[None])[0][0]
    # the nearest pixel (smallest metric depth) is 1, the farthest 0
    assert near.flatten()[metres.argmin()] > 0.99 and near.flatten()[metres.argmax()] < 0.01


def test_constant_maps_become_zeros_and_are_flagged(folders, tmp_path):
    maps = torch.stack([torch.full((4, 5), 3.0), torch.arange(20.0).view(4, 5), torch.zeros(4, 5),
                        torch.full((4, 5), 3.0) + torch.rand(4, 5) * 1e-8])
    out, constant = de.normalise_depth_maps(maps)
    assert constant.tolist() == [True, False, True, True]
    assert (out[constant] == 0).all() and torch.isfinite(out).all()
    assert out[1].min() == 0 and out[1].max() == 1 and out[1, 0, 1] == pytest.approx(1 / 19)

    # a model whose head outputs a constant: its estimate is all zeros, not NaN
    from transformers import AutoModelForDepthEstimation
    model = AutoModelForDepthEstimation.from_pretrained(str(folders["depth_anything"]), local_files_only=True)
    with torch.no_grad():
        model.head.conv3.weight.zero_()
        model.head.conv3.bias.fill_(0.5)
    dm = de.load_depth_model(folders["depth_anything"])
    depth = de.estimate_depth(model.eval(), dm.preprocess, torch.rand(1, H, W, 3), resolution=70)
    assert (depth == 0).all()


def test_differentiable_in_the_image_even_when_loaded_under_inference_mode(folders):
    """ComfyUI runs nodes under inference_mode; the weights must still let a loss reach the image."""
    with torch.inference_mode():
        dm = de.load_depth_model(folders["dpt"])
    image = torch.rand(1, 32, 48, 3, requires_grad=True)
    de.estimate_depth(dm.model, dm.preprocess, image, resolution=64, normalise=False).square().mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    with torch.no_grad():
        assert not de.estimate_depth(dm.model, dm.preprocess, image, resolution=64).requires_grad


def _refusal(path) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        de.load_depth_model(path)
    return str(info.value)


def test_other_architectures_and_files_are_refused(folders, tmp_path):
    message = _refusal(folders["vit"])
    assert str(folders["vit"]) in message and "'vit'" in message and "ViTForImageClassification" in message
    assert "depth_anything" in message and "Depth-Anything-V2-Small-hf" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    message = _refusal(empty)
    assert str(empty) in message and "no config.json" in message and "model.safetensors" in message

    from safetensors.torch import save_file
    loose = tmp_path / "depth_anything_v2_vits.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(loose))
    message = _refusal(loose)
    assert str(loose) in message and "single file" in message and "config.json" in message

    message = _refusal(tmp_path / "missing")
    assert "does not exist" in message


def test_broken_folders_are_refused(folders, tmp_path):
    import shutil

    def copy(name: str):
        target = tmp_path / name
        shutil.copytree(folders["depth_anything"], target)
        return target

    no_processor = copy("no_processor")
    (no_processor / "preprocessor_config.json").unlink()
    assert "no preprocessor_config.json" in _refusal(no_processor)

    no_weights = copy("no_weights")
    (no_weights / "model.safetensors").unlink()
    assert "no weights" in _refusal(no_weights)

    segmentation = copy("segmentation")
    config = json.loads((segmentation / "config.json").read_text())
    (segmentation / "config.json").write_text(json.dumps({**config, "model_type": "dpt",
                                                          "architectures": ["DPTForSemanticSegmentation"]}))
    message = _refusal(segmentation)
    assert "DPTForSemanticSegmentation" in message and "not a depth estimation model" in message

    zoe = copy("zoedepth")
    (zoe / "config.json").write_text(json.dumps({**config, "model_type": "zoedepth"}))
    assert "'zoedepth'" in _refusal(zoe)

    bad_json = copy("bad_json")
    (bad_json / "config.json").write_text("{not json")
    assert "config.json is not readable JSON" in _refusal(bad_json)

    # weights of another model under a Depth Anything config: most tensors missing
    other = copy("other_weights")
    shutil.copy(folders["vit"] / "model.safetensors", other / "model.safetensors")
    message = _refusal(other)
    assert str(other) in message and ("missing" in message or "could not be loaded" in message)


def test_bad_images_are_refused(models):
    dm = models["dpt"]
    for bad in (torch.rand(H, W, 3), torch.rand(1, H, W, 2), torch.zeros(1, H, W, 3, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"expected float images \(B, H, W, 3 or 4\)"):
            de.estimate_depth(dm.model, dm.preprocess, bad)


def test_transformers_is_imported_only_inside_functions():
    """The pack imports this module at start-up: transformers must come only with a model."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(de))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(name.split(".")[0] == "transformers" for name in names), names
