"""Tests for mpod_core.encoding: layout, the published hash, exactness at vertices and cell
centres, continuity across cell boundaries, gradcheck (table and positions, float64),
chunking, fitting a 3D function, backend selection, and tinycudann parity (gpu)."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from mpod_core import lazy_cuda
from mpod_core.encoding import HashGridConfig, HashGridEncoding, hash_grid_encode, level_layout, spatial_hash

TCNN = importlib.import_module("mpod_core.encoding.tcnn_backend")
F64 = torch.float64

# 3 levels, scales 1, 3, 7 (R = 2, 4, 8): levels 0 and 1 dense (8 and 64 <= 64 entries), level 2 hashed.
TINY = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2,
                      per_level_scale=2.0)


def _encoder(config: HashGridConfig, dtype=F64, seed: int = 0, scale: float = 1.0) -> HashGridEncoding:
    torch.manual_seed(seed)
    enc = HashGridEncoding(config, backend="torch").to(dtype)
    with torch.no_grad():
        enc.table.uniform_(-scale, scale)  # O(1) features so errors are visible
    return enc


def _away_from_boundaries(config: HashGridConfig, n: int, margin: float, seed: int = 0) -> torch.Tensor:
    """Random points whose fractional grid position is in [margin, 1 - margin] on every level."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(20000, 3, generator=g, dtype=F64) * 0.9 + 0.05
    s = torch.tensor(level_layout(config).scales, dtype=F64).view(1, -1, 1)
    frac = torch.frac(x[:, None, :] * s + 0.5)
    ok = ((frac > margin) & (frac < 1 - margin)).all(dim=2).all(dim=1)
    assert ok.sum() >= n
    return x[ok][:n]


def test_default_layout_matches_instant_ngp():
    c = HashGridConfig()
    lay = level_layout(c)
    assert c.out_dim == 32
    assert lay.resolutions[0] == 16 and lay.resolutions[-1] == 4096  # 16 * 1.4472692**15 = 4096
    assert lay.dense == [True] * 5 + [False] * 11                      # 71^3 <= 2^19 < 102^3
    assert all(s == 1 << 19 for s in lay.sizes[5:])
    assert all(s % 8 == 0 and s >= r ** 3 for s, r in zip(lay.sizes[:5], lay.resolutions[:5]))
    assert lay.offsets == [sum(lay.sizes[:i]) for i in range(16)]
    enc = HashGridEncoding(c, backend="torch")
    assert enc.table.shape == (lay.n_entries, 2)
    assert enc.table.abs().max() <= 1e-4 and enc.table.std() > 4e-5   # uniform(-1e-4, 1e-4)


def test_hash_matches_published_primes():
    # (i * 1) ^ (j * 2654435761) ^ (k * 805459861) mod 2^19, computed by hand:
    # 1 ^ 5308871522 ^ 2416379583 = 7721315068 -> mod 2^19 = 128476
    coords = torch.tensor([[1, 2, 3], [7, 0, 5], [4095, 4095, 4095], [0, 0, 0]])
    assert spatial_hash(coords, 19).tolist() == [128476, 243182, 352731, 0]
    assert spatial_hash(coords[:1], 6).item() == 128476 % 64


def test_vertex_values_equal_table_entries_dense_and_hashed():
    enc = _encoder(TINY)
    lay = level_layout(TINY)
    F = 2
    for level in range(3):
        s, R, off = lay.scales[level], lay.resolutions[level], lay.offsets[level]
        ijk = torch.cartesian_prod(*[torch.arange(1, R)] * 3)          # vertices inside [0, 1]^3
        x = (ijk.to(F64) - 0.5) / s
        out = enc(x)[:, level * F:(level + 1) * F]
        if lay.dense[level]:
            rows = ijk[:, 0] + ijk[:, 1] * R + ijk[:, 2] * R * R
        else:
            rows = spatial_hash(ijk, TINY.log2_hashmap_size)
        torch.testing.assert_close(out, enc.table[off + rows].detach(), rtol=0, atol=1e-12)


