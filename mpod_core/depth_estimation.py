"""Monocular depth estimation (Depth Anything v1/v2, DPT) for REPARO's layout loss.

REPARO's appearance loss (eq. 4) compares depth maps predicted by "a frozen depth
foundation model F_D"; this module runs one from a Hugging Face-format folder, the
form users download (``config.json`` + ``model.safetensors`` + ``preprocessor_config.json``,
e.g. ``depth-anything/Depth-Anything-V2-Small-hf``, ``depth-anything/Depth-Anything-V2-Base-hf``,
``Intel/dpt-large``, ``Intel/dpt-hybrid-midas``), with ``transformers``'
``AutoModelForDepthEstimation`` and ``AutoImageProcessor`` reading that folder only
(``local_files_only``: nothing is ever downloaded). ``transformers`` is imported inside the
functions that need it, never at module import.

Pre-processing is the processor's own (``DPTImageProcessor``, which both families use), done in
torch on a batch at once so that it stays on the device and is differentiable in the image:
resize to the processor's ``size`` (Depth Anything: 518 x 518 with ``keep_aspect_ratio``, the
side whose scale is closer to 1 fitted, both sides rounded to a multiple of
``ensure_multiple_of`` = 14, the ViT patch; DPT: 384 x 384) with its ``resample``
(bicubic / bilinear, antialiased, as torchvision resizes), then its rescale and normalisation
(ImageNet mean/std for Depth Anything, 0.5/0.5 for DPT). The processor reads uint8 pictures and
rounds the resized pixels to uint8; here the image stays float (only clipped to [0, 1] after the
resize, as uint8 clips), so pixel values differ from the processor's by at most that rounding.
The prediction is resized back to the image's H x W by bicubic interpolation, as the
``depth-estimation`` pipeline's post-processing does.

Output convention: relative inverse depth, near = large, what relative Depth Anything and DPT
(MiDaS) models predict (affine-invariant disparity). A metric model (Depth Anything with
``depth_estimation_type = "metric"``, which predicts metres, far = large) is converted to
``1 / max(depth, METRIC_MIN_DEPTH)`` after the resize, so every map has the same convention.
:func:`normalise_depth_maps` maps each image's map to [0, 1] by its own min and max over the
whole image (near = 1); a constant map (no depth information at all) becomes zeros and is
flagged, so the caller can say so instead of dividing by zero.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from .progress import ProgressFn

log = logging.getLogger(__name__)

#: config.json ``model_type`` -> family name, the architectures this module runs.
SUPPORTED_MODEL_TYPES = {"depth_anything": "Depth Anything (v1/v2)", "dpt": "DPT (MiDaS v3)"}
#: What a model folder holds (the files of a Hugging Face model repository).
FOLDER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
#: Weight file names transformers reads from a folder, preferred first.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
EXAMPLE_REPOSITORY = "depth-anything/Depth-Anything-V2-Small-hf"
EXPECTED = (f"a Hugging Face-format depth model folder ({' + '.join(FOLDER_FILES)}) of Depth Anything (v1/v2) "
            f"or DPT, e.g. {EXAMPLE_REPOSITORY} downloaded with `hf download`")
#: Metric depths are floored at 1 mm (the models predict metres) before inverting: a depth of 0
#: (sigmoid saturating) would otherwise give an infinite inverse depth.
METRIC_MIN_DEPTH = 1e-3
#: A map whose max - min is at most this share of its largest magnitude is constant (float32 noise).
CONSTANT_RELATIVE_RANGE = 1e-6

#: Load refuses weights that leave more than this share of the model's tensors missing (another model's
#: file); a few missing are logged: Intel/dpt-hybrid-midas has no weights for the first fusion layer's
#: residual unit, which that layer never runs.
MAX_MISSING_SHARE = 0.1

#: PIL resample codes of preprocessor_config.json -> torch interpolation modes (transformers'
#: ``pil_torch_interpolation_mapping``: PIL NEAREST is torchvision's NEAREST_EXACT).
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class DepthPreprocess:
    """The image processor's steps, read from a loaded ``DPTImageProcessor``."""

    height: int
    """Target size (``size.height``): 518 for Depth Anything, 384 for DPT (their preprocessor_config.json)."""
    width: int
    """Target size (``size.width``)."""
    keep_aspect_ratio: bool
    """Scale both sides by the factor of the side whose scale is closer to 1 (Depth Anything: true)."""
    ensure_multiple_of: int
    """Both resized sides rounded to a multiple of this (Depth Anything: 14, the ViT patch)."""
    resample: str
    """torch interpolation mode of the resize (PIL code 3 = bicubic, 2 = bilinear)."""
    do_resize: bool
    scale: float
    """Factor from [0, 1] images to what the model reads: 255 x ``rescale_factor`` (1/255), or 255 when
    ``do_rescale`` is off."""
    mean: Optional[Tuple[float, ...]]
    """Normalisation mean (Depth Anything: ImageNet's 0.485, 0.456, 0.406), None when ``do_normalize`` is off."""
    std: Optional[Tuple[float, ...]]
    """Normalisation std (Depth Anything: ImageNet's 0.229, 0.224, 0.225)."""
    pad_divisor: Optional[int] = None
    """``do_pad``: centre-pad (after normalisation, with zeros) to a multiple of ``size_divisor``."""

    @classmethod
    def from_processor(cls, processor: Any, source: str = "preprocessor_config.json") -> "DepthPreprocess":
        """The steps of a transformers ``DPTImageProcessor`` (torchvision or PIL backend).

        Raises:
            ValueError: another processor class, a centre crop, or a resample mode other than
                nearest / bilinear / bicubic, naming ``source``.
        """
        name = type(processor).__name__
        if not name.startswith("DPTImageProcessor"):
            raise ValueError(f"{source}: image processor {name} is not DPTImageProcessor (what Depth Anything and DPT "
                             "use); expected " + EXPECTED)
        if getattr(processor, "do_center_crop", False):
            raise ValueError(f"{source}: do_center_crop is set; Depth Anything and DPT processors do not crop")
        size = processor.size
        height, width = _size_of(size)
        if not height or not width:
            raise ValueError(f"{source}: size must give height and width (e.g. 518 x 518), got {size}")
        code = int(getattr(processor, "resample", 3))
        if code not in _RESAMPLE:
            raise ValueError(f"{source}: resample {code} ({_RESAMPLE_NAMES.get(code, 'unknown')}) is not supported; "
                             "Depth Anything uses 3 (bicubic), DPT 2 (bilinear) or 3")
        do_rescale = bool(getattr(processor, "do_rescale", True))
        scale = 255.0 * float(processor.rescale_factor) if do_rescale else 255.0
        mean = std = None
        if getattr(processor, "do_normalize", True):
            mean = tuple(float(v) for v in _triple(processor.image_mean))
            std = tuple(float(v) for v in _triple(processor.image_std))
        pad = int(getattr(processor, "size_divisor", None) or 0) if getattr(processor, "do_pad", False) else 0
        return cls(height=int(height), width=int(width), keep_aspect_ratio=bool(processor.keep_aspect_ratio),
                   ensure_multiple_of=int(processor.ensure_multiple_of or 1), resample=_RESAMPLE[code],
                   do_resize=bool(getattr(processor, "do_resize", True)), scale=scale, mean=mean, std=std,
                   pad_divisor=pad or None)

    def input_size(self, height: int, width: int, resolution: Optional[int] = None) -> Tuple[int, int]:
        """The model's input size for an ``height`` x ``width`` image: ``DPTImageProcessor``'s
        ``get_resize_output_image_size``, with ``resolution`` (if given) in place of both target sides.

        Each side is at least ``ensure_multiple_of`` (the processor would make a 1-pixel strip 0 high).
        """
        if not self.do_resize:
            return height, width
        out_h, out_w = (resolution, resolution) if resolution else (self.height, self.width)
        scale_h, scale_w = out_h / height, out_w / width
        if self.keep_aspect_ratio:  # "scale as little as possible"
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        m = self.ensure_multiple_of
        return _multiple_of(scale_h * height, m), _multiple_of(scale_w * width, m)


