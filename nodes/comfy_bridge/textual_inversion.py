"""Textual inversion over ComfyUI's MODEL / CLIP / VAE (the core's
:class:`~mpod_core.guidance.textual_inversion.TextualInversionModel` protocol).

Gradients. Nodes run under ``torch.inference_mode()`` and the loaders' weights
are inference tensors, which autograd refuses to save for backward; yet the
token's gradient must pass through the whole UNet (to the context) and the CLIP
text transformer (to the token row). So the adapter makes one ordinary-tensor
float32 copy of the UNet (``diffusion_model``) and of the text encoder
(``_trainable_copy``, parameters frozen) after ComfyUI has loaded them, with
any weight patches (LoRA) applied, and the node runs the loop under
``torch.inference_mode(False)`` + ``torch.enable_grad()``. The MODEL and CLIP
the user wired in are only read. (ComfyUI's other route, an identity weight
wrapper on every weight through ``ModelPatcher.add_weight_wrapper`` as core
Train LoRA does, copies every weight on every forward instead; the backward
then holds those copies anyway, so the peak memory is the same and the per-step
copy is pure cost; see ``bench/README.md``.)

Text. ComfyUI's own tokenizer and ``SDClipModel.process_tokens`` place a tensor
given in the token list at its position (how ``embedding:NAME`` works), so a
template is tokenized with a one-token marker word where ``{}`` is, and the
marker's id is replaced by the trainable tensor: the context is exactly what
core CLIP Text Encode computes for the saved file as ``embedding:NAME`` (CLIP's
BPE splits at spaces, so the words around it tokenize alike), including
``CLIPSetLastLayer`` (``clip.layer_idx``) and SD 2.x's penultimate layer.

UNet. Called as ``diffusion_model(x_t, t, context=...)`` with DDPM latents and
integer timesteps: for SD 1.x/2.x that is what ``BaseModel._apply_model`` feeds
it (``calculate_input`` turns sigma-space x into x_t; ``timestep(sigma)`` gives
t), and the raw output is the model's eps or v. ``model_options`` patches
(attention replacements, CFG functions) act at sampling, not here.
"""
from __future__ import annotations

import functools
import numbers
from typing import List, Sequence

import torch

import comfy.clip_model
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd1_clip

from .diffusion import _trainable_copy

__all__ = ["ComfyTextualInversionModel", "count_clip_tokens"]

#: A single CLIP token standing for ``{}`` while tokenizing; any word would do that is one token and
#: absent from the templates (checked on every prompt).
MARKER = "sks"


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    """ComfyUI's CLIP BPE tokenizer (``comfy/sd1_tokenizer``; SD 2.x's OpenCLIP uses the same vocabulary)."""
    return comfy.sd1_clip.SDTokenizer().tokenizer


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


def count_clip_tokens(word: str) -> int:
    """Number of CLIP tokens of ``word`` (without start/end), as ComfyUI's tokenizer splits it."""
    return len(_clip_bpe()(word)["input_ids"]) - 2


class ComfyTextualInversionModel:
    """SD 1.x / 2.x MODEL + its CLIP + VAE, for :func:`~mpod_core.guidance.textual_inversion.train_textual_inversion`.

    Raises:
        ValueError: naming the input, for a MODEL that is not an SD 1.x/2.x eps/v text-to-image model
            (SDXL, flow, inpainting, ...), a CLIP that is not its single CLIP-L / OpenCLIP-H text
            encoder, or a VAE without an encoder of 4 latent channels.
    """

    def __init__(self, model, clip, vae):
        inner = getattr(model, "model", None)
        if not isinstance(model, comfy.model_patcher.ModelPatcher) or not isinstance(inner, comfy.model_base.BaseModel):
            raise ValueError(f"model: expected a MODEL from a checkpoint loader, got {type(model).__name__}")
        unet_config = getattr(getattr(inner, "model_config", None), "unet_config", {}) or {}
        context_dim = unet_config.get("context_dim")
        mtype = getattr(inner, "model_type", None)
        if type(inner) is not comfy.model_base.BaseModel or context_dim not in (768, 1024) \
                or unet_config.get("adm_in_channels") is not None:
            raise ValueError(
                f"model: textual inversion here supports SD 1.x (CLIP-L, 768) and SD 2.x (OpenCLIP-H, 1024) "
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
        clip.load_model()
        self.text_device = clip.patcher.load_device
        self.text = _trainable_copy(encoder, self.text_device, torch.float32).eval()
        _out_of_place_clip_layers(self.text)
        self.text.reset_clip_options()
        if clip.layer_idx is not None:  # CLIPSetLastLayer, as CLIP.encode_from_tokens applies it
            self.text.set_clip_options({"layer": clip.layer_idx})
        self._tokenizer_key = clip.tokenizer.clip_name
        self._bpe = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer
        marker = self._bpe(MARKER)["input_ids"][1:-1]
        assert len(marker) == 1, "the marker word must be one CLIP token"
        self._marker = marker[0]

    # ------------------------------------------------------------ the token
    def token_embedding(self, word: str, input_name: str = "initializer_word") -> torch.Tensor:
        """(D,) float32 input embedding of ``word``, which must be a single CLIP token."""
        ids = self._bpe(word)["input_ids"][1:-1]
        if len(ids) != 1:
            raise ValueError(f"{input_name}: {word!r} is {len(ids)} CLIP tokens; it must be a single token "
                             "(a common word such as 'dog', 'chair', 'toy')")
        table = self.text.transformer.get_input_embeddings().weight
        return table[ids[0]].detach().float().cpu().clone()

    def _tokens(self, template: str, embedding: torch.Tensor) -> List:
        text = template.replace("{}", MARKER)
        sections = self.clip.tokenize(text)[self._tokenizer_key]
        if len(sections) != 1:
            raise ValueError(f"prompt {template!r} is longer than one CLIP context (77 tokens)")
        ids = [tok for tok, _ in sections[0]]
        if sum(1 for tok in ids if isinstance(tok, numbers.Integral) and tok == self._marker) != 1:
            raise ValueError(f"prompt {template!r} must hold '{{}}' once and not the word {MARKER!r}")
        return [embedding if isinstance(tok, numbers.Integral) and tok == self._marker else tok for tok in ids]

    # -------------------------------------------------------- the protocol
    def encode_text(self, templates: Sequence[str], embedding: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) context, differentiable w.r.t. ``embedding`` (D,)."""
        tokens = [self._tokens(t, embedding) for t in templates]
        z, _ = self.text(tokens)[:2]
        return z.to(self.device)

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
