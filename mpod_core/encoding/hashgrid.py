"""Multiresolution hash-grid encoding (Instant-NGP, Müller et al. 2022), pure-PyTorch backend.

Geometry follows tiny-cuda-nn's ``HashGrid`` exactly, so the torch backend and
the tinycudann twin (:mod:`.tcnn_backend`) share one parameter layout and give
the same values for the same table:

* level ``l`` has scale ``s_l = base_resolution * per_level_scale**l - 1`` and
  ``R_l = ceil(s_l) + 1`` vertices per axis; a point ``x`` in ``[0, 1]^3`` sits
  at grid position ``p = x * s_l + 0.5`` (vertex ``i`` is at ``x = (i - 0.5) / s_l``);
* a level whose ``R_l**3`` vertices fit in ``2**log2_hashmap_size`` entries is
  stored densely (index ``i + j R + k R^2``, no collisions, table padded to a
  multiple of 8); finer levels use the spatial hash
  ``(i * 1) ^ (j * 2654435761) ^ (k * 805459861)  mod 2**log2_hashmap_size``;
* the features of the 8 cell corners are blended trilinearly.

All levels live in ONE flat parameter ``(n_entries, F)`` with per-level row
offsets (tinycudann's memory layout), so an evaluation is a few vectorised
int32 ops on ``(L, N, 2)`` tensors per axis and one fused gather + weighted sum
(``embedding_bag``) of ``(L, N, 8)`` rows; there is no Python loop over points,
corners or levels. When ``x`` needs no gradient (training the table, inference)
the table gradient is one scatter-add of ``w * grad`` (a custom autograd
function); when ``x`` requires grad, plain autograd through a gather and an
einsum is used, so ``d encoding / d x`` (normals) and double backward work.

Inputs must be in ``[0, 1]^3``: callers map their bounding box into the unit
cube. Values outside are not an error (indices wrap like tinycudann's) but
carry no meaning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal

import torch
from torch import nn

# The primes of Instant-NGP's spatial hash (the first axis is multiplied by 1).
HASH_PRIMES = (1, 2654435761, 805459861)

Backend = Literal["auto", "torch", "tcnn"]
BACKENDS = ("auto", "torch", "tcnn")


@dataclass
class HashGridConfig:
    """Hyper-parameters of a 3D multiresolution hash grid (defaults: Instant-NGP's NeRF grid)."""

    n_levels: int = 16
    """Number of resolution levels L; the output has ``n_levels * n_features_per_level`` channels."""

    n_features_per_level: int = 2
    """Features F stored at every grid vertex of every level."""

    log2_hashmap_size: int = 19
    """log2 of the entries per level T; levels with more than T vertices are hashed into T entries."""

    base_resolution: int = 16
    """Resolution of the coarsest level (its scale is ``base_resolution - 1``, as in tinycudann)."""

    per_level_scale: float = 1.4472692
    """Growth factor b between levels: level l has scale ``base_resolution * b**l - 1``
    (the default makes the finest level 4096 vertices across)."""

    init_scale: float = 1e-4
    """Table entries start uniform in ``[-init_scale, init_scale]`` (Instant-NGP: 1e-4)."""

    chunk_size: int = 1 << 16
    """Points per chunk when NO gradient is being recorded (inference), bounding the transient
    memory to about ``chunk_size * L * 8 * (8 + 4 F)`` bytes. Under autograd the whole batch is
    evaluated at once: chunking would not reduce what autograd keeps for the backward pass."""

    def __post_init__(self) -> None:
        if self.n_levels < 1 or self.n_features_per_level < 1:
            raise ValueError(f"n_levels and n_features_per_level must be >= 1, got "
                             f"{self.n_levels}, {self.n_features_per_level}")
        if not 1 <= self.log2_hashmap_size <= 30:
            raise ValueError(f"log2_hashmap_size must be in [1, 30], got {self.log2_hashmap_size}")
        if self.base_resolution < 2 or self.per_level_scale < 1.0:
            raise ValueError(f"need base_resolution >= 2 and per_level_scale >= 1, got "
                             f"{self.base_resolution}, {self.per_level_scale}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def out_dim(self) -> int:
        """Channels of the encoding: ``n_levels * n_features_per_level``."""
        return self.n_levels * self.n_features_per_level


@dataclass(frozen=True)
class LevelLayout:
    """Per-level geometry derived from a :class:`HashGridConfig` (tinycudann's conventions)."""

    scales: List[float]
    """``s_l``: a point x maps to grid position ``x * s_l + 0.5``."""
    resolutions: List[int]
    """``R_l = ceil(s_l) + 1`` vertices per axis."""
    dense: List[bool]
    """True where ``R_l**3 <= 2**log2_hashmap_size`` (no hashing)."""
    sizes: List[int]
    """Table rows of each level: ``R_l**3`` padded to a multiple of 8, or ``2**log2_hashmap_size``."""
    offsets: List[int]
    """First row of each level in the flat table."""

    @property
    def n_entries(self) -> int:
        return self.offsets[-1] + self.sizes[-1]


def level_layout(config: HashGridConfig) -> LevelLayout:
    """Scales, resolutions, dense/hashed flags, sizes and row offsets of every level."""
    table = 1 << config.log2_hashmap_size
    scales, resolutions, dense, sizes, offsets = [], [], [], [], []
    offset = 0
    for level in range(config.n_levels):
        # float32 arithmetic as in tinycudann: exp2f(level * log2f(b)) * base - 1
        s = float(torch.exp2(torch.tensor(level * math.log2(config.per_level_scale), dtype=torch.float32))
                  * config.base_resolution - 1.0)
        s = float(torch.tensor(s, dtype=torch.float32))
        res = int(math.ceil(s)) + 1
        is_dense = res ** 3 <= table
        size = (res ** 3 + 7) // 8 * 8 if is_dense else table
        scales.append(s)
        resolutions.append(res)
        dense.append(is_dense)
        sizes.append(size)
        offsets.append(offset)
        offset += size
    return LevelLayout(scales, resolutions, dense, sizes, offsets)


def spatial_hash(coords: torch.Tensor, log2_hashmap_size: int) -> torch.Tensor:
    """Instant-NGP's hash of integer vertex coordinates.

    Args:
        coords: ``(..., 3)`` integer tensor of non-negative vertex coordinates.
        log2_hashmap_size: the table has ``2**log2_hashmap_size`` entries.

    Returns:
        ``(...,)`` int64 indices ``(i * 1 ^ j * 2654435761 ^ k * 805459861) mod 2**log2_hashmap_size``
        (equal to tinycudann's uint32 arithmetic, since the modulus divides 2**32).
    """
    c = coords.to(torch.int64)
    h = (c[..., 0] * HASH_PRIMES[0]) ^ (c[..., 1] * HASH_PRIMES[1]) ^ (c[..., 2] * HASH_PRIMES[2])
    return h & ((1 << log2_hashmap_size) - 1)


def _int32(v: int) -> int:
    """``v`` mod 2**32 as a signed int32 value (same low bits)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class _LevelConstants:
    """Per-level tensors used by :func:`hash_grid_encode`, cached per (device, dtype)."""

    def __init__(self, config: HashGridConfig, layout: LevelLayout, device, dtype) -> None:
        L = config.n_levels
        self.n_dense = sum(layout.dense)
        # Dense levels come first (resolution grows with the level), hashed levels after.
        assert all(layout.dense[:self.n_dense]) and not any(layout.dense[self.n_dense:])
        # Shapes broadcast against level-major (L, N, ...) tensors.
        self.scales = torch.tensor(layout.scales, dtype=dtype, device=device).view(L, 1, 1)
        # Index arithmetic in int32: products wrap mod 2^32 exactly like tinycudann's uint32 hash
        # (the mask keeps the low bits), dense indices and row offsets are < 2^31 (checked).
        # Half the memory traffic of int64 on these (L, N, 8) tensors.
        self.index_dtype = torch.int32 if layout.n_entries < (1 << 31) - 1 else torch.int64
        idt = self.index_dtype
        conv = _int32 if idt == torch.int32 else (lambda v: v)
        mult = [[1, r, r * r] for r in layout.resolutions[:self.n_dense]]
        mult += [[conv(p) for p in HASH_PRIMES]] * (L - self.n_dense)
        self.mult = torch.tensor(mult, dtype=idt, device=device).view(L, 1, 1, 3)
        self.sizes5 = torch.tensor(layout.sizes, dtype=idt, device=device).view(L, 1, 1, 1, 1)
        self.offsets5 = torch.tensor(layout.offsets, dtype=idt, device=device).view(L, 1, 1, 1, 1)
        self.hash_mask = (1 << config.log2_hashmap_size) - 1
        self.unit = torch.tensor([0, 1], dtype=idt, device=device).view(1, 1, 2, 1)


def _corners(x: torch.Tensor, k: _LevelConstants):
    """Table rows ``(L, N, 8)`` (int32/int64) and trilinear weights ``(L, N, 8)`` of the cell corners.

    Level-major: all points of level 0, then level 1, ... so the gather (and the scatter of its
    backward) touches one level's table at a time, which stays in the CPU cache
    (2^19 x 2 float32 = 4 MiB), instead of all 16 at once. Corner order (x-bit, y-bit, z-bit).
    The weights are differentiable in ``x`` (the floor is constant almost everywhere).
    """
    n = x.shape[0]
    L = k.scales.shape[0]
    pos = x.unsqueeze(0) * k.scales + 0.5                      # (L, N, 3)
    floor = torch.floor(pos)
    frac = pos - floor
    # Corner coordinates per axis, already multiplied by the level's per-axis factor
    # ((1, R, R^2) dense, the primes hashed): (L, N, 2, 3), 2 = {floor, floor + 1}
    c = (floor.to(k.index_dtype).unsqueeze(2) + k.unit) * k.mult
    cx, cy, cz = c[..., 0], c[..., 1], c[..., 2]               # each (L, N, 2)
    nd = k.n_dense
    idx = torch.empty(L, n, 2, 2, 2, dtype=k.index_dtype, device=x.device)
    if nd > 0:   # dense: i + j R + k R^2, wrapped like tinycudann for points on the far face
        d = idx[:nd]
        torch.add(cx[:nd, :, :, None, None] + cy[:nd, :, None, :, None], cz[:nd, :, None, None, :], out=d)
        d.remainder_(k.sizes5[:nd])
        d.add_(k.offsets5[:nd])
    if nd < L:   # hashed: xor of the prime-multiplied coordinates, mod 2^log2_hashmap_size
        h = idx[nd:]
        torch.bitwise_xor(cx[nd:, :, :, None, None] ^ cy[nd:, :, None, :, None], cz[nd:, :, None, None, :], out=h)
        h.bitwise_and_(k.hash_mask)
        h.add_(k.offsets5[nd:])
    w1 = frac
    w0 = 1.0 - frac
    wx = torch.stack((w0[..., 0], w1[..., 0]), dim=-1)         # (L, N, 2)
    wy = torch.stack((w0[..., 1], w1[..., 1]), dim=-1)
    wz = torch.stack((w0[..., 2], w1[..., 2]), dim=-1)
    w = ((wx[..., :, None] * wy[..., None, :])[..., None] * wz[..., None, None, :]).reshape(L, n, 8)
    return idx.view(L, n, 8), w


def _interpolate(table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_k w[..., k] * table[idx[..., k]]`` for ``(L, N, 8)`` idx and w: ``(L, N, F)``, no autograd.

    ``embedding_bag(mode="sum", per_sample_weights=...)`` fuses the gather and the weighted sum
    (no (L, N, 8, F) temporary).
    """
    L, n, _ = idx.shape
    out = torch.nn.functional.embedding_bag(idx.reshape(-1, 8), table, per_sample_weights=w.reshape(-1, 8),
                                            mode="sum")
    return out.view(L, n, table.shape[1])


class _InterpolateTable(torch.autograd.Function):
    """:func:`_interpolate` differentiable w.r.t. the table only (weights constant: x needs no grad).

    The backward scatters ``w * grad`` into a zero table with ONE ``index_add_`` on the table
    viewed as complex numbers when F = 2 (one 8-byte row per corner; the 2-D ``index_add`` /
    ``embedding_bag`` backwards are 3-10x slower on CPU).
    """

    @staticmethod
    def forward(ctx, table, idx, w):
        ctx.save_for_backward(idx, w)
        ctx.table_shape = table.shape
        return _interpolate(table, idx, w)

    @staticmethod
    def backward(ctx, grad):
        idx, w = ctx.saved_tensors
        n_entries, F = ctx.table_shape
        src = (w.unsqueeze(-1) * grad.unsqueeze(2)).reshape(-1, F)       # (L N 8, F)
        flat = idx.reshape(-1)
        if F == 2 and src.dtype in (torch.float32, torch.float64):
            cdt = torch.complex64 if src.dtype == torch.float32 else torch.complex128
            g = torch.zeros(n_entries, dtype=cdt, device=src.device)
            g.index_add_(0, flat, src.view(cdt).view(-1))
            return torch.view_as_real(g), None, None
        g = torch.zeros(n_entries, F, dtype=src.dtype, device=src.device)
        return g.index_add_(0, flat, src), None, None


def _encode_chunk(x: torch.Tensor, table: torch.Tensor, k: _LevelConstants) -> torch.Tensor:
    n = x.shape[0]
    L = k.scales.shape[0]
    F = table.shape[1]
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        # Plain autograd (gather + einsum), so d/dx and double backward work.
        idx, w = _corners(x, k)
        feats = table.index_select(0, idx.reshape(-1)).view(L, n, 8, F)
        out = torch.einsum("lnk,lnkf->lnf", w, feats)
    else:
        with torch.no_grad():
            idx, w = _corners(x, k)
        if grad and table.requires_grad:
            out = _InterpolateTable.apply(table, idx, w)
        else:
            out = _interpolate(table, idx, w)
    return out.permute(1, 0, 2).reshape(n, L * F)


def hash_grid_encode(x: torch.Tensor, table: torch.Tensor, config: HashGridConfig,
                     layout: LevelLayout | None = None, _constants: _LevelConstants | None = None
                     ) -> torch.Tensor:
    """Evaluate a multiresolution hash grid (pure PyTorch).

    Args:
        x: ``(N, 3)`` points in ``[0, 1]^3``, floating point (float32 or float64).
        table: ``(layout.n_entries, F)`` parameters of all levels (see :func:`level_layout`),
            same dtype and device as ``x``.
        config: the grid's hyper-parameters.
        layout: :func:`level_layout` of ``config`` (computed when omitted).

    Returns:
        ``(N, n_levels * F)`` features, level-major (level 0's F features first).
        Differentiable w.r.t. ``table`` and ``x``.
    """
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (N, 3), got {tuple(x.shape)}")
    layout = layout if layout is not None else level_layout(config)
    F = config.n_features_per_level
    if table.ndim != 2 or table.shape != (layout.n_entries, F):
        raise ValueError(f"table must have shape ({layout.n_entries}, {F}), got {tuple(table.shape)}")
    if not x.is_floating_point() or x.dtype != table.dtype or x.device != table.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) must be floating point with the table's dtype "
                         f"and device ({table.dtype}, {table.device})")
    k = _constants if _constants is not None else _LevelConstants(config, layout, x.device, x.dtype)
    n = x.shape[0]
    recording = torch.is_grad_enabled() and (x.requires_grad or table.requires_grad)
    if recording or n <= config.chunk_size:
        return _encode_chunk(x, table, k)
    out = x.new_empty(n, config.out_dim)
    for start in range(0, n, config.chunk_size):
        out[start:start + config.chunk_size] = _encode_chunk(x[start:start + config.chunk_size], table, k)
    return out


