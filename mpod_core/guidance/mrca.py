"""Mask Rectified Cross-Attention (MPOD123 §3.3, eq. 6–8), as plain torch.

In a cross-attention layer the image queries ``Q(x)`` (N = h·w positions)
attend over the text keys ``K(y)`` (L tokens): ``AM = softmax(Q Kᵀ / √d)``.
MRCA confines the columns of chosen tokens (the learned ``<e>`` of textual
inversion) to the object's outline mask ``M``, resized to the layer's h×w:

    AM⟨e⟩_ij ← AM⟨e⟩_ij  where M_ij = 1,   0 where M_ij = 0        (eq. 8)

Implemented, as the paper's "set to −inf" reading in REFERENCE.md, on the
logits before the softmax: the confined columns get −inf where the mask is 0,
so their probability is exactly 0 there and the other columns renormalise
(the output equals attention with those columns deleted). Unconfined columns,
and every position inside the mask, are untouched.

What the paper leaves open, decided here:

* **Resize per layer** (:data:`RESIZE_MODES`): ``"area"`` (default) keeps a
  layer cell when at least half of the image pixels it covers are inside the
  mask (area average, then ≥ 0.5), the majority vote, free of the aliasing of
  ``"nearest"`` (a thin part vanishes or appears depending on where the cell
  centres fall) and not as generous as ``"max"`` (a cell counts as inside if any
  pixel is, which lets the token reach one cell past the outline on the 8×8
  layers of a 512² image). InvokeAI's regional prompts pool by 2 per level,
  which is the area average for power-of-two sizes.
* **End and padding tokens** are not confined by default: the paper rectifies
  the ``<e>`` channel only; in CLIP's causal text encoder the end token and the
  padding after it summarise the whole prompt including ``<e>``, so confining
  them too (``confine_end_tokens``) is a stronger variant, offered as an option.

The ComfyUI side (``nodes/comfy_bridge/mrca.py``) finds every cross-attention
layer of the UNet, calls :func:`rectified_attention` there, and takes the mask
of each call from the model options (a per-view mask set by the refine node) or
from a static MASK.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RESIZE_MODES", "MASK_OPTION_KEY", "layer_mask", "confined_columns", "rectification_bias",
           "rectified_attention", "sdpa_attention"]

#: How a mask is resized to a layer's h×w (see the module docstring); the first is the default.
RESIZE_MODES = ("area", "max", "nearest")

#: The ``transformer_options`` key under which a caller passes the mask of each noise prediction:
#: a (M, H, W) tensor in [0, 1], M = 1 or one mask per sample of a conditional batch chunk. The
#: denoiser adapters put a :class:`~mpod_core.guidance.protocol.ViewCondition`'s ``extras`` there.
MASK_OPTION_KEY = "mpod3d_mrca_mask"


def layer_mask(mask: torch.Tensor, height: int, width: int, mode: str = "area") -> torch.Tensor:
    """(M, H, W) mask in [0, 1] -> (M, height·width) bool, True inside, in row-major layer order.

    A layer's grid covers the whole image, so the mask must have the image's aspect ratio; UNet
    layers round odd sizes up (a 72-pixel side gives 9, 5, 3, 2 cells), so a difference of up to
    one cell is accepted.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mask resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mask.ndim != 3 or mask.shape[1] < 1 or mask.shape[2] < 1:
        raise ValueError(f"mask: expected (M, H, W), got {tuple(mask.shape)}")
    mh, mw = mask.shape[1:]
    if abs(mw * height / mh - width) > 1.0 and abs(mh * width / mw - height) > 1.0:
        raise ValueError(f"mask: {mw}x{mh} (width x height) does not have the aspect ratio of the image being "
                         f"generated (a {width}x{height} attention layer); give a mask of the image's shape")
    m = mask.float().unsqueeze(1)
    if mode == "area":
        small = F.adaptive_avg_pool2d(m, (height, width)) >= 0.5
    elif mode == "max":
        small = F.adaptive_max_pool2d(m, (height, width)) >= 0.5
    else:
        small = F.interpolate(m, size=(height, width), mode="nearest-exact") >= 0.5
    return small.reshape(mask.shape[0], height * width)