def test_cell_centre_is_mean_of_eight_corners():
    enc = _encoder(HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=1.5))
    lay = level_layout(enc.config)
    level = 2
    assert lay.dense[level]
    s, R, off = lay.scales[level], lay.resolutions[level], lay.offsets[level]
    ijk = torch.tensor([[0, 0, 0], [2, 3, 1], [R - 2, R - 2, R - 2]])
    x = ijk.to(F64) / s                                                 # grid position ijk + 0.5
    out = enc(x)[:, 2 * level:2 * level + 2]
    corners = torch.cartesian_prod(*[torch.arange(2)] * 3)            # (8, 3)
    c = ijk[:, None, :] + corners[None]                                 # (3, 8, 3)
    rows = c[..., 0] + c[..., 1] * R + c[..., 2] * R * R
    torch.testing.assert_close(out, enc.table[off + rows].mean(dim=1).detach(), rtol=0, atol=1e-12)


def test_continuity_lipschitz_and_across_cell_boundaries():
    cfg = HashGridConfig()                                              # default grid, finest 4096
    enc = _encoder(cfg)
    lay = level_layout(cfg)
    torch.manual_seed(1)
    x = torch.rand(4000, 3, dtype=F64) * 0.98 + 0.01
    d = torch.nn.functional.normalize(torch.randn(4000, 3, dtype=F64), dim=1)
    delta = 1e-6
    with torch.no_grad():
        ratio = (enc(x + delta * d) - enc(x)).abs().max(dim=1).values / delta
    # trilinear interpolation of features in [-1, 1]: |d/dx| <= 2 * s_l per axis, sqrt(3) for a direction
    bound = 2 * 3 ** 0.5 * max(lay.scales)
    assert ratio.max() <= bound
    # a jump (wrong corner, wrong weight) would give |delta enc| ~ 1, i.e. a ratio ~ 1e6
    # straddle one cell boundary per level (a coarse-dense, a finest-hashed one): x_b -+ 1e-6 along x
    for level in (0, 3, 15):
        s = lay.scales[level]
        xb = torch.tensor([[(7 - 0.5) / s, 0.3, 0.6]], dtype=F64)
        e = torch.tensor([[1e-6, 0.0, 0.0]], dtype=F64)
        with torch.no_grad():
            jump = (enc(xb + e) - enc(xb - e)).abs().max().item()
        assert jump <= 2 * 2e-6 * max(lay.scales) * 1.01, (level, jump)
        assert jump > 0


