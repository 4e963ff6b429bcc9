"""ThemeStation's theme priors as LoRA fine-tunes (paper §3.1-3.2): DreamBooth's loss on captioned images.

ThemeStation fine-tunes a text-to-image model twice: on renders of the exemplars (the *reference
prior*, 150 steps) and on the concept image plus renders of the initial model (the *concept
prior*, 300 steps). The official code runs diffusers' ``train_dreambooth.py`` (full UNet and text
encoder, lr 2e-6, batch 8, 512^2, no prior preservation); here the same loss trains a LoRA, the
cheaper deviation REFERENCE.md allows (lr ~1e-4, rank 4-8)::

    x0    = VAE latents of a training image                       (computed once, no grad)
    t     ~ U{0, ..., T-1},  eps ~ N(0, I)
    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    ctx   = text encoder(the image's caption)                     (with its LoRA when trained)
    loss  = mean((model(x_t, t, ctx) - target)^2),  target = eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0

AdamW on the LoRA factors (UNet attention q/k/v/out, and the text encoder's self-attention
q/k/v/out when ``train_text_encoder``), constant learning rate, gradient norm clipped to 1
(train_dreambooth.py's ``--max_grad_norm``).

Deviations, each cheaper and none changing the loss: the latents are the VAE's deterministic
encoding computed once (train_dreambooth.py samples the latent distribution every step; the
images are not augmented, so each epoch would re-encode the same images), and a batch can be
split into micro-batches whose gradients are summed (memory of one image, update of the batch).

Random draws, all from one CPU generator seeded with ``config.seed``: the LoRA init, then per
step the images (seeded epochs of shuffled indices, as a shuffling DataLoader), ``t`` and ``eps``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from ..configdoc import limits
from ..loss_history import LossHistory, LossMap
from ..progress import ProgressFn
from .lora import DOWN, LoraSet, attach_lora
from .textual_inversion import MAX_PASS_PIXELS, diffusion_target

log = logging.getLogger(__name__)


@runtime_checkable
class FinetuneModel(Protocol):
    """What :func:`train_theme_lora` needs from a text-to-image latent diffusion model."""

    #: (T,) float32 cumulative products of (1 - beta).
    alphas_cumprod: torch.Tensor
    #: "eps" or "v".
    prediction_type: str

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/f, W/f) latents as the diffusion model sees them (no grad)."""
        ...

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, L, D) cross-attention context of the captions, differentiable through the text
        encoder's adapted layers."""
        ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The model's raw output (eps or v) for DDPM latents at integer timesteps ``t`` (B,)."""
        ...

    def lora_targets(self, text_encoder: bool) -> Mapping[str, torch.nn.Linear]:
        """The layers a LoRA adapts, named by their key prefix in a LoRA file: the diffusion model's
        attention projections, plus the text encoder's when ``text_encoder``."""
        ...


@dataclass
class ThemeFinetuneConfig:
    """Settings of :func:`train_theme_lora` (ThemeStation's prior fine-tunes, as a LoRA)."""

    steps: int = field(default=150, metadata=limits(0, 100000))
    """Optimisation steps (official reference prior: train_dreambooth.py --max_train_steps=150; the concept prior
    uses 300). 0 saves the untrained LoRA (lora_up = 0: the model is unchanged)."""
    learning_rate: float = field(default=1e-4, metadata=limits(1e-7, 1.0, 1e-5))
    """AdamW learning rate, constant (REFERENCE.md: ~1e-4 for a LoRA, as diffusers' train_dreambooth_lora.py;
    the official full fine-tune uses 2e-6, far too small for LoRA factors that start at zero)."""
    weight_decay: float = field(default=1e-2, metadata=limits(0.0, 1.0, 1e-3))
    """AdamW weight decay (train_dreambooth.py --adam_weight_decay default 1e-2)."""
    rank: int = field(default=4, metadata=limits(1, 1024))
    """LoRA rank of every adapted layer (REFERENCE.md: rank 4-8; ThemeStation's own LoRA score copies use 4)."""
    alpha: float = field(default=4.0, metadata=limits(0.01, 1024.0, 0.5))
    """LoRA alpha: the update is scaled by alpha / rank (diffusers' train_dreambooth_lora.py sets alpha = rank,
    scale 1)."""
    train_text_encoder: bool = True
    """Also adapt the text encoder's self-attention (the official fine-tune trains the text encoder too,
    train_dreambooth.py --train_text_encoder); off: the UNet only, captions encoded once."""
    resolution: int = field(default=512, metadata=limits(64, 512, 8))
    """Side of the square training images (official: --resolution=512; non-square images are centre-cropped).
    micro_batch x resolution^2 may not exceed 512^2, the memory of one SD UNet backward."""
    batch_size: int = field(default=8, metadata=limits(1, 256))
    """Images per step (official: --train_batch_size=8)."""
    micro_batch: int = field(default=1, metadata=limits(1, 256))
    """Images per forward/backward pass; chunk gradients are summed, so the step is the whole batch's
    (the pack's choice, for memory)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip over all LoRA factors (train_dreambooth.py --max_grad_norm default 1.0)."""
    seed: int = 0
    """Seed of the LoRA init, the image order, timesteps and noise."""
    preview_every: int = 10
    """Send the current training image as preview every this many steps (and at the last)."""

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (latents are 1/8 of the image), "
                             f"got {self.resolution}")
        if self.batch_size < 1 or self.micro_batch < 1:
            raise ValueError(f"batch_size and micro_batch must be >= 1, got {self.batch_size}, {self.micro_batch}")
        if self.micro_batch > self.batch_size:
            raise ValueError(f"micro_batch {self.micro_batch} is larger than batch_size {self.batch_size}")
        pixels = self.micro_batch * self.resolution ** 2
        if pixels > MAX_PASS_PIXELS:
            raise ValueError(f"micro_batch x resolution^2 = {pixels} exceeds {MAX_PASS_PIXELS} (one 512^2 image per "
                             "forward/backward pass): lower micro_batch (the update stays the whole batch's) or "
                             "resolution")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.preview_every < 1:
            raise ValueError(f"preview_every must be >= 1, got {self.preview_every}")


