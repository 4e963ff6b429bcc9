"""REPARO layout alignment: accuracy of the OT loss against pixel-wise L2, speed, memory,
and the matching solver against geomloss (the reference code's Sinkhorn) in the same run.

    python bench/bench_layout.py                  # everything (about 15 minutes on 2 CPU cores)
    python bench/bench_layout.py --only accuracy  # or: speed, matching, rate, depth
    python bench/bench_layout.py --only depth --iterations 300   # flat vs depth-aware layout
    python bench/bench_layout.py --only depth --iterations 300 --depth-map gamma
    python bench/bench_layout.py --only rate --rate-objects 2 --rate-resolution 32 --rate-iterations 200 \
        --seeds 1 2 3 4 5 6 7 8                   # the recovery rate the unit test checks

The peer needs geomloss, which the pack does not depend on; install it beside the venv:

    pip install --target /tmp/gldeps --no-deps geomloss==0.3.1
    PYTHONPATH=/tmp/gldeps python bench/bench_layout.py --only matching

Accuracy: synthetic scenes of K = 2..6 primitives of distinct colours rendered from the
reference camera (:mod:`mpod_core.layout.synthetic`); every object is moved 0.35 in the image
plane and rescaled by 0.7-1.4, and object 0 is moved clear of its target (no overlap). For each
method: the per-object translation error relative to the scene's size, the scale error, the share
of objects recovered (translation < 2% and scale < 5%) and the silhouette IoU.

Depth: hidden-style scenes of 3-6 primitives at different depths, some hiding parts of others
(:func:`mpod_core.layout.synthetic.make_depth_scene`), the depth map an estimator-like transform of
the true view depth (affine in inverse depth, or inverse depth to the power 0.7): today's flat layout
(no depth map) against the depth-aware one, on the same scenes. Depth errors are the worst object's
centre-depth error relative to the camera distance; occlusion order counts the overlapping pairs
whose front object is right.

Rate: the share of objects recovered over N seeded scenes of the same size, per method, with two
broken variants beside them, to show what a recovery-rate threshold can tell apart: "OT, wrong plan"
(every point's transport target taken from another, random point: a transport plan that ignores the
cost). "Placed" = translation error < 2% of the scene whatever the scale (at 32² a 5% scale error of
an object 10 pixels wide is half a pixel) and "OT pull only, no pixel term" (the ablation). This is what sets the thresholds of
tests/unit/test_layout_align.py's rate test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import trimesh

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.timing import peak_rss_growth_kib  # noqa: E402
from mpod_core.layout.align import LayoutConfig, align_layout, silhouette_iou  # noqa: E402
from mpod_core.layout.ot_loss import OTAppearanceLoss, OTLossConfig, reference_points, render_points  # noqa: E402
from mpod_core.layout.scene import LayoutScene, render_scene, scene_object  # noqa: E402
from mpod_core.layout.ot_loss import _StratifiedCloud  # noqa: E402
from mpod_core.layout.sinkhorn import SinkhornResult, barycentric_targets, sinkhorn, transport_plan  # noqa: E402
from mpod_core.layout.synthetic import (affine_disparity, gamma_disparity, make_depth_scene, make_scene,  # noqa: E402
                                        perturb)
from mpod_core.layout.align import initial_placement  # noqa: E402
from mpod_core.layout.crop import mask_box  # noqa: E402
from mpod_core.layout.depth import check_depth_map, depth_placement, front_object  # noqa: E402

METHODS = {
    "OT then OT + L2 (ours, default)": dict(loss="ot"),
    "L2 only": dict(loss="l2"),
}
# "OT only" (pixel_weight=0) is left out of the default table: without the pixel term scales run away
# (mean scale error 0.81 on 2 objects, 1.30 on 3, 0% recovered), and oversized objects cover the
# whole image, which makes every matching slow. Run it with --ot-only.
RECOVERED_T, RECOVERED_S = 0.02, 0.05


def _run(scene, t0, s0, iterations, **config):
    cfg = LayoutConfig(iterations=iterations, ot=OTLossConfig(beta=0.0), **config)
    t = time.perf_counter()
    res = align_layout(scene.objects, t0, s0, scene.camera, scene.image, scene.mask, cfg)
    elapsed = time.perf_counter() - t
    t_err = (res.translations - scene.translations).norm(dim=-1) / scene.extent
    s_err = (res.scales / scene.scales - 1).abs().amax(-1)
    return t_err, s_err, silhouette_iou(res.covered, scene.mask > 0.5), elapsed


def accuracy(resolution: int, iterations: int, seeds) -> None:
    print(f"\n## Accuracy: {resolution}², {iterations} iterations, scenes {list(seeds)}, object 0 starts "
          f"off its target\n")
    print("| Objects | Method | Recovered | Far object's t err | Mean t err | Mean s err | IoU | Time |")
    print("|---|---|---|---|---|---|---|---|")
    for k in range(2, 7):
        for name, config in METHODS.items():
            rows = []
            for seed in seeds:
                scene = make_scene(k, seed=seed, resolution=resolution)
                t0, s0 = perturb(scene, seed=seed + 100, no_overlap=True)
                rows.append(_run(scene, t0, s0, iterations, **config))
            t_err = torch.cat([r[0] for r in rows])
            s_err = torch.cat([r[1] for r in rows])
            ok = ((t_err < RECOVERED_T) & (s_err < RECOVERED_S)).float().mean()
            far = statistics.mean(float(r[0][0]) for r in rows)
            print(f"| {k} | {name} | {100 * ok:.0f}% | {far:.3f} | {float(t_err.mean()):.3f} | "
                  f"{float(s_err.mean()):.3f} | {statistics.mean(r[2] for r in rows):.3f} | "
                  f"{statistics.mean(r[3] for r in rows):.1f} s |", flush=True)


def _shuffled_targets(self, points):
    """A wrong transport plan: each point gets the target the matching gives another, random point."""
    targets = _correct_targets(self, points)
    return targets[torch.randperm(targets.shape[0], generator=self.generator)]


_correct_targets = OTAppearanceLoss.targets

RATE_METHODS = {
    "OT then OT + L2 (ours, default)": (dict(loss="ot"), False),
    "L2 only": (dict(loss="l2"), False),
    "OT, wrong plan (broken)": (dict(loss="ot"), True),
    "OT pull only, no pixel term (ablation)": (dict(loss="ot", pixel_l2=0.0), False),
}


def rate(resolution: int, iterations: int, objects: int, seeds) -> None:
    print(f"\n## Recovery rate: {objects} objects, {resolution}², {iterations} iterations, scenes "
          f"{list(seeds)} (starts: seed + 100, object 0 off its target)\n")
    print("| Method | Recovered | Placed (t only) | Far object placed | Placed per scene | Mean t err | Mean s err "
          "| Time per scene |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (config, broken) in RATE_METHODS.items():
        OTAppearanceLoss.targets = _shuffled_targets if broken else _correct_targets
        try:
            rows = []
            for seed in seeds:
                scene = make_scene(objects, seed=seed, resolution=resolution)
                t0, s0 = perturb(scene, seed=seed + 100, no_overlap=True)
                rows.append(_run(scene, t0, s0, iterations, **config))
        finally:
            OTAppearanceLoss.targets = _correct_targets
        placed = [r[0] < RECOVERED_T for r in rows]
        t_err = torch.cat([r[0] for r in rows])
        s_err = torch.cat([r[1] for r in rows])
        n = t_err.numel()
        total = int(((t_err < RECOVERED_T) & (s_err < RECOVERED_S)).sum())
        n_placed = int((t_err < RECOVERED_T).sum())
        far = sum(int(p[0]) for p in placed)
        per_scene = " ".join(str(int(p.sum())) for p in placed)
        print(f"| {name} | {total}/{n} ({100 * total / n:.0f}%) | {n_placed}/{n} ({100 * n_placed / n:.0f}%) | "
              f"{far}/{len(rows)} | {per_scene} | "
              f"{float(t_err.mean()):.3f} | {float(s_err.mean()):.3f} | "
              f"{statistics.mean(r[3] for r in rows):.1f} s |", flush=True)


def _dense_objects(scene, min_faces: int):
    """The scene's objects subdivided (same surfaces) to at least ``min_faces`` faces each."""
    out = []
    for k, o in enumerate(scene.objects):
        mesh = trimesh.Trimesh(o.vertices.numpy(), o.faces.numpy(), process=False)
        while len(mesh.faces) < min_faces:
            mesh = mesh.subdivide()
        colour = o.colors[:1].expand(len(mesh.vertices), 3)
        out.append(scene_object(torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces),
                                colour.clone(), f"object {k}"))
    return out


