"""MRCA as a ComfyUI attention patch: the maths is :mod:`mpod_core.guidance.mrca`.

* :func:`cross_attention_sites` walks a UNet for its cross-attention layers
  (the ``(block, id, transformer index)`` keys of ``set_model_attn2_replace``).
* :func:`token_columns` tokenizes the prompt with the CLIP that encodes it and
  finds the context columns of a word or ``embedding:NAME``.
* :class:`MRCAPatch` is the ``attn2`` replacement: ``(q, k, v, extra_options)``
  with projected queries/keys/values; it reads the mask of the call from
  ``extra_options[MASK_OPTION_KEY]`` (a per-view mask put in
  ``transformer_options`` by the caller) or falls back to its static mask, and
  rectifies only the conditional chunks (``cond_or_uncond`` = 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_base
import comfy.model_patcher
import comfy.model_sampling

from ...mpod_core.guidance.mrca import MASK_OPTION_KEY, RESIZE_MODES, confined_columns, layer_mask, \
    rectified_attention

__all__ = ["MASK_OPTION_KEY", "MRCAPatch", "TokenColumns", "apply_mrca", "check_sd_model", "cross_attention_sites",
           "token_columns"]


def check_sd_model(model, input_name: str = "model") -> None:
    """Refuse anything but an SD 1.x / 2.x UNet (discrete eps/v, one CLIP text encoder's context)."""
    inner = getattr(model, "model", None)
    if not isinstance(model, comfy.model_patcher.ModelPatcher) or not isinstance(inner, comfy.model_base.BaseModel):
        raise ValueError(f"{input_name}: expected a MODEL (from a checkpoint loader), got {type(model).__name__}")
    unet = getattr(inner, "diffusion_model", None)
    sd_family = type(inner) in (comfy.model_base.BaseModel, comfy.model_base.SD21UNCLIP) \
        and isinstance(unet, openaimodel.UNetModel) \
        and isinstance(getattr(inner, "model_sampling", None), comfy.model_sampling.ModelSamplingDiscrete) \
        and inner.model_type in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION)
    if not sd_family:
        raise ValueError(f"{input_name}: MRCA supports SD 1.x / 2.x UNets (one CLIP text encoder, discrete eps or v "
                         f"prediction); this MODEL is {type(inner).__name__} with prediction "
                         f"{getattr(inner.model_type, 'name', inner.model_type)} (SDXL, flow and DiT models "
                         f"are not supported)")


def cross_attention_sites(diffusion_model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """The ``(block, id, transformer index)`` key of every cross-attention layer of a ComfyUI UNet,
    found by walking its blocks (16 for SD 1.5 and SD 2.x)."""
    groups = (("input", list(diffusion_model.input_blocks)), ("middle", [diffusion_model.middle_block]),
              ("output", list(diffusion_model.output_blocks)))
    sites = []
    for kind, blocks in groups:
        for block_id, block in enumerate(blocks):
            for module in block.modules():
                if isinstance(module, comfy_attention.SpatialTransformer):
                    sites += [(kind, block_id, index) for index, _ in enumerate(module.transformer_blocks)]
    return sites


@dataclass(frozen=True)
class TokenColumns:
    """Where the confined tokens sit in the prompt's context."""

    #: column indices (chunk k, position i -> 77 k + i).
    positions: tuple[int, ...]
    #: the prompt's context length (77 per CLIP chunk).
    length: int
    #: the columns of the matched token(s), without end/padding columns.
    token_positions: tuple[int, ...]


def _chunks(clip, text: str) -> list:
    """``text`` tokenized as CLIP Text Encode does: (token or embedding row, weight) per position, per
    77-token chunk, for the one text encoder of an SD 1.x / 2.x CLIP."""
    tokens = clip.tokenize(text)
    if not isinstance(tokens, dict) or len(tokens) != 1:
        names = sorted(tokens) if isinstance(tokens, dict) else type(tokens).__name__
        raise ValueError(f"clip: expected the CLIP of an SD 1.x / 2.x checkpoint (one text encoder); this one has "
                         f"{names} (SDXL's two encoders are not supported)")
    return next(iter(tokens.values()))


def _special_tokens(clip) -> tuple:
    tokenizer = getattr(clip, "tokenizer", None)
    inner = getattr(tokenizer, getattr(tokenizer, "clip", ""), None)
    return getattr(inner, "start_token", None), getattr(inner, "end_token", None)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a.float().cpu(), b.float().cpu())
    return int(a) == int(b)


def _content(chunk: list, start, end) -> list:
    """The tokens of a chunk between the start token and the first end token."""
    items = [t[0] for t in chunk]
    if items and start is not None and not isinstance(items[0], torch.Tensor) and items[0] == start:
        items = items[1:]
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor) and end is not None and int(item) == end:
            return items[:i]
    return items


