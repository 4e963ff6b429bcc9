"""Variational score distillation's score model (ProlificDreamer; ThemeStation's DSD uses it per prior).

VSD replaces the sampled noise of SDS by the noise a second model predicts for the *current*
renders: a LoRA on a copy of the prior, trained on the fly on those renders with the ordinary
diffusion loss. Per optimisation step, for each prior::

    baseline(x_t, t)  = eps_lora(x_t, t, prompt)                  (CFG 1, no grad; v -> eps if v-pred)
    grad              = w(t) (eps_prior,cfg(x_t, t) - baseline)   (sds_loss with ``baseline=``)
    then one LoRA step on the detached render latents x0 of each render kind the prior reads:
    t' ~ U{0, ..., T-1}, eps' ~ N(0, I), loss = mean((lora(x_t', t', prompt) - target)^2)

with AdamW (lr 1e-4, betas (0.9, 0.99), eps 1e-15, threestudio's AdamW weight decay 0.01), the LoRA on
the UNet's attention projections (rank 4), as the official ``stable-diffusion-vsd-guidance`` with
``theme-station-optimization.yaml`` (``optimizer.params.guidance.lr``; ``use_camera_embedding: false``,
so no camera condition either).

Deviation: the official LoRA copy is vanilla SD 2.1 (768-v) beside SD 2.1-base DreamBooth priors; here the
copy is the prior itself (its MODEL with its theme LoRA merged), as ProlificDreamer pairs the LoRA with the
model it distils. So a fresh score (``lora_up = 0``) predicts exactly the prior's conditional noise, and VSD
starts as the prior's classifier-free-guidance direction alone; any checkpoint the user loads works, with no
second download.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..configdoc import limits
from .lora import LoraSet, attach_lora
from .protocol import NoiseBaseline, ViewCondition
from .textual_inversion import diffusion_target


@runtime_checkable
class ScoreModel(Protocol):
    """A trainable copy of a latent diffusion model, as :class:`VSDScore` needs it (the theme fine-tune's
    :class:`~mpod_core.guidance.theme_finetune.FinetuneModel` adapters provide it)."""

    #: (T,) float32 cumulative products of (1 - beta).
    alphas_cumprod: torch.Tensor
    #: "eps" or "v".
    prediction_type: str

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The raw output (eps or v) for DDPM latents at integer timesteps ``t`` (B,); differentiable
        through adapters hooked on its layers."""
        ...

    def lora_targets(self, text_encoder: bool) -> Mapping[str, torch.nn.Linear]:
        """The attention projections a LoRA adapts (``text_encoder=False`` here)."""
        ...


@dataclass
class VSDConfig:
    """Settings of one prior's LoRA score model; each default names its source."""

    rank: int = field(default=4, metadata=limits(1, 128))
    """LoRA rank (threestudio stable-diffusion-vsd-guidance: diffusers' LoRAAttnProcessor, rank 4)."""
    learning_rate: float = field(default=1e-4, metadata=limits(1e-7, 1.0, 1e-5))
    """AdamW learning rate (theme-station-optimization.yaml optimizer.params.guidance.lr: 1e-4)."""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's and threestudio's AdamW default; the config sets none)."""
    seed: int = 0
    """Seeds the LoRA's down-projection init."""

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.rank!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"lora_learning_rate must be > 0, got {self.learning_rate!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


class VSDScore:
    """One prior's LoRA score model (module docstring); a context manager that removes its hooks.

    Args:
        model: a trainable copy of the prior (:class:`ScoreModel`); its LoRA hooks stay on it until
            :meth:`close`.
        contexts: ``{render kind: (1, L, D) prompt context}``, e.g. the colour and the normal-map prompt.
        config: :class:`VSDConfig`.
        name: the prior's name, for messages.
    """

    def __init__(self, model: ScoreModel, contexts: Mapping[str, torch.Tensor], config: Optional[VSDConfig] = None,
                 name: str = "prior"):
        self.config = config or VSDConfig()
        self.config.validate()
        if model.prediction_type not in ("eps", "v"):
            raise ValueError(f"{name}: prediction_type must be 'eps' or 'v', got {model.prediction_type!r}")
        if not contexts:
            raise ValueError(f"{name}: the VSD score needs at least one prompt context")
        for kind, ctx in contexts.items():
            if not isinstance(ctx, torch.Tensor) or ctx.ndim != 3 or ctx.shape[0] != 1:
                shape = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
                raise ValueError(f"{name}: context of the {kind} prompt: expected (1, L, D), got {shape}")
        self.model, self.name = model, name
        self.contexts: Dict[str, torch.Tensor] = {k: v.detach() for k, v in contexts.items()}
        self.lora: LoraSet = attach_lora(model.lora_targets(False), self.config.rank, float(self.config.rank),
                                         seed=self.config.seed)
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=self.config.learning_rate, betas=(0.9, 0.99),
                                           eps=1e-15, weight_decay=self.config.weight_decay)
        self.steps = 0

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        abar = self.model.alphas_cumprod.to(like.device)[t.to(like.device)]
        return abar.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def _context(self, kind: str, batch: int) -> torch.Tensor:
        if kind not in self.contexts:
            raise ValueError(f"{self.name}: no prompt for the {kind} render (has: {', '.join(self.contexts)})")
        ctx = self.contexts[kind]
        return ctx.expand(batch, *ctx.shape[1:])

    def predict_eps(self, latents_t: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, C, h, w) the LoRA model's noise prediction at CFG 1 (v converted:
        ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``), no grad."""
        with torch.no_grad():
            raw = self.model.predict(latents_t, t, self._context(kind, latents_t.shape[0])).to(latents_t.dtype)
            if self.model.prediction_type == "eps":
                return raw
            abar = self._abar(t, latents_t)
            return abar.sqrt() * raw + (1.0 - abar).sqrt() * latents_t

    def baseline(self, kind: str) -> NoiseBaseline:
        """The :data:`~mpod_core.guidance.protocol.NoiseBaseline` of the ``kind`` render for ``sds_loss``."""
        self._context(kind, 1)  # fail now, not inside the loop

        def predict(latents_t: torch.Tensor, t: torch.Tensor, views: Optional[ViewCondition] = None):
            return self.predict_eps(latents_t, t, kind).to(latents_t.device)
        return predict

    def train_step(self, latents: Mapping[str, torch.Tensor], generator: Optional[torch.Generator] = None) -> float:
        """One AdamW step of the LoRA on the renders' latents (module docstring).

        Args:
            latents: ``{kind: (B, C, h, w)}`` latents of the current renders (detached here); each kind is
                a micro-batch with its own prompt, their gradients summed (memory of one kind).
            generator: the source of t and noise (CPU or the latents' device).

        Returns:
            The mean diffusion loss over the kinds.
        """
        if not latents:
            raise ValueError(f"{self.name}: no render to train the VSD score on")
        self.optimizer.zero_grad(set_to_none=True)
        num_t = int(self.model.alphas_cumprod.shape[0])
        total = 0.0
        for kind, x0 in latents.items():
            x0 = x0.detach().float()
            b = x0.shape[0]
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, num_t, (b,), generator=generator, device=gen_device).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device)
            abar = self._abar(t, x0)
            x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
            pred = self.model.predict(x_t, t, self._context(kind, b)).float()
            loss = F.mse_loss(pred, diffusion_target(self.model.prediction_type, x0, noise, abar))
            (loss / len(latents)).backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return total / len(latents)

    def close(self) -> None:
        """Remove the LoRA hooks from the model."""
        self.lora.remove()

    def __enter__(self) -> "VSDScore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ScoreModel", "VSDConfig", "VSDScore"]
