"""Training through ComfyUI's SD 1.x / 2.x MODEL, CLIP and VAE: what textual inversion and the
theme fine-tune share.

Gradients. Nodes run under ``torch.inference_mode()`` and the loaders' weights
are inference tensors, which autograd refuses to save for backward. So the
adapter makes one ordinary-tensor float32 copy of the UNet (``diffusion_model``)
and of the text encoder (``_trainable_copy``, parameters frozen) after ComfyUI
has loaded them, with any weight patches (LoRA) applied, and the node runs the
loop under ``torch.inference_mode(False)`` + ``torch.enable_grad()``. The MODEL
and CLIP the user wired in are only read. (ComfyUI's other route, an identity
weight wrapper on every weight through ``ModelPatcher.add_weight_wrapper`` as
core Train LoRA does, copies every weight on every forward instead; the
backward then holds those copies anyway, so the peak memory is the same and the
per-step copy is pure cost; see ``bench/README.md``.)

UNet. Called as ``diffusion_model(x_t, t, context=...)`` with DDPM latents and
integer timesteps: for SD 1.x/2.x that is what ``BaseModel._apply_model`` feeds
it (``calculate_input`` turns sigma-space x into x_t; ``timestep(sigma)`` gives
t), and the raw output is the model's eps or v. ``model_options`` patches
(attention replacements, CFG functions) act at sampling, not here.

Text. The copy is the checkpoint's ``SDClipModel`` (CLIP-L or OpenCLIP-H) with
``CLIPSetLastLayer`` (``clip.layer_idx``) applied as ``CLIP.encode_from_tokens``
applies it, fed the token lists of ComfyUI's own tokenizer.
"""
from __future__ import annotations

import torch

import comfy.clip_model
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd1_clip

from .diffusion import _trainable_copy

__all__ = ["ComfySDTraining"]


def _out_of_place_clip_layers(text_encoder: torch.nn.Module) -> None:
    """Give every ``CLIPLayer`` of (our copy of) the text encoder an out-of-place residual forward.

    ComfyUI's ``CLIPLayer.forward`` adds its residuals in place (``x += attn(norm(x))``), which
    overwrites the input its LayerNorm saved for backward; autograd then refuses the backward. The
    replacement computes the same sums into new tensors. Only the copy's instances are changed."""
    for layer in text_encoder.modules():
        if isinstance(layer, comfy.clip_model.CLIPLayer):
            def forward(x, mask=None, optimized_attention=None, layer=layer):
                x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
                return x + layer.mlp(layer.layer_norm2(x))
            layer.forward = forward


