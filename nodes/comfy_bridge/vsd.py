"""VSD score models over ComfyUI's MODEL (the core's :class:`~mpod_core.guidance.vsd.ScoreModel`).

A float32 trainable copy of the prior's UNet (:class:`~.sd_training.ComfySDTraining` without the text
encoder: the prompt contexts come from ComfyUI's own CLIP), with its weight patches (the theme LoRA)
merged as sampling loads them; the VSD LoRA hooks onto the copy's attention projections, named by
ComfyUI's generic LoRA keys like Theme Finetune's.
"""
from __future__ import annotations

from typing import Dict

import torch

from ...mpod_core.guidance.theme_finetune_diffusers import UNET_TARGETS, linear_targets
from .sd_training import ComfySDTraining

__all__ = ["ComfyScoreModel", "conditioning_context"]


class ComfyScoreModel(ComfySDTraining):
    """A trainable copy of an SD 1.x / 2.x MODEL for :class:`~mpod_core.guidance.vsd.VSDScore`.

    Args:
        model, clip, vae: the prior's MODEL and CLIP (from Theme Finetune or Load LoRA) and the VAE.
        input_name: the node input, for error messages.
    """

    def __init__(self, model, clip, vae, input_name: str = "model"):
        try:
            super().__init__(model, clip, vae, "DSD Refine's VSD", text_encoder=False)
        except ValueError as e:
            raise ValueError(f"{input_name}: {e}") from None

    def lora_targets(self, text_encoder: bool = False) -> Dict[str, torch.nn.Linear]:
        return linear_targets(self.unet, UNET_TARGETS, "diffusion_model.")


def conditioning_context(conditioning, name: str) -> torch.Tensor:
    """(1, L, D) cross-attention context of a CONDITIONING's first entry (what the UNet's ``context`` gets).

    Raises:
        ValueError: not a CONDITIONING of a text prompt.
    """
    if not isinstance(conditioning, list) or not conditioning or not isinstance(conditioning[0], (list, tuple)) \
            or not isinstance(conditioning[0][0], torch.Tensor) or conditioning[0][0].ndim != 3:
        raise ValueError(f"{name}: expected CONDITIONING from a CLIP text encoder")
    return conditioning[0][0][:1].detach().float().clone()
