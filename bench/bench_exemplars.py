"""Benchmark: Render Exemplars' cost (ThemeStation's 30 views x colour + normal map per mesh) on the CPU.

``.venv/bin/python bench/bench_exemplars.py [--resolutions 256,512]``

Two meshes: the bundled example (``workflows/inputs/example.glb``, 448 faces) and trimesh's
icosphere(6) (81,920 faces); one warm-up render first, then one timed call of
``render_exemplars`` per mesh and size (the pure-torch rasterizer; its peer comparison with
trimesh's ray casting is ``bench_rasterize.py``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", default="256,512")
    args = ap.parse_args(argv)
    import torch
    import trimesh
    from mpod_core.exemplars import ExemplarConfig, render_exemplars
    from mpod_core.mesh import load_mesh

    meshes = {"example.glb (448 faces)": load_mesh(REPO / "workflows" / "inputs" / "example.glb"),
              "icosphere(6) (81,920 faces)": trimesh.creation.icosphere(subdivisions=6)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; 30 views x 2 images per mesh")
    for name, mesh in meshes.items():
        render_exemplars([mesh], ExemplarConfig(views=1, resolution=64), backend="torch")
        for res in (int(r) for r in args.resolutions.split(",")):
            start = time.perf_counter()
            render_exemplars([mesh], ExemplarConfig(resolution=res), backend="torch")
            seconds = time.perf_counter() - start
            print(f"{name:>28} {res:>5}²: {seconds:6.1f} s ({seconds / 60 * 1e3:.0f} ms per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
