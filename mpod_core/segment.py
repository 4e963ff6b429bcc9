"""Object segmentation for REPARO (section 3.1): one SAM mask per bounding box.

Boxes come as JSON (typed by the user, or Crop Objects' ``crop_boxes``) or from
rough masks; :func:`segment_boxes` runs Segment Anything once per image and its
mask decoder once per chunk of boxes, with the official ``SamPredictor``
pre- and post-processing (PIL resize of the longest side to 1024, boxes scaled
the same way, masks cropped out of the padded frame and resized back).

``segment_anything`` (pip ``segment-anything``) is imported inside the
functions that need it, never at module import.

Boxes are ``(x0, y0, x1, y1)`` in the image's pixels, continuous coordinates
(a box from a mask uses the exclusive end, as Crop Objects does: pixels
``x0 .. x1 - 1``).
"""
from __future__ import annotations

import colorsys
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Literal, Mapping, Optional, Tuple

import torch

from .mesh import object_name

#: The official checkpoints (https://github.com/facebookresearch/segment-anything#model-checkpoints).
SAM_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
SAM_CHECKPOINTS_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
SAM_INSTALL_HINT = "Segment Anything is not installed: pip install segment-anything==1.0"

ModelType = Literal["auto", "vit_b", "vit_l", "vit_h"]
MODEL_TYPES: Tuple[str, ...] = ("auto", "vit_b", "vit_l", "vit_h")

#: Box chunk of the mask decoder: bounds memory at ~``chunk`` x (1024^2 + H x W) floats.
DEFAULT_CHUNK = 16

# SAM's fixed input geometry (segment_anything.build_sam._build_sam): 1024 px, 16 px patches,
# 14 x 14 attention windows. A block's rel_pos table has 2 * size - 1 rows: 127 for global
# attention over the 64 x 64 patch grid, 27 for a window.
_IMAGE_SIZE = 1024
_PATCH = 16
_GLOBAL_REL_POS = 2 * (_IMAGE_SIZE // _PATCH) - 1


@dataclass(frozen=True)
class SamConfig:
    """Architecture of SAM's ViT image encoder (the prompt encoder and mask decoder are fixed)."""

    embed_dim: int
    """Patch embedding width (vit_b 768, vit_l 1024, vit_h 1280)."""
    depth: int
    """Number of transformer blocks (12, 24, 32)."""
    num_heads: int
    """Attention heads per block (12, 16, 16)."""
    global_attn_indexes: Tuple[int, ...]
    """Blocks with global attention; the others attend in 14 x 14 windows."""
    name: str = "custom"
    """vit_b / vit_l / vit_h when the architecture is an official one, else custom."""


OFFICIAL_CONFIGS: Dict[str, SamConfig] = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11), "vit_b"),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23), "vit_l"),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31), "vit_h"),
}


