"""Benchmark: UV unwrapping (xatlas) and texture baking (mpod_core.texture_bake) by phase.

Meshes: ``trimesh.creation.icosphere(5)`` (20,480 faces) and ``icosphere(6)`` (81,920
faces) with its vertices jittered by N(0, 1e-4): xatlas 0.0.11 segfaults on the exact
icosphere(6) (jpcy/xatlas#151), which the bench also times as the error the pack turns it
into. Texture sides 1024 and 2048, padding 4, colour_fn = (p + 1) / 2 (cheap, analytic, so
the figures are the bake's own cost), chunk 2**18.

Phases: xatlas unwrap (``unwrap_uv``: a child process running xatlas, one call: it takes
seconds to minutes), UV rasterization (``rasterize_uv``), colour evaluation (``sample_texels``:
barycentric positions + colour_fn), padding (``fill_padding``); median of 3 after a warm-up
for the last three. Peak memory = RSS growth during one cold ``bake_texture`` call.

Peers, same run: ``xatlas.parametrize(v, f)`` with its default options (what
stable-dreamfusion / threestudio call; in a child process too, timed inside it), and the
vertex-colour path: ``textured_mesh(fallback="vertex_colors")`` (colour_fn at the vertices)
and trimesh's own ``TextureVisuals.to_color()`` (trimesh sampling the baked texture at the
vertices).

Run: ``.venv/bin/python bench/bench_texture_bake.py`` (about 3-5 minutes on 2 cores).
"""
from __future__ import annotations

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
from PIL import Image  # noqa: E402

from bench.timing import median_time, peak_rss_growth_kib  # noqa: E402
from mpod_core import texture_bake as tb  # noqa: E402

PADDING = 4

PEER = """
import sys, time
import numpy as np
import xatlas
with np.load(sys.argv[1]) as d:
    v, f = d["v"], d["f"]
t0 = time.perf_counter()
vmapping, faces, uv = xatlas.parametrize(v, f)
print(time.perf_counter() - t0, len(vmapping))
"""


def colour(p: torch.Tensor) -> torch.Tensor:
    return (p + 1) / 2


def meshes():
    ico5 = trimesh.creation.icosphere(5)
    ico6 = trimesh.creation.icosphere(6)
    jitter = np.random.default_rng(0).normal(0.0, 1e-4, ico6.vertices.shape)
    return [("icosphere(5)", ico5.vertices, ico5.faces),
            ("icosphere(6) + 1e-4 jitter", ico6.vertices + jitter, ico6.faces)], ico6


def peer_parametrize(vertices, faces) -> str:
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_xatlas_{os.getpid()}.npz")
    np.savez(path, v=np.asarray(vertices, np.float32), f=np.asarray(faces, np.uint32))
    try:
        proc = subprocess.run([sys.executable, "-c", PEER, path], capture_output=True, text=True)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        return f"failed ({proc.returncode})"
    seconds, n_verts = proc.stdout.split()
    return f"{float(seconds):.1f} s ({n_verts} vertices)"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, padding {PADDING}", flush=True)
    cases, ico6 = meshes()
    print("\n| mesh | faces | size | xatlas unwrap | UV rasterize | colour eval | padding | bake total "
          "| covered texels | bake peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    unwrapped = {}
    for name, v, f in cases:
        for size in (1024, 2048):
            t0 = time.perf_counter()
            verts, faces, uv, _ = tb.unwrap_uv(v, f, resolution=size, padding=PADDING)
            t_unwrap = time.perf_counter() - t0
            unwrapped[(name, size)] = (verts, faces, uv)
            ids = tb.rasterize_uv(uv, faces, size)
            mask = ids >= 0
            tex = tb.sample_texels(verts, faces, uv, ids, colour)
            t_rast = median_time(lambda: tb.rasterize_uv(uv, faces, size), 3)
            t_eval = median_time(lambda: tb.sample_texels(verts, faces, uv, ids, colour), 3)
            t_pad = median_time(lambda: tb.fill_padding(tex, mask, PADDING), 3)
            peak = peak_rss_growth_kib(lambda: tb.bake_texture(verts, faces, uv, colour, size, PADDING))
            print(f"| {name} | {len(f):,} | {size}² | {t_unwrap:.1f} s | {ms(t_rast)} | {ms(t_eval)} | {ms(t_pad)} "
                  f"| {ms(t_rast + t_eval + t_pad)} | {int(mask.sum()):,} ({mask.float().mean():.0%}) "
                  f"| {peak / 1024:,.0f} MiB |", flush=True)

    print("\nPeers (same run):\n")
    print("| mesh | xatlas.parametrize defaults (peer) | vertex colours: textured_mesh fallback "
          "| trimesh TextureVisuals.to_color() of the 1024² bake |")
    print("|---|---|---|---|")
    for name, v, f in cases:
        peer = peer_parametrize(v, f)
        t_vc = median_time(lambda: tb.textured_mesh(v, f, colour, fallback="vertex_colors"), 3)
        verts, faces, uv = unwrapped[(name, 1024)]
        tex = tb.bake_texture(verts, faces, uv, colour, 1024, PADDING)
        mesh = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)
        mesh.visual = trimesh.visual.TextureVisuals(
            uv=uv.double().numpy(), image=Image.fromarray((tex * 255).round().to(torch.uint8).numpy()))
        t_tc = median_time(lambda: mesh.visual.to_color(), 3)
        print(f"| {name} | {peer} | {ms(t_vc)} | {ms(t_tc)} |", flush=True)

    t0 = time.perf_counter()
    try:
        tb.unwrap_uv(ico6.vertices, ico6.faces, resolution=1024, padding=PADDING)
        outcome = "unwrapped"
    except RuntimeError as err:
        outcome = f"RuntimeError: {str(err)[:60]}..."
    print(f"\nexact icosphere(6): {outcome} after {time.perf_counter() - t0:.1f} s (the bench process lives on)")


if __name__ == "__main__":
    main()