def speed(resolution: int, iterations: int, min_faces: int) -> None:
    scene = make_scene(3, seed=1, resolution=resolution)
    scene.objects = _dense_objects(scene, min_faces)
    faces = sum(o.faces.shape[0] for o in scene.objects)
    t0, s0 = perturb(scene, seed=2, no_overlap=True)
    print(f"\n## Speed: 3 objects ({faces:,} faces in all), {resolution}², {iterations} iterations, "
          f"{torch.get_num_threads()} threads\n")
    print("| Loss | Time | Per iteration | Peak memory | Recovered |")
    print("|---|---|---|---|---|")
    for i, (name, config) in enumerate((("OT then OT + L2", dict(loss="ot")), ("L2 only", dict(loss="l2")))):
        out = {}
        peak = peak_rss_growth_kib(lambda: out.setdefault("r", _run(scene, t0, s0, iterations, **config)))
        t_err, s_err, iou, elapsed = out["r"]
        ok = int(((t_err < RECOVERED_T) & (s_err < RECOVERED_S)).sum())
        # RSS growth: the second run reuses what the first one grew, so only the first figure is cold.
        memory = f"+{peak / 1024:.0f} MiB" if i == 0 else "(not cold)"
        print(f"| {name} | {elapsed:.1f} s | {1000 * elapsed / iterations:.0f} ms | {memory} | "
              f"{ok}/3 (IoU {iou:.3f}) |", flush=True)


