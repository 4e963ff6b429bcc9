"""Benchmark: what stage 1's settings do to the recovered shape, on the
multi-view oracle scene (a known asymmetric mesh; every novel view's SDS target
is the mesh's render from that view, see ``mpod_core.guidance.mesh_oracle``).

Runs (same seed, same iterations, 64^2 renders, 96 samples per ray, a reduced
hash grid of 8 levels x 2^16 entries, guidance scale 1, oracle sigma 0.05):

* ``defaults``: ``Stage1Config()``'s defaults (timestep schedule
  stable-zero123 over run fractions, encoder at 10x a 1e-3 base rate, the four
  regularisers, coarse-to-fine on half the levels) except shading augmentation,
  which is off because the oracle's targets are albedo renders (it cannot judge
  shaded images);
* ``no-regularisers``: the same with the four regularisers at 0;
* ``previous``: the loop's settings before this revision (one learning rate
  1e-2 for all parameters, [0.4, 0.85] -> [0.2, 0.5] over the first 200
  iterations, no regularisers, no coarse-to-fine).

Reported per run, at four held-out views (none a training camera):
the first checkpoint (every ``--every`` iterations) where every view's
silhouette IoU >= 0.9; final min IoU and PSNR; *haze* = the share of rendered
opacity that falls outside the true silhouette; and the number of connected
components of Field to Mesh's output (marching cubes at density 10 on a 96^3
lattice): floaters show up as extra components.

    python bench/bench_stage1_quality.py [--iterations 300] [--every 25] [--runs defaults,no-regularisers,previous]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mpod_core.encoding import HashGridConfig  # noqa: E402
from mpod_core.fields import NeRFFieldConfig, RadianceField  # noqa: E402
from mpod_core.fields.extract import extract_mesh  # noqa: E402
from mpod_core.guidance.mesh_oracle import MeshViewOracle  # noqa: E402
from mpod_core.guidance.schedules import TimestepSchedule  # noqa: E402
from mpod_core.pipelines.mpod123 import Stage1Config, fit_stage1  # noqa: E402

HELD_OUT = ([20.0, -15.0, 35.0, 10.0], [45.0, 135.0, -100.0, 200.0])
RES, SPR = 64, 96
FIELD = NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=8, log2_hashmap_size=16))
NO_REGULARISERS = dict(lambda_orient=0.0, lambda_normal_smooth=0.0, lambda_sparsity=0.0, lambda_opaque=0.0)


def config_for(run: str, iterations: int, seed: int) -> Stage1Config:
    common = dict(iterations=iterations, resolution=RES, guidance_resolution=None, shading_augmentation=False,
                  preview_every=1, seed=seed)
    if run == "defaults":
        cfg = Stage1Config(coarse_levels=FIELD.hash_grid.n_levels // 2, **common)
    elif run == "no-regularisers":
        cfg = Stage1Config(coarse_levels=FIELD.hash_grid.n_levels // 2, **NO_REGULARISERS, **common)
    elif run == "no-normal-smooth":
        cfg = Stage1Config(coarse_levels=FIELD.hash_grid.n_levels // 2, lambda_normal_smooth=0.0, **common)
    elif run == "sparsity-2":
        cfg = Stage1Config(coarse_levels=FIELD.hash_grid.n_levels // 2, lambda_sparsity=2.0, **common)
    elif run == "previous":
        cfg = Stage1Config(learning_rate=1e-2, encoding_lr_scale=1.0, coarse_levels=0, timestep_preset="custom",
                           custom_timesteps=TimestepSchedule(0.4, 0.85, 0.2, 0.5, 0.0, min(1.0, 200 / iterations)),
                           **NO_REGULARISERS, **common)
    else:
        raise ValueError(f"unknown run {run!r}")
    cfg.sds.guidance_scale = 1.0
    return cfg


def evaluate(field: RadianceField, oracle: MeshViewOracle) -> dict:
    r = oracle.compare(field, *HELD_OUT)
    return {"iou": float(r["iou"].min()), "psnr": float(r["psnr"].min()), "haze": r["haze"],
            "haze2": r["haze_beyond_2px"]}


def components(field: RadianceField) -> int:
    with torch.no_grad():
        mesh = extract_mesh(field.field.density, field.aabb, resolution=96, threshold=10.0)
    return len(mesh.split(only_watertight=False)) if len(mesh.faces) else 0


def run_one(run: str, iterations: int, every: int, seed: int) -> dict:
    oracle = MeshViewOracle(RES)
    image, mask = oracle.reference(128)
    config = config_for(run, iterations, seed)
    torch.manual_seed(seed)
    field = RadianceField(FIELD, samples_per_ray=SPR, backend="torch")
    reached = []

    def progress(step, total, preview):
        if step % every == 0 and not reached:
            if evaluate(field, oracle)["iou"] >= 0.9:
                reached.append(step)

    t0 = time.perf_counter()
    fit_stage1(image, mask, oracle.denoiser(), config, field=field, progress=progress)
    seconds = time.perf_counter() - t0
    return {"run": run, "seconds": seconds, "iou>=0.9 at": reached[0] if reached else None,
            **evaluate(field, oracle), "components": components(field)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="defaults,no-regularisers,previous")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-header", action="store_true", help="print result rows only")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.no_header:
        print(f"stage-1 oracle scene, {args.iterations} iterations at {RES}^2, spr {SPR}, seed {args.seed}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{'run':>16} {'IoU>=0.9 at':>12} {'min IoU':>8} {'min PSNR':>9} {'haze':>7} {'haze>2px':>9} "
              f"{'components':>11} {'time':>8}")
    for run in args.runs.split(","):
        r = run_one(run, args.iterations, args.every, args.seed)
        at = "never" if r["iou>=0.9 at"] is None else str(r["iou>=0.9 at"])
        print(f"{r['run']:>16} {at:>12} {r['iou']:>8.3f} {r['psnr']:>8.1f}  {r['haze']:>7.4f} {r['haze2']:>9.4f} "
              f"{r['components']:>11d} {r['seconds']:>7.0f}s", flush=True)


if __name__ == "__main__":
    main()