@dataclass
class ThemeFinetuneResult:
    """What :func:`train_theme_lora` produced."""

    lora: LoraSet
    """The trained adapters, still hooked into the model (call ``lora.remove()`` when done)."""
    loss_map: LossMap
    """``{"loss": [batch loss of each step]}`` (ComfyUI's LOSS_MAP)."""


def split_captions(captions: str, count: int, input_name: str = "captions") -> List[str]:
    """One caption per image from a string with one caption per line (Render Exemplars' output).

    Surrounding whitespace of the whole string and of each line is dropped.

    Raises:
        ValueError: naming ``input_name``, when the number of lines differs from ``count`` or a
            line is empty.
    """
    if not isinstance(captions, str):
        raise ValueError(f"{input_name}: expected a STRING with one caption per line, got {type(captions).__name__}")
    lines = [line.strip() for line in captions.strip().splitlines()] if captions.strip() else []
    if len(lines) != count:
        raise ValueError(f"{input_name}: {len(lines)} caption line(s) for {count} image(s); give one caption per "
                         "image, one per line, in the images' order (as Render Exemplars outputs them)")
    empty = [i for i, line in enumerate(lines) if not line]
    if empty:
        raise ValueError(f"{input_name}: line {empty[0] + 1} is empty; every image needs a caption")
    return lines


