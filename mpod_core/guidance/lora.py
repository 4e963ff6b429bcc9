"""Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of a frozen model, saved as a standard LoRA file.

A layer ``y = x W^T + b`` (W: (out, in)) gains ``scale * (x D^T) U^T`` with ``D`` (rank, in),
``U`` (out, rank) and ``scale = alpha / rank``: the merged weight is ``W + scale * U D``, which is
what LoRA loaders (ComfyUI's ``comfy/weight_adapter/lora.py``, diffusers, kohya) compute from the
file's ``lora_down`` (= D), ``lora_up`` (= U) and ``alpha``. ``U`` starts at zero, so a fresh
adapter changes nothing; ``D`` starts as ``nn.Linear``'s default weight init (Kaiming-uniform,
a = sqrt(5)), as peft and ComfyUI's trainer do, from a seeded generator.

The adapter is a forward hook on the layer: the frozen weight is never copied or merged during
training, and the low-rank path costs ``rank * (in + out)`` multiply-adds per token instead of a
second ``in * out``. Layers are named by the key prefix they get in the file, e.g.
``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q`` (ComfyUI's generic LoRA key
format), so saving and resuming need no other mapping.

File layout (safetensors, float32)::

    <prefix>.lora_down.weight   (rank, in)
    <prefix>.lora_up.weight     (out, rank)
    <prefix>.alpha              ()  scalar
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from ..atomic import atomic_paths

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass
class LoraLayer:
    """One adapted layer: its trainable factors and the hook that applies them."""

    module: torch.nn.Linear
    down: torch.nn.Parameter
    """(rank, in) float32."""
    up: torch.nn.Parameter
    """(out, rank) float32; zero at creation."""
    alpha: float
    handle: Optional[torch.utils.hooks.RemovableHandle] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """(out, in) the change of the merged weight, ``scale * U D``."""
        return self.scale * (self.up @ self.down)


class LoraSet:
    """Adapters on named linear layers of a model, applied by forward hooks until :meth:`remove`.

    Use as a context manager so the hooks come off even when training is interrupted."""

    def __init__(self, layers: Dict[str, LoraLayer]):
        self.layers = layers

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.down, layer.up)]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The file's tensors (module docstring), detached float32 on the CPU."""
        out: Dict[str, torch.Tensor] = {}
        for key, layer in self.layers.items():
            out[key + DOWN] = layer.down.detach().float().cpu().contiguous()
            out[key + UP] = layer.up.detach().float().cpu().contiguous()
            out[key + ALPHA] = torch.tensor(float(layer.alpha))
        return out

    def remove(self) -> None:
        for layer in self.layers.values():
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None

    def __enter__(self) -> "LoraSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _hook(layer: LoraLayer):
    def forward_hook(module, inputs, output):
        x = inputs[0]
        low = F.linear(F.linear(x.to(layer.down.dtype), layer.down), layer.up)
        return output + (layer.scale * low).to(output.dtype)
    return forward_hook


def check_rank(layers: Mapping[str, torch.nn.Module], rank: int, input_name: str = "rank") -> None:
    """Every layer must be a ``Linear`` of at least ``rank`` in both widths (a larger rank is not low).

    Raises:
        ValueError: naming ``input_name`` and the first layer that is too narrow.
    """
    if not layers:
        raise ValueError("no layer to adapt: the model has none of the targeted linear layers")
    if rank < 1:
        raise ValueError(f"{input_name}: must be >= 1, got {rank}")
    for key, module in layers.items():
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{key}: LoRA here adapts linear layers, this is {type(module).__name__}")
        out_f, in_f = module.weight.shape
        if rank > min(out_f, in_f):
            raise ValueError(f"{input_name}: {rank} is larger than layer {key} allows (min(out, in) = "
                             f"min({out_f}, {in_f}) = {min(out_f, in_f)}); lower the rank")


