"""Dual score distillation (DSD, ThemeStation §3.3, eq. 3): two theme priors guide one 3D model.

Each optimisation step renders the model's colour image and its normal map once, encodes each
once, and sums score-distillation terms, each with its own denoiser, timestep range, weight and
(for VSD) noise baseline::

    loss = Σ_k  weight_k · SDS(latents[kind_k]; denoiser_k, t_k ~ U[lo_k, hi_k], eps_k, baseline_k)

so ``d loss / d latents[kind] = Σ_{k: kind_k = kind} weight_k · grad_k / B`` with ``grad_k`` the
per-term gradient of :func:`~mpod_core.guidance.sds.sds_loss` (its own ``t`` and noise, drawn in
the terms' order from one generator). ThemeStation's terms (official ``systems/themestation.py``,
``configs/theme-station-optimization.yaml``), built by :func:`themestation_terms`:

==========  ========  ===================  ======  ==============================================
prior       render    t / T                weight  role
==========  ========  ===================  ======  ==============================================
concept     colour    [0.50, 0.75]         0.2     high noise: the concept's identity and layout
reference   colour    [0.10, 0.25]         1.0     low noise: the theme's details
reference   normal    [0.10, 0.25]         1.0     the same prior on the "..., normal map" prompt
==========  ========  ===================  ======  ==============================================

The concept prior never sees the normal render (it was fine-tuned on colour images only). With
VSD (``baseline`` set, :class:`~mpod_core.guidance.vsd.VSDScore`) a LoRA copy of each prior,
trained on the current renders, predicts the render's own score; with plain SDS the sampled
noise is the baseline. Classifier-free guidance 7.5 for both priors (official ``guidance_scale``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from ..configdoc import limits
from .protocol import Denoiser, NoiseBaseline, ViewCondition
from .sds import NonFiniteGuard, SDSConfig, SDSOutput, sds_loss

#: The renders a term can read.
RENDER_KINDS: Tuple[str, ...] = ("color", "normal")
Score = Literal["vsd", "sds"]
SCORES: Tuple[str, ...] = ("vsd", "sds")


@dataclass
class DSDTerm:
    """One score-distillation term of :func:`dsd_loss`.

    Attributes:
        prior: the prior's name ("concept", "reference"), for names and the loss map.
        kind: which render it reads, one of :data:`RENDER_KINDS`.
        denoiser: the prior (its prompt bound), a :class:`~mpod_core.guidance.protocol.Denoiser`.
        min_step, max_step: its timestep range, fractions of T.
        weight: its weight in the sum.
        guidance_scale: the prior's classifier-free guidance.
        baseline: VSD's noise baseline for this prior and render (None: SDS).
    """

    prior: str
    kind: str
    denoiser: Denoiser
    min_step: float
    max_step: float
    weight: float
    guidance_scale: float = 7.5
    baseline: Optional[NoiseBaseline] = None

    @property
    def name(self) -> str:
        return f"{self.prior}_{self.kind}"

    def sds_config(self) -> SDSConfig:
        """The term's :class:`SDSConfig` (DreamFusion's w(t) = 1 - abar, as threestudio's VSD guidance)."""
        return SDSConfig(guidance_scale=self.guidance_scale, min_step=self.min_step, max_step=self.max_step)

    def validate(self) -> None:
        if self.kind not in RENDER_KINDS:
            raise ValueError(f"DSD term {self.prior}: kind must be one of {', '.join(RENDER_KINDS)}, got {self.kind!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"DSD term {self.name}: weight must be a finite number >= 0, got {self.weight}")
        try:
            self.sds_config().validate()
        except ValueError as e:
            raise ValueError(f"DSD term {self.name}: {e}") from None


@dataclass
class DSDConfig:
    """ThemeStation's dual score distillation settings; each default names its source."""

    concept_min_step: float = field(default=0.5, metadata=limits(0.0, 1.0, 0.01))
    """Concept prior's lowest timestep, fraction of T (theme-station-optimization.yaml guidance.min_step_percent: 0.5;
    paper §3.3: the concept prior at large t)."""
    concept_max_step: float = field(default=0.75, metadata=limits(0.0, 1.0, 0.01))
    """Concept prior's highest timestep (theme-station-optimization.yaml guidance.max_step_percent: 0.75)."""
    reference_min_step: float = field(default=0.1, metadata=limits(0.0, 1.0, 0.01))
    """Reference prior's lowest timestep (theme-station-optimization.yaml ref_guidance.min_step_percent: 0.1; paper §3.3: small t)."""
    reference_max_step: float = field(default=0.25, metadata=limits(0.0, 1.0, 0.01))
    """Reference prior's highest timestep (theme-station-optimization.yaml ref_guidance.max_step_percent: 0.25)."""
    concept_weight: float = field(default=0.2, metadata=limits(0.0, 100.0, 0.05))
    """Weight of the concept prior's term (theme-station-optimization.yaml loss.lambda_vsd: 0.2)."""
    reference_weight: float = field(default=1.0, metadata=limits(0.0, 100.0, 0.05))
    """Weight of each reference-prior term, colour and normal (theme-station-optimization.yaml loss.lambda_ref_vsd: 1.0)."""
    guidance_scale: float = field(default=7.5, metadata=limits(0.1, 100.0, 0.1))
    """Classifier-free guidance of both priors (theme-station-optimization.yaml guidance.guidance_scale and ref_guidance.guidance_scale: 7.5)."""
    score: Score = field(default="vsd", metadata=limits(options=SCORES))
    """vsd: a LoRA copy of each prior trained on the renders predicts their score (ThemeStation's
    stable-diffusion-vsd-guidance); sds: the sampled noise instead (cheaper: no training, no copy)."""

    def validate(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        for prior in ("concept", "reference"):
            w = getattr(self, f"{prior}_weight")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{prior}_weight must be a finite number >= 0, got {w!r}")
            try:
                SDSConfig(guidance_scale=self.guidance_scale, min_step=getattr(self, f"{prior}_min_step"),
                          max_step=getattr(self, f"{prior}_max_step")).validate()
            except ValueError as e:
                raise ValueError(f"{prior} prior: {str(e).replace('min_step', f'{prior}_min_step')}") from None


def themestation_terms(config: DSDConfig, concept: Denoiser, reference: Denoiser, reference_normal: Denoiser,
                       baselines: Optional[Mapping[str, NoiseBaseline]] = None) -> List[DSDTerm]:
    """ThemeStation's three terms (module docstring): concept·colour, reference·colour, reference·normal.

    Args:
        config: the :class:`DSDConfig`.
        concept: the concept prior with its colour prompt bound.
        reference: the reference prior with its colour prompt bound.
        reference_normal: the reference prior with its normal-map prompt bound.
        baselines: VSD baselines by term name (``concept_color``, ``reference_color``,
            ``reference_normal``); None or a missing name: SDS for that term.
    """
    config.validate()
    baselines = dict(baselines or {})
    c = ("concept", config.concept_min_step, config.concept_max_step, config.concept_weight)
    r = ("reference", config.reference_min_step, config.reference_max_step, config.reference_weight)
    terms = [DSDTerm(c[0], "color", concept, *c[1:], config.guidance_scale),
             DSDTerm(r[0], "color", reference, *r[1:], config.guidance_scale),
             DSDTerm(r[0], "normal", reference_normal, *r[1:], config.guidance_scale)]
    for term in terms:
        term.baseline = baselines.pop(term.name, None)
    if baselines:
        raise ValueError(f"baselines for unknown DSD terms: {', '.join(sorted(baselines))}")
    return terms


#: The concept prior's prompt (official: the concept prior's caption "a 3d model of sks {obj}").
CONCEPT_PROMPT = "a 3d model of {token} {object}"
#: The reference prior's prompt (official: the exemplar renders' caption), the normal map's adds ", normal map".
REFERENCE_PROMPT = "a 3d model of {object}, in the style of {token}"
NORMAL_SUFFIX = ", normal map"


def dsd_prompts(object_name: str, token: str, concept: str = CONCEPT_PROMPT,
                reference: str = REFERENCE_PROMPT) -> Dict[str, str]:
    """The three prompts, ``{object}`` and ``{token}`` filled in: ``concept_color``, ``reference_color`` and
    ``reference_normal`` (the reference prompt + ", normal map", Render Exemplars' normal-map caption).

    Raises:
        ValueError: an empty token or object, or a prompt without the theme token (the priors learned the
            theme under it, so a prompt without it asks the prior for something else).
    """
    object_name, token = str(object_name).strip(), str(token).strip()
    if not token or not object_name:
        raise ValueError("token and object must not be empty (the theme token the priors were fine-tuned with, "
                         "and what the model is)")
    prompts = {}
    for name, template in (("concept", concept), ("reference", reference)):
        try:
            text = template.format(object=object_name, token=token)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{name}_prompt: only {{object}} and {{token}} can be filled in ({e})") from None
        if not any(word.strip(",.;:!?") == token for word in text.split()):
            raise ValueError(f"{name}_prompt {text!r} lacks the theme token {token!r}: the {name} prior was "
                             "fine-tuned with it (Theme Finetune's captions), so put {token} in the prompt")
        prompts[name] = text
    return {"concept_color": prompts["concept"], "reference_color": prompts["reference"],
            "reference_normal": prompts["reference"] + NORMAL_SUFFIX}


@dataclass
class DSDOutput:
    """What one :func:`dsd_loss` evaluation produced."""

    loss: torch.Tensor
    """Scalar: ``Σ weight_k · loss_k``."""
    terms: Dict[str, SDSOutput]
    """Each term's :class:`SDSOutput` (its unweighted loss, gradient, t and noise) by name."""


def dsd_loss(latents: Mapping[str, torch.Tensor], terms: Sequence[DSDTerm], step: int = 0,
             views: Optional[ViewCondition] = None, generator: Optional[torch.Generator] = None,
             guards: Optional[Mapping[str, NonFiniteGuard]] = None) -> DSDOutput:
    """The dual score-distillation loss (module docstring).

    Args:
        latents: ``{kind: (B, C, h, w)}``, each render encoded once (the gradient flows to them).
        terms: the terms, e.g. :func:`themestation_terms`.
        step: the optimisation step (for the guards' messages).
        views: the camera of each sample, passed to every denoiser and baseline.
        generator: the source of every term's t and noise, drawn in the terms' order.
        guards: one :class:`NonFiniteGuard` per term name (a broken prior is named by its term).

    Returns:
        :class:`DSDOutput`.

    Raises:
        ValueError: a term reads a render that ``latents`` lacks, or a bad term.
    """
    if not terms:
        raise ValueError("dual score distillation needs at least one term")
    total = None
    outputs: Dict[str, SDSOutput] = {}
    for term in terms:
        term.validate()
        if term.kind not in latents:
            raise ValueError(f"DSD term {term.name} reads the {term.kind} render, which was not given "
                             f"(given: {', '.join(latents) or 'none'})")
        if term.name in outputs:
            raise ValueError(f"two DSD terms are named {term.name}")
        guard = guards.get(term.name) if guards is not None else None
        out = sds_loss(latents[term.kind], term.denoiser, term.sds_config(), step, views, generator,
                       term.baseline, guard=guard)
        outputs[term.name] = out
        weighted = term.weight * out.loss
        total = weighted if total is None else total + weighted
    return DSDOutput(loss=total, terms=outputs)


__all__ = ["CONCEPT_PROMPT", "NORMAL_SUFFIX", "REFERENCE_PROMPT", "dsd_prompts", "DSDConfig", "DSDOutput", "DSDTerm", "RENDER_KINDS", "SCORES", "Score", "dsd_loss", "themestation_terms"]