def matching(resolution: int) -> None:
    """One matching of a 256² render against its reference: ours (blockwise, grid-stratified) vs
    geomloss's tensorized Sinkhorn on the same clouds, and what the full-resolution problem would need."""
    scene = make_scene(3, seed=1, resolution=resolution)
    t0, s0 = perturb(scene, seed=2, no_overlap=True)
    render = render_scene(LayoutScene(scene.objects, t0, s0), scene.camera, resolution, resolution)
    fg = scene.mask > 0.5
    loss = OTAppearanceLoss(reference_points(scene.image, scene.mask), fg, OTLossConfig(beta=0.0),
                            use_depth=False, generator=torch.Generator().manual_seed(0))
    points = render_points(render).detach()
    ref = loss.reference
    cloud = _StratifiedCloud(points, render.covered, loss.stride, (0, 0), loss.config.background_points,
                             torch.Generator().manual_seed(1))
    eps = loss.config.eps
    n, m = cloud.points.shape[0], ref.points.shape[0]
    print(f"\n## Matching at {resolution}²: grid clouds of {n:,} x {m:,} points (stride {loss.stride}), eps {eps}\n")
    print("| Solver | Time | Marginal error (L1) | Targets vs converged (px, mean / max) |")
    print("|---|---|---|---|")

    def report(name, result, elapsed):
        plan = transport_plan(cloud.points, ref.points, result, cloud.weights, ref.weights, cost=loss.cost)
        a = cloud.weights / cloud.weights.sum()
        b = ref.weights / ref.weights.sum()
        err = float((plan.sum(1) - a).abs().sum() + (plan.sum(0) - b).abs().sum())
        tg = barycentric_targets(cloud.points, ref.points, result, b=ref.weights, cost=loss.cost)
        d = ((tg - reference_targets)[:, 4:6] * resolution).norm(dim=-1)
        print(f"| {name} | {elapsed:.2f} s | {err:.1e} | {float(d.mean()):.2f} / {float(d.max()):.2f} |")

    converged = sinkhorn(cloud.points, ref.points, cloud.weights, ref.weights, cost=loss.cost, eps=eps,
                         max_iter=5000, tol=1e-6)
    reference_targets = barycentric_targets(cloud.points, ref.points, converged, b=ref.weights, cost=loss.cost)
    t = time.perf_counter()
    ours = sinkhorn(cloud.points, ref.points, cloud.weights, ref.weights, cost=loss.cost, eps=eps,
                    max_iter=200, tol=1e-3)
    report(f"ours, cold start, eps-scaling 0.5, tol 1e-3 ({ours.iterations} iterations)", ours,
           time.perf_counter() - t)
    t = time.perf_counter()
    warm = sinkhorn(cloud.points, ref.points, cloud.weights, ref.weights, cost=loss.cost, eps=eps,
                    max_iter=loss.config.sinkhorn_iterations, tol=0.0, init_g=ours.g)
    report(f"ours, warm start ({warm.iterations} iterations, as in the loop)", warm, time.perf_counter() - t)
    try:
        from geomloss import SamplesLoss
    except ImportError:
        print("| geomloss | not installed (see the module docstring) | - | - |")
    else:
        root = torch.tensor([1.0] * 3 + [0.0] + [1.0] * 2).sqrt()
        x, y = cloud.points * root, ref.points * root
        a, b = cloud.weights / cloud.weights.sum(), ref.weights / ref.weights.sum()
        for scaling in (0.5, 0.9):
            solver = SamplesLoss("sinkhorn", p=2, blur=eps ** 0.5, scaling=scaling, debias=False,
                                 potentials=True, backend="tensorized")
            t = time.perf_counter()
            f, g = solver(a, x, b, y)
            elapsed = time.perf_counter() - t
            theirs = SinkhornResult(f=f.view(-1), g=g.view(-1), eps=eps, iterations=0, converged=True,
                                    marginal_error=0.0)
            report(f"geomloss 0.3.1 tensorized, scaling {scaling}", theirs, elapsed)
    full = resolution * resolution
    print(f"\nThe full-resolution problem ({full:,} x {full:,} points) needs a {full * full * 4 / 2**30:.0f} GiB "
          f"dense float32 cost matrix (geomloss tensorized); the grid-stratified one needs {n * m * 4 / 2**20:.0f} MiB, "
          f"and ours is blockwise on top.")