class ComfySDTraining:
    """SD 1.x / 2.x MODEL + its CLIP + VAE, copied for training (module docstring).

    Args:
        model, clip, vae: from a checkpoint loader (only read).
        purpose: the feature's name, for error messages ("textual inversion", ...).
        text_encoder: also copy the text encoder (False: the UNet alone; ``encode_text`` is then unavailable).

    Raises:
        ValueError: naming the input, for a MODEL that is not an SD 1.x/2.x eps/v text-to-image model
            (SDXL, flow, inpainting, ...), a CLIP that is not its single CLIP-L / OpenCLIP-H text
            encoder, or a VAE without an encoder of 4 latent channels.
    """

    def __init__(self, model, clip, vae, purpose: str, text_encoder: bool = True):
        inner = getattr(model, "model", None)
        if not isinstance(model, comfy.model_patcher.ModelPatcher) or not isinstance(inner, comfy.model_base.BaseModel):
            raise ValueError(f"model: expected a MODEL from a checkpoint loader, got {type(model).__name__}")
        unet_config = getattr(getattr(inner, "model_config", None), "unet_config", {}) or {}
        context_dim = unet_config.get("context_dim")
        mtype = getattr(inner, "model_type", None)
        if type(inner) is not comfy.model_base.BaseModel or context_dim not in (768, 1024) \
                or unet_config.get("adm_in_channels") is not None:
            raise ValueError(
                f"model: {purpose} here supports SD 1.x (CLIP-L, 768) and SD 2.x (OpenCLIP-H, 1024) "
                f"models; this MODEL is {type(inner).__name__} with context width {context_dim} (SDXL's two text "
                "encoders, SD3, Flux and video models are not supported)")
        if mtype not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION) \
                or not isinstance(inner.model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
            raise ValueError(f"model: needs a discrete-time eps- or v-prediction model; this one predicts "
                             f"{getattr(mtype, 'name', mtype)} with {type(inner.model_sampling).__name__} sampling "
                             "(flow / EDM / continuous models are not supported)")
        if unet_config.get("in_channels", 4) != 4 or getattr(inner, "concat_keys", ()):
            raise ValueError("model: an inpainting / image-conditioned model (more than 4 input channels); "
                             "use the text-to-image checkpoint")
        cond = getattr(clip, "cond_stage_model", None)
        if not isinstance(cond, comfy.sd1_clip.SD1ClipModel) or getattr(cond, "clip", None) not in ("clip_l", "clip_h"):
            raise ValueError(f"clip: expected the CLIP of an SD 1.x/2.x checkpoint (one CLIP-L or OpenCLIP-H text "
                             f"encoder), got {type(cond).__name__}")
        encoder = getattr(cond, cond.clip)
        width = encoder.transformer.get_input_embeddings().weight.shape[1]
        if width != context_dim:
            raise ValueError(f"clip: its text encoder is {width} wide but the MODEL expects {context_dim}; connect "
                             "the CLIP of the same checkpoint")
        if vae is None or not hasattr(vae, "encode") or getattr(vae, "latent_channels", 4) != 4:
            raise ValueError("vae: expected the checkpoint's VAE (4 latent channels)")
        self.model, self.inner, self.clip, self.vae = model, inner, clip, vae
        self.clip_name = cond.clip
        self.prediction_type = "v" if mtype == comfy.model_base.ModelType.V_PREDICTION else "eps"
        self.embedding_dim = int(width)
        self.device = model.load_device
        sigmas = inner.model_sampling.sigmas.detach().float().clone()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
        # Load as sampling does (weight patches such as LoRA applied), then copy once.
        comfy.model_management.load_models_gpu([model])
        self.unet = _trainable_copy(inner.diffusion_model, self.device, torch.float32).eval()
        if hasattr(self.unet, "dtype"):
            self.unet.dtype = torch.float32
        self.text = None
        if not text_encoder:  # e.g. a VSD score, conditioned on contexts computed by ComfyUI's own CLIP
            return
        clip.load_model()
        self.text_device = clip.patcher.load_device
        self.text = _trainable_copy(encoder, self.text_device, torch.float32).eval()
        _out_of_place_clip_layers(self.text)
        self.text.reset_clip_options()
        if clip.layer_idx is not None:  # CLIPSetLastLayer, as CLIP.encode_from_tokens applies it
            self.text.set_clip_options({"layer": clip.layer_idx})
        self._tokenizer_key = clip.tokenizer.clip_name
        self._bpe = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer

    def _token_ids(self, text: str):
        """ComfyUI's token list of ``text`` (one CLIP context; prompt weights are dropped)."""
        sections = self.clip.tokenize(text)[self._tokenizer_key]
        if len(sections) != 1:
            raise ValueError(f"prompt {text!r} is longer than one CLIP context (77 tokens)")
        return [tok for tok, _ in sections[0]]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 4, H/8, W/8) latents as the UNet sees them (``process_latent_in``)."""
        with torch.no_grad():
            raw = self.vae.encode(images.movedim(1, -1).float())
            return self.inner.process_latent_in(raw.float()).to(self.device)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (eps or v) for DDPM latents at integer timesteps."""
        out = self.unet(x_t.to(self.device, torch.float32), t.to(self.device).float(),
                        context=context.to(self.device, torch.float32), transformer_options={})
        return out.float()
