"""The Denoiser protocol over diffusers models (UNet2DConditionModel + AutoencoderKL
+ a DDPM-family scheduler), for library users and for core tests with tiny random
models. diffusers itself is never imported: the adapter only calls the objects it
is given, so importing this module costs nothing and needs no diffusers.

Conventions:
* ``encode``: ``vae.encode(2 * images - 1).latent_dist`` -> its mean (default,
  deterministic) or a sample, then ``(z - shift_factor) * scaling_factor``
  (shift 0 when the VAE has none). Differentiable w.r.t. the images.
* ``predict_noise``: the UNet sees DDPM-scaled ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``
  and integer t (what SD-style UNets are trained on; Euler-type schedulers'
  ``scale_model_input`` converts their sigma space to exactly this, so it is not
  called). Classifier-free guidance ``eps_u + s (eps_c - eps_u)`` in one batched
  UNet call (unconditional half first); s = 1 runs the conditional half only.
  ``prediction_type`` of the scheduler: "epsilon" as is, "v_prediction" via
  ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``, "sample" via
  ``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional

import torch

from .protocol import ViewCondition

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EncodeMode = Literal["mean", "sample"]


def _config_get(obj, name: str, default=None):
    config = getattr(obj, "config", None)
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _module_device_dtype(module, fallback: torch.Tensor):
    try:
        p = next(module.parameters())
        return p.device, p.dtype
    except (AttributeError, StopIteration, TypeError):
        return fallback.device, fallback.dtype


class DiffusersDenoiser:
    """:class:`~mpod_core.guidance.protocol.Denoiser` over diffusers models.

    Args:
        unet: a ``UNet2DConditionModel`` (or any callable
            ``unet(sample, timestep, encoder_hidden_states=...)`` returning
            ``.sample`` or a tuple).
        vae: an ``AutoencoderKL`` (``vae.encode(x).latent_dist`` with ``.mean``/``.sample()``).
        scheduler: a diffusers scheduler with ``alphas_cumprod`` and
            ``config.prediction_type`` (DDPM, DDIM, PNDM, Euler, ...).
        prompt_embeds: (1 or B, L, D) conditional text embeddings.
        negative_embeds: (1 or B, L, D) unconditional embeddings (e.g. of "").
        scaling_factor: latent scale; default ``vae.config.scaling_factor``.
        encode_mode: "mean" (deterministic, default) or "sample" of the latent distribution.
        unet_kwargs: extra keyword arguments for every UNet call (e.g. ``cross_attention_kwargs``).

    Freeze the models (``requires_grad_(False)``) unless you train them: SDS
    back-propagates through the VAE encoder and would otherwise fill its ``.grad``.
    """

    def __init__(self, unet, vae, scheduler, prompt_embeds: torch.Tensor,
                 negative_embeds: torch.Tensor, scaling_factor: Optional[float] = None, *,
                 encode_mode: EncodeMode = "mean", unet_kwargs: Optional[Dict[str, Any]] = None):
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_embeds", negative_embeds)):
            if not isinstance(emb, torch.Tensor) or emb.ndim != 3:
                shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ValueError(f"{name}: expected (1 or B, L, D) embeddings, got {shape}")
        if prompt_embeds.shape[1:] != negative_embeds.shape[1:]:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_embeds "
                             f"{tuple(negative_embeds.shape)} must agree in (L, D)")
        prediction_type = _config_get(scheduler, "prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {', '.join(PREDICTION_TYPES)}; "
                             f"got {prediction_type!r}")
        if encode_mode not in ("mean", "sample"):
            raise ValueError(f"encode_mode must be 'mean' or 'sample', got {encode_mode!r}")
        abar = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(abar, torch.Tensor) or abar.ndim != 1:
            raise ValueError("scheduler has no (T,) alphas_cumprod tensor; use a DDPM-family scheduler")
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.prediction_type: str = prediction_type
        self.encode_mode: EncodeMode = encode_mode
        self.unet_kwargs = dict(unet_kwargs or {})
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else _config_get(vae, "scaling_factor", 1.0))
        self.shift_factor = float(_config_get(vae, "shift_factor", None) or 0.0)
        device, _ = _module_device_dtype(unet, abar)
        self.alphas_cumprod = abar.detach().to(device=device, dtype=torch.float32)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, C, H/f, W/f) scaled latents, differentiable.

        Returns latents in the dtype of ``images``.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, 3, H, W) in [0, 1], got {shape}")
        device, dtype = _module_device_dtype(self.vae, images)
        dist = self.vae.encode((images * 2.0 - 1.0).to(device=device, dtype=dtype)).latent_dist
        z = dist.mean if self.encode_mode == "mean" else dist.sample()
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, t, encoder_hidden_states=emb, **self.unet_kwargs)
        return out.sample if hasattr(out, "sample") else out[0]

    @staticmethod
    def _expand(emb: torch.Tensor, b: int, name: str) -> torch.Tensor:
        if emb.shape[0] == b:
            return emb
        if emb.shape[0] == 1:
            return emb.expand(b, -1, -1)
        raise ValueError(f"{name}: batch {emb.shape[0]} matches neither 1 nor the latents' {b}")

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, guidance_scale: float,
                      views: Optional[ViewCondition] = None) -> torch.Tensor:
        """Guided epsilon (see the module docstring); ``views`` is ignored (text model).

        Args:
            latents_t: (B, C, h, w) noisy latents.
            t: (B,) int64 timesteps in [0, T).
            guidance_scale: s in ``eps_u + s (eps_c - eps_u)``.

        Returns:
            (B, C, h, w) in the dtype of ``latents_t``.
        """
        if latents_t.ndim != 4:
            raise ValueError(f"latents_t: expected (B, C, h, w), got {tuple(latents_t.shape)}")
        b = latents_t.shape[0]
        t = torch.as_tensor(t).reshape(-1)
        if t.shape[0] != b:
            raise ValueError(f"t: expected ({b},) timesteps, got {tuple(t.shape)}")
        device, dtype = _module_device_dtype(self.unet, latents_t)
        x = latents_t.to(device=device, dtype=dtype)
        t = t.to(device=device, dtype=torch.long)
        cond = self._expand(self.prompt_embeds, b, "prompt_embeds").to(device=device, dtype=dtype)
        if guidance_scale == 1.0:
            pred = self._unet(x, t, cond)
        else:
            uncond = self._expand(self.negative_embeds, b, "negative_embeds")
            uncond = uncond.to(device=device, dtype=dtype)
            out = self._unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
            pred_u, pred_c = out.chunk(2)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        pred = pred.to(latents_t.dtype)
        return self._to_epsilon(pred, latents_t, t.to(latents_t.device))

    def _to_epsilon(self, pred: torch.Tensor, latents_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The (guided) model output as epsilon; CFG commutes with this (affine in pred)."""
        if self.prediction_type == "epsilon":
            return pred
        abar = self.alphas_cumprod.to(latents_t.device)[t].to(latents_t.dtype).reshape(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * pred + (1.0 - abar).sqrt() * latents_t
        # "sample": pred is x0
        return (latents_t - abar.sqrt() * pred) / (1.0 - abar).sqrt()