def square_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, S, S): centre crop to a square, then an antialiased resize to S."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected (N, 3, H, W) RGB, got {got}")
    if not torch.isfinite(images).all():
        raise ValueError("images: contain NaN or infinite values")
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[..., top:top + side, left:left + side].float().clamp(0, 1)
    if side == resolution:
        return square
    return F.interpolate(square, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def epoch_order(count: int, batch: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch) image indices: seeded shuffled epochs, concatenated (a shuffling DataLoader's order)."""
    need = steps * batch
    epochs = [torch.randperm(count, generator=generator) for _ in range(-(-need // count))] if need else []
    flat = torch.cat(epochs) if epochs else torch.zeros(0, dtype=torch.long)
    return flat[:need].reshape(steps, batch)


def dreambooth_loss(model: FinetuneModel, latents: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, abar_all: torch.Tensor) -> torch.Tensor:
    """Per-element-mean DreamBooth loss of one batch (module docstring); ``t`` (B,) integer, ``noise`` like
    ``latents``, ``abar_all`` (T,)."""
    abar = abar_all.to(latents.device)[t.to(abar_all.device)].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = diffusion_target(model.prediction_type, latents, noise, abar)
    pred = model.predict(x_t, t.to(x_t.device), context)
    return F.mse_loss(pred.float(), target.float())


def train_theme_lora(images: torch.Tensor, captions: Sequence[str], model: FinetuneModel,
                     config: ThemeFinetuneConfig, initial: Optional[Mapping[str, torch.Tensor]] = None,
                     progress: Optional[ProgressFn] = None,
                     status: Optional[Callable[[str], None]] = None) -> ThemeFinetuneResult:
    """Train a LoRA on ``model`` with DreamBooth's loss on captioned images (module docstring).

    Args:
        images: (N, 3, H, W) in [0, 1].
        captions: N strings, caption i for image i.
        model: a :class:`FinetuneModel`; its own weights stay frozen.
        config: :class:`ThemeFinetuneConfig`.
        initial: a LoRA file's tensors to continue training (its rank and alpha win over the config's).
        progress: ``progress(step, total, preview)`` after each step; it may raise to stop the run
            (the adapters are then removed from the model).
        status: ``status(text)`` after each step with the step and its loss ("step 3/150  loss 0.1234").

    Returns:
        :class:`ThemeFinetuneResult`, the adapters still hooked in.
    """
    config.validate()
    n = images.shape[0] if isinstance(images, torch.Tensor) else 0
    if len(captions) != n:
        raise ValueError(f"captions: {len(captions)} caption(s) for {n} image(s)")
    squares = square_images(images, config.resolution)
    generator = torch.Generator().manual_seed(int(config.seed))
    targets = dict(model.lora_targets(config.train_text_encoder))
    unet_keys = set(model.lora_targets(False))
    if initial is not None and not config.train_text_encoder:
        text_keys = set(model.lora_targets(True)) - unet_keys
        if any(k.endswith(DOWN) and k[:-len(DOWN)] in text_keys for k in initial):
            raise ValueError("resume: the LoRA also adapts the text encoder; turn train_text_encoder on to resume it")
    lora = attach_lora(targets, config.rank, config.alpha, seed=int(torch.randint(2 ** 62, (1,), generator=generator)),
                       initial=initial)
    try:
        with torch.no_grad():
            latents = torch.cat([model.encode_images(squares[i:i + config.micro_batch])
                                 for i in range(0, n, config.micro_batch)]).float()
        text_trained = any(k not in unet_keys for k in lora.layers)
        fixed_context: Optional[torch.Tensor] = None
        if not text_trained:
            with torch.no_grad():
                fixed_context = torch.cat([model.encode_text(list(captions[i:i + config.micro_batch]))
                                           for i in range(0, n, config.micro_batch)]).float()
        abar_all = model.alphas_cumprod.detach().float()
        num_t = abar_all.shape[0]
        params = lora.parameters()
        optimiser = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=config.weight_decay)
        order = epoch_order(n, config.batch_size, config.steps, generator)
        history = LossHistory()
        b, mb = config.batch_size, config.micro_batch
        for step in range(config.steps):
            pick = order[step]
            t = torch.randint(0, num_t, (b,), generator=generator)
            noise = torch.randn((b,) + tuple(latents.shape[1:]), generator=generator).to(latents.device)
            optimiser.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(0, b, mb):
                j = min(b, i + mb)
                idx = pick[i:j]
                if fixed_context is not None:
                    context = fixed_context[idx.to(fixed_context.device)]
                else:
                    context = model.encode_text([captions[k] for k in idx.tolist()])
                loss = dreambooth_loss(model, latents[idx.to(latents.device)], context, t[i:j], noise[i:j],
                                       abar_all) * ((j - i) / b)  # the chunk's share of the batch mean
                if not loss.requires_grad:
                    raise RuntimeError("the loss does not depend on the LoRA factors: the model's lora_targets are "
                                       "not layers its forward uses")
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimiser.step()
            history.record(total)
            last = step + 1 == config.steps
            show = last or (step + 1) % config.preview_every == 0
            if show:
                log.info("theme finetune step %d/%d: loss %.5g", step + 1, config.steps, total)
            if status is not None:
                status(f"step {step + 1}/{config.steps}  loss {total:.4g}")
            if progress is not None:
                progress(step + 1, config.steps, squares[int(pick[0])].permute(1, 2, 0).cpu() if show else None)
    except BaseException:
        lora.remove()
        raise
    return ThemeFinetuneResult(lora=lora, loss_map=history.as_loss_map())


def fixed_loss(model: FinetuneModel, images: torch.Tensor, captions: Sequence[str], resolution: int,
               t: torch.Tensor, noise: torch.Tensor) -> float:
    """The DreamBooth loss of every image at fixed ``t`` (N,) and ``noise`` (N, C, h, w): a training
    curve free of the draw's noise, for tests and benchmarks."""
    with torch.no_grad():
        latents = model.encode_images(square_images(images, resolution)).float()
        context = model.encode_text(list(captions))
        return float(dreambooth_loss(model, latents, context, t, noise.to(latents.device),
                                     model.alphas_cumprod.detach().float()))


def settings_metadata(config: ThemeFinetuneConfig, lora: LoraSet, resumed: bool = False) -> Dict[str, str]:
    """safetensors metadata recording how the LoRA was trained (strings only, as the format requires)."""
    import json
    ranks = sorted({layer.rank for layer in lora.layers.values()})
    meta = {"mpod3d_theme_finetune": json.dumps({
        "steps": config.steps, "learning_rate": config.learning_rate, "weight_decay": config.weight_decay,
        "resolution": config.resolution, "batch_size": config.batch_size, "seed": config.seed,
        "train_text_encoder": config.train_text_encoder, "resumed": resumed,
        "ranks": ranks, "layers": len(lora.layers), "loss": "dreambooth"}),
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "",
        "ss_network_alpha": str(next(iter(lora.layers.values())).alpha) if lora.layers else ""}
    return meta


__all__ = ["FinetuneModel", "ThemeFinetuneConfig", "ThemeFinetuneResult", "dreambooth_loss", "epoch_order",
           "fixed_loss", "settings_metadata", "split_captions", "square_images", "train_theme_lora"]
