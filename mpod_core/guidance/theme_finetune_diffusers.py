"""The theme fine-tune's model protocol over diffusers + transformers models.

For library users and for core tests with tiny random models; diffusers and transformers are not
imported (the adapter calls the objects it is given, as
:class:`~mpod_core.guidance.textual_inversion_diffusers.DiffusersTextualInversionModel`, which it
reuses for images and the UNet). LoRA layers are named ``unet.<module path>`` and
``text_encoder.<module path>``: diffusers' attention projections ``to_q``/``to_k``/``to_v``/
``to_out.0`` and CLIP's ``self_attn.{q,k,v,out}_proj`` (diffusers' train_dreambooth_lora.py targets).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .textual_inversion_diffusers import DiffusersTextualInversionModel

#: Module-name endings of the adapted layers: the UNet's attention projections (diffusers'
#: train_dreambooth_lora.py: to_k, to_q, to_v, to_out.0), CLIP's self-attention (q/k/v/out_proj).
UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_TARGETS = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj")


def linear_targets(module: torch.nn.Module, endings: Sequence[str], prefix: str) -> Dict[str, torch.nn.Linear]:
    """``{prefix + name: layer}`` for every ``Linear`` of ``module`` whose name ends with one of ``endings``."""
    return {f"{prefix}{name}": m for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(tuple(endings))}


class DiffusersFinetuneModel:
    """:class:`~mpod_core.guidance.theme_finetune.FinetuneModel` over diffusers models.

    Args: as :class:`~mpod_core.guidance.textual_inversion_diffusers.DiffusersTextualInversionModel`
        (freeze the models: only the LoRA factors train).
    """

    def __init__(self, unet, vae, text_encoder, scheduler, tokenize: Callable[[str], List[int]], *, bos: int,
                 eos: int, pad: int, max_length: int = 77, scaling_factor: Optional[float] = None):
        self.base = DiffusersTextualInversionModel(unet, vae, text_encoder, scheduler, tokenize, bos=bos, eos=eos,
                                                   pad=pad, max_length=max_length, scaling_factor=scaling_factor)
        self.alphas_cumprod = self.base.alphas_cumprod
        self.prediction_type = self.base.prediction_type

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.encode_images(images)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.base.predict(x_t, t, context)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        b = self.base
        rows = []
        for caption in captions:
            ids = [b.bos] + b.tokenize(caption) + [b.eos]
            if len(ids) > b.max_length:
                raise ValueError(f"caption {caption!r} is {len(ids)} tokens, more than {b.max_length}")
            rows.append(ids + [b.pad] * (b.max_length - len(ids)))
        device = b.text_encoder.get_input_embeddings().weight.device
        out = b.text_encoder(torch.tensor(rows, device=device))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def lora_targets(self, text_encoder: bool) -> Dict[str, torch.nn.Linear]:
        targets = linear_targets(self.base.unet, UNET_TARGETS, "unet.")
        if text_encoder:
            targets.update(linear_targets(self.base.text_encoder, TEXT_TARGETS, "text_encoder."))
        return targets