@pytest.mark.parametrize("wrt", ["table", "x"])
def test_gradcheck_float64(wrt):
    enc = _encoder(TINY)
    x = _away_from_boundaries(TINY, 12, margin=0.05)
    table = enc.table.detach().clone()
    if wrt == "table":
        table.requires_grad_(True)
    else:
        x.requires_grad_(True)
    inp = table if wrt == "table" else x
    fn = (lambda t: hash_grid_encode(x, t, TINY)) if wrt == "table" else (lambda p: hash_grid_encode(p, table, TINY))
    assert torch.autograd.gradcheck(fn, (inp,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradgradcheck_positions():
    """Second order in x (normals from density gradients inside a loss)."""
    enc = _encoder(TINY)
    x = _away_from_boundaries(TINY, 4, margin=0.05).requires_grad_(True)
    table = enc.table.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda p, t: hash_grid_encode(p, t, TINY), (x, table),
                                        eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("features,dtype", [(2, F64), (2, torch.float32), (1, F64), (4, torch.float32)])
def test_table_only_backward_matches_plain_autograd(features, dtype):
    """The training path (x without grad: fused gather, one scatter for the table gradient) gives
    the values and table gradients of the plain-autograd path (x with grad), incl. the far faces."""
    cfg = HashGridConfig(n_levels=5, n_features_per_level=features, log2_hashmap_size=9, base_resolution=3,
                         per_level_scale=1.8)
    assert any(level_layout(cfg).dense) and not all(level_layout(cfg).dense)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300, 3, generator=g, dtype=dtype)
    x[:20, 0] = 1.0                                   # far face: indices wrap like tinycudann's
    x[20:40] = 0.0
    x = torch.cat([x, x[:50]])                        # repeated points: gradients must accumulate
    table = (torch.rand(level_layout(cfg).n_entries, features, generator=g, dtype=dtype) * 2 - 1)
    weights = torch.randn(x.shape[0], cfg.out_dim, generator=g, dtype=dtype)
    t_fast = table.clone().requires_grad_(True)
    out_fast = hash_grid_encode(x, t_fast, cfg)
    (out_fast * weights).sum().backward()
    t_ref, x_ref = table.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref = hash_grid_encode(x_ref, t_ref, cfg)
    (out_ref * weights).sum().backward()
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(out_fast, out_ref.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(t_fast.grad, t_ref.grad, atol=tol, rtol=0)
    assert t_fast.grad.abs().sum() > 0


def test_chunked_inference_equals_single_pass():
    cfg = HashGridConfig(n_levels=6, log2_hashmap_size=10, base_resolution=4, chunk_size=97)
    enc = _encoder(cfg, dtype=torch.float32)
    x = torch.rand(1000, 3)
    with torch.no_grad():
        chunked = enc(x)
    whole = enc(x)                                                      # autograd: one pass
    torch.testing.assert_close(chunked, whole.detach(), rtol=0, atol=0)


@pytest.mark.slow
def test_fits_a_3d_function():
    torch.manual_seed(0)
    cfg = HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=14, base_resolution=4,
                         per_level_scale=1.5)
    enc = HashGridEncoding(cfg, backend="torch")
    head = torch.nn.Linear(cfg.out_dim, 1)

    def target(p):
        return (torch.sin(2 * torch.pi * p[:, 0]) * torch.sin(2 * torch.pi * p[:, 1])
                * torch.cos(2 * torch.pi * p[:, 2]))[:, None]

    opt = torch.optim.Adam([{"params": enc.parameters(), "lr": 3e-2}, {"params": head.parameters(), "lr": 1e-2}],
                           eps=1e-15)
    for _ in range(300):
        x = torch.rand(2048, 3)
        loss = torch.nn.functional.mse_loss(head(enc(x)), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt = torch.rand(8192, 3)
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(head(enc(xt)), target(xt)).item()
    # target variance is 1/8 = 0.125; a grid that does not learn stays near it
    assert mse < 1e-4, mse         # measured: 7.7e-6


def test_input_and_config_checks():
    enc = HashGridEncoding(TINY, backend="torch")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        enc(torch.rand(4, 2))
    with pytest.raises(ValueError, match="backend"):
        HashGridEncoding(TINY, backend="cuda")
    with pytest.raises(ValueError, match="log2_hashmap_size"):
        HashGridConfig(log2_hashmap_size=40)
    with pytest.raises(ValueError, match="table"):
        hash_grid_encode(torch.rand(3, 3), torch.rand(5, 2), TINY)


@pytest.mark.skipif(TCNN.is_available(), reason="tinycudann is installed")
def test_tcnn_backend_missing_raises_with_hint_and_auto_warns_once(monkeypatch):
    with pytest.raises(ImportError, match="tiny-cuda-nn"):
        HashGridEncoding(TINY, backend="tcnn")
    monkeypatch.setattr(lazy_cuda, "_WARNED", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = HashGridEncoding(TINY, backend="auto")
        HashGridEncoding(TINY, backend="auto")
    assert a.backend == "torch"
    assert sum("pure-PyTorch hash grid" in str(w.message) for w in rec) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not TCNN.is_available(), reason="needs CUDA and tinycudann")
def test_tcnn_parity_values_and_gradients():
    cfg = HashGridConfig(n_levels=8, log2_hashmap_size=15, base_resolution=8, per_level_scale=1.6)
    ours = HashGridEncoding(cfg, backend="torch").cuda()
    ref = HashGridEncoding(cfg, backend="tcnn")
    with torch.no_grad():
        ours.table.uniform_(-1, 1)
        ref.tcnn.params.copy_(ours.table.reshape(-1))
    x = torch.rand(4096, 3, device="cuda")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(ours.table.grad.reshape(-1), ref.tcnn.params.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-2, atol=1e-2)
