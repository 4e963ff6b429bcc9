"""MRCA's attention maths (mpod_core.guidance.mrca) against plain attention, with known answers."""
import math

import pytest
import torch


from mpod_core.guidance.mrca import (RESIZE_MODES, confined_columns, layer_mask, rectification_bias,
                                     rectified_attention, sdpa_attention)
from mpod_core.guidance.protocol import ViewCondition

HEADS, D = 4, 8


def _qkv(b=2, n=16, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, HEADS * D, generator=g, dtype=torch.float64),
            torch.randn(b, L, HEADS * D, generator=g, dtype=torch.float64),
            torch.randn(b, L, HEADS * D, generator=g, dtype=torch.float64))


def _probabilities(q, k, bias=None):
    b, n, _ = q.shape
    qh = q.reshape(b, n, HEADS, D).transpose(1, 2)
    kh = k.reshape(b, -1, HEADS, D).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(D)
    return torch.softmax(logits if bias is None else logits + bias, dim=-1)   # (B, heads, N, L)


def test_an_all_ones_mask_is_plain_attention_exactly():
    q, k, v = _qkv()
    allowed = torch.ones(1, 16, dtype=torch.bool)
    cols = torch.tensor([0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    out = rectified_attention(q, k, v, HEADS, allowed, cols, torch.ones(2, dtype=torch.bool))
    assert torch.equal(out, sdpa_attention(q, k, v, HEADS))


def test_outside_the_mask_the_token_has_zero_probability_and_the_output_is_attention_without_it():
    q, k, v = _qkv()
    allowed = torch.zeros(2, 16, dtype=torch.bool)
    allowed[:, :6] = True                                   # positions 0..5 inside, 6..15 outside
    token = 3
    cols = torch.zeros(7, dtype=torch.bool)
    cols[token] = True
    rows = torch.ones(2, dtype=torch.bool)
    bias = rectification_bias(allowed, cols, rows, torch.float64)
    p = _probabilities(q, k, bias)
    assert torch.all(p[:, :, 6:, token] == 0.0)             # exactly zero, not small
    assert torch.all(p[:, :, :6, token] > 0)
    out = rectified_attention(q, k, v, HEADS, allowed, cols, rows)
    keep = [i for i in range(7) if i != token]
    deleted = sdpa_attention(q, k[:, keep], v[:, keep], HEADS)
    full = sdpa_attention(q, k, v, HEADS)
    assert torch.allclose(out[:, 6:], deleted[:, 6:], atol=1e-6, rtol=0)
    assert torch.allclose(out[:, :6], full[:, :6], atol=1e-6, rtol=0)
    assert (out[:, 6:] - full[:, 6:]).abs().max() > 1e-3    # and that made a difference


def test_only_the_rectified_rows_change():
    q, k, v = _qkv(b=4)
    allowed = torch.zeros(1, 16, dtype=torch.bool)
    cols = torch.zeros(7, dtype=torch.bool)
    cols[2] = True
    full = sdpa_attention(q, k, v, HEADS)
    for rows in ([True, True, False, False], [False, False, True, True]):
        rows = torch.tensor(rows)
        out = rectified_attention(q, k, v, HEADS, allowed, cols, rows)
        assert torch.allclose(out[~rows], full[~rows], atol=1e-12, rtol=0)
        assert (out[rows] - full[rows]).abs().max() > 1e-3


def test_confining_every_column_is_refused():
    with pytest.raises(ValueError, match="every token column"):
        rectification_bias(torch.zeros(1, 4, dtype=torch.bool), torch.ones(3, dtype=torch.bool),
                           torch.ones(1, dtype=torch.bool))


def test_layer_masks_for_a_64_latent_and_the_resize_modes():
    """A 512^2 image gives layers of 64, 32, 16, 8 cells; a left-half mask is exactly the left half of each."""
    mask = torch.zeros(1, 512, 512)
    mask[:, :, :256] = 1
    for side in (64, 32, 16, 8):
        for mode in RESIZE_MODES:
            m = layer_mask(mask, side, side, mode).reshape(side, side)
            assert m[:, :side // 2].all() and not m[:, side // 2:].any(), (side, mode)
    # A 3-pixel-wide stripe at a 64-pixel cell: area drops it, max keeps it.
    thin = torch.zeros(1, 512, 512)
    thin[:, :, 100:103] = 1
    assert not layer_mask(thin, 8, 8, "area").any()
    assert layer_mask(thin, 8, 8, "max").reshape(8, 8)[:, 1].all()
    # A cell is inside by area when half of it is: 60% in, 40% out.
    part = torch.zeros(1, 10, 10)
    part[:, :, :6] = 1
    assert layer_mask(part, 1, 1, "area").item() and not layer_mask(1 - part, 1, 1, "area").item()


def test_a_mask_of_another_aspect_ratio_is_refused_and_odd_sizes_are_accepted():
    with pytest.raises(ValueError, match="aspect ratio"):
        layer_mask(torch.ones(1, 64, 128), 8, 8)
    assert layer_mask(torch.ones(1, 72, 72), 5, 5).shape == (1, 25)   # 72 / 8 / 2 rounded up
    assert layer_mask(torch.ones(1, 72, 96), 2, 2).shape == (1, 4)    # 9x12 latent -> 2x2 at the deepest layer


def test_columns_repeat_when_comfyui_tiles_a_shorter_context():
    cols = confined_columns(154, [8], period=77)
    assert cols.nonzero().flatten().tolist() == [8, 85]
    with pytest.raises(ValueError, match="same prompt"):
        confined_columns(100, [8], period=77)


def test_sdpa_attention_is_plain_softmax_attention():
    q, k, v = _qkv()
    p = _probabilities(q, k)
    vh = v.reshape(2, -1, HEADS, D).transpose(1, 2)
    expected = (p @ vh).transpose(1, 2).reshape(2, 16, HEADS * D)
    assert torch.allclose(sdpa_attention(q, k, v, HEADS), expected, atol=1e-12)


def test_view_extras_must_have_one_entry_per_view():
    views = ViewCondition(torch.zeros(2), torch.zeros(2), torch.ones(2), extras={"m": torch.ones(2, 4, 4)})
    assert views.extras["m"].shape == (2, 4, 4)
    with pytest.raises(ValueError, match="one entry per view"):
        ViewCondition(torch.zeros(2), torch.zeros(2), torch.ones(2), extras={"m": torch.ones(3, 4, 4)})


def test_rectified_attention_is_differentiable_in_q_k_v():
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, n=4, L=3))
    allowed = torch.tensor([[True, False, True, False]])
    cols = torch.tensor([False, True, False])
    torch.autograd.gradcheck(lambda a, b, c: rectified_attention(a, b, c, HEADS, allowed, cols,
                                                                 torch.ones(1, dtype=torch.bool)), (q, k, v))