def confined_columns(length: int, positions: Sequence[int], period: Optional[int] = None) -> torch.Tensor:
    """(length,) bool: True at the token columns to confine.

    Args:
        length: the context length L of the layer's keys.
        positions: column indices in the tokenized prompt.
        period: the prompt's own length (77 per CLIP chunk). ComfyUI repeats a shorter context to
            the least common multiple when it batches conds of different lengths, so the columns
            repeat with this period; L must be a multiple of it.
    """
    period = period or length
    if length % period:
        raise ValueError(f"the text context has {length} tokens, not a multiple of the {period} of the prompt the "
                         "MRCA patch was built from: connect the same prompt to CLIP Text Encode and to the patch")
    base = torch.zeros(period, dtype=torch.bool)
    if len(positions):
        idx = torch.as_tensor(list(positions), dtype=torch.long)
        if idx.min() < 0 or idx.max() >= period:
            raise ValueError(f"token positions {list(positions)} are outside the prompt's {period} tokens")
        base[idx] = True
    return base.repeat(length // period)


def rectification_bias(allowed: torch.Tensor, columns: torch.Tensor, rectified_rows: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive logit bias of eq. 8: −inf at (confined column, position outside the mask).

    Args:
        allowed: (B or 1, N) bool, True inside the mask (from :func:`layer_mask`), one row per
            sample of the attention batch (or one for all).
        columns: (L,) bool, the confined token columns.
        rectified_rows: (B,) bool, the samples to rectify (the conditional chunks); the others
            get a zero bias.

    Returns:
        (B, 1, N, L) tensor of 0 and −inf, broadcast over heads.
    """
    if columns.all():
        raise ValueError("every token column would be confined, which leaves positions outside the mask nothing "
                         "to attend to; confine only the object's token(s)")
    outside = ~allowed.to(columns.device)
    block = outside[:, :, None] & columns[None, None, :]                       # (B|1, N, L)
    block = block & rectified_rows.to(columns.device)[:, None, None]           # (B, N, L)
    bias = torch.zeros(block.shape, dtype=dtype, device=columns.device)
    return bias.masked_fill_(block, float("-inf")).unsqueeze(1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention on (B, N, heads·d) projections, ComfyUI's ``optimized_attention`` signature."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, heads * d)


AttentionFn = Callable[..., torch.Tensor]


def rectified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, allowed: torch.Tensor,
                        columns: torch.Tensor, rectified_rows: torch.Tensor,
                        attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """Cross-attention with the confined columns masked outside the mask (eq. 8).

    Args:
        q: (B, N, heads·d) projected image queries; k, v: (B, L, heads·d) projected text keys/values.
        heads: attention heads.
        allowed: (B or 1, N) bool, True inside the mask.
        columns: (L,) bool, the confined token columns.
        rectified_rows: (B,) bool, the samples to rectify.
        attention: ``attention(q, k, v, heads, mask=bias)`` (ComfyUI's ``optimized_attention`` in the
            node; plain SDPA by default).

    Returns:
        (B, N, heads·d). When nothing is confined (no column, every position inside, or no row
        rectified), exactly ``attention(q, k, v, heads)``.
    """
    b, n = q.shape[:2]
    if allowed.shape[-1] != n or allowed.shape[0] not in (1, b):
        raise ValueError(f"mask of {tuple(allowed.shape)} positions for an attention batch of {b} x {n}")
    if columns.shape[0] != k.shape[1]:
        raise ValueError(f"{columns.shape[0]} column flags for a context of {k.shape[1]} tokens")
    if not columns.any() or bool(allowed.all()) or not rectified_rows.any():
        return attention(q, k, v, heads)
    bias = rectification_bias(allowed.to(q.device), columns.to(q.device), rectified_rows.to(q.device), q.dtype)
    return attention(q, k, v, heads, mask=bias)
