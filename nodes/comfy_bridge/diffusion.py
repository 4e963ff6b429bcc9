"""Denoisers over ComfyUI's MODEL / VAE / CLIP_VISION values (the
:class:`~mpod_core.guidance.protocol.Denoiser` protocol).

* :class:`ComfyTextDenoiser`: SD 1.x / 2.x (eps or v prediction) with
  CONDITIONING from CLIPTextEncode (or anything else that builds SD conds).
* :class:`ComfyZero123Denoiser`: Stable Zero123 (a MODEL with ``cc_projection``),
  conditioned like core ``StableZero123_Conditioning``: CLIP-vision image embeds +
  the camera of each sample relative to the reference view, and the VAE latent
  of the reference image as ``concat_latent_image``; the negative is zeros.

Latent space. ``encode`` returns the latents the diffusion model sees, i.e.
ComfyUI's "processed" space: ``model.model.process_latent_in(mean of the VAE
posterior)`` (for SD 1.x/2.x and Zero123 that is ``0.18215 * z``), which is what
the protocol calls "latents scaled by the VAE's scaling factor" and what
diffusers' SDS code uses. ``predict_noise`` gets noisy latents in that same
space and feeds them to ``apply_model`` without another ``process_latent_in``.

Noise prediction goes through ComfyUI's own sampling code
(``comfy.samplers.process_conds`` + ``sampling_function``), the path KSampler
takes, so ``extra_conds``, ControlNets, hooks, ``model_options`` (CFG
functions, ``transformer_options`` with attention patches from
``set_model_attn2_replace``, wrappers) and LoRA weight patches (applied when
``load_models_gpu`` loads the patcher) all act as they do in sampling. ComfyUI
batches cond and uncond into one ``apply_model`` call when memory allows
(always on CPU). ComfyUI's samplers work in "sigma space"
``x = x0 + sigma * eps``; the DDPM latent ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``
maps to it as ``x = x_t / sqrt(abar)`` with ``sigma_t = sqrt((1 - abar) / abar)``;
``apply_model`` returns the denoised ``x0`` and ``eps = (x - x0) / sigma``.
Guidance in x0 space (``x0_u + s (x0_c - x0_u)``) is the same as in eps space
because eps is affine in x0.

Zero123 camera convention (checked in tests/unit/test_zero123_camera_convention.py
and against core ``StableZero123_Conditioning`` in
tests/integration/test_comfy_denoisers.py): the pack's orbit cameras
(y up, azimuth counter-clockwise seen from above, front on +z) are a proper
rotation of threestudio's (z up, azimuth counter-clockwise from above, front on
+x): ``(x, y, z)_threestudio -> (y, z, x)_pack`` maps threestudio's camera
centre ``(cos e cos a, cos e sin a, sin e)`` onto ours
``(cos e sin a, sin e, cos e cos a)`` for the same (e, a). Zero123 (and
threestudio's zero123 guidance, and ComfyUI's node) take the target camera
relative to the input view: ``delta_elevation = e - e_ref``,
``delta_azimuth = a - a_ref``, embedded as
``[-delta_elevation (rad), sin(delta_azimuth), cos(delta_azimuth), pi/2]``.
So the node's ``elevation``/``azimuth`` widgets are our deltas, unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils

from ..schema import check_image
from ...mpod_core.guidance.protocol import ViewCondition

__all__ = ["ComfyTextDenoiser", "ComfyZero123Denoiser", "zero123_camera_embeddings"]


def zero123_camera_embeddings(delta_elevation: torch.Tensor, delta_azimuth: torch.Tensor,
                              reference_elevation: float = 0.0) -> torch.Tensor:
    """(B,) relative angles in degrees -> (B, 1, 4) Stable Zero123 camera embedding.

    ``[-delta_elevation, sin(delta_azimuth), cos(delta_azimuth), 90 - reference_elevation]``
    (radians): threestudio's ``StableZero123Guidance.get_cond``, whose fourth
    component is the conditioning image's polar angle. With ``reference_elevation
    = 0`` it is exactly ``comfy_extras.nodes_stable3d.camera_embeddings`` (fixed pi/2).
    """
    e = torch.as_tensor(delta_elevation, dtype=torch.float32).reshape(-1)
    a = torch.as_tensor(delta_azimuth, dtype=torch.float32).reshape(-1)
    emb = torch.stack([
        torch.deg2rad((90 - e) - 90),           # Zero123's polar angle is 90 - elevation
        torch.sin(torch.deg2rad(a)),
        torch.cos(torch.deg2rad(a)),
        torch.deg2rad(90 - torch.full_like(e, float(reference_elevation))),  # the reference's polar angle
    ], dim=-1)
    return emb.unsqueeze(1)


def _trainable_copy(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """A copy of ``module`` whose tensors are ordinary (not inference) tensors,
    so autograd can save them for backward; parameters do not require grad."""
    import copy
    with torch.inference_mode(False):
        clone = copy.copy(module)
        clone.__dict__ = dict(module.__dict__)
        clone._parameters = dict(module._parameters)
        clone._buffers = dict(module._buffers)
        clone._modules = {k: _trainable_copy(m, device, dtype) if m is not None else None
                          for k, m in module._modules.items()}
        for k, p in module._parameters.items():
            if p is not None:
                clone._parameters[k] = torch.nn.Parameter(
                    p.detach().to(device=device, dtype=dtype).clone(), requires_grad=False)
        for k, b in module._buffers.items():
            if b is not None:
                clone._buffers[k] = b.detach().to(device=device).clone()
    return clone


def _check_image_batch(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected (B, 3, H, W) images in [0, 1], got {shape}")
    h, w = images.shape[-2:]
    if h % 8 or w % 8 or h < 8 or w < 8:
        raise ValueError(f"{name}: the VAE needs width and height that are multiples of 8 "
                         f"(latents are 1/8 of the image); got {w}x{h}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: the image contains NaN or infinite values")


class _ComfyDenoiser:
    """Shared part: schedule, differentiable encoder, ComfyUI sampling call.

    Use as a context manager (or call :meth:`close`) so the model's patcher is
    cleaned up after the optimisation, as after a KSampler run."""

    kind = "diffusion"

    def __init__(self, model, vae, input_name: str = "model"):
        inner = getattr(model, "model", None)
        if not isinstance(model, comfy.model_patcher.ModelPatcher) or not isinstance(inner, comfy.model_base.BaseModel):
            raise ValueError(f"{input_name}: expected a MODEL (from a checkpoint loader), got {type(model).__name__}")
        mtype = getattr(inner, "model_type", None)
        sampling = getattr(inner, "model_sampling", None)
        if mtype not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION) \
                or not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
            raise ValueError(
                f"{input_name}: score distillation here needs a discrete-time eps- or v-prediction latent "
                f"diffusion model (SD 1.x/2.x, Stable Zero123); this MODEL is "
                f"{type(inner).__name__} with prediction {getattr(mtype, 'name', mtype)} and "
                f"{type(sampling).__name__} sampling (flow / EDM / continuous models are not supported)")
        if inner.latent_format.latent_channels != 4:
            raise ValueError(f"{input_name}: expected a 4-channel latent model (SD 1.x/2.x family), got "
                             f"{inner.latent_format.latent_channels} latent channels")
        if vae is None or not hasattr(vae, "first_stage_model"):
            raise ValueError("vae: a VAE is required (connect the checkpoint loader's VAE output)")
        fsm = vae.first_stage_model
        if not (hasattr(fsm, "encoder") and hasattr(fsm, "quant_conv")) or getattr(vae, "latent_channels", 4) != 4 \
                or getattr(vae, "downscale_ratio", 8) != 8:
            raise ValueError("vae: expected an SD-style KL VAE (4 latent channels, 8x downscale, with quant_conv); "
                             f"got {type(fsm).__name__}")
        self.model = model
        self.inner = inner
        self.vae = vae
        self.device = model.load_device
        sigmas = sampling.sigmas.detach().float().clone()
        self.sigmas = sigmas.to(self.device)
        #: (T,) float32 abar_t = 1 / (1 + sigma_t^2), on the model's device.
        self.alphas_cumprod = (1.0 / (1.0 + sigmas ** 2)).to(self.device)
        # The differentiable encoder copy runs in float32 whatever dtype ComfyUI loaded the VAE
        # in: bf16/fp16 gradients through the encoder are noisy enough to blur the SDS signal.
        self._vae_dtype = torch.float32
        self._vae_device = vae.device
        self._encoder = _trainable_copy(fsm.encoder, self._vae_device, self._vae_dtype).eval()
        self._quant_conv = _trainable_copy(fsm.quant_conv, self._vae_device, self._vae_dtype).eval()
        self._prepared = False
        self._model_options = None
        self._loaded = []
        self.calls = 0

    # -------------------------------------------------------------- encoder
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 4, H/8, W/8) processed latents, differentiable."""
        _check_image_batch(images)
        x = (images * 2.0 - 1.0).to(device=self._vae_device, dtype=self._vae_dtype)
        z = self._quant_conv(self._encoder(x))
        mean = z[:, :4].float()  # posterior mode, as ComfyUI's VAE.encode
        return self.inner.process_latent_in(mean).to(images.device)

    # ------------------------------------------------------------ sampling
    def _conds(self, views: Optional[ViewCondition], batch: int, height: int, width: int) -> dict:
        """{"positive": [...], "negative": [...]} ComfyUI conds for a batch (each subclass builds its own)."""
        raise TypeError(f"{type(self).__name__} does not define its conditioning")

    def _prepare(self, conds: dict, shape) -> None:
        if self._prepared:
            return
        self._model_options = comfy.model_patcher.create_model_options_clone(self.model.model_options)
        self._model_options.setdefault("transformer_options", {})
        comfy.sampler_helpers.prepare_model_patcher(self.model, conds, self._model_options)
        _, _, self._loaded = comfy.sampler_helpers.prepare_sampling(
            self.model, (2 * shape[0],) + tuple(shape[1:]), conds, self._model_options)
        self.model.pre_run()
        self._prepared = True

    def _call_options(self, views: Optional[ViewCondition]) -> dict:
        """The model options of one prediction: the prepared ones, plus the views' per-view extras in
        a copy of ``transformer_options`` (so they reach attention patches for this call only)."""
        if views is None or not views.extras:
            return self._model_options
        options = dict(self._model_options)
        options["transformer_options"] = {**self._model_options["transformer_options"],
                                          **{k: v.to(self.device) for k, v in views.extras.items()}}
        return options

    def _ensure_own_weights(self) -> None:
        """Reload the MODEL when another patcher of the same weights (a clone with other LoRA patches, e.g. the
        other prior of DSD Refine) was loaded since: ComfyUI patches weights in place, one patch set at a time,
        and ``load_models_gpu`` swaps them (it unloads the other clone and applies this one's patches)."""
        current = getattr(self.inner, "current_weight_patches_uuid", None)
        if current is not None and current != self.model.patches_uuid:
            comfy.model_management.load_models_gpu([self.model])

    def close(self) -> None:
        """Release what sampling set up (hooks, current patcher, extra models)."""
        if self._prepared:
            self._prepared = False
            try:
                self.model.cleanup()
            finally:
                comfy.sampler_helpers.cleanup_models({}, self._loaded)
                self._loaded = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, guidance_scale: float,
                      views: Optional[ViewCondition] = None) -> torch.Tensor:
        if latents_t.ndim != 4 or latents_t.shape[1] != 4:
            raise ValueError(f"latents_t: expected (B, 4, h, w), got {tuple(latents_t.shape)}")
        b, _, h, w = latents_t.shape
        if views is not None and len(views) != b:
            raise ValueError(f"views: expected {b} cameras, got {len(views)}")
        out_device = latents_t.device
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(b)
        sigma = self.sigmas[t]
        abar = self.alphas_cumprod[t].reshape(b, 1, 1, 1)
        x = (latents_t.to(self.device, torch.float32) / abar.sqrt())
        conds = self._conds(views, b, h, w)
        self._prepare(conds, x.shape)
        self._ensure_own_weights()
        with torch.no_grad():
            conds = comfy.samplers.process_conds(self.inner, x, conds, self.device)
            x0 = comfy.samplers.sampling_function(self.inner, x, sigma, conds.get("negative"),
                                                  conds.get("positive"), float(guidance_scale),
                                                  model_options=self._call_options(views), seed=None)
            eps = (x - x0.float()) / sigma.reshape(b, 1, 1, 1)
        self.calls += 1
        return eps.to(out_device, torch.float32)