class HashGridEncoding(nn.Module):
    """Multiresolution hash-grid encoding of 3D points in ``[0, 1]^3``.

    Args:
        config: grid hyper-parameters (defaults: 16 levels x 2 features, 2^19 entries, base 16).
        backend: ``"torch"`` (pure PyTorch, any device), ``"tcnn"`` (tinycudann, CUDA only;
            ImportError with an install hint when missing) or ``"auto"`` (tinycudann when CUDA
            is available and it imports, else torch with one warning per process).

    Both backends keep the same flat parameter layout (tinycudann's), so values are
    interchangeable; ``forward(x)`` maps ``(N, 3)`` -> ``(N, config.out_dim)``.
    """

    def __init__(self, config: HashGridConfig | None = None, backend: Backend = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = config if config is not None else HashGridConfig()
        self.layout = level_layout(self.config)
        from . import tcnn_backend  # noqa: PLC0415 (module of this package; tinycudann stays lazy)

        self.backend = tcnn_backend.resolve_backend(backend)
        if self.backend == "tcnn":
            self.tcnn = tcnn_backend.make_encoding(self.config)
        else:
            init = torch.empty(self.layout.n_entries, self.config.n_features_per_level)
            nn.init.uniform_(init, -self.config.init_scale, self.config.init_scale)
            self.table = nn.Parameter(init)
        self._constants_cache: dict = {}

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points.

        Args:
            x: ``(N, 3)`` points in ``[0, 1]^3``.

        Returns:
            ``(N, n_levels * n_features_per_level)`` features (level-major), in the
            table's dtype for the torch backend, float32 for tinycudann.
        """
        if x.ndim != 2 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (N, 3), got {tuple(x.shape)}")
        if self.backend == "tcnn":
            return self.tcnn(x.to(torch.float32).contiguous()).to(torch.float32)
        key = (self.table.device, self.table.dtype)
        k = self._constants_cache.get(key)
        if k is None:
            k = self._constants_cache[key] = _LevelConstants(self.config, self.layout, *key)
        return hash_grid_encode(x.to(self.table.dtype), self.table, self.config, self.layout, k)

    def extra_repr(self) -> str:
        c = self.config
        return (f"backend={self.backend}, levels={c.n_levels}, features={c.n_features_per_level}, "
                f"log2_T={c.log2_hashmap_size}, base={c.base_resolution}, scale={c.per_level_scale}")
