"""Ray marching and volume rendering on packed samples, in pure PyTorch.

Rays are marched uniformly at ``step_size`` inside an axis-aligned box; samples
are *packed*: one flat list of S samples over all R rays, grouped by ray
(``ray_indices`` non-decreasing), as nerfacc does. With an
:class:`~mpod_core.volume.occupancy.OccupancyGrid` the samples that fall in
empty cells are dropped before the field is evaluated (empty-space skipping);
with a ``density_fn`` and thresholds, samples of negligible alpha and samples
behind nearly opaque matter are dropped too (nerfacc's ``alpha_thre`` and
``early_stop_eps``), after a density evaluation without autograd.

Volume rendering (MPOD123 eq. 3-5, NeRF's quadrature) for the samples of one
ray, with interval lengths ``delta_i = t_end_i - t_start_i``::

    alpha_i = 1 - exp(-sigma_i delta_i)
    T_i     = exp(-sum_{j<i} sigma_j delta_j)
    w_i     = T_i alpha_i,   opacity = sum_i w_i = 1 - exp(-sum_i sigma_i delta_i)

Backends: everything here is the pure-torch path (CPU or GPU). nerfacc's CUDA
estimator (``nerfacc.OccGridEstimator.sampling`` and
``nerfacc.render_weight_from_density``) takes the same packed layout and is
where a ``backend="auto" | "torch" | "nerfacc"`` argument would plug in, as
:mod:`mpod_core.render.ops` does for nvdiffrast: a lazy ``import nerfacc``
inside the function, never at module top, falling back to torch with a single
warning. It is not wired in yet because it cannot be tested on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

#: Default number of rays processed at once by :func:`render_rays` and friends.
DEFAULT_CHUNK = 4096
#: Default cap on samples per ray; more raises (choose a larger ``step_size``).
DEFAULT_MAX_SAMPLES_PER_RAY = 1024

FieldFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
DensityFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RaySamples:
    """Packed samples of R rays (S samples in all, grouped by ray).

    Attributes:
        ray_indices: (S,) long, index of each sample's ray, non-decreasing.
        t_starts: (S,) start of each sample's interval along its ray.
        t_ends: (S,) end of the interval (``t_ends - t_starts`` is delta).
        positions: (S, 3) world position where the field is evaluated (the
            interval midpoint, or a jittered point inside the interval).
        n_rays: R.
    """

    ray_indices: torch.Tensor
    t_starts: torch.Tensor
    t_ends: torch.Tensor
    positions: torch.Tensor
    n_rays: int

    def __len__(self) -> int:
        return self.ray_indices.shape[0]


def _check_rays(origins, dirs) -> None:
    for name, x in (("origins", origins), ("dirs", dirs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating (R, 3) tensor, got {tuple(x.shape)} {x.dtype}")
    if origins.shape != dirs.shape:
        raise ValueError(f"origins and dirs must match: {tuple(origins.shape)} vs {tuple(dirs.shape)}")


def _as_aabb(aabb, like: torch.Tensor) -> torch.Tensor:
    box = torch.as_tensor(aabb, dtype=like.dtype, device=like.device).reshape(-1)
    if box.numel() != 6:
        raise ValueError(f"aabb: expected 6 values (xmin, ymin, zmin, xmax, ymax, zmax), got {box.numel()}")
    if not (box[3:] > box[:3]).all():
        raise ValueError(f"aabb: max must exceed min on every axis, got {box.tolist()}")
    return box


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, aabb) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersect rays with an axis-aligned box (slab method).

    Args:
        origins: (R, 3) ray origins.
        dirs: (R, 3) ray directions (any length; ``t`` is in units of ``|dirs|``).
            Zero components are allowed.
        aabb: (6,) ``(xmin, ymin, zmin, xmax, ymax, zmax)``.

    Returns:
        t_near (R,), t_far (R,), hit (R,) bool. Only ``t >= 0`` counts (a ray
        starting inside the box has ``t_near = 0``). For rays that miss,
        ``t_near = t_far = 0`` and ``hit`` is False.
    """
    _check_rays(origins, dirs)
    box = _as_aabb(aabb, origins)
    with torch.no_grad():
        inv = 1.0 / dirs  # +-inf on zero components
        t0 = (box[:3] - origins) * inv
        t1 = (box[3:] - origins) * inv
        # 0 * inf = nan: the origin lies on that slab's plane with a parallel ray -> no constraint.
        tmin = torch.nan_to_num(torch.minimum(t0, t1), nan=-math.inf)
        tmax = torch.nan_to_num(torch.maximum(t0, t1), nan=math.inf)
        t_near = tmin.amax(dim=-1).clamp_min(0.0)
        t_far = tmax.amin(dim=-1)
        hit = t_far > t_near
        zero = torch.zeros_like(t_near)
        return torch.where(hit, t_near, zero), torch.where(hit, t_far, zero), hit