def _size_of(size) -> Tuple[Optional[int], Optional[int]]:
    if isinstance(size, dict):
        return size.get("height"), size.get("width")
    if isinstance(size, int):
        return size, size
    return getattr(size, "height", None), getattr(size, "width", None)


def _triple(value) -> Tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {values}")
    return tuple(values)


def _multiple_of(value: float, multiple: int) -> int:
    """``constrain_to_multiple_of`` of transformers' DPT processor (round, no bounds), at least ``multiple``."""
    return max(multiple, int(round(value / multiple) * multiple))


@dataclass
class DepthModel:
    """A loaded depth estimator: what Load Depth Model hands to Estimate Depth."""

    model: torch.nn.Module
    """``DepthAnythingForDepthEstimation`` or ``DPTForDepthEstimation``, eval mode, weights frozen."""
    processor: Any
    """The folder's ``DPTImageProcessor`` (its settings are :attr:`preprocess`)."""
    preprocess: DepthPreprocess
    model_type: str
    """config.json ``model_type``: depth_anything or dpt."""
    metric: bool
    """The model predicts metric depth (converted to inverse depth by :func:`estimate_depth`)."""
    path: Path

    @property
    def default_resolution(self) -> int:
        """The processor's own input size (518 for Depth Anything, 384 for DPT)."""
        return max(self.preprocess.height, self.preprocess.width)

    def __repr__(self) -> str:
        return f"DepthModel({self.model_type}, {self.path.name}, {'metric' if self.metric else 'relative'})"


