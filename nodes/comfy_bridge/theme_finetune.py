"""The theme fine-tune over ComfyUI's MODEL / CLIP / VAE (the core's
:class:`~mpod_core.guidance.theme_finetune.FinetuneModel` protocol), and the LoRA it saves.

The LoRA trains on the trainable copies of :class:`~.sd_training.ComfySDTraining`
(hooks on their linear layers, :mod:`mpod_core.guidance.lora`). Its layers are
named by ComfyUI's generic LoRA keys, which ``comfy/lora.py`` maps for every
checkpoint (``model_lora_keys_unet`` / ``model_lora_keys_clip``):

* UNet: ``diffusion_model.<path in diffusion_model>`` for the attention
  projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (diffusers'
  train_dreambooth_lora.py targets, which have the same names in ComfyUI's UNet);
* text encoder: ``text_encoders.<clip_l|clip_h>.transformer.text_model.encoder.
  layers.N.self_attn.{q,k,v,out}_proj``.

So the saved file is a standard LoRA: core Load LoRA applies it to the same
checkpoint, and :func:`patched_models` returns exactly what Load LoRA returns.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import torch

import comfy.lora
import comfy.sd
import comfy.utils

from ...mpod_core.guidance.theme_finetune_diffusers import TEXT_TARGETS, UNET_TARGETS, linear_targets
from .sd_training import ComfySDTraining

__all__ = ["ComfyFinetuneModel", "patched_models"]


class ComfyFinetuneModel(ComfySDTraining):
    """SD 1.x / 2.x MODEL + CLIP + VAE for :func:`~mpod_core.guidance.theme_finetune.train_theme_lora`.

    Raises:
        ValueError: as :class:`~.sd_training.ComfySDTraining`.
    """

    def __init__(self, model, clip, vae):
        super().__init__(model, clip, vae, "Theme Finetune")

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) context of the captions, as core CLIP Text Encode computes it (weights aside);
        differentiable through the text encoder's LoRA."""
        z, _ = self.text([self._token_ids(c) for c in captions])[:2]
        return z.to(self.device).float()

    def lora_targets(self, text_encoder: bool) -> Dict[str, torch.nn.Linear]:
        targets = linear_targets(self.unet, UNET_TARGETS, "diffusion_model.")
        if text_encoder:
            targets.update(linear_targets(self.text, TEXT_TARGETS, f"text_encoders.{self.clip_name}."))
        return targets


def patched_models(model, clip, path: Path):
    """(MODEL, CLIP) with the LoRA file at ``path`` applied at strength 1, as core Load LoRA does.

    Raises:
        ValueError: if ComfyUI maps none of the file's keys onto the model (never for a file this
            pack trained on the same checkpoint).
    """
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, keys)
    loaded = comfy.lora.load_lora(lora, keys, log_missing=False)
    if len(loaded) * 3 < len(lora):  # each adapter has three tensors: up, down, alpha
        raise ValueError(f"{path.name}: ComfyUI's LoRA loader maps only {len(loaded)} of its {len(lora) // 3} "
                         "adapters onto this model")
    return comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