DEPTH_SCENES = ((3, 1), (4, 2), (5, 3), (6, 4))


def _depth_row(scene, resolution, iterations, with_depth):
    """One layout of a depth scene: today's flat one (no depth map) or the depth-aware one."""
    boxes = torch.tensor([mask_box(m.float()) for m in scene.object_masks], dtype=torch.float32)
    t = time.perf_counter()
    if with_depth:
        start = depth_placement(scene.objects, boxes, scene.object_masks.float(),
                                check_depth_map(scene.disparity, scene.mask), scene.camera, resolution, resolution,
                                distance=2.5)
        t0, s0, depth = start.translations, start.scales, scene.disparity
    else:
        lo = torch.stack([o.vertices.amin(0) for o in scene.objects])
        hi = torch.stack([o.vertices.amax(0) for o in scene.objects])
        t0, s0 = initial_placement(boxes, hi - lo, scene.camera, resolution, resolution)
        depth = None
    res = align_layout(scene.objects, t0, s0, scene.camera, scene.image, scene.mask,
                       LayoutConfig(iterations=iterations), depth=depth)
    elapsed = time.perf_counter() - t
    truth_z, z0, z = (2.5 - v[:, 2] for v in (scene.translations, t0, res.translations))
    truth_order = front_object(LayoutScene(scene.objects, scene.translations, scene.scales), scene.camera,
                               resolution, resolution)
    order = front_object(LayoutScene(scene.objects, res.translations, res.scales), scene.camera, resolution,
                         resolution)
    right = sum(order.get(p) == f for p, f in truth_order.items())
    xy = (res.translations - scene.translations)[:, :2].norm(dim=-1) / scene.extent
    return dict(start=float((z0 - truth_z).abs().max() / 2.5), depth=float((z - truth_z).abs().max() / 2.5),
                order=(right, len(truth_order)), xy=float(xy.max()),
                scale=float((res.scales / scene.scales - 1).abs().max()),
                iou=silhouette_iou(res.covered, scene.mask > 0.5), time=elapsed)


def depth_table(resolution: int, iterations: int, transform: str) -> None:
    maps = {"affine": affine_disparity, "gamma": gamma_disparity}
    print(f"\n## Depth: {resolution}², {iterations} iterations, depth map = {transform} of the true depth\n")
    print("| Scene (objects, seed) | Layout | Start depth err | Final depth err | Occlusion order | "
          "Image-plane t err | Scale err | IoU | Time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for objects, seed in DEPTH_SCENES:
        scene = make_depth_scene(objects, seed=seed, resolution=resolution, transform=maps[transform])
        for name, with_depth in (("flat (no depth map)", False), ("depth map", True)):
            r = _depth_row(scene, resolution, iterations, with_depth)
            print(f"| {objects}, {seed} | {name} | {100 * r['start']:.1f}% | {100 * r['depth']:.1f}% | "
                  f"{r['order'][0]}/{r['order'][1]} | {100 * r['xy']:.1f}% | {100 * r['scale']:.1f}% | "
                  f"{r['iou']:.3f} | {r['time']:.0f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("accuracy", "speed", "matching", "rate", "depth"))
    parser.add_argument("--depth-map", choices=("affine", "gamma"), default="affine")
    parser.add_argument("--accuracy-resolution", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--speed-resolution", type=int, default=256)
    parser.add_argument("--min-faces", type=int, default=20000)
    parser.add_argument("--rate-objects", type=int, default=2)
    parser.add_argument("--rate-resolution", type=int, default=32)
    parser.add_argument("--rate-iterations", type=int, default=200)
    parser.add_argument("--ot-only", action="store_true", help="add the OT-only ablation to the accuracy table")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.only in (None, "matching"):
        matching(args.speed_resolution)
    if args.only in (None, "speed"):
        speed(args.speed_resolution, args.iterations, args.min_faces)
    if args.ot_only:
        METHODS["OT only (ablation)"] = dict(loss="ot", pixel_weight=0.0)
    if args.only in (None, "accuracy"):
        accuracy(args.accuracy_resolution, args.iterations, args.seeds)
    if args.only == "depth":
        depth_table(args.accuracy_resolution, args.iterations, args.depth_map)
    if args.only == "rate":  # not part of the default run: the accuracy table covers the defaults
        rate(args.rate_resolution, args.rate_iterations, args.rate_objects, args.seeds)


if __name__ == "__main__":
    main()