def _read_json(path: Path, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder}: {path.name} is not readable JSON ({exc}); expected {EXPECTED}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{folder}: {path.name} is not a JSON object; expected {EXPECTED}")
    return data


def check_depth_folder(path) -> dict:
    """The ``config.json`` of a depth model folder, after checking the folder is one this module runs.

    Reads JSON only (no transformers import), so a wrong file or folder is refused fast.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a single file (e.g. an original ``depth_anything_v2_vits.pth``), a folder without
            ``config.json``, ``preprocessor_config.json`` or weights, or a config of another architecture;
            the message names the file or folder and what is expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {EXPECTED}")
    if path.is_file():
        raise ValueError(f"{path} is a single file, not a model folder; expected {EXPECTED} (original checkpoints such "
                         "as depth_anything_v2_vits.pth are not read: download the -hf repository instead)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json in this folder; expected {EXPECTED}")
    config = _read_json(config_file, path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ValueError(f"{path}: config.json model_type {model_type!r} ({arch}) is not a supported depth estimator; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} ({', '.join(SUPPORTED_MODEL_TYPES.values())})"
                         f"; expected {EXPECTED}")
    archs = config.get("architectures") or []
    if archs and not any(a.endswith("ForDepthEstimation") for a in archs):
        raise ValueError(f"{path}: config.json describes {', '.join(archs)}, not a depth estimation model (a "
                         f"{model_type} model for another task); expected {EXPECTED}")
    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"{path}: no preprocessor_config.json in this folder (the image processor's settings); "
                         f"expected {EXPECTED}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{path}: no weights in this folder ({' or '.join(WEIGHT_FILES[::2])}); expected {EXPECTED}")
    return config


def load_depth_model(path, device="cpu") -> DepthModel:
    """Load a Depth Anything or DPT depth estimator from a Hugging Face-format folder, offline.

    The weights are loaded outside ``torch.inference_mode`` (as ordinary tensors, so a loss can
    back-propagate through the frozen model to the image) and frozen (``requires_grad`` off), eval mode.

    Args:
        path: the folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
        device: where the model goes.

    Raises:
        FileNotFoundError, ValueError: see :func:`check_depth_folder`; also weights that do not match
            config.json (tensors of another shape, or more than ``MAX_MISSING_SHARE`` of them missing),
            naming the folder.
    """
    path = Path(path)
    config = check_depth_folder(path)
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: preprocessor_config.json could not be read by transformers ({exc}); "
                         f"expected {EXPECTED}") from None
    preprocess = DepthPreprocess.from_processor(processor, f"{path}/preprocessor_config.json")
    with torch.inference_mode(False):
        try:
            model, info = AutoModelForDepthEstimation.from_pretrained(
                str(path), local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: the model could not be loaded ({type(exc).__name__}: {exc}); "
                             f"expected {EXPECTED}") from None
        missing = sorted(info.get("missing_keys") or [])
        total = len(model.state_dict())
        if len(missing) > MAX_MISSING_SHARE * total:
            raise ValueError(f"{path}: the weights do not match config.json ({len(missing)} of {total} tensors "
                             f"missing, e.g. {missing[0]}); expected {EXPECTED}")
        if missing:  # Intel/dpt-hybrid-midas: transformers issue #28292
            log.warning("%s: %d of %d tensors not in the weights (left at their initial values): %s", path,
                        len(missing), total, ", ".join(missing[:4]))
        model = model.float().to(device).eval().requires_grad_(False)
    metric = config.get("depth_estimation_type") == "metric"
    return DepthModel(model=model, processor=processor, preprocess=preprocess, model_type=config["model_type"],
                      metric=metric, path=path)


def check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """``images`` checked to be (B, H, W, 3 or 4) floats.

    Raises:
        ValueError: expected vs actual shape.
    """
    got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4) \
            or images.shape[0] < 1 or min(images.shape[1:3]) < 1 or not images.is_floating_point():
        raise ValueError(f"{name}: expected float images (B, H, W, 3 or 4) in [0, 1], got {got}")
    return images


def preprocess_images(images: torch.Tensor, settings: DepthPreprocess,
                      resolution: Optional[int] = None) -> torch.Tensor:
    """The model's ``pixel_values`` for a batch of images, the processor's steps in torch (differentiable).

    Args:
        images: (B, H, W, 3) floats in [0, 1]; (B, H, W, 4) is composited on white first (as the processor
            converts RGBA to RGB).
        settings: the processor's steps.
        resolution: target side in place of the processor's ``size`` (None = its own).

    Returns:
        (B, 3, h, w) with (h, w) = ``settings.input_size(H, W, resolution)`` (padded when ``do_pad``).
    """
    check_images(images)
    rgb = images[..., :3]
    if images.shape[-1] == 4:
        alpha = images[..., 3:]
        rgb = rgb * alpha + (1 - alpha)
    x = rgb.permute(0, 3, 1, 2)
    h, w = settings.input_size(x.shape[-2], x.shape[-1], resolution)
    if settings.resample == "nearest-exact":
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="nearest-exact")
    else:
        # torchvision's resize (antialiased, align_corners off) of the uint8 picture the processor reads
        # runs the width pass, clips to [0, 255], then the height pass: the same here in float, so a
        # bicubic overshoot is clipped where the processor clips it (2D then clip differs by up to
        # 21/255 on a noise image, this by the uint8 rounding: 1.1/255, measured).
        if w != x.shape[-1]:
            x = F.interpolate(x, size=(x.shape[-2], w), mode=settings.resample, align_corners=False,
                              antialias=True).clamp(0, 1)
        if h != x.shape[-2]:
            x = F.interpolate(x, size=(h, w), mode=settings.resample, align_corners=False,
                              antialias=True).clamp(0, 1)
    x = x * settings.scale
    if settings.mean is not None:
        mean = torch.tensor(settings.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(settings.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    if settings.pad_divisor:
        d = settings.pad_divisor
        ph, pw = math.ceil(h / d) * d - h, math.ceil(w / d) * d - w
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return x


def _is_metric(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "depth_estimation_type", None) == "metric"


def predict_depth(model: torch.nn.Module, pixel_values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The model's ``predicted_depth`` for ``pixel_values`` (B, 3, h, w), resized to ``size`` = (H, W) by
    bicubic interpolation (the pipeline's ``post_process_depth_estimation``), in the model's own units.

    Returns:
        (B, H, W).
    """
    param = next(model.parameters())
    depth = model(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype)).predicted_depth
    if tuple(depth.shape[-2:]) != tuple(size):
        depth = F.interpolate(depth[:, None], size=tuple(size), mode="bicubic", align_corners=False)[:, 0]
    return depth