def jitter_seed_from(generator: Optional[torch.Generator]) -> Optional[int]:
    """One 62-bit seed for :func:`hashed_uniform` drawn from ``generator`` (None: None)."""
    if generator is None:
        return None
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device))


def hashed_uniform(seed: int, ray_ids: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) that depend only on (seed, ray, sample index).

    A counter-based generator (SplitMix64's finaliser on the int64 counter
    ``seed + ray * 0x9E3779B1 + sample * 0x85EBCA77``, with logical shifts done
    by masks since torch shifts int64 arithmetically), so a ray gets the same
    jitter whatever chunk or call it is rendered in: a re-render of any subset
    of rays reproduces the samples of a full render exactly (the two-pass
    backward of :mod:`mpod_core.fields.backprop` relies on it).

    Args:
        seed: any int (e.g. from :func:`jitter_seed_from`).
        ray_ids, sample_ids: int64 tensors of one shape.

    Returns:
        float32 tensor of that shape, 24-bit resolution.
    """
    x = ray_ids.to(torch.int64) * 0x9E3779B1 + sample_ids.to(torch.int64) * 0x85EBCA77 + (int(seed) & ((1 << 62) - 1))
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94D049BB133111EB as int64
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 40) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def sample_along_rays(origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor, t_far: torch.Tensor,
                      step_size: float, grid=None, *, generator: Optional[torch.Generator] = None,
                      max_samples_per_ray: int = DEFAULT_MAX_SAMPLES_PER_RAY,
                      chunk: int = DEFAULT_CHUNK, jitter_seed: Optional[int] = None,
                      ray_offset: int = 0, density_fn: Optional[DensityFn] = None,
                      alpha_threshold: float = 0.0, early_stop_eps: float = 0.0) -> RaySamples:
    """Uniform ray marching with optional empty-space skipping and pruning.

    Ray r gets the intervals ``[t_near + k h, min(t_near + (k + 1) h, t_far)]``
    for ``k = 0 .. ceil((t_far - t_near) / h) - 1`` (``h = step_size``), so the
    intervals tile ``[t_near, t_far]`` exactly; the last one may be shorter.
    Each interval is evaluated at its midpoint, or, with ``generator``, at a
    uniformly jittered point inside it (stratified sampling). With ``grid``,
    samples whose position lies in an unoccupied cell are dropped.

    With ``density_fn`` (nerfacc's ``OccGridEstimator.sampling(sigma_fn=...,
    alpha_thre=..., early_stop_eps=...)``), the density of the samples left by
    the grid is evaluated without autograd, and a sample is dropped when its
    ``alpha = 1 - exp(-sigma delta) < alpha_threshold`` or when the
    transmittance before it, ``T = exp(-sum of sigma delta over the earlier
    candidates of its ray)`` (the dropped low-alpha ones included), is below
    ``early_stop_eps``. Compositing the kept samples then differs from
    compositing all candidates by at most ``sum of the dropped alphas +
    early_stop_eps`` per ray in opacity, and in each colour channel for
    colours in [0, 1] (each low-alpha drop moves the composite by at most its
    alpha; everything behind ``T < eps`` weighs less than ``eps``). The bound is
    nearly attained by faint matter: a ray whose every step has alpha below the
    threshold loses all of it (with threshold 0.01, e.g. opacity 0.25 spread
    over 30 steps renders as empty), as with nerfacc.

    The jitter of candidate k of ray r is ``hashed_uniform(seed, ray_offset + r, k)``
    (one seed per call, drawn from ``generator`` or given as ``jitter_seed``), so
    the samples depend only on the seed, the rays, the grid and the density:
    any chunking, and any subset of the rays marched with its ``ray_offset``,
    reproduces exactly the samples of one call over all of them.

    Vectorised: rays are processed ``chunk`` at a time as a dense (chunk, K)
    table of candidates (K = the chunk's largest sample count), masked, then
    packed with ``nonzero``; memory is bounded by ``chunk * max_samples_per_ray``.

    Args:
        origins, dirs: (R, 3) rays.
        t_near, t_far: (R,) marching range; rays with ``t_far <= t_near`` get no samples.
        step_size: interval length h > 0 (in units of ``|dirs|``).
        grid: optional occupancy grid with an ``occupied(points (N, 3)) -> (N,) bool`` method.
        generator: jitter positions inside the intervals (None = midpoints): one
            seed is drawn from it for :func:`hashed_uniform`.
        jitter_seed: jitter with this seed instead (overrides ``generator``).
        ray_offset: global index of ray 0 of this call in the jitter's counter
            (a subset of the rays of a render reproduces their samples).
        max_samples_per_ray: ValueError when a ray would need more samples.
        chunk: rays per batch (> 0).
        density_fn: ``positions (S, 3) -> sigma (S,)`` used for pruning (called
            under ``no_grad``, once per chunk); None disables pruning.
        alpha_threshold: drop samples with alpha below this (0 keeps all; nerfacc: 0.01).
        early_stop_eps: drop samples whose transmittance is below this (0
            keeps all; nerfacc: 1e-4).

    Returns:
        :class:`RaySamples` (packed, grouped by ray, in marching order).
    """
    _check_rays(origins, dirs)
    n = origins.shape[0]
    for name, t in (("t_near", t_near), ("t_far", t_far)):
        if t.shape != (n,):
            raise ValueError(f"{name}: expected ({n},), got {tuple(t.shape)}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if not (0.0 <= alpha_threshold < 1.0 and 0.0 <= early_stop_eps < 1.0):
        raise ValueError(f"alpha_threshold and early_stop_eps must be in [0, 1), got "
                         f"{alpha_threshold}, {early_stop_eps}")
    prune = alpha_threshold > 0 or early_stop_eps > 0
    if prune and density_fn is None:
        raise ValueError("alpha_threshold / early_stop_eps need a density_fn to evaluate the alphas")
    device, dtype = origins.device, origins.dtype
    if jitter_seed is None:
        jitter_seed = jitter_seed_from(generator)
    with torch.no_grad():
        counts = torch.ceil((t_far - t_near) / step_size).clamp_min(0).long()
        # A ray whose range is a float-rounding hair above a multiple of h would get a
        # zero-length extra interval; drop it (it contributes nothing).
        counts = torch.where((counts > 0) & (t_near + (counts - 1) * step_size >= t_far), counts - 1, counts)
        kmax_all = int(counts.max()) if n else 0
        if kmax_all > max_samples_per_ray:
            raise ValueError(f"a ray needs {kmax_all} samples at step_size={step_size}, more than "
                             f"max_samples_per_ray={max_samples_per_ray}; use a larger step_size")
        parts = []
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            c = counts[lo:hi]
            kmax = int(c.max()) if hi > lo else 0
            if kmax == 0:
                continue
            k = torch.arange(kmax, device=device, dtype=dtype)
            tn, tf = t_near[lo:hi, None], t_far[lo:hi, None]
            starts = tn + k * step_size
            ends = torch.minimum(starts + step_size, tf)
            valid = torch.arange(kmax, device=device)[None, :] < c[:, None]
            rows, cols = valid.nonzero(as_tuple=True)
            ts, te = starts[rows, cols], ends[rows, cols]
            if jitter_seed is not None:
                u = hashed_uniform(jitter_seed, rows + (lo + ray_offset), cols).to(device, dtype)
            else:
                u = torch.full_like(ts, 0.5)
            tm = ts + u * (te - ts)
            ridx = rows + lo
            pos = origins[ridx] + tm[:, None] * dirs[ridx]
            if grid is not None:
                keep = grid.occupied(pos)
                ridx, ts, te, pos = ridx[keep], ts[keep], te[keep], pos[keep]
            if prune and ridx.numel() > 0:
                keep = _visible_samples(density_fn, pos, ts, te, ridx - lo, hi - lo, alpha_threshold,
                                        early_stop_eps)
                ridx, ts, te, pos = ridx[keep], ts[keep], te[keep], pos[keep]
            parts.append((ridx, ts, te, pos))
    if not parts:
        return RaySamples(torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=dtype, device=device),
                          torch.zeros(0, dtype=dtype, device=device), torch.zeros(0, 3, dtype=dtype, device=device), n)
    ridx, ts, te, pos = (torch.cat(p) for p in zip(*parts))
    return RaySamples(ridx, ts, te, pos, n)


def _visible_samples(density_fn: DensityFn, positions: torch.Tensor, t_starts: torch.Tensor,
                     t_ends: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, alpha_threshold: float,
                     early_stop_eps: float) -> torch.Tensor:
    """(S,) bool: packed samples with ``alpha >= alpha_threshold`` and transmittance ``>= early_stop_eps``.

    ``ray_indices`` in [0, n_rays), grouped by ray; the density is evaluated without autograd.
    """
    with torch.no_grad():
        sigma = density_fn(positions)
        if sigma.shape != t_starts.shape:
            raise ValueError(f"density_fn must return ({t_starts.shape[0]},), got {tuple(sigma.shape)}")
        tau = sigma.to(t_starts.dtype) * (t_ends - t_starts)
        # The same expression render_weights uses, so "kept" matches the alphas it reports.
        keep = (1.0 - torch.exp(-tau)) >= alpha_threshold
        if early_stop_eps > 0:
            keep &= torch.exp(-_exclusive_segment_cumsum(tau, ray_indices, n_rays)) >= early_stop_eps
        return keep


def _exclusive_segment_cumsum(x: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per-ray exclusive cumulative sum of packed ``x`` (grouped by ray).

    Global cumsum minus the cumsum at the ray's first sample. Done in float64
    (except on MPS) so the difference of two large running totals stays exact
    to float32 precision however many samples precede the ray.
    """
    acc = torch.float64 if x.device.type != "mps" else x.dtype
    xs = x.to(acc)
    incl = torch.cumsum(xs, 0)
    excl = incl - xs
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # index of each ray's first sample
    return (excl - excl[first[ray_indices]]).to(x.dtype)


def render_weights(sigmas: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                   ray_indices: torch.Tensor, n_rays: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Volume-rendering weights of packed samples (differentiable w.r.t. ``sigmas``).

    Args:
        sigmas: (S,) densities >= 0.
        t_starts, t_ends: (S,) sample intervals.
        ray_indices: (S,) long, non-decreasing (samples grouped by ray, in
            marching order within a ray), values in [0, n_rays).
        n_rays: number of rays R.

    Returns:
        weights (S,) ``T_i alpha_i``, transmittance (S,) ``T_i`` (before the
        sample), alphas (S,) ``1 - exp(-sigma_i delta_i)``.
    """
    s = sigmas.shape[0] if sigmas.dim() == 1 else -1
    for name, t in (("sigmas", sigmas), ("t_starts", t_starts), ("t_ends", t_ends), ("ray_indices", ray_indices)):
        if t.dim() != 1 or t.shape[0] != s:
            raise ValueError(f"{name}: expected ({s},) like sigmas, got {tuple(t.shape)}")
    if ray_indices.dtype != torch.long:
        raise TypeError(f"ray_indices: expected torch.long, got {ray_indices.dtype}")
    tau = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-tau)
    trans = torch.exp(-_exclusive_segment_cumsum(tau, ray_indices, n_rays))
    return trans * alphas, trans, alphas


def accumulate(weights: torch.Tensor, values: Optional[torch.Tensor], ray_indices: torch.Tensor,
               n_rays: int) -> torch.Tensor:
    """Sum weighted per-sample values per ray (``index_add``; differentiable).

    Args:
        weights: (S,) weights.
        values: (S, C) values, or None for the weights themselves (opacity).
        ray_indices: (S,) long ray index of each sample.
        n_rays: R.

    Returns:
        (R, C), or (R,) when ``values`` is None. Rays without samples get 0.
    """
    if values is None:
        out = torch.zeros(n_rays, dtype=weights.dtype, device=weights.device)
        return out.index_add(0, ray_indices, weights)
    if values.dim() != 2 or values.shape[0] != weights.shape[0]:
        raise ValueError(f"values: expected ({weights.shape[0]}, C), got {tuple(values.shape)}")
    out = torch.zeros(n_rays, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add(0, ray_indices, weights[:, None] * values)


def render_rays(field_fn: FieldFn, origins: torch.Tensor, dirs: torch.Tensor, aabb, step_size: float,
                grid=None, *, background: Union[None, float, torch.Tensor] = None,
                normal_fn: Optional[DensityFn] = None, generator: Optional[torch.Generator] = None,
                chunk: int = DEFAULT_CHUNK, max_samples_per_ray: int = DEFAULT_MAX_SAMPLES_PER_RAY,
                eps: float = 1e-10, detached_weight_extras: Sequence[str] = (),
                count_samples: bool = False, jitter_seed: Optional[int] = None,
                ray_offset: int = 0, density_fn: Optional[DensityFn] = None, alpha_threshold: float = 0.0,
                early_stop_eps: float = 0.0) -> Dict[str, torch.Tensor]:
    """Volume-render rays through a radiance field inside ``aabb``.

    Rays are processed ``chunk`` at a time (sampling, field evaluation and
    compositing), so peak memory is bounded by ``chunk * max_samples_per_ray``
    samples at any image resolution; gradients flow to the field's outputs.

    Args:
        field_fn: ``(positions (S, 3), dirs (S, 3)) -> (sigma (S,), rgb (S, 3))``,
            or ``-> (sigma, rgb, extras)`` with ``extras`` a dict of per-sample
            values ``(S,)`` or ``(S, C)`` that are accumulated like the colour
            (``sum_i w_i v_i``) into outputs of the same names (``(R,)`` or
            ``(R, C)``); ``dirs`` are the rays' directions as given.
        origins, dirs: (R, 3) rays (``t`` and ``step_size`` are in units of ``|dirs|``).
        aabb: (6,) box outside which density is taken as 0.
        step_size: marching step (see :func:`sample_along_rays`).
        grid: optional occupancy grid for empty-space skipping.
        background: None (colour stays premultiplied, i.e. black background),
            a float, a (3,) colour or an (R, 3) per-ray colour composited as
            ``color + (1 - opacity) * background``.
        normal_fn: optional ``positions (S, 3) -> normals (S, 3)``; the output
            ``normal`` is ``sum_i w_i n_i`` (premultiplied, not renormalised).
        generator: jitter sample positions (training); None = midpoints.
        chunk: rays per batch.
        max_samples_per_ray: see :func:`sample_along_rays`.
        jitter_seed, ray_offset: see :func:`sample_along_rays` (a ray's samples
            depend only on the seed and its global index ``ray_offset + r``).
        eps: floor of the opacity in the depth division.
        detached_weight_extras: names of extras accumulated with the weights
            detached (``sum_i stop_grad(w_i) v_i``: gradients reach only the
            values, as DreamFusion's orientation loss wants).
        count_samples: also return ``samples`` (R,) long, the samples each ray
            evaluated (to size later passes over the same rays by memory).
        density_fn, alpha_threshold, early_stop_eps: prune samples of alpha
            below ``alpha_threshold`` or transmittance below ``early_stop_eps``
            before ``field_fn`` is called, with ``density_fn`` (``positions
            (S, 3) -> sigma (S,)``, the density ``field_fn`` returns, evaluated
            without autograd); see :func:`sample_along_rays` for the error bound.
            Defaults: no pruning.

    Returns:
        dict with ``color`` (R, 3), ``opacity`` (R,) ``sum_i w_i``, ``depth``
        (R,) ``sum_i w_i t_mid_i / max(opacity, eps)`` (expected ray distance of
        the visible matter, 0 for empty rays), ``normal`` (R, 3) when
        ``normal_fn`` is given, and the accumulated extras.
    """
    _check_rays(origins, dirs)
    n = origins.shape[0]
    t_near, t_far, _ = ray_aabb(origins, dirs, aabb)
    if jitter_seed is None:
        jitter_seed = jitter_seed_from(generator)
    out = {"color": [], "opacity": [], "depth": []}
    if normal_fn is not None:
        out["normal"] = []
    counts = []
    extras_out: Dict[str, Dict[int, torch.Tensor]] = {}  # name -> {chunk start: (m,) or (m, C)}
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        o, d = origins[lo:hi], dirs[lo:hi]
        smp = sample_along_rays(o, d, t_near[lo:hi], t_far[lo:hi], step_size, grid, jitter_seed=jitter_seed,
                                ray_offset=ray_offset + lo, max_samples_per_ray=max_samples_per_ray,
                                chunk=hi - lo, density_fn=density_fn, alpha_threshold=alpha_threshold,
                                early_stop_eps=early_stop_eps)
        m = hi - lo
        if count_samples:
            counts.append(torch.bincount(smp.ray_indices, minlength=m))
        if len(smp) == 0:
            z = origins.new_zeros(m)
            out["color"].append(origins.new_zeros(m, 3))
            out["opacity"].append(z)
            out["depth"].append(z)
            if normal_fn is not None:
                out["normal"].append(origins.new_zeros(m, 3))
            continue
        result = field_fn(smp.positions, d[smp.ray_indices])
        sigma, rgb = result[0], result[1]
        extras = result[2] if len(result) > 2 else {}
        if sigma.shape != (len(smp),) or rgb.shape != (len(smp), 3):
            raise ValueError(f"field_fn must return sigma ({len(smp)},) and rgb ({len(smp)}, 3), "
                             f"got {tuple(sigma.shape)} and {tuple(rgb.shape)}")
        w, _, _ = render_weights(sigma, smp.t_starts, smp.t_ends, smp.ray_indices, m)
        opacity = accumulate(w, None, smp.ray_indices, m)
        t_mid = 0.5 * (smp.t_starts + smp.t_ends)
        out["color"].append(accumulate(w, rgb, smp.ray_indices, m))
        out["opacity"].append(opacity)
        out["depth"].append(accumulate(w * t_mid, None, smp.ray_indices, m) / opacity.clamp_min(eps))
        if normal_fn is not None:
            out["normal"].append(accumulate(w, normal_fn(smp.positions), smp.ray_indices, m))
        for name, value in extras.items():
            if value.shape[0] != len(smp) or value.dim() not in (1, 2):
                raise ValueError(f"field_fn extra {name!r}: expected ({len(smp)},) or ({len(smp)}, C), "
                                 f"got {tuple(value.shape)}")
            wk = w.detach() if name in detached_weight_extras else w
            acc = accumulate(wk * value, None, smp.ray_indices, m) if value.dim() == 1 \
                else accumulate(wk, value, smp.ray_indices, m)
            extras_out.setdefault(name, {})[lo] = acc
    for name, parts in extras_out.items():  # chunks without samples (or before the first) get zeros
        shape = next(iter(parts.values())).shape[1:]
        out[name] = [parts[lo] if lo in parts else origins.new_zeros((min(chunk, n - lo),) + tuple(shape))
                     for lo in range(0, n, chunk)]
    res = {k: torch.cat(v) if v else origins.new_zeros((0, 3) if k in ("color", "normal") else (0,))
           for k, v in out.items()}
    if count_samples:
        res["samples"] = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long, device=origins.device)
    if background is not None:
        bg = torch.as_tensor(background, dtype=res["color"].dtype, device=res["color"].device)
        res["color"] = res["color"] + (1.0 - res["opacity"])[:, None] * bg
    return res


def opacity_from_density(density_fn: DensityFn, origins: torch.Tensor, dirs: torch.Tensor, aabb,
                         step_size: float, grid=None, *, generator: Optional[torch.Generator] = None,
                         chunk: int = DEFAULT_CHUNK, max_samples_per_ray: int = DEFAULT_MAX_SAMPLES_PER_RAY,
                         alpha_threshold: float = 0.0, early_stop_eps: float = 0.0) -> torch.Tensor:
    """Accumulated opacity from density alone (MPOD123 eq. 3-5), no colour.

    ``O = sum_i T_i (1 - exp(-sigma_i delta_i))`` per ray, chunked like
    :func:`render_rays`.

    Args:
        density_fn: ``positions (S, 3) -> sigma (S,)``.
        origins, dirs, aabb, step_size, grid, generator, chunk, max_samples_per_ray:
            as in :func:`render_rays`.
        alpha_threshold, early_stop_eps: prune samples (alphas evaluated with
            ``density_fn`` without autograd) as in :func:`render_rays`; 0 = off.

    Returns:
        (R,) opacity in [0, 1] (differentiable w.r.t. the densities).
    """
    _check_rays(origins, dirs)
    n = origins.shape[0]
    t_near, t_far, _ = ray_aabb(origins, dirs, aabb)
    seed = jitter_seed_from(generator)
    parts = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        smp = sample_along_rays(origins[lo:hi], dirs[lo:hi], t_near[lo:hi], t_far[lo:hi], step_size, grid,
                                jitter_seed=seed, ray_offset=lo, max_samples_per_ray=max_samples_per_ray,
                                chunk=hi - lo, density_fn=density_fn, alpha_threshold=alpha_threshold,
                                early_stop_eps=early_stop_eps)
        if len(smp) == 0:
            parts.append(origins.new_zeros(hi - lo))
            continue
        sigma = density_fn(smp.positions)
        if sigma.shape != (len(smp),):
            raise ValueError(f"density_fn must return ({len(smp)},), got {tuple(sigma.shape)}")
        w, _, _ = render_weights(sigma, smp.t_starts, smp.t_ends, smp.ray_indices, hi - lo)
        parts.append(accumulate(w, None, smp.ray_indices, hi - lo))
    return torch.cat(parts) if parts else origins.new_zeros(0)