class ComfyTextDenoiser(_ComfyDenoiser):
    """SD 1.x / 2.x MODEL + VAE + positive/negative CONDITIONING."""

    kind = "text"

    def __init__(self, model, vae, positive, negative=None):
        super().__init__(model, vae)
        if getattr(self.inner, "concat_keys", ()) or isinstance(self.inner, comfy.model_base.Stable_Zero123):
            raise ValueError("model: this MODEL needs image conditioning (e.g. Stable Zero123 or an inpainting "
                             "model); for Zero123 connect clip_vision and reference_image instead of text")
        for name, cond in (("positive", positive), ("negative", negative)):
            if cond is None and name == "negative":
                continue
            if not isinstance(cond, list) or not cond or not all(isinstance(c, (list, tuple)) and len(c) == 2
                                                                 for c in cond):
                raise ValueError(f"{name}: expected CONDITIONING (e.g. from CLIP Text Encode), "
                                 f"got {type(cond).__name__}")
        if negative is None:  # an empty prompt's stand-in: zeros like ComfyUI's ConditioningZeroOut
            negative = [[torch.zeros_like(c[0]), {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v)
                                                   for k, v in c[1].items()}] for c in positive]
        self._positive = comfy.sampler_helpers.convert_cond(positive)
        self._negative = comfy.sampler_helpers.convert_cond(negative)

    def _conds(self, views, batch, height, width) -> dict:
        return {"positive": [c.copy() for c in self._positive], "negative": [c.copy() for c in self._negative]}