def attach_lora(layers: Mapping[str, torch.nn.Linear], rank: int, alpha: float, seed: int = 0,
                initial: Optional[Mapping[str, torch.Tensor]] = None) -> LoraSet:
    """New adapters on ``layers`` (key prefix -> Linear), hooked in, factors on each layer's device.

    Args:
        layers: the layers, named by their key prefix in the file.
        rank, alpha: of every new adapter (``scale = alpha / rank``).
        seed: seeds the ``lora_down`` init, layer by layer in sorted key order.
        initial: a LoRA file's tensors to resume from; then every layer takes its rank, alpha and
            factors from there (see :func:`lora_factors_from`), and ``rank``/``alpha`` are unused.

    Raises:
        ValueError: a rank larger than a layer allows, or ``initial`` that does not fit ``layers``.
    """
    resumed = lora_factors_from(initial, layers) if initial is not None else None
    if resumed is None:
        check_rank(layers, rank)
    generator = torch.Generator().manual_seed(int(seed))
    out: Dict[str, LoraLayer] = {}
    for key in sorted(layers):
        module = layers[key]
        device = module.weight.device
        out_f, in_f = module.weight.shape
        if resumed is not None:
            down, up, a = resumed[key]
        else:
            down = torch.empty(rank, in_f)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            up, a = torch.zeros(out_f, rank), float(alpha)
        layer = LoraLayer(module, torch.nn.Parameter(down.float().to(device)),
                          torch.nn.Parameter(up.float().to(device)), a)
        layer.handle = module.register_forward_hook(_hook(layer))
        out[key] = layer
    return LoraSet(out)


def lora_factors_from(tensors: Mapping[str, torch.Tensor], layers: Mapping[str, torch.nn.Module]):
    """``{key: (down, up, alpha)}`` for every layer of ``layers`` from a LoRA file's tensors.

    The file must hold exactly the layers' adapters (the ones this pack wrote for the same model
    and the same choice of layers): a LoRA of another model, or with other layers, is refused
    rather than trained partly.

    Raises:
        ValueError: naming the first mismatch (missing or foreign keys, shapes, ranks, alpha).
    """
    prefixes = {k[:-len(DOWN)] for k in tensors if k.endswith(DOWN)}
    foreign = sorted(prefixes - set(layers))
    if foreign:
        raise ValueError(f"the LoRA adapts {len(foreign)} layer(s) this model does not have or this training does "
                         f"not target (first: {foreign[0]}); resume a LoRA made by Theme Finetune for the same "
                         "checkpoint and the same train_text_encoder setting")
    missing = sorted(set(layers) - prefixes)
    if missing:
        raise ValueError(f"the LoRA has no adapter for {len(missing)} targeted layer(s) (first: {missing[0]}); it "
                         "was made for another model or with another train_text_encoder setting")
    out = {}
    for key, module in layers.items():
        down, up = tensors[key + DOWN].float(), tensors.get(key + UP)
        if up is None:
            raise ValueError(f"the LoRA lacks {key}{UP}")
        up = up.float()
        out_f, in_f = module.weight.shape
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_f or up.shape[0] != out_f \
                or up.shape[1] != down.shape[0]:
            raise ValueError(f"the LoRA's factors for {key} are {tuple(up.shape)} x {tuple(down.shape)}, which do not "
                             f"fit the layer ({out_f}, {in_f})")
        alpha = tensors.get(key + ALPHA)
        a = float(alpha) if alpha is not None else float(down.shape[0])  # no alpha: scale 1, as loaders read it
        if not (torch.isfinite(down).all() and torch.isfinite(up).all() and math.isfinite(a)):
            raise ValueError(f"the LoRA's factors for {key} contain NaN or infinite values")
        out[key] = (down.clone(), up.clone(), a)
    return out


def save_lora(path: Union[str, Path], lora: LoraSet, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``lora``'s tensors to ``path`` (safetensors), atomically: an interrupted save leaves no file."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_paths([path]) as (tmp,):
        save_file(lora.state_dict(), str(tmp), metadata=metadata)
    return path


__all__ = ["ALPHA", "DOWN", "UP", "LoraLayer", "LoraSet", "attach_lora", "check_rank", "lora_factors_from",
           "save_lora"]
