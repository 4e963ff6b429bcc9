"""Node schemas from the core's configs, and the input checks every node shares.

A node declares a widget for a core config field with :func:`config_input`:
the widget takes the field's name, default, range (``mpod_core.configdoc.limits``)
and docstring (which names the default's source), so a node states its config
once and widget names never drift from config names. :func:`node_schema` looks
the display name and category up in the registry.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from comfy_api.latest import io

from ..mpod_core.configdoc import field_spec
from .registry import (DEPTH_MODEL_TYPE, NODE_CATEGORIES, NODE_DISPLAY_NAMES, RADIANCE_FIELD_TYPE, SAM_MODEL_TYPE,
                       TRIMESH_TYPE)

#: The pack's custom socket types (names in :mod:`.registry`).
Trimesh = io.Custom(TRIMESH_TYPE)
RadianceFieldType = io.Custom(RADIANCE_FIELD_TYPE)
SamModel = io.Custom(SAM_MODEL_TYPE)
DepthModelType = io.Custom(DEPTH_MODEL_TYPE)
#: ComfyUI's loss-history type (``{"loss": [...]}``), what core Train LoRA outputs and Plot Loss Graph draws.
LossMap = io.Custom("LOSS_MAP")


def loss_map_output(terms: str = "") -> io.Output:
    """The ``loss_map`` output every optimisation node appends last (saved workflows link outputs by index).

    Args:
        terms: what the per-term keys are, for the tooltip (e.g. "rgb, mask, sds").
    """
    tip = 'Loss at each iteration of this run under "loss" (what core Plot Loss Graph draws)'
    if terms:
        tip += f", and each term unweighted ({terms}; 0 where not part of that iteration)"
    return LossMap.Output("loss_map", display_name="loss_map", tooltip=tip + ".")

#: One seed range for every node: ComfyUI's own (KSampler's 0 .. 2^64 - 1); torch generators take it all.
SEED_MAX = 0xFFFFFFFFFFFFFFFF

#: The CUDA backend choice, named the same on every node.
BACKEND_CHOICES = ("auto", "torch", "cuda")
#: backend widget value -> mpod_core.render backend (the rasterizer).
RENDER_BACKENDS = {"auto": "auto", "torch": "torch", "cuda": "nvdiffrast"}
#: backend widget value -> mpod_core.encoding backend (the hash grid).
FIELD_BACKENDS = {"auto": "auto", "torch": "torch", "cuda": "tcnn"}
RENDER_BACKEND_TOOLTIP = ("Rasterizer: cuda = nvdiffrast (GPU, must be installed), torch = pure PyTorch (any device), "
                          "auto = cuda when available.")
FIELD_BACKEND_TOOLTIP = ("Hash grid: cuda = tinycudann (GPU, must be installed), torch = pure PyTorch (any device), "
                         "auto = cuda when available.")


def node_schema(node_id: str, **kwargs) -> io.Schema:
    """``io.Schema`` of ``node_id``, with its display name and category from :mod:`.registry`."""
    return io.Schema(node_id=node_id, display_name=NODE_DISPLAY_NAMES[node_id], category=NODE_CATEGORIES[node_id],
                     **kwargs)


def config_input(cls: type, name: str, tooltip: str = "", **overrides) -> io.Input:
    """A widget for field ``name`` of config dataclass ``cls``.

    Args:
        cls: a core config dataclass (e.g. ``LayoutConfig``).
        name: the field; also the widget's name.
        tooltip: text put before the field's docstring in the tooltip.
        **overrides: passed to the ComfyUI input (e.g. ``default``, ``max``, ``optional``).

    Raises:
        TypeError: the field is not an int, float, bool or str.
    """
    spec = field_spec(cls, name)
    kw = {"default": spec.default, "tooltip": f"{tooltip} {spec.doc}".strip()}
    if spec.kind is bool:
        return io.Boolean.Input(name, **{**kw, **overrides})
    if spec.kind is str:
        if spec.options:
            return io.Combo.Input(name, options=list(spec.options), **{**kw, **overrides})
        return io.String.Input(name, **{**kw, **overrides})
    kw.update({k: v for k, v in (("min", spec.min), ("max", spec.max), ("step", spec.step)) if v is not None})
    if spec.kind is int:
        if name == "seed":
            kw.update(min=0, max=SEED_MAX, control_after_generate=True)
        return io.Int.Input(name, **{**kw, **overrides})
    return io.Float.Input(name, **{**kw, **overrides})


def single_value(value, name: str, node: str):
    """The one value of an input of a node declared ``is_input_list`` (for its meshes): ComfyUI then hands
    every input as a list.

    Raises:
        ValueError: a list of more than one value, naming the node and the input.
    """
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{node}: {name}: expected one value, got a list of {len(value)}; only the meshes "
                             "may be a list")
        return value[0]
    return value


def backend_input(tooltip: str) -> io.Combo.Input:
    """The ``backend`` widget: auto, torch or cuda (the library each node's cuda means is in ``tooltip``)."""
    return io.Combo.Input("backend", options=list(BACKEND_CHOICES), default="auto", tooltip=tooltip)


def check_backend(node: str, backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"{node}: backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    return backend


def check_image(image, node: str, name: str = "image", channels: Sequence[int] = (3, 4)) -> torch.Tensor:
    """``image`` checked to be a ComfyUI IMAGE: a (B, H, W, C) tensor with C in ``channels``, B >= 1.

    Raises:
        ValueError: naming the node, the input and what arrived.
    """
    got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in channels \
            or image.shape[0] < 1 or min(image.shape[1:3]) < 1:
        want = " or ".join(map(str, channels))
        raise ValueError(f"{node}: {name}: expected a ComfyUI IMAGE (B, H, W, {want}), got {got}")
    return image


def check_masks(masks, node: str, name: str = "masks", size: Optional[tuple] = None) -> torch.Tensor:
    """A ComfyUI MASK (B, H, W) or (H, W), returned as (B, H, W); ``size`` = (H, W) it must match.

    Raises:
        ValueError: naming the node, the input and what arrived.
    """
    got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
    if not isinstance(masks, torch.Tensor) or masks.ndim not in (2, 3):
        raise ValueError(f"{node}: {name}: expected a ComfyUI MASK (B, H, W), got {got}")
    masks = masks if masks.ndim == 3 else masks[None]
    if size is not None and tuple(masks.shape[1:]) != tuple(size):
        raise ValueError(f"{node}: {name}: mask size {masks.shape[2]}x{masks.shape[1]} does not match the image "
                         f"size {size[1]}x{size[0]}")
    return masks


def training_batch_error(resolution, batch_size, micro_batch, max_pixels: int):
    """What is wrong with a training node's image-batch widgets, or None (ComfyUI's ``validate_inputs``:
    linked inputs arrive as None and are skipped). ``max_pixels``: the most one forward/backward pass
    may hold (``micro_batch x resolution^2``)."""
    if resolution is not None and resolution % 8:
        return f"resolution: {resolution} is not a multiple of 8 (latents are 1/8 of the image)"
    if batch_size is not None and micro_batch is not None and micro_batch > batch_size:
        return f"micro_batch: {micro_batch} is larger than batch_size {batch_size}"
    if resolution is not None and micro_batch is not None and micro_batch * resolution ** 2 > max_pixels:
        return (f"micro_batch x resolution^2 = {micro_batch * resolution ** 2} exceeds {max_pixels} (one 512^2 "
                "image per forward/backward pass, the UNet backward's memory): lower micro_batch or resolution")
    return None