# --------------------------------------------------------------------------- boxes
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _box_entries(data) -> list:
    """The list of raw boxes in parsed JSON (see :func:`parse_boxes` for the accepted shapes)."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list of boxes, got {type(data).__name__}")
    if len(data) == 4 and all(_is_number(v) for v in data):
        return [data]  # one box [x0, y0, x1, y1]
    return data


def parse_boxes(text: str, width: int, height: int) -> torch.Tensor:
    """Parse object boxes from JSON and clip them to the image.

    Accepted: ``[[x0, y0, x1, y1], ...]``, a single ``[x0, y0, x1, y1]``, or
    Crop Objects' ``crop_boxes`` (a list of dicts whose ``"object_box"`` is the
    box; a ``"box"`` key is read too). A dict carrying ``"image_size"``
    ([width, height]) must match the image. Pixels, continuous coordinates.

    Args:
        text: the JSON text.
        width, height: image size in pixels.

    Returns:
        (K, 4) float32 boxes, clipped to ``[0, width] x [0, height]``.

    Raises:
        ValueError: malformed JSON, a box without 4 finite numbers, x1 <= x0 or
            y1 <= y0, a box entirely outside the image, an image_size that
            differs, or no box at all. Messages name the box index.
    """
    if not (text or "").strip():
        raise ValueError("no boxes given (empty text): expected JSON such as [[x0, y0, x1, y1], ...] in pixels")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected "
                         "[[x0, y0, x1, y1], ...] in pixels") from None
    entries = _box_entries(data)
    if not entries:
        raise ValueError("zero boxes: the JSON list is empty; give at least one [x0, y0, x1, y1]")
    boxes = []
    for k, entry in enumerate(entries):
        if isinstance(entry, dict):
            size = entry.get("image_size")
            if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2
                                     or not all(_is_number(v) for v in size)):
                raise ValueError(f"{object_name(k)}: box: image_size must be [width, height], got {json.dumps(size)}")
            if size is not None and [int(v) for v in size] != [width, height]:
                raise ValueError(f"{object_name(k)}: box: it was made for a {size[0]}x{size[1]} image, this image is "
                                 f"{width}x{height}")
            key = "object_box" if "object_box" in entry else "box"
            if key not in entry:
                raise ValueError(f"{object_name(k)}: box: a dict needs an 'object_box' or 'box' key, got keys {sorted(entry)}")
            entry = entry[key]
        if not isinstance(entry, (list, tuple)) or len(entry) != 4 or not all(_is_number(v) for v in entry):
            raise ValueError(f"{object_name(k)}: box: expected 4 numbers [x0, y0, x1, y1], got {json.dumps(entry)}")
        x0, y0, x1, y1 = (float(v) for v in entry)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{object_name(k)}: box {_fmt(entry)}: needs x1 > x0 and y1 > y0")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ValueError(f"{object_name(k)}: box {_fmt(entry)} is entirely outside the {width}x{height} image")
        boxes.append([max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))])
    return torch.tensor(boxes, dtype=torch.float32)


def _fmt(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def boxes_to_json(boxes: torch.Tensor) -> str:
    """(K, 4) boxes -> ``[[x0, y0, x1, y1], ...]`` (2 decimals), what :func:`parse_boxes` reads."""
    return json.dumps([[round(float(v), 2) for v in box] for box in boxes.tolist()])


def default_min_component_area(height: int, width: int) -> int:
    """Area floor of :func:`boxes_from_masks` components: 0.1 % of the image, at least 16 px."""
    return max(16, (height * width) // 1000)


def boxes_from_masks(masks: torch.Tensor, threshold: float = 0.5,
                     min_component_area: Optional[int] = None) -> torch.Tensor:
    """One box per mask, or per connected object of a single mask.

    With K > 1 masks each mask gives the box around all its pixels above
    ``threshold``. With one mask, each 8-connected component gives its own box
    (so one rough mask painted over several objects yields one box each), in
    reading order of their first pixel (top to bottom, then left to right);
    components smaller than ``min_component_area`` pixels are ignored as specks
    (default :func:`default_min_component_area`: 0.1 % of the image, at least
    16 px), unless all are, in which case the largest is kept.

    Args:
        masks: (K, H, W) or (H, W); 1 = object.
        threshold: a pixel belongs to the mask above this value.
        min_component_area: see above; only used when K == 1.

    Returns:
        (K', 4) float32 boxes (x0, y0, x1, y1), exclusive ends, in pixels.

    Raises:
        ValueError: a wrong shape, an empty batch, or an empty mask (naming its index).
    """
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks: expected (K, H, W), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        raise ValueError("zero masks: the mask batch is empty")
    fg = masks.detach().float().cpu() > threshold
    for k in range(fg.shape[0]):
        if not fg[k].any():
            raise ValueError(f"{object_name(k)}: mask is empty (no pixel above {threshold}); remove it or fix it")
    if fg.shape[0] > 1:
        rows, cols = fg.any(dim=2), fg.any(dim=1)  # (K, H), (K, W)
        h_idx = torch.arange(fg.shape[1], dtype=torch.float32)
        w_idx = torch.arange(fg.shape[2], dtype=torch.float32)
        inf = torch.tensor(float("inf"))
        x0 = torch.where(cols, w_idx, inf).amin(1)
        x1 = torch.where(cols, w_idx, -inf).amax(1) + 1
        y0 = torch.where(rows, h_idx, inf).amin(1)
        y1 = torch.where(rows, h_idx, -inf).amax(1) + 1
        return torch.stack([x0, y0, x1, y1], 1)
    from skimage.measure import label, regionprops  # only paid when a single mask is split

    regions = regionprops(label(fg[0].numpy(), connectivity=2))
    floor = default_min_component_area(*fg.shape[1:]) if min_component_area is None else min_component_area
    kept = [r for r in regions if r.area >= floor] or [max(regions, key=lambda r: r.area)]
    kept.sort(key=lambda r: tuple(r.coords[0]))  # coords are row-major: the first pixel in reading order
    return torch.tensor([[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in kept], dtype=torch.float32)


# --------------------------------------------------------------------------- loading
def _import_segment_anything():
    import importlib

    try:  # the module, not the package's re-exported build_sam function of the same name
        return importlib.import_module("segment_anything.build_sam")
    except ImportError as exc:
        raise ImportError(SAM_INSTALL_HINT) from exc


_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def infer_sam_config(state_dict: Mapping[str, torch.Tensor]) -> SamConfig:
    """The image-encoder architecture of a SAM state dict, from key names and shapes only
    (works on meta tensors: nothing is read).

    embed_dim is the patch embedding's width, depth the number of blocks,
    num_heads = embed_dim / head_dim (head_dim = width of each block's
    relative-position table) and the global-attention blocks are those whose
    table spans the whole 64 x 64 patch grid (127 rows, 27 for a window).

    Raises:
        ValueError: the keys are not a SAM image encoder's, or it is not built for 1024 px inputs.
    """
    patch_key = "image_encoder.patch_embed.proj.weight"
    if patch_key not in state_dict:
        some = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError(f"not a Segment Anything checkpoint: no '{patch_key}' (first keys: {some})")
    patch = state_dict[patch_key]
    embed_dim = int(patch.shape[0])
    pos = state_dict.get("image_encoder.pos_embed")
    if tuple(patch.shape[2:]) != (_PATCH, _PATCH) or (pos is not None and pos.shape[1] * _PATCH != _IMAGE_SIZE):
        raise ValueError(f"unsupported SAM image encoder: {tuple(patch.shape[2:])} px patches and a "
                         f"{tuple(pos.shape[1:3]) if pos is not None else '?'} position grid; SAM uses 16 px "
                         "patches on 1024 px inputs (a 64 x 64 grid)")
    blocks = sorted({int(m.group(1)) for key in state_dict if (m := _BLOCK.match(key))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"not a Segment Anything checkpoint: image encoder blocks {blocks[:8]} are not 0..n-1")
    head_dims, global_idx = set(), []
    for i in blocks:
        key = f"image_encoder.blocks.{i}.attn.rel_pos_h"
        if key not in state_dict:
            raise ValueError(f"not a Segment Anything checkpoint: no '{key}' (SAM's encoder uses relative "
                             "positions in every block)")
        rows, head_dim = state_dict[key].shape
        head_dims.add(int(head_dim))
        if rows == _GLOBAL_REL_POS:
            global_idx.append(i)
    if len(head_dims) != 1 or embed_dim % next(iter(head_dims)):
        raise ValueError(f"inconsistent SAM attention head widths {sorted(head_dims)} for embed_dim {embed_dim}")
    config = SamConfig(embed_dim, len(blocks), embed_dim // head_dims.pop(), tuple(global_idx))
    for name, official in OFFICIAL_CONFIGS.items():
        if (official.embed_dim, official.depth, official.num_heads, official.global_attn_indexes) == \
                (config.embed_dim, config.depth, config.num_heads, config.global_attn_indexes):
            return official
    return config


def build_sam(config: SamConfig, device: torch.device | str | None = None):
    """A ``segment_anything.modeling.Sam`` of ``config`` with random weights, in eval mode
    (``segment_anything.build_sam._build_sam``'s construction). ``device="meta"`` builds it
    without memory (the non-persistent pixel mean/std buffers stay on the CPU)."""
    build = _import_segment_anything()
    with torch.device(device or "cpu"):
        sam = build._build_sam(encoder_embed_dim=config.embed_dim, encoder_depth=config.depth,
                               encoder_num_heads=config.num_heads,
                               encoder_global_attn_indexes=list(config.global_attn_indexes))
    return sam.eval()


def _unwrap(state_dict) -> dict:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"not a Segment Anything checkpoint: it holds a {type(state_dict).__name__}, "
                         "not a state dict")
    for key in ("model", "state_dict"):  # training checkpoints wrap the weights
        inner = state_dict.get(key)
        if "image_encoder.patch_embed.proj.weight" not in state_dict and isinstance(inner, Mapping):
            return dict(inner)
    return dict(state_dict)


def _try_infer(state_dict) -> Optional[SamConfig]:
    try:
        return infer_sam_config(state_dict)
    except ValueError:
        return None


def _describe(config: SamConfig) -> str:
    if config.name != "custom":
        return config.name
    return (f"a custom SAM (embed_dim {config.embed_dim}, depth {config.depth}, {config.num_heads} heads, "
            f"global attention in blocks {list(config.global_attn_indexes)})")


def _list(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def sam_from_state_dict(state_dict: Mapping[str, torch.Tensor], model_type: ModelType = "auto"):
    """Build a Sam around ``state_dict`` without copying it (assigned, not loaded into random weights).

    Args:
        state_dict: SAM weights (the official checkpoints' keys); floating tensors become float32.
        model_type: ``auto`` infers the architecture (:func:`infer_sam_config`, any size);
            vit_b / vit_l / vit_h insist on that one.

    Returns:
        ``segment_anything.modeling.Sam`` in eval mode, gradients off, on the state dict's device;
        ``sam.mpod_config`` is its :class:`SamConfig`.

    Raises:
        ValueError: an unknown model_type, keys that are not SAM's (a few missing / unexpected
            ones are named), shapes of another architecture.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got '{model_type}'")
    state_dict = _unwrap(state_dict)
    inferred = infer_sam_config(state_dict) if model_type == "auto" else _try_infer(state_dict)
    config = inferred if model_type == "auto" else OFFICIAL_CONFIGS[model_type]
    if inferred is not None and inferred != config:
        raise ValueError(f"model_type is {model_type} but the checkpoint is {_describe(inferred)}: "
                         "choose model_type auto (or the matching type)")
    sam = build_sam(config, device="meta")
    expected = sam.state_dict()
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        raise ValueError(f"not a Segment Anything {config.name} checkpoint: " + "; ".join(parts)
                         + f". Expected the official format ({', '.join(SAM_CHECKPOINTS.values())})")
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"checkpoint does not fit SAM {config.name}: {len(wrong)} tensors of another shape "
                         f"(checkpoint vs model: {_list(wrong, 3)})")
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    sam.load_state_dict(weights, strict=True, assign=True)
    device = weights["image_encoder.patch_embed.proj.weight"].device
    sam.to(device)  # the CPU-built pixel mean / std buffers follow the weights
    assert all(t.device == device for t in [*sam.parameters(), *sam.buffers()]), "a tensor was not assigned"
    sam.requires_grad_(False)
    sam.mpod_config = config
    return sam.eval()


def load_sam(path: str | Path, model_type: ModelType = "auto", device: torch.device | str | None = None):
    """Load a SAM checkpoint: the official ``.pth`` (a ``torch.save``'d state dict,
    read with ``weights_only=True``) or ``.safetensors`` with the same keys.

    Args:
        path: the file.
        model_type: see :func:`sam_from_state_dict`.
        device: where the model goes (default CPU).

    Returns:
        ``segment_anything.modeling.Sam`` in eval mode; ``sam.mpod_config`` is its :class:`SamConfig`.

    Raises:
        FileNotFoundError, ValueError (unreadable, not SAM), ImportError (segment-anything missing).
    """
    path = Path(path)
    _import_segment_anything()
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors.torch import load_file
            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip, safetensors header errors all mean "not readable as weights"
        raise ValueError(f"could not read {path.name} as a PyTorch / safetensors checkpoint of plain tensors "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return sam_from_state_dict(state_dict, model_type).to(device or "cpu")


# --------------------------------------------------------------------------- inference
def segment_boxes(sam, image: torch.Tensor, boxes: torch.Tensor, threshold: float = 0.5,
                  chunk: int = DEFAULT_CHUNK,
                  progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """One SAM mask per box (``SamPredictor`` semantics, single-mask output).

    The image is embedded once (``SamPredictor.set_image``: uint8, PIL resize of
    the longest side to the encoder's 1024 px, normalise, pad); boxes are scaled
    with the same ``ResizeLongestSide`` and decoded ``chunk`` at a time; logits
    are cropped out of the padding and resized to the image
    (``Sam.postprocess_masks``). Runs under ``torch.inference_mode`` on the
    model's device.

    Args:
        sam: ``segment_anything.modeling.Sam``.
        image: (H, W, 3) RGB float in [0, 1].
        boxes: (K, 4) pixel boxes (x0, y0, x1, y1), e.g. from :func:`parse_boxes`.
        threshold: mask probability (sigmoid of SAM's logit) above which a pixel
            is object; 0.5 is SAM's own (logit 0).
        chunk: boxes per mask-decoder call (memory bound).
        progress: ``progress(done, total)`` after the embedding (step 1) and each chunk.

    Returns:
        (K, H, W) float masks in {0, 1}, on ``image``'s device, in the order of ``boxes``.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected (H, W, 3) RGB, got {tuple(image.shape)}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or boxes.shape[0] == 0:
        raise ValueError(f"boxes: expected (K, 4) with K >= 1, got {tuple(boxes.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    _import_segment_anything()
    from segment_anything import SamPredictor

    h, w = image.shape[:2]
    logit_threshold = math.log(threshold / (1 - threshold))
    n_chunks = math.ceil(boxes.shape[0] / chunk)
    with torch.inference_mode():
        predictor = SamPredictor(sam)
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        predictor.set_image(pixels)
        if progress is not None:
            progress(1, n_chunks + 1)
        scaled = predictor.transform.apply_boxes_torch(boxes.detach().float().to(predictor.device), (h, w))
        out = torch.empty(boxes.shape[0], h, w, device=image.device)
        for c in range(n_chunks):
            part = slice(c * chunk, (c + 1) * chunk)
            logits, _, _ = predictor.predict_torch(None, None, boxes=scaled[part], multimask_output=False,
                                                   return_logits=True)
            out[part] = (logits[:, 0] > logit_threshold).to(out)
            if progress is not None:
                progress(c + 2, n_chunks + 1)
        predictor.reset_image()
    return out


def overlay_masks(image: torch.Tensor, masks: torch.Tensor, boxes: Optional[torch.Tensor] = None,
                  alpha: float = 0.5, line_width: int = 2) -> torch.Tensor:
    """The image with mask k tinted in colour k and box k outlined in it (a preview).

    Args:
        image: (H, W, 3) in [0, 1].
        masks: (K, H, W) in [0, 1].
        boxes: optional (K, 4) pixel boxes.
        alpha: tint strength.
        line_width: outline width in pixels.

    Returns:
        (H, W, 3) image.
    """
    out = image.detach().float().clone()
    colours = distinct_colours(masks.shape[0]).to(out)
    for k in range(masks.shape[0]):
        m = (masks[k].to(out) * alpha)[..., None]
        out = out * (1 - m) + colours[k] * m
    if boxes is not None:
        h, w = out.shape[:2]
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            xa, ya = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
            xb, yb = min(w, int(math.ceil(x1))), min(h, int(math.ceil(y1)))
            lw = max(1, line_width)
            for sl in ((slice(ya, min(yb, ya + lw)), slice(xa, xb)), (slice(max(ya, yb - lw), yb), slice(xa, xb)),
                       (slice(ya, yb), slice(xa, min(xb, xa + lw))), (slice(ya, yb), slice(max(xa, xb - lw), xb))):
                out[sl] = colours[k]
    return out


def distinct_colours(n: int) -> torch.Tensor:
    """(n, 3) saturated RGB colours with hues spread by the golden angle (neighbours differ)."""
    return torch.tensor([colorsys.hsv_to_rgb((0.61803398875 * k) % 1.0, 0.85, 1.0) for k in range(n)],
                        dtype=torch.float32).reshape(n, 3)
