"""Occupancy grid for empty-space skipping (the Instant-NGP / nerfacc scheme).

A regular grid over an axis-aligned box keeps a running estimate of the
largest ``density * step_size`` seen in each cell and a binary ``mask`` of
cells worth sampling. :meth:`OccupancyGrid.update` evaluates the density at one
random point per cell (every cell during warm-up, afterwards a random quarter
of the cells plus up to as many currently occupied ones) and applies the EMA
max-decay ``grid = max(grid * decay, new)`` to the visited cells; a cell is
occupied when its estimate is positive and at least ``min(threshold, mean
estimate)``.

With ``step_size`` = the marching step, the estimate is the optical depth
``sigma * delta`` of one marching step (about its alpha when small), which is
what nerfacc's ``OccGridEstimator.update_every_n_steps`` is given
(``occ_eval_fn = density(x) * render_step_size``, ``occ_thre=0.01``): a cell is
skipped when one step through it would be at most about 1% opaque, whatever the
step. ``step_size=1`` (the default) thresholds the raw density.

Until the first update every cell is occupied, so a fresh grid never drops
samples. nerfacc's ``OccGridEstimator`` keeps the same state (``occs``,
``binaries``) and is where a CUDA backend would plug in (see
:mod:`mpod_core.volume.rendering`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn


class OccupancyGrid(nn.Module):
    """Binary occupancy over ``aabb`` with EMA density estimates per cell.

    Buffers (saved in ``state_dict``): ``aabb`` (6,), ``density`` (X, Y, Z)
    float estimates of ``density * step_size`` (see :meth:`update`), ``mask``
    (X, Y, Z) bool, ``step`` () long (updates done).

    Args:
        aabb: (6,) ``(xmin, ymin, zmin, xmax, ymax, zmax)``.
        resolution: cells per axis, an int or 3 ints.
        ema_decay: factor applied to a visited cell's old estimate, in [0, 1].
        threshold: estimate (``density * step_size``) from which a cell is
            occupied (capped by the mean estimate, as in Instant-NGP and
            nerfacc, so a low-density field is not pruned away entirely);
            cells with estimate 0 are never occupied.
        warmup_steps: updates with ``step < warmup_steps`` visit every cell.
    """

    def __init__(self, aabb, resolution: Union[int, Sequence[int]] = 32, ema_decay: float = 0.95,
                 threshold: float = 0.01, warmup_steps: int = 256):
        super().__init__()
        box = torch.as_tensor(aabb, dtype=torch.float32).reshape(-1)
        if box.numel() != 6 or not (box[3:] > box[:3]).all():
            raise ValueError(f"aabb: expected (xmin, ymin, zmin, xmax, ymax, zmax) with max > min, "
                             f"got {box.tolist()}")
        res = (resolution,) * 3 if isinstance(resolution, int) else tuple(int(r) for r in resolution)
        if len(res) != 3 or min(res) <= 0:
            raise ValueError(f"resolution: expected a positive int or 3 positive ints, got {resolution}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.resolution: Tuple[int, int, int] = res
        self.ema_decay = float(ema_decay)
        self.threshold = float(threshold)
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("aabb", box)
        self.register_buffer("density", torch.zeros(res))
        self.register_buffer("mask", torch.ones(res, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def num_cells(self) -> int:
        return self.density.numel()

    def _res(self) -> torch.Tensor:
        return torch.tensor(self.resolution, device=self.aabb.device)

    def cell_points(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """World points in the given flat cells: uniformly random (cell centres when ``generator`` is None).

        Args:
            indices: (N,) long flat cell indices (C order over X, Y, Z).
            generator: random source; None gives cell centres.

        Returns:
            (N, 3) points (float32, on the grid's device).
        """
        rx, ry, rz = self.resolution
        ijk = torch.stack([indices // (ry * rz), (indices // rz) % ry, indices % rz], -1).float()
        if generator is None:
            u = torch.full_like(ijk, 0.5)
        else:
            u = torch.rand(ijk.shape, generator=generator, device=generator.device).to(ijk.device)
        lo, hi = self.aabb[:3], self.aabb[3:]
        return lo + (ijk + u) / self._res().float() * (hi - lo)

    @torch.no_grad()
    def update(self, step: int, density_fn: Callable[[torch.Tensor], torch.Tensor],
               generator: Optional[torch.Generator] = None, *, step_size: float = 1.0) -> None:
        """One EMA update of the estimates and the mask.

        Args:
            step: training step; ``step < warmup_steps`` visits every cell,
                later steps a random quarter of the cells plus up to as many
                occupied ones.
            density_fn: ``points (N, 3) -> density (N,)``, called without grad
                on float32 points on the grid's device.
            generator: random source for the visited cells and points (None: a
                generator seeded with ``step``).
            step_size: the estimates track ``density_fn(x) * step_size``; pass
                the marching step to threshold the optical depth of one step
                (nerfacc's ``sigma * delta``), 1 to threshold raw density. Keep
                it fixed over a training run (the estimates mix otherwise).
        """
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        n = self.num_cells
        dev = self.aabb.device
        if generator is None:  # reproducible per step without touching the global RNG
            generator = torch.Generator(device=dev.type if dev.type != "mps" else "cpu")
            generator.manual_seed(int(step))
        if step < self.warmup_steps:
            idx = torch.arange(n, device=dev)
        else:
            k = max(n // 4, 1)
            uni = torch.randint(n, (k,), generator=generator,
                                device=generator.device).to(dev)
            occ = self.mask.reshape(-1).nonzero(as_tuple=True)[0]
            if occ.numel() > k:
                pick = torch.randint(occ.numel(), (k,), generator=generator,
                                     device=generator.device).to(dev)
                occ = occ[pick]
            idx = torch.cat([uni, occ])
        pts = self.cell_points(idx, generator)
        new = density_fn(pts).reshape(-1).to(self.density.dtype)
        if new.shape[0] != idx.shape[0]:
            raise ValueError(f"density_fn must return ({idx.shape[0]},), got {tuple(new.shape)}")
        if step_size != 1.0:
            new = new * step_size
        flat = self.density.reshape(-1)
        # Duplicated indices: keep the largest new value per cell.
        best = torch.zeros_like(flat).scatter_reduce(0, idx, new, reduce="amax", include_self=False)
        visited = torch.zeros(n, dtype=torch.bool, device=dev)
        visited[idx] = True
        flat[visited] = torch.maximum(flat[visited] * self.ema_decay, best[visited])
        # ">=" and "> 0" (not nerfacc's ">"): a uniform density stays occupied, zero never is.
        thr = min(self.threshold, float(flat.mean()))
        self.mask.copy_(((flat >= thr) & (flat > 0)).reshape(self.resolution))
        self.step.fill_(int(step) + 1)

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """Whether each point lies in an occupied cell.

        Args:
            points: (N, 3) world points (any float dtype/device of the grid).

        Returns:
            (N,) bool; points outside the box are unoccupied.
        """
        if points.dim() != 2 or points.shape[1] != 3:
            raise ValueError(f"points: expected (N, 3), got {tuple(points.shape)}")
        lo, hi = self.aabb[:3].to(points.dtype), self.aabb[3:].to(points.dtype)
        res = self._res()
        rel = (points - lo) / (hi - lo)
        inside = ((rel >= 0) & (rel <= 1)).all(-1)
        ijk = torch.minimum((rel.clamp(0, 1) * res).long(), res - 1)
        rx, ry, rz = self.resolution
        flat = (ijk[:, 0] * ry + ijk[:, 1]) * rz + ijk[:, 2]
        return inside & self.mask.reshape(-1)[flat]
