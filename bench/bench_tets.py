"""Benchmark: differentiable marching tetrahedra vs scikit-image's marching cubes.

Surface: the sphere ``|p - c| - 0.6`` (c = (0.05, -0.03, 0.02), off the lattice's
symmetry planes) on the box [-1, 1]^3 with n cells per axis, n = 32, 64, 96
(n = 32 is about threestudio's "64_tets", n = 64 "128_tets"). For each n:

* grid build: ``TetGrid.cube(n)`` once (the refine stage builds it once per box);
* marching tets forward: ``marching_tets(vertices, grid, sdf)``;
* forward + backward: as the refine loop runs it, the SDF and a per-vertex
  deformation ``delta`` as leaf tensors, ``marching_tets(deform(grid, delta), grid,
  sdf)``, then the backward of a random linear function of the mesh vertices
  (what a renderer's gradient looks like to this op);
* peer: ``skimage.measure.marching_cubes`` on the same SDF values on the same
  (n+1)^3 lattice. It is not differentiable (numpy, no gradient to the SDF or the
  vertices), so it is a speed and quality reference only, not a drop-in.

Quality: enclosed volume relative to 4/3 pi r^3 (divergence theorem on the faces).
Times are the median of 7 calls after a warm-up, float32 CPU, with torch's
default thread count and with one thread (on a shared 2-core box the 2-thread
figures stall whenever the other core is busy; the 1-thread ones are steadier).
scikit-image's marching cubes is single-threaded. Run: ``.venv/bin/python bench/bench_tets.py`` (under a minute).
"""
from __future__ import annotations

import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # allow running from anywhere without installing the pack
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.measure import marching_cubes  # noqa: E402

from mpod_core.geometry import TetGrid, deform, marching_tets  # noqa: E402
from timing import median_time  # noqa: E402  (bench/ is sys.path[0] when run as a script)

RESOLUTIONS = (32, 64, 96)
RADIUS = 0.6
CENTRE = (0.05, -0.03, 0.02)
REPEATS = 7


def enclosed_volume(v: np.ndarray, f: np.ndarray) -> float:
    v = v.astype(np.float64)
    return float(np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6)


def main() -> None:
    ball = 4 / 3 * math.pi * RADIUS ** 3
    centre = torch.tensor(CENTRE)
    threads = torch.get_num_threads()
    print(f"sphere r={RADIUS} centre={CENTRE} in [-1,1]^3, float32 CPU, median of {REPEATS}; "
          f"times as {threads} threads / 1 thread")
    header = (f"{'n':>3s} {'tets':>10s} {'build':>9s} {'tables':>9s} | {'tets fwd':>17s} {'fwd+bwd':>17s} "
              f"{'faces':>8s} {'vol err':>8s} | {'MC fwd':>8s} {'MC faces':>8s} {'MC vol err':>10s}")
    print(header)
    print("-" * len(header))
    for n in RESOLUTIONS:
        t0 = time.perf_counter()
        grid = TetGrid.cube(n)
        build = time.perf_counter() - t0
        tables = sum(t.numel() * t.element_size() for t in (grid.tets, grid.edges, grid.tet_edges))
        sdf = (grid.vertices - centre).norm(dim=1) - RADIUS

        def fwd_only():
            with torch.no_grad():
                marching_tets(grid.vertices, grid, sdf)

        mesh_v, faces = marching_tets(grid.vertices, grid, sdf)
        vol_err = enclosed_volume(mesh_v.numpy(), faces.numpy()) / ball - 1

        sdf_leaf = sdf.clone().requires_grad_(True)
        delta = torch.zeros_like(grid.vertices, requires_grad=True)
        upstream = torch.randn(mesh_v.shape, generator=torch.Generator().manual_seed(0))

        def fwd_bwd():
            sdf_leaf.grad = delta.grad = None
            v, _ = marching_tets(deform(grid, delta), grid, sdf_leaf)
            (v * upstream).sum().backward()

        fwd, fb = [], []
        for k in (threads, 1):
            torch.set_num_threads(k)
            fwd.append(median_time(fwd_only, REPEATS))
            fb.append(median_time(fwd_bwd, REPEATS))
        torch.set_num_threads(threads)

        lattice = sdf.numpy().reshape(n + 1, n + 1, n + 1)
        spacing = (2.0 / n,) * 3
        mc = median_time(lambda: marching_cubes(lattice, level=0.0, spacing=spacing), REPEATS)
        mc_v, mc_f, _, _ = marching_cubes(lattice, level=0.0, spacing=spacing)
        mc_err = abs(enclosed_volume(mc_v - 1.0, mc_f)) / ball - 1  # skimage's winding differs; |vol|

        print(f"{n:3d} {grid.tets.shape[0]:10,d} {build * 1e3:6.0f} ms {tables / 2**20:5.0f} MiB | "
              f"{fwd[0] * 1e3:5.0f} / {fwd[1] * 1e3:5.0f} ms {fb[0] * 1e3:5.0f} / {fb[1] * 1e3:5.0f} ms {faces.shape[0]:8,d} {vol_err:+8.3%} | "
              f"{mc * 1e3:5.1f} ms {mc_f.shape[0]:8,d} {mc_err:+10.3%}")


if __name__ == "__main__":
    main()
