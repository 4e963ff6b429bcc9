"""Benchmark: pure-torch rasterizer vs trimesh ray casting on one view of a ~82k-triangle mesh.

Mesh: ``trimesh.creation.icosphere(subdivisions=6, radius=0.8)`` (81,920 faces,
40,962 vertices), seen from the papers' reference camera (elevation 0, azimuth 0,
distance 2.5, fov 40) at 256 x 256, CPU, torch's default thread count and,
for comparison, one thread.

Times are the median of several calls after a warm-up call. Peak memory is
the growth of the resident set size (``/proc/self/statm``, sampled every
millisecond by a thread) during the first (cold) call of each operation, in a
fresh child process per operation: ``tracemalloc`` does not see torch's
allocations, and ``ru_maxrss`` deltas read 0 here because building the mesh
peaks higher than the call. Ray casting uses
``trimesh.ray.ray_triangle.RayMeshIntersector.intersects_location`` (rtree), the
reference the tests compare against, on every 4th pixel row and column (4,096
rays, in chunks of 512 to bound its memory); its full-frame time is extrapolated.

Run: ``python bench/bench_rasterize.py`` (about a minute).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # allow running from anywhere without installing the pack
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import trimesh  # noqa: E402

from mpod_core import cameras as C  # noqa: E402
from mpod_core.render import antialias, interpolate, rasterize, render_mesh  # noqa: E402
from timing import median_time, peak_rss_growth_kib  # noqa: E402  (bench/ is sys.path[0] when run as a script)

SIZE = 256
SUBDIVISIONS = 6
RADIUS = 0.8
REPEATS = 7
RAY_STRIDE = 4
RAY_CHUNK = 512


def scene():
    mesh = trimesh.creation.icosphere(subdivisions=SUBDIVISIONS, radius=RADIUS)
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    f = torch.tensor(mesh.faces, dtype=torch.long)
    cam = C.reference_camera()
    return mesh, v, f, cam


def operations(v, f, cam):
    clip = C.world_to_clip(v, cam, SIZE, SIZE)
    normals = torch.nn.functional.normalize(v, dim=-1)  # a sphere's vertex normals
    state = {}

    def rast():
        state["rast"] = rasterize(clip, f, (SIZE, SIZE), backend="torch")

    def rast_interp():
        r = rasterize(clip, f, (SIZE, SIZE), backend="torch")
        state["normal"] = interpolate(normals, r, f, backend="torch")

    shade = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))

    def aa():
        if "rast" not in state:
            rast()
        antialias(shade, state["rast"], clip, f, backend="torch")

    def full():
        render_mesh(v, f, cam, SIZE, SIZE, backend="torch")

    return {"rasterize": rast, "rasterize + interpolate(normals)": rast_interp,
            "antialias (3 channels)": aa, "render_mesh (all outputs, antialiased)": full}


def child(name: str) -> None:
    """Run one operation cold in a fresh process; print its peak RSS growth (KiB).

    A thread samples the resident set size every millisecond (torch ops release
    the GIL); the baseline is the RSS just before the call, so memory spikes of
    the setup (which would hide it from ``ru_maxrss``) do not count.
    """
    _, v, f, cam = scene()
    ops = operations(v, f, cam)
    if name.startswith("antialias"):
        ops["rasterize"]()
    print(json.dumps({"peak_rss_growth_kib": peak_rss_growth_kib(ops[name])}))


def peak_memory_mib(name: str) -> float:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_growth_kib"] / 1024.0


def timed(fn, repeats=REPEATS):
    return median_time(fn, repeats)


def main() -> None:
    mesh, v, f, cam = scene()
    n_px = SIZE * SIZE
    n_tri = len(f)
    print(f"mesh: icosphere(subdivisions={SUBDIVISIONS}, radius={RADIUS}): {n_tri} triangles, "
          f"{len(v)} vertices; image {SIZE}x{SIZE}; reference camera; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    rows = []
    default_threads = torch.get_num_threads()
    for name, fn in operations(v, f, cam).items():
        t = timed(fn)
        rows.append((name, t, n_px * n_tri / t, peak_memory_mib(name)))
    # One thread too: on a shared 2-core machine, OpenMP threads that wait on a
    # busy core make the default setting far slower than this.
    torch.set_num_threads(1)
    for name, fn in operations(v, f, cam).items():
        t = timed(fn)
        rows.append((f"{name} [1 thread]", t, n_px * n_tri / t, float("nan")))
    torch.set_num_threads(default_threads)

    # Reference: trimesh ray casting of the same view, one ray per pixel centre on
    # every RAY_STRIDE-th row and column (the full frame would take minutes and,
    # unchunked, more memory than this machine has), in chunks of RAY_CHUNK rays.
    origins, dirs = C.get_rays(cam.to(dtype=torch.float64), SIZE, SIZE)
    rows_cols = torch.arange(0, SIZE, RAY_STRIDE)
    o = origins[0][rows_cols][:, rows_cols].reshape(-1, 3).numpy()
    d = dirs[0][rows_cols][:, rows_cols].reshape(-1, 3).numpy()
    caster = trimesh.ray.ray_triangle.RayMeshIntersector(mesh)
    hit = np.zeros(len(o), bool)
    ray_depth = np.zeros(len(o))
    forward = -cam.c2w[0, :3, 2].double().numpy()
    t0 = time.perf_counter()
    for s in range(0, len(o), RAY_CHUNK):
        locs, ray_idx, _ = caster.intersects_location(o[s:s + RAY_CHUNK], d[s:s + RAY_CHUNK],
                                                      multiple_hits=False)
        hit[s + ray_idx] = True
        dist = np.linalg.norm(locs - o[s + ray_idx], axis=1)
        ray_depth[s + ray_idx] = dist * (d[s + ray_idx] @ forward)
    t_rays = time.perf_counter() - t0
    n_rays = len(o)
    rows.append((f"trimesh ray casting, {n_rays} rays (1/{RAY_STRIDE ** 2} of the pixels)", t_rays,
                 n_rays * n_tri / t_rays, float("nan")))
    rows.append((f"  -> extrapolated to all {n_px} pixels", t_rays * n_px / n_rays,
                 n_rays * n_tri / t_rays, float("nan")))

    print()
    print(f"{'operation':60s} {'time/call':>12s} {'px*tri/s':>12s} {'peak mem':>12s}")
    print("-" * 99)
    for name, t, rate, mem in rows:
        mem_s = "n/a" if mem != mem else f"{mem:8.1f} MiB"
        print(f"{name:60s} {t * 1e3:9.1f} ms {rate:12.3e} {mem_s:>12s}")
    print(f"(time: median of {REPEATS} calls after a warm-up; ray casting: one pass; peak mem: "
          "RSS growth of a cold call in a fresh process, sampled at 1 kHz)")

    # Agreement between the two on the ray-cast pixels.
    out = render_mesh(v.double(), f, cam.to(dtype=torch.float64), SIZE, SIZE, antialias=False, backend="torch")
    sil = (out.triangle_id[0][rows_cols][:, rows_cols].reshape(-1) >= 0).numpy()
    depth = out.depth[0][rows_cols][:, rows_cols].reshape(-1).numpy()
    both = sil & hit
    rel = np.abs(depth[both] - ray_depth[both]) / ray_depth[both]
    print()
    print(f"silhouette agreement torch vs ray casting: {(sil == hit).mean():.4%} of {n_rays} pixels "
          f"({(sil != hit).sum()} differ); coverage {sil.mean():.1%}")
    print(f"view depth on pixels both hit: max relative difference {rel.max():.2e}, "
          f"median {np.median(rel):.2e}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