def token_columns(clip, prompt: str, token: str, confine_end_tokens: bool = False) -> TokenColumns:
    """Tokenize ``prompt`` as CLIP Text Encode does and find the columns of ``token``.

    Args:
        clip: the CLIP that encodes the prompt (SD 1.x / 2.x).
        prompt: the prompt text.
        token: one or more words or ``embedding:NAME``s separated by commas; every occurrence is
            confined. Empty: every ``embedding:`` in the prompt.
        confine_end_tokens: also the end token and the padding after it, in every chunk.
    """
    start, end = _special_tokens(clip)
    chunks = _chunks(clip, prompt)
    period = len(chunks[0])
    if any(len(c) != period for c in chunks):
        raise ValueError("prompt: its CLIP chunks have different lengths; MRCA needs padded 77-token chunks")
    words = [w.strip() for w in token.split(",") if w.strip()]
    positions: list[int] = []
    if not words:
        for k, chunk in enumerate(chunks):
            positions += [k * period + i for i, t in enumerate(chunk) if isinstance(t[0], torch.Tensor)]
        if not positions:
            raise ValueError("token: empty, which means every embedding:NAME of the prompt, but the prompt has "
                             "none (or its embedding file was not found in models/embeddings); name the word to "
                             "confine")
    for word in words:
        alone = _chunks(clip, word)[0]
        if word.startswith("embedding:") and not any(isinstance(t[0], torch.Tensor) for t in alone):
            raise ValueError(f"token: {word} was not found in models/embeddings (ComfyUI ignores a missing "
                             "embedding, so there would be nothing to confine)")
        target = _content(alone, start, end)
        if not target:
            raise ValueError(f"token: {word!r} tokenizes to nothing")
        found = []
        for k, chunk in enumerate(chunks):
            items = [t[0] for t in chunk]
            for i in range(len(items) - len(target) + 1):
                if all(_same(items[i + j], target[j]) for j in range(len(target))):
                    found += [k * period + i + j for j in range(len(target))]
        if not found:
            raise ValueError(f"prompt: it does not contain the token to confine, {word!r} ({len(target)} CLIP "
                             f"token(s)); prompt was {prompt!r}")
        positions += found
    token_positions = tuple(sorted(set(positions)))
    if confine_end_tokens:
        for k, chunk in enumerate(chunks):
            items = [t[0] for t in chunk]
            first_end = next((i for i, t in enumerate(items) if i > 0 and not isinstance(t, torch.Tensor)
                              and int(t) == end), None)
            if first_end is not None:
                positions += [k * period + i for i in range(first_end, period)]
    return TokenColumns(tuple(sorted(set(positions))), period * len(chunks), token_positions)


class MRCAPatch:
    """The ``attn2`` replacement of every cross-attention layer (one instance shared by all).

    Args:
        columns: the confined token columns of the prompt.
        mask: optional static (M, H, W) mask in [0, 1]; a mask in ``transformer_options`` under
            :data:`MASK_OPTION_KEY` takes precedence for that call. With neither, attention is
            unchanged.
        resize: one of :data:`~mpod_core.guidance.mrca.RESIZE_MODES`.
    """

    def __init__(self, columns: TokenColumns, mask: Optional[torch.Tensor] = None, resize: str = "area"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"mask_resize: one of {RESIZE_MODES}, got {resize!r}")
        self.columns = columns
        self.mask = None if mask is None else mask.detach().float().cpu().clone()
        self.resize = resize
        self._cache: dict = {}
        #: (block key, (h, w)) of each call, for tests and diagnostics (cleared by the caller).
        self.trace: Optional[list] = None

    def _allowed(self, mask: torch.Tensor, h: int, w: int, device) -> torch.Tensor:
        key = (id(mask), tuple(mask.shape), h, w, str(device))  # callers pass new tensors, never edit one
        cached = self._cache.get(key)
        if cached is None or cached[0] is not mask:
            if len(self._cache) > 64:
                self._cache.clear()
            cached = (mask, layer_mask(mask.to(device), h, w, self.resize))
            self._cache[key] = cached
        return cached[1]

    def __call__(self, q, k, v, extra_options: dict):
        heads = extra_options["n_heads"]
        mask = extra_options.get(MASK_OPTION_KEY, self.mask)
        if self.trace is not None:
            self.trace.append((extra_options.get("block"), extra_options.get("block_index"),
                               tuple(extra_options.get("activations_shape", ())[-2:])))
        if mask is None:
            return comfy_attention.optimized_attention(q, k, v, heads)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        b = q.shape[0]
        h, w = extra_options["activations_shape"][-2:]
        chunks = extra_options.get("cond_or_uncond") or [0]
        if b % len(chunks):
            raise ValueError(f"MRCA: an attention batch of {b} does not split into {len(chunks)} cond/uncond chunks")
        per_chunk = b // len(chunks)
        rows = torch.tensor([c == 0 for c in chunks], device=q.device).repeat_interleave(per_chunk)
        allowed = self._allowed(mask, h, w, q.device)
        if allowed.shape[0] == per_chunk and per_chunk != 1:
            allowed = allowed.repeat(len(chunks), 1)
        elif allowed.shape[0] != 1:
            raise ValueError(f"MRCA: {allowed.shape[0]} masks for a batch of {per_chunk} images; give one mask, or "
                             "one per image")
        columns = confined_columns(k.shape[1], self.columns.positions, self.columns.length)
        return rectified_attention(q, k, v, heads, allowed, columns.to(q.device), rows,
                                   attention=comfy_attention.optimized_attention)


def apply_mrca(model, patch: MRCAPatch):
    """A clone of ``model`` with ``patch`` on every cross-attention layer (the user's MODEL untouched)."""
    check_sd_model(model)
    patched = model.clone()
    sites = cross_attention_sites(model.model.diffusion_model)
    if not sites:
        raise ValueError("model: no cross-attention layer found in this UNet")
    for block, block_id, index in sites:
        patched.set_model_attn2_replace(patch, block, block_id, index)
    return patched


def mrca_patched_layers(model) -> int:
    """How many cross-attention layers of ``model`` carry an :class:`MRCAPatch` (0: not patched)."""
    options = getattr(model, "model_options", None) or {}
    replaced = options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return sum(isinstance(patch, MRCAPatch) for patch in replaced.values())
