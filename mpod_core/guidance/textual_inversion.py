"""Textual inversion (Gal et al.; RealFusion / Magic123's recipe): learn one token embedding.

MPOD123 stage 2 (after Magic123 and RealFusion) conditions its refine stage on
"A high-resolution DSLR image of <e>", where ``<e>`` is a token embedding
learned from the reference image with everything else frozen: the plain
diffusion loss on random augmentations of the image, at uniform timesteps::

    x0    = VAE latents of an augmented reference          (no grad)
    t     ~ U{0, ..., T-1},  eps ~ N(0, I)
    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    ctx   = text encoder("a photo of a <e>"-style template)  (differentiable w.r.t. <e>)
    loss  = mean((model(x_t, t, ctx) - target)^2),  target = eps (eps-prediction)
            or sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v-prediction): the model's own training target

AdamW on ``<e>`` alone. Defaults are Magic123's (``scripts/textual_inversion/
textual_inversion.sh``: 512^2, batch 16, 3000 steps, constant lr, RealFusion's
augmentations) over diffusers' ``examples/textual_inversion/textual_inversion.py``
(lr 1e-4, AdamW weight decay 1e-2, betas (0.9, 0.999), eps 1e-8, the 27
"a photo of a {}" ImageNet templates).

The model reaches the loop through :class:`TextualInversionModel`; an adapter
over ComfyUI's MODEL/CLIP/VAE lives in ``nodes/comfy_bridge/textual_inversion.py``
and one over diffusers/transformers models in
:mod:`mpod_core.guidance.textual_inversion_diffusers`.

Random draws per step, all from one CPU generator seeded with ``config.seed``:
the reference index and augmentation of each sample, then ``t``, ``eps`` and the
template of each sample.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Protocol, Sequence, Tuple, get_args, runtime_checkable

import torch
import torch.nn.functional as F

from ..configdoc import limits
from ..loss_history import LossHistory, LossMap
from ..progress import ProgressFn
from .augment import REALFUSION, augment, prepare_square
from .sds import MAX_GUIDANCE_PIXELS

#: diffusers' ``imagenet_templates_small`` (examples/textual_inversion/textual_inversion.py), which
#: RealFusion's and so Magic123's script use unchanged; ``{}`` is where the learned token goes.
IMAGENET_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)

#: The prompt the refine stage uses with the learned token (MPOD123 / Magic123 / RealFusion).
REFINE_TEMPLATE = "A high-resolution DSLR image of {}"

Background = Literal["white", "black", "grey"]
BACKGROUNDS: Tuple[str, ...] = get_args(Background)
#: RGB of each background choice.
BACKGROUND_RGB = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5)}

PredictionType = Literal["eps", "v"]

log = logging.getLogger(__name__)


@runtime_checkable
class TextualInversionModel(Protocol):
    """What the training loop needs from a text-to-image latent diffusion model."""

    #: (T,) float32 cumulative products of (1 - beta).
    alphas_cumprod: torch.Tensor
    #: "eps" (the model predicts the noise) or "v" (v-prediction, SD 2.x 768-v).
    prediction_type: str
    #: D, the width of a token embedding (768 for SD 1.x's CLIP-L, 1024 for SD 2.x's OpenCLIP-H).
    embedding_dim: int

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/f, W/f) latents scaled as the diffusion model sees them.
        Not differentiated (called under ``torch.no_grad()``)."""
        ...

    def encode_text(self, templates: Sequence[str], embedding: torch.Tensor) -> torch.Tensor:
        """Text-encoder context of each template with ``embedding`` as the token at ``{}``.

        Args:
            templates: B strings, each with exactly one ``{}``.
            embedding: (D,) the learned token; the result must be differentiable w.r.t. it.

        Returns:
            (B, L, D_ctx) cross-attention context.
        """
        ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The model's raw output (eps or v) for DDPM latents ``x_t`` at integer ``t`` (B,);
        differentiable w.r.t. ``context``."""
        ...


#: Pixels one forward/backward pass may hold: one 512^2 image, as the score-distillation nodes'
#: bound (:data:`~mpod_core.guidance.sds.MAX_GUIDANCE_PIXELS`), whose backward is also the memory peak.
MAX_PASS_PIXELS = MAX_GUIDANCE_PIXELS


@dataclass
class TextualInversionConfig:
    """Settings of :func:`train_textual_inversion` (Magic123's textual-inversion recipe)."""

    steps: int = field(default=3000, metadata=limits(1, 100000))
    """Optimisation steps (Magic123's scripts/textual_inversion/textual_inversion.sh: --max_train_steps=3000)."""
    learning_rate: float = field(default=1e-4, metadata=limits(1e-6, 1.0, 1e-5))
    """AdamW learning rate on the token, constant (diffusers/RealFusion textual_inversion.py default 1e-4,
    which Magic123's script keeps, without --scale_lr)."""
    weight_decay: float = field(default=1e-2, metadata=limits(0.0, 1.0, 1e-3))
    """AdamW weight decay (diffusers textual_inversion.py --adam_weight_decay default 1e-2)."""
    resolution: int = field(default=512, metadata=limits(64, 512, 8))
    """Side of the square training images in pixels, a multiple of 8 (Magic123: --resolution=512, SD 1.5's
    own size; also the most one forward/backward pass may hold, see ``micro_batch``)."""
    batch_size: int = field(default=16, metadata=limits(1, 256))
    """Augmented images per step (Magic123: --train_batch_size=16)."""
    micro_batch: int = field(default=1, metadata=limits(1, 256))
    """Images per forward/backward pass; the gradients of the batch's chunks are summed before the step,
    so the update is exactly that of the whole batch and memory that of this many images (the pack's
    choice: one 512^2 image's UNet backward already needs several GB on a CPU). micro_batch x resolution^2
    may not exceed 512^2 (:data:`MAX_PASS_PIXELS`): the UNet's activations for backward grow with it and
    the self-attention of larger images with its square."""
    background: Background = "white"
    """Colour the reference is composited on (where the mask is 0) and that fills what the augmentation's
    rotation and crops uncover. Match the background the refine stage renders on (white, as Magic123's
    and RealFusion's references)."""
    augment: bool = True
    """RealFusion's augmentations (rotation, resized crop 0.85-1.15, colour jitter, grayscale, blur, flip;
    RealFusion's --use_augmentations, which Magic123's script passes); off: resize and random flip only
    (plain diffusers textual_inversion.py)."""
    seed: int = 0
    """Seed of the augmentations, timesteps, noise and templates drawn at each step."""
    preview_every: int = 10
    """Send an augmented training image as preview every this many steps (and at the last)."""
    templates: Tuple[str, ...] = IMAGENET_TEMPLATES
    """Prompt templates, ``{}`` marking the token (diffusers' 27 ImageNet "a photo of a {}" templates)."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (latents are 1/8 of the image), "
                             f"got {self.resolution}")
        if self.batch_size < 1 or self.micro_batch < 1:
            raise ValueError(f"batch_size and micro_batch must be >= 1, got {self.batch_size}, {self.micro_batch}")
        pixels = self.micro_batch * self.resolution ** 2
        if pixels > MAX_PASS_PIXELS:
            raise ValueError(f"micro_batch x resolution^2 = {self.micro_batch} x {self.resolution}^2 = {pixels} exceeds "
                             f"{MAX_PASS_PIXELS} (one 512^2 image per forward/backward pass): the UNet's backward "
                             "would hold too much memory; lower micro_batch (the update stays the whole batch's) "
                             "or resolution")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.preview_every < 1:
            raise ValueError(f"preview_every must be >= 1, got {self.preview_every}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("templates: each template must contain '{}' exactly once")


@dataclass
class TextualInversionResult:
    """What :func:`train_textual_inversion` produced."""

    embedding: torch.Tensor
    """(D,) the learned token embedding, float32, on the CPU."""
    loss_map: LossMap
    """``{"loss": [diffusion loss of each step]}`` (ComfyUI's LOSS_MAP)."""
    preview: torch.Tensor
    """(H, W, 3) the first augmented training image of the last step."""


def composite_reference(images: torch.Tensor, masks: Optional[torch.Tensor], background: str) -> torch.Tensor:
    """The reference images on ``background`` where the mask is 0.

    Args:
        images: (N, 3, H, W) RGB in [0, 1].
        masks: (N or 1, H, W) in [0, 1], 1 = object; None keeps the images as they are.
        background: one of :data:`BACKGROUNDS`.

    Returns:
        (N, 3, H, W) float32.

    Raises:
        ValueError: wrong shapes, a mask whose size differs from the image's, or a mask without
            foreground (the training would learn the background alone).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"image: expected (N, 3, H, W) RGB, got {got}")
    if not torch.isfinite(images).all():
        raise ValueError("image: contains NaN or infinite values")
    if background not in BACKGROUND_RGB:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
    images = images.float().clamp(0, 1)
    if masks is None:
        return images
    if masks.ndim != 3 or masks.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"mask: expected (1 or {images.shape[0]}, H, W), got {tuple(masks.shape)}")
    if tuple(masks.shape[1:]) != tuple(images.shape[2:]):
        raise ValueError(f"mask: size {masks.shape[2]}x{masks.shape[1]} differs from the image's "
                         f"{images.shape[3]}x{images.shape[2]}")
    masks = masks.float().clamp(0, 1).to(images.device)
    empty = (masks.flatten(1) < 0.5).all(1)
    if empty.any():
        raise ValueError(f"mask: no foreground (no pixel >= 0.5) in mask {int(empty.nonzero()[0])}: the object must "
                         "be 1 (after Load Image, put Invert Mask on its MASK output)")
    bg = torch.tensor(BACKGROUND_RGB[background], device=images.device).reshape(1, 3, 1, 1)
    m = masks[:, None]
    return images * m + bg * (1 - m)


def training_batch(squares: torch.Tensor, config: TextualInversionConfig, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, 3, S, S) augmented training images from the prepared references (N, 3, S', S')."""
    pick = torch.randint(squares.shape[0], (config.batch_size,), generator=generator).to(squares.device)
    chosen = squares[pick]
    if config.augment:
        return augment(chosen, config.resolution, generator, BACKGROUND_RGB[config.background], REALFUSION)
    # diffusers' plain path: resize the square to S, random horizontal flip.
    out = F.interpolate(chosen, size=(config.resolution,) * 2, mode="bilinear", align_corners=False, antialias=True)
    flip = (torch.rand(config.batch_size, generator=generator) < 0.5).to(squares.device).reshape(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out).clamp(0, 1)


def diffusion_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                     abar: torch.Tensor) -> torch.Tensor:
    """The training target: ``eps`` for eps-prediction, ``sqrt(abar) eps - sqrt(1 - abar) x0`` for v
    (diffusers' ``DDPMScheduler.get_velocity``). ``abar`` is (B, 1, 1, 1)."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        return abar.sqrt() * noise - (1 - abar).sqrt() * latents
    raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")


def train_textual_inversion(images: torch.Tensor, model: TextualInversionModel, config: TextualInversionConfig,
                            initial_embedding: torch.Tensor, masks: Optional[torch.Tensor] = None,
                            progress: Optional[ProgressFn] = None) -> TextualInversionResult:
    """Learn one token embedding from reference images (see the module docstring).

    Args:
        images: (N, 3, H, W) references in [0, 1]; each training sample picks one at random.
        model: a :class:`TextualInversionModel` (frozen; only the token is optimised).
        config: :class:`TextualInversionConfig`.
        initial_embedding: (D,) start value (the initializer word's embedding, or a resumed token).
        masks: optional (N or 1, H, W) object masks, 1 = object; the images are composited on
            ``config.background`` where the mask is 0.
        progress: ``progress(step, total, preview)`` after each step; it may raise to stop the run.

    Returns:
        :class:`TextualInversionResult`.
    """
    config.validate()
    dim = int(model.embedding_dim)
    if not isinstance(initial_embedding, torch.Tensor) or initial_embedding.reshape(-1).shape[0] != dim:
        got = tuple(initial_embedding.shape) if isinstance(initial_embedding, torch.Tensor) else None
        raise ValueError(f"initial_embedding: expected ({dim},) for this text encoder, got {got}")
    reference = composite_reference(images, masks, config.background)
    squares = prepare_square(reference, config.resolution, REALFUSION.base_scale)
    abar_all = model.alphas_cumprod.detach().float()
    num_t = abar_all.shape[0]
    generator = torch.Generator().manual_seed(int(config.seed))
    embedding = initial_embedding.detach().reshape(dim).float().clone().requires_grad_(True)
    optimiser = torch.optim.AdamW([embedding], lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay)
    history = LossHistory()
    b = config.batch_size
    preview = None
    for step in range(config.steps):
        pixels = training_batch(squares, config, generator)
        with torch.no_grad():
            latents = torch.cat([model.encode_images(pixels[i:i + config.micro_batch])
                                 for i in range(0, b, config.micro_batch)]).float()
        t = torch.randint(0, num_t, (b,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        which = torch.randint(len(config.templates), (b,), generator=generator).tolist()
        abar = abar_all.to(latents.device)[t.to(abar_all.device)].reshape(b, 1, 1, 1)
        x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        target = diffusion_target(model.prediction_type, latents, noise, abar)
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, b, config.micro_batch):
            j = min(b, i + config.micro_batch)
            context = model.encode_text([config.templates[k] for k in which[i:j]], embedding)
            pred = model.predict(x_t[i:j], t[i:j].to(x_t.device), context)
            # The chunk's share of the batch mean: summed chunk gradients = the whole batch's gradient.
            loss = F.mse_loss(pred.float(), target[i:j].float(), reduction="sum") / target.numel()
            loss.backward()
            total += float(loss.detach())
        optimiser.step()
        history.record(total)
        last = step + 1 == config.steps
        if last or (step + 1) % config.preview_every == 0:
            preview = pixels[0].detach().permute(1, 2, 0).cpu()
            log.info("textual inversion step %d/%d: loss %.5g", step + 1, config.steps, total)
        if progress is not None:
            progress(step + 1, config.steps, preview if last or (step + 1) % config.preview_every == 0 else None)
    return TextualInversionResult(embedding=embedding.detach().cpu(), loss_map=history.as_loss_map(),
                                  preview=preview)


def refine_prompt(embedding_name: str) -> str:
    """``"A high-resolution DSLR image of embedding:NAME"``: the refine stage's prompt with the saved
    embedding, as core CLIP Text Encode reads it."""
    return REFINE_TEMPLATE.format(f"embedding:{embedding_name}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two embeddings (any shapes with D elements)."""
    return float(F.cosine_similarity(a.reshape(1, -1).float(), b.reshape(1, -1).float()))


__all__: List[str] = ["BACKGROUNDS", "MAX_PASS_PIXELS", "BACKGROUND_RGB", "IMAGENET_TEMPLATES", "REFINE_TEMPLATE",
                      "TextualInversionConfig", "TextualInversionModel", "TextualInversionResult",
                      "composite_reference", "cosine", "diffusion_target", "refine_prompt",
                      "train_textual_inversion", "training_batch"]
