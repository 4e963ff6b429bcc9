"""Random-weight depth estimators in the Hugging Face folder format users download.

:func:`write_depth_anything` writes what ``depth-anything/Depth-Anything-V2-Small-hf`` holds
(``config.json``, ``model.safetensors``, ``preprocessor_config.json`` with the real processor
settings: 518 px, keep aspect ratio, multiple of 14, bicubic, ImageNet mean/std) for a tiny
``DepthAnythingForDepthEstimation`` (DINOv2 backbone of width 32, 4 layers, 14 px patches; ~0.2 M
parameters); :func:`write_dpt` a tiny ``DPTForDepthEstimation`` with ``Intel/dpt-large``'s processor
settings (384 x 384, bilinear, mean/std 0.5); :func:`write_vit_classifier` a folder of another
architecture, for the refusals. Each is written by ``save_pretrained`` in well under a second.

Weights are transformers' own initialisation, then every tensor gets seeded noise, so the maps vary
over the image (a freshly initialised head often outputs a flat ReLU'd zero) and a loader that drops
or misplaces a tensor is caught by comparing outputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

#: Depth-Anything-V2-Small-hf's preprocessor_config.json.
DEPTH_ANYTHING_PROCESSOR = dict(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                do_pad=False)
#: Intel/dpt-large's preprocessor_config.json.
DPT_PROCESSOR = dict(size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1, resample=2,
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=False)


def _noisy(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _save(model, processor_kwargs: dict, folder) -> Path:
    from transformers import DPTImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    DPTImageProcessor(**processor_kwargs).save_pretrained(folder)
    return folder


def tiny_depth_anything(seed: int = 0, metric: bool = False, max_depth: int = 20, hidden: int = 32,
                        layers: int = 4, heads: int = 2):
    """A random ``DepthAnythingForDepthEstimation`` (tiny DINOv2 backbone), eval mode, on the CPU."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=2 * hidden, patch_size=14, image_size=518,
                            out_indices=list(range(layers - 3, layers + 1)), reshape_hidden_states=False)
    extra = dict(depth_estimation_type="metric", max_depth=max_depth) if metric else {}
    config = DepthAnythingConfig(backbone_config=backbone.to_dict(), reassemble_hidden_size=hidden,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                                 patch_size=14, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _noisy(DepthAnythingForDepthEstimation(config), seed)


def tiny_dpt(seed: int = 0):
    """A random ViT ``DPTForDepthEstimation`` (width 32, 4 layers, 16 px patches), eval mode, on the CPU."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=384, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _noisy(DPTForDepthEstimation(config), seed)


def write_depth_anything(folder, seed: int = 0, metric: bool = False, max_depth: int = 20) -> Path:
    """Write a tiny random Depth Anything folder (``metric``: ``depth_estimation_type = "metric"``)."""
    return _save(tiny_depth_anything(seed, metric, max_depth), DEPTH_ANYTHING_PROCESSOR, folder)


def write_dpt(folder, seed: int = 0) -> Path:
    """Write a tiny random DPT folder with Intel/dpt-large's processor settings."""
    return _save(tiny_dpt(seed), DPT_PROCESSOR, folder)


def write_vit_classifier(folder, seed: int = 0) -> Path:
    """A tiny ``ViTForImageClassification`` folder (config + weights + processor): not a depth model."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = Path(folder)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16, num_labels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
