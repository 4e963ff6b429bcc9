"""Score distillation sampling (SDS, DreamFusion) and its VSD hook.

One call of :func:`sds_loss` on latents ``x`` (B, C, h, w)::

    t     ~ U{lo, ..., hi}        per sample, (lo, hi) = timestep_bounds(config, step, T)
    eps   ~ N(0, I)
    x_t   = sqrt(abar_t) * x.detach() + sqrt(1 - abar_t) * eps
    eps^  = denoiser.predict_noise(x_t, t, guidance_scale, views)      (no grad)
    ref   = eps, or baseline(x_t, t, views) (VSD: a second noise predictor)
    grad  = nan_to_num(w(t) * (eps^ - ref)), optionally clamped to [-clip, clip]
    loss  = 0.5 * sum((x - (x - grad).detach())^2) / B

so ``d loss / d x = grad / B`` (the per-sample SDS gradient, averaged over the
batch as threestudio does) and the diffusion model never enters the autograd
graph. ``w(t)`` is ``1 - abar`` ("sds", DreamFusion), ``1`` ("uniform") or
``sqrt(abar) * (1 - abar)`` ("fantasia", Fantasia3D). Classifier-free guidance is
the denoiser's: ``eps_u + s * (eps_c - eps_u)`` (diffusers/ComfyUI; threestudio's
``eps_c + s * (eps_c - eps_u)`` equals our ``s + 1``).

Broken guidance. The NaN guard above tolerates a few non-finite entries (a
fp16 UNet overflowing in some pixels at high t), but a model that returns NaN
everywhere would be averaged away: every gradient zeroed, the optimisation
"succeeding" without moving. Loops that distil a score pass a
:class:`NonFiniteGuard`, which raises :class:`NonFiniteGuidanceError` naming the
likely causes when more than half of one step's gradient entries are
non-finite, or when any are on :data:`MAX_CONSECUTIVE_NONFINITE` SDS steps in a
row.

Random draws: ``t`` first (``torch.randint``), then ``eps`` (``torch.randn``),
both from ``generator`` on the generator's device, so a seeded generator
reproduces a step exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple, get_args

import torch

from ..configdoc import limits
from .protocol import Denoiser, NoiseBaseline, ViewCondition

Weighting = Literal["sds", "uniform", "fantasia"]
#: The weighting names, for node widgets and error messages.
WEIGHTINGS: Tuple[str, ...] = get_args(Weighting)
#: Largest ``batch x height x width`` of images whose SDS gradient goes through the
#: VAE encoder: its backward holds the encoder's activations for the whole batch at
#: full resolution (the SD VAE's first blocks keep 128-256 channels per pixel), so it is
#: capped at 4 views of 256^2 = one 512^2 image (SD 1.5's own size), as Zero123 SDS
#: NeRF's guidance batch (MPOD123 stage 1) and SDS Image Fit both enforce.
MAX_GUIDANCE_PIXELS = 4 * 256 * 256


@dataclass
class SDSConfig:
    """Settings of score distillation (threestudio's defaults for SD guidance)."""

    guidance_scale: float = field(default=100.0, metadata=limits(0.1, 1000.0, 0.1))
    """Classifier-free guidance scale s in ``eps_u + s * (eps_c - eps_u)``; > 0.
    SDS with Stable Diffusion needs large values (DreamFusion / threestudio: 100); Zero123 uses 3-5."""

    min_step: float = field(default=0.02, metadata=limits(0.0, 1.0, 0.01))
    """Lowest timestep as a fraction of the T training timesteps, in [0, 1] (threestudio: 0.02)."""

    max_step: float = field(default=0.98, metadata=limits(0.0, 1.0, 0.01))
    """Highest timestep as a fraction of T, in [min_step, 1]; equal to
    ``min_step`` fixes a single timestep (threestudio: 0.98)."""

    anneal_min_step: Optional[float] = None
    """``min_step`` at the end of annealing (None: no annealing of the lower end)."""

    anneal_max_step: Optional[float] = None
    """``max_step`` at the end of annealing (None: no annealing of the upper end)."""

    anneal_steps: int = 0
    """The range moves linearly from (min_step, max_step) to the annealed range
    over optimisation steps ``anneal_start_step..anneal_steps`` and stays there
    afterwards; ``anneal_steps <= anneal_start_step`` with an annealed range given
    means a jump to the annealed range at ``anneal_start_step``."""

    anneal_start_step: int = 0
    """First step of the anneal (threestudio's ``[start_iter, start, end, end_iter]``
    schedules; stable-zero123.yaml starts at step 50 of 600)."""

    weighting: Weighting = "sds"
    """w(t): "sds" = 1 - abar (DreamFusion, threestudio's default), "uniform" = 1,
    "fantasia" = sqrt(abar) * (1 - abar) (Fantasia3D)."""

    grad_clip: Optional[float] = None
    """Clamp every element of the gradient to [-grad_clip, grad_clip] (None: no clamp); > 0."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        s = self.guidance_scale
        if not _is_finite_number(s) or s <= 0:
            raise ValueError(f"guidance_scale must be a finite number > 0, got {s!r}")
        _check_range(self.min_step, self.max_step, "min_step", "max_step")
        if self.anneal_min_step is not None or self.anneal_max_step is not None:
            lo, hi = self._end_range()
            _check_range(lo, hi, "anneal_min_step" if self.anneal_min_step is not None else "min_step",
                         "anneal_max_step" if self.anneal_max_step is not None else "max_step")
        for name in ("anneal_steps", "anneal_start_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        c = self.grad_clip
        if c is not None and (not _is_finite_number(c) or c <= 0):
            raise ValueError(f"grad_clip must be None or a finite number > 0, got {c!r}")

    def _end_range(self) -> Tuple[float, float]:
        lo = self.min_step if self.anneal_min_step is None else self.anneal_min_step
        hi = self.max_step if self.anneal_max_step is None else self.anneal_max_step
        return lo, hi


def _is_finite_number(v) -> bool:
    """A real, finite number (Python or numpy scalar; not a bool, not a string)."""
    if isinstance(v, (bool, str)):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _check_range(lo, hi, lo_name: str, hi_name: str) -> None:
    for v, name in ((lo, lo_name), (hi, hi_name)):
        if not _is_finite_number(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a fraction of the training timesteps in [0, 1], got {v!r}")
    if lo > hi:
        raise ValueError(f"{lo_name} ({lo}) must be <= {hi_name} ({hi})")


def timestep_bounds(config: SDSConfig, step: int, num_train_timesteps: int) -> Tuple[int, int]:
    """The inclusive integer timestep range sampled at optimisation ``step``.

    Fractions interpolate linearly from ``(min_step, max_step)`` to
    ``(anneal_min_step, anneal_max_step)`` between steps ``anneal_start_step`` and
    ``anneal_steps``, then map to ``round(fraction * T)`` clamped to ``[0, T - 1]``.

    Args:
        config: validated or not (it is validated here).
        step: the optimisation step, >= 0.
        num_train_timesteps: T, the length of the schedule (1000 for SD).

    Returns:
        (lo, hi) with ``0 <= lo <= hi <= T - 1``; t is drawn from ``{lo, ..., hi}``.
    """
    config.validate()
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    lo, hi = config.min_step, config.max_step
    if config.anneal_min_step is not None or config.anneal_max_step is not None:
        end_lo, end_hi = config._end_range()
        start, end = config.anneal_start_step, config.anneal_steps
        if step < start:
            frac = 0.0
        elif end <= start:
            frac = 1.0
        else:
            frac = min((step - start) / (end - start), 1.0)
        lo = lo + (end_lo - lo) * frac
        hi = hi + (end_hi - hi) * frac
    last = num_train_timesteps - 1
    lo_i = min(max(int(round(lo * num_train_timesteps)), 0), last)
    hi_i = min(max(int(round(hi * num_train_timesteps)), 0), last)
    return lo_i, hi_i


def sds_weight(alphas_cumprod_t: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """w(t) from ``abar_t`` (any shape): "sds" 1 - abar, "uniform" 1, "fantasia" sqrt(abar)(1 - abar)."""
    a = alphas_cumprod_t
    if weighting == "sds":
        return 1.0 - a
    if weighting == "uniform":
        return torch.ones_like(a)
    if weighting == "fantasia":
        return a.sqrt() * (1.0 - a)
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")


@dataclass
class SDSOutput:
    """What one SDS evaluation produced.

    Attributes:
        loss: scalar, ``0.5 * sum(grad^2) / B`` in value; ``d loss / d latents = grad / B``.
        grad: (B, C, h, w) the per-sample SDS gradient (after weighting, NaN guard, clip).
        t: (B,) int64 sampled timesteps.
        noise: (B, C, h, w) the sampled noise eps.
        noise_pred: (B, C, h, w) the guided prediction eps^.
    """

    loss: torch.Tensor
    grad: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    noise_pred: torch.Tensor
    nonfinite: int = 0
    """How many entries of the gradient were NaN or infinite before the guard zeroed them."""


#: A step whose gradient has more than this share of non-finite entries stops a
#: guarded loop: the model's output is mostly NaN/inf, not a few overflowing pixels.
MAX_NONFINITE_FRACTION = 0.5

#: A guarded loop stops after this many SDS steps in a row with any non-finite
#: gradient entry. fp16 overflow, which the guard tolerates, hits some timesteps
#: (the highest), so a healthy model with t drawn anew every step rarely shows it
#: 5 times running (at 10% of steps: 1e-5 per window), while a model that is
#: partly broken on every step (e.g. one latent channel, under the majority
#: threshold) is stopped within 5 steps.
MAX_CONSECUTIVE_NONFINITE = 5

_CAUSES = ("Check the diffusion MODEL (a broken or incompatible checkpoint, or a LoRA/patch applied to it), "
           "its conditioning (the CLIP text encoder behind positive/negative; for Stable Zero123 the "
           "CLIP vision encoder of the reference image) and the VAE; running in fp16 can also overflow "
           "(try ComfyUI's --force-fp32).")


class NonFiniteGuidanceError(FloatingPointError):
    """The guidance (diffusion model, its conditioning or its VAE) returned NaN or infinite values."""


class NonFiniteGuard:
    """Stops a score-distillation loop whose guidance is broken (see the module docstring).

    One guard per optimisation run, passed to every :func:`sds_loss` /
    :func:`sds_image_loss` call of the run (``guard=``); it is checked before the
    gradient is used, so a raise leaves the optimised parameters untouched.

    Args:
        max_fraction: a step with a larger share of non-finite gradient entries raises.
        max_consecutive: this many guarded steps in a row with any non-finite entry raise.
    """

    def __init__(self, max_fraction: float = MAX_NONFINITE_FRACTION,
                 max_consecutive: int = MAX_CONSECUTIVE_NONFINITE):
        if not 0.0 <= max_fraction < 1.0:
            raise ValueError(f"max_fraction must be in [0, 1), got {max_fraction}")
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_fraction = float(max_fraction)
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0  # guarded steps in a row, up to the last, with a non-finite gradient entry
        self._first_bad_step: Optional[int] = None
        self._worst_fraction = 0.0

    def check_images(self, images: torch.Tensor, step: int) -> None:
        """Raise if the images handed to the guidance are not finite (the optimisation diverged,
        which is not the model's fault and must not be blamed on it)."""
        if not bool(torch.isfinite(images).all()):
            raise NonFiniteGuidanceError(
                f"Score distillation stopped at step {step}: the images given to the guidance contain NaN or "
                f"infinite values, so the optimised image or field diverged; lower the learning rate.")

    def update(self, nonfinite: int, total: int, step: int, t: torch.Tensor,
               latents_finite: bool = True) -> None:
        """Record one SDS step's count of non-finite gradient entries; raise if the guidance is broken.

        Args:
            nonfinite: non-finite entries of the step's gradient (before the NaN guard).
            total: all entries of the gradient.
            step: the optimisation step, for the message.
            t: (B,) the step's timesteps, for the message.
            latents_finite: whether the encoder's latents were finite (else the VAE is named).

        Raises:
            NonFiniteGuidanceError: more than ``max_fraction`` of the entries are non-finite, or
                some were on ``max_consecutive`` guarded steps in a row.
        """
        if nonfinite == 0:
            self.consecutive = 0
            self._first_bad_step, self._worst_fraction = None, 0.0
            return
        fraction = nonfinite / max(total, 1)
        self.consecutive += 1
        if self._first_bad_step is None:
            self._first_bad_step = step
        self._worst_fraction = max(self._worst_fraction, fraction)
        if fraction > self.max_fraction:
            what = (f"{fraction:.0%} of the gradient ({nonfinite} of {total} entries) was NaN or infinite "
                    f"(timesteps {t.tolist()})")
        elif self.consecutive >= self.max_consecutive:
            what = (f"the gradient had NaN or infinite entries on {self.consecutive} steps in a row "
                    f"(steps {self._first_bad_step}-{step}, up to {self._worst_fraction:.1%} of the entries)")
        else:
            return
        if not latents_finite:
            cause = ("The latents (the VAE encoder's output for finite images) are NaN or infinite: check the "
                     "VAE (or run it in fp32: ComfyUI's --fp32-vae).")
        else:
            cause = "The diffusion model returned NaN or infinite noise predictions. " + _CAUSES
        raise NonFiniteGuidanceError(f"Score distillation stopped at step {step}: {what}. {cause}")


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def sds_loss(latents: torch.Tensor, denoiser: Denoiser, config: SDSConfig, step: int = 0,
             views: Optional[ViewCondition] = None, generator: Optional[torch.Generator] = None,
             baseline: Optional[NoiseBaseline] = None, *, t: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, guard: Optional[NonFiniteGuard] = None) -> SDSOutput:
    """Score distillation loss on latents (see the module docstring for the formulas).

    Args:
        latents: (B, C, h, w) latents, usually ``denoiser.encode(render)``; the
            gradient flows to whatever produced them.
        denoiser: a :class:`~mpod_core.guidance.protocol.Denoiser`.
        config: the :class:`SDSConfig` (validated here).
        step: the optimisation step, for timestep annealing.
        views: the camera of each sample, passed through to the denoiser (and baseline).
        generator: the source of t and noise (None: torch's global generator).
        baseline: the VSD hook: a second noise predictor ``(latents_t, t, views) -> eps``
            subtracted instead of the sampled noise.
        t: (B,) timesteps to use instead of sampling them (tests, deterministic schedules);
            they need not lie in the configured range but must be in [0, T).
        noise: (B, C, h, w) noise to use instead of sampling it.
        guard: the run's :class:`NonFiniteGuard` (None: non-finite entries are only zeroed).

    Returns:
        :class:`SDSOutput`; call ``out.loss.backward()``.

    Raises:
        NonFiniteGuidanceError: from ``guard``, when the guidance is broken.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents: expected (B, C, h, w), got {_shape(latents)}")
    config.validate()
    b = latents.shape[0]
    if views is not None and len(views) != b:
        raise ValueError(f"views: expected {b} cameras (one per latent), got {len(views)}")
    abar_all = denoiser.alphas_cumprod
    num_t = int(abar_all.shape[0])
    device, dtype = latents.device, latents.dtype
    gen_device = generator.device if generator is not None else device

    if t is None:
        lo, hi = timestep_bounds(config, step, num_t)
        t = torch.randint(lo, hi + 1, (b,), generator=generator, device=gen_device)
    else:
        t = torch.as_tensor(t).reshape(-1)
        if t.shape != (b,) or t.is_floating_point():
            raise ValueError(f"t: expected ({b},) integer timesteps, got {_shape(t)} {t.dtype}")
        if (t < 0).any() or (t >= num_t).any():
            raise ValueError(f"t: timesteps must be in [0, {num_t}), got {t.tolist()}")
    t = t.to(device=device, dtype=torch.long)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=dtype)
    elif not isinstance(noise, torch.Tensor) or noise.shape != latents.shape:
        raise ValueError(f"noise: expected {tuple(latents.shape)} like latents, got {_shape(noise)}")
    noise = noise.to(device=device, dtype=dtype)

    abar = abar_all.to(device)[t].to(dtype).reshape(b, 1, 1, 1)
    with torch.no_grad():
        latents_t = abar.sqrt() * latents.detach() + (1.0 - abar).sqrt() * noise
        noise_pred = denoiser.predict_noise(latents_t, t, float(config.guidance_scale), views)
        if noise_pred.shape != latents.shape:
            raise ValueError(f"denoiser.predict_noise returned {tuple(noise_pred.shape)}, "
                             f"expected {tuple(latents.shape)}")
        noise_pred = noise_pred.to(dtype)
        if baseline is None:
            reference = noise
        else:
            reference = baseline(latents_t, t, views)
            if reference.shape != latents.shape:
                raise ValueError(f"baseline returned {tuple(reference.shape)}, "
                                 f"expected {tuple(latents.shape)}")
            reference = reference.to(dtype)
        grad = sds_weight(abar, config.weighting) * (noise_pred - reference)
        nonfinite = int((~torch.isfinite(grad)).sum())
        if guard is not None:
            guard.update(nonfinite, grad.numel(), step, t,
                         latents_finite=nonfinite == 0 or bool(torch.isfinite(latents).all()))
        # A fp16 UNet can overflow at high t; one bad element must not poison the field.
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if config.grad_clip is not None:
            grad = grad.clamp(-config.grad_clip, config.grad_clip)

    target = (latents - grad).detach()
    loss = 0.5 * ((latents - target) ** 2).sum() / b
    return SDSOutput(loss=loss, grad=grad, t=t, noise=noise, noise_pred=noise_pred, nonfinite=nonfinite)


def sds_image_loss(images: torch.Tensor, denoiser: Denoiser, config: SDSConfig, step: int = 0,
                   views: Optional[ViewCondition] = None, generator: Optional[torch.Generator] = None,
                   baseline: Optional[NoiseBaseline] = None, *, t: Optional[torch.Tensor] = None,
                   noise: Optional[torch.Tensor] = None, guard: Optional[NonFiniteGuard] = None) -> SDSOutput:
    """:func:`sds_loss` on ``denoiser.encode(images)``; the gradient reaches ``images``
    through the (differentiable) encoder.

    Args:
        images: (B, 3, H, W) renders in [0, 1] (BCHW, not ComfyUI's BHWC).
        Others: as :func:`sds_loss`.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images: expected (B, 3, H, W) in [0, 1], got {_shape(images)}")
    if guard is not None:
        guard.check_images(images, step)
    latents = denoiser.encode(images)
    return sds_loss(latents, denoiser, config, step, views, generator, baseline, t=t, noise=noise, guard=guard)