class ComfyZero123Denoiser(_ComfyDenoiser):
    """Stable Zero123 MODEL + CLIP_VISION + VAE, conditioned on a reference image.

    Args:
        reference_image: ComfyUI IMAGE (B, H, W, C >= 3); the first image is used.
        reference_view: the reference image's camera in the pack's convention,
            a :class:`ViewCondition` (first entry used) or ``(elevation, azimuth[, distance])``.
    """

    kind = "zero123"

    def __init__(self, model, clip_vision, vae, reference_image: torch.Tensor,
                 reference_view: Union[ViewCondition, Sequence[float]] = (0.0, 0.0)):
        if clip_vision is None or not hasattr(clip_vision, "encode_image"):
            raise ValueError("clip_vision: Zero123 guidance needs the CLIP_VISION output of "
                             "Image Only Checkpoint Loader (or Load CLIP Vision); none was connected")
        super().__init__(model, vae)
        if not hasattr(self.inner, "cc_projection"):
            raise ValueError("model: this MODEL has no cc_projection, so it is not a Stable Zero123 model; "
                             "load stable_zero123.ckpt with Image Only Checkpoint Loader, or use text mode "
                             "(positive/negative) for SD models")
        img = check_image(reference_image, "Zero123 guidance", "reference_image")
        if not torch.isfinite(img).all():
            raise ValueError("reference_image: the image contains NaN or infinite values")
        self.reference_image = img[:1, :, :, :3].float()
        if isinstance(reference_view, ViewCondition):
            ref_e, ref_a = float(reference_view.elevation.reshape(-1)[0]), float(reference_view.azimuth.reshape(-1)[0])
        else:
            vals = list(reference_view)
            if len(vals) < 2:
                raise ValueError("reference_view: expected (elevation, azimuth[, distance]) in degrees")
            ref_e, ref_a = float(vals[0]), float(vals[1])
        if not (math.isfinite(ref_e) and math.isfinite(ref_a)):
            raise ValueError(f"reference_view: angles must be finite, got ({ref_e}, {ref_a})")
        self.reference_elevation, self.reference_azimuth = ref_e, ref_a
        with torch.no_grad():
            output = clip_vision.encode_image(self.reference_image)
        #: (1, 1, D) CLIP-vision image embedding, as StableZero123_Conditioning's ``pooled``.
        self.pooled = output.image_embeds.unsqueeze(0).float()
        self._concat_cache: dict = {}

    def reference_latent(self, height: int, width: int) -> torch.Tensor:
        """VAE latent of the reference image resized to the render size (``8h x 8w``),
        exactly as StableZero123_Conditioning computes ``concat_latent_image``."""
        key = (height, width)
        if key not in self._concat_cache:
            with torch.no_grad():
                pixels = comfy.utils.common_upscale(self.reference_image.movedim(-1, 1), width * 8, height * 8,
                                                    "bilinear", "center").movedim(1, -1)
                self._concat_cache[key] = self.vae.encode(pixels[:, :, :, :3])
        return self._concat_cache[key]

    def camera_conditioning(self, views: Optional[ViewCondition], batch: int) -> torch.Tensor:
        """(B, 1, D + 4): CLIP image embeds + the camera of each view relative to the reference."""
        if views is None:
            de = torch.zeros(batch)
            da = torch.zeros(batch)
        else:
            de = views.elevation.detach().float().cpu().reshape(-1) - self.reference_elevation
            da = views.azimuth.detach().float().cpu().reshape(-1) - self.reference_azimuth
        cam = zero123_camera_embeddings(de, da, self.reference_elevation).to(self.pooled.device)
        return torch.cat([self.pooled.repeat(batch, 1, 1), cam], dim=-1)

    def _conds(self, views, batch, height, width) -> dict:
        latent = self.reference_latent(height, width)
        cond = self.camera_conditioning(views, batch)
        positive = [[cond, {"concat_latent_image": latent}]]
        negative = [[torch.zeros_like(self.pooled), {"concat_latent_image": torch.zeros_like(latent)}]]
        return {"positive": comfy.sampler_helpers.convert_cond(positive),
                "negative": comfy.sampler_helpers.convert_cond(negative)}