def estimate_depth(model: torch.nn.Module, processor: Any, images: torch.Tensor, *,
                   resolution: Optional[int] = None, normalise: bool = True, batch_size: Optional[int] = None,
                   progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """Relative inverse depth (near = large) of each image, at the image's size.

    Differentiable in ``images`` when they require grad (the weights stay frozen); otherwise the
    forward runs without autograd.

    Args:
        model: a loaded ``DepthAnythingForDepthEstimation`` / ``DPTForDepthEstimation``
            (:attr:`DepthModel.model`).
        processor: its ``DPTImageProcessor`` or the :class:`DepthPreprocess` read from it.
        images: (B, H, W, 3 or 4) floats in [0, 1] (ComfyUI's IMAGE).
        resolution: the model's input side in place of the processor's size (None = its own: 518 for
            Depth Anything, 384 for DPT), resized by the processor's rules.
        normalise: map each image's map to [0, 1] by its min and max (:func:`normalise_depth_maps`;
            a constant map becomes zeros). False returns the raw inverse depth.
        batch_size: images per forward pass (None = all at once).
        progress: ``progress(done, total, preview)`` after each forward pass, ``preview`` the last image's
            normalised map as (H, W, 3) grey; it may raise to stop (ComfyUI's Cancel).

    Returns:
        (B, H, W) on ``images``' device: in [0, 1] when ``normalise``, else the model's inverse depth
        (metric models: ``1 / max(depth in metres, METRIC_MIN_DEPTH)``).
    """
    check_images(images)
    settings = processor if isinstance(processor, DepthPreprocess) else DepthPreprocess.from_processor(processor)
    metric = _is_metric(model)
    b, h, w = images.shape[:3]
    step = batch_size or b
    grad = torch.is_grad_enabled() and images.requires_grad
    maps = []
    with torch.set_grad_enabled(grad):
        for start in range(0, b, step):
            pixels = preprocess_images(images[start:start + step], settings, resolution)
            depth = predict_depth(model, pixels, (h, w)).to(device=images.device, dtype=images.dtype)
            if metric:
                depth = 1.0 / depth.clamp_min(METRIC_MIN_DEPTH)
            maps.append(depth)
            if progress is not None:
                shown = normalise_depth_maps(depth[-1:].detach())[0][0]
                progress(min(start + step, b), b, shown[..., None].expand(h, w, 3))
    raw = torch.cat(maps)
    return normalise_depth_maps(raw)[0] if normalise else raw


def normalise_depth_maps(maps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each map min-max normalised to [0, 1] over the whole image (near = 1 for inverse depth).

    A constant map (max - min <= ``CONSTANT_RELATIVE_RANGE`` x its largest magnitude, or not finite)
    carries no depth: it becomes zeros and is flagged rather than divided by a zero range.

    Args:
        maps: (B, H, W).

    Returns:
        ((B, H, W) in [0, 1], (B,) bool: which maps were constant).
    """
    flat = maps.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    span = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    constant = ~(span > CONSTANT_RELATIVE_RANGE * scale) | ~torch.isfinite(span)
    safe = torch.where(constant, torch.ones_like(span), span)
    out = (maps - lo[:, None, None]) / safe[:, None, None]
    out = torch.where(constant[:, None, None], torch.zeros_like(out), out)
    return out, constant
