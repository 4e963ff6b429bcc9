"""Benchmark: cost of one MPOD123 stage-1 iteration on CPU (torch backend), guidance excluded.

What is measured (default ``NeRFFieldConfig()``: 16 levels x 2 features, 2^19
entries per level; occupancy grid 32^3; float32, CPU):

1. One iteration as ``fit_stage1`` runs it for a novel view, minus the
   guidance: render one random view (elevation in [-45, 45], azimuth in
   [-180, 180], distance 2.5, fov 40, from a seeded generator; jittered
   samples, white background), a stand-in loss
   ``((color - 0.5)**2).mean() + opacity.mean()``, backward and an Adam step
   (the loop's settings). The field is fresh (blob init) and its occupancy grid
   warmed by ``update_grid`` at steps 0, 16, 32 (still the "visit every cell"
   warm-up), so empty-space skipping is active, and the field's default pruning
   (alpha < 0.01, transmittance < 1e-4) is on. Cases: 64^2 and 128^2 with the
   default 256 samples per ray, 64^2 with 128 (a CPU-friendly setting). Time is
   the median over iterations after a warm-up one (``bench/timing.py``), split
   into forward (render + loss) and backward + Adam step; samples are the
   points the field evaluates with autograd per iteration (counted by a hook on
   the field), "no-grad" the grid's survivors whose density the pruning
   evaluates first (``field.density`` calls during the render).
2. Peak memory of one 128^2 iteration: RSS growth during the first (cold)
   iteration in a fresh child process (``peak_rss_growth_kib``).
3. The hash-grid encoding alone, ours vs nerfstudio's pure-torch
   ``HashEncoding`` (``bench/bench_hashgrid.py``'s set-up), on the sample
   positions of one 128^2 view.
4. Compositing alone, ``mpod_core.volume.render_weights`` + ``accumulate``
   vs nerfacc 0.5.3's ``render_weight_from_density`` + ``accumulate_along_rays``,
   forward + backward (into densities and colours) on the samples of the
   middle 4096-ray chunk of a 128^2 view, with the max abs differences of
   the outputs and gradients. nerfacc's packed path is CUDA only on CPU
   tensors (``pack_info`` raises, the segmented scan is a CUDA kernel), so its
   pure-torch batched path is used: the packed samples are scattered into a
   zero-padded (rays, max samples) layout inside the timed call.

The peers are NOT dependencies of the pack; install them outside the project
environment, without touching torch, and put them on PYTHONPATH:

    pip install --target /tmp/nsdeps --no-deps nerfstudio==1.1.5 jaxtyping wadler_lindig \
        viser msgspec websockets zstandard
    pip install --target /tmp/nadeps --no-deps nerfacc==0.5.3
    PYTHONPATH=/tmp/nsdeps:/tmp/nadeps python bench/bench_stage1.py [--quick] [--threads N]

Missing peers are reported and their parts skipped. About ten minutes on 2 threads
(five with ``--quick``); timings are noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # allow running from anywhere without installing the pack
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench_hashgrid import make as make_encoding, operations as encoding_operations  # noqa: E402
from mpod_core.cameras import get_rays, orbit_cameras  # noqa: E402
from mpod_core.fields import RadianceField  # noqa: E402
from mpod_core.volume import accumulate, ray_aabb, render_weights, sample_along_rays  # noqa: E402
from timing import median_time, peak_rss_growth_kib  # noqa: E402  (bench/ is sys.path[0] when run as a script)

DISTANCE, FOV = 2.5, 40.0
GRID_WARMUP_STEPS = (0, 16, 32)
CASES = ((64, 256), (128, 256), (64, 128))  # (resolution, samples per ray)
PEER_CHUNK = 4096
PEER_HINT = ("{name} not importable; for the comparison run:\n"
             "  pip install --target {target} --no-deps {packages}\n"
             "  PYTHONPATH=/tmp/nsdeps:/tmp/nadeps python bench/bench_stage1.py")


def warm_field(samples_per_ray: int) -> RadianceField:
    """A fresh field (blob init, seeded) whose occupancy grid has had its first updates."""
    torch.manual_seed(0)
    field = RadianceField(samples_per_ray=samples_per_ray, backend="torch")
    for step in GRID_WARMUP_STEPS:
        field.update_grid(step)
    return field


def random_camera(generator: torch.Generator):
    elev = -45.0 + 90.0 * torch.rand(1, generator=generator, dtype=torch.float64)
    azim = -180.0 + 360.0 * torch.rand(1, generator=generator, dtype=torch.float64)
    return orbit_cameras(elev, azim, DISTANCE, FOV)


def training_step(field: RadianceField, res: int):
    """One stage-1 iteration without guidance, and the log it appends
    ``(forward s, backward+step s, samples)`` to."""
    optimiser = torch.optim.Adam(field.field.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-15)
    views, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    counts, pruned, log = [], [], []
    field.field.register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[0]))
    density = field.field.density  # the bound method the pruning calls (older versions: never)

    def counting_density(points):
        pruned.append(points.shape[0])
        return density(points)

    field.field.density = counting_density

    def step():
        counts.clear()
        pruned.clear()
        t0 = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        out = field.render(random_camera(views), res, res, background=1.0, generator=noise)
        loss = ((out["color"] - 0.5) ** 2).mean() + out["opacity"].mean()
        t1 = time.perf_counter()
        loss.backward()
        optimiser.step()
        log.append((t1 - t0, time.perf_counter() - t1, sum(counts), sum(pruned)))

    return step, log


def view_samples(field: RadianceField, res: int):
    """Packed samples of one random res^2 view, marched as ``RadianceField.render`` does."""
    gen = torch.Generator().manual_seed(2)
    origins, dirs = (x.reshape(-1, 3) for x in get_rays(random_camera(gen), res, res))
    t_near, t_far, _ = ray_aabb(origins, dirs, field.aabb)
    return sample_along_rays(origins, dirs, t_near, t_far, field.step_size, field.grid, generator=gen,
                             density_fn=field.field.density, alpha_threshold=field.alpha_threshold,
                             early_stop_eps=field.early_stop_eps)


def bench_iterations(repeats: int):
    print(f"\n1. one iteration (render + stand-in loss + backward + Adam), median of {repeats} after a warm-up")
    print(f"{'view':>6} {'spr':>4} {'rays':>6} {'samples/it':>11} {'per ray':>8} {'no-grad':>8} {'ms/it':>9} "
          f"{'forward':>9} {'bwd+step':>9} {'ns/sample':>10}")
    print("-" * 89)
    for res, spr in CASES:
        step, log = training_step(warm_field(spr), res)
        total = median_time(step, repeats)
        fwd, bwd, n, m = (statistics.median(col) for col in zip(*log[1:]))
        rays = res * res
        print(f"{res:>5}² {spr:>4} {rays:>6} {n:>11.0f} {n / rays:>8.1f} {m:>8.0f} {total * 1e3:>9.1f} "
              f"{fwd * 1e3:>9.1f} {bwd * 1e3:>9.1f} {total / n * 1e9:>10.0f}")
    print("(spr: samples_per_ray; samples/it: points the field evaluates with autograd, per ray: over all "
          "rays, empty ones included; no-grad: points whose density the pruning evaluates first; "
          "forward: render + loss)")


def child_memory(res: int) -> None:
    """Print the RSS growth (KiB) of the first, cold iteration of a freshly warmed field."""
    step, _ = training_step(warm_field(256), res)
    print(json.dumps({"peak_rss_growth_kib": peak_rss_growth_kib(step)}))


def bench_memory(res: int, threads: int) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--child-memory", str(res)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    kib = json.loads(out.strip().splitlines()[-1])["peak_rss_growth_kib"]
    print(f"\n2. peak memory of one {res}² iteration (spr 256; RSS growth of a cold iteration in a fresh "
          f"process, sampled at 1 kHz): {kib / 1024:.1f} MiB")


def bench_encoding(field: RadianceField, repeats: int) -> None:
    smp = view_samples(field, 128)
    r = field.config.radius
    x = ((smp.positions + r) / (2 * r)).clamp(0.0, 1.0)
    print(f"\n3. hash-grid encoding alone on the {len(x)} sample positions of one 128² view "
          f"(median of {repeats} after a warm-up)")
    impls = ["ours"]
    try:
        make_encoding("nerfstudio")
        impls.append("nerfstudio")
    except ImportError as exc:
        print(PEER_HINT.format(name="nerfstudio", target="/tmp/nsdeps", packages="nerfstudio==1.1.5 "
                               "jaxtyping wadler_lindig viser msgspec websockets zstandard") + f"\n  ({exc})")
    times = {}
    for impl in impls:
        torch.manual_seed(0)
        for op, fn in encoding_operations(make_encoding(impl), x).items():
            times[impl, op] = median_time(fn, repeats)
            print(f"  {impl:11s} {op:17s} {times[impl, op] * 1e3:9.1f} ms  "
                  f"{len(x) / times[impl, op] / 1e6:6.2f} Mpoints/s")
    for op in ("forward", "forward+backward"):
        if ("nerfstudio", op) in times:
            print(f"  speed-up ours vs nerfstudio, {op}: {times['nerfstudio', op] / times['ours', op]:.2f}x")


def bench_compositing(field: RadianceField, repeats: int) -> None:
    print(f"\n4. compositing alone (weights + colour + opacity, forward+backward), middle {PEER_CHUNK}-ray "
          f"chunk of a 128² view (median of {repeats} after a warm-up)")
    try:
        import nerfacc  # noqa: PLC0415 (optional peer)
    except ImportError as exc:
        print(PEER_HINT.format(name="nerfacc", target="/tmp/nadeps", packages="nerfacc==0.5.3") + f"\n  ({exc})")
        return
    smp = view_samples(field, 128)
    lo = (smp.n_rays - PEER_CHUNK) // 2
    keep = (smp.ray_indices >= lo) & (smp.ray_indices < lo + PEER_CHUNK)
    ridx, ts, te, pos = smp.ray_indices[keep] - lo, smp.t_starts[keep], smp.t_ends[keep], smp.positions[keep]
    with torch.no_grad():
        sigma, rgb = field.field(pos)
    counts = torch.bincount(ridx, minlength=PEER_CHUNK)
    col = torch.arange(len(ridx)) - (torch.cumsum(counts, 0) - counts)[ridx]  # position within the ray
    shape = (PEER_CHUNK, int(counts.max()))
    print(f"  {len(ridx)} samples, up to {shape[1]} per ray")
    try:
        nerfacc.render_weight_from_density(ts, te, sigma, ray_indices=ridx, n_rays=PEER_CHUNK)
    except Exception as exc:  # noqa: BLE001 (report whatever the packed CPU path raises)
        print(f"  nerfacc packed path on CPU: {type(exc).__name__}: {exc} -> padded batched path used")
    ts_pad = ts.new_zeros(shape).index_put((ridx, col), ts)
    te_pad = te.new_zeros(shape).index_put((ridx, col), te)  # padding: zero-length intervals, weight 0
    results = {}

    def ours():
        s, c = sigma.clone().requires_grad_(True), rgb.clone().requires_grad_(True)
        w, _, _ = render_weights(s, ts, te, ridx, PEER_CHUNK)
        color, opacity = accumulate(w, c, ridx, PEER_CHUNK), accumulate(w, None, ridx, PEER_CHUNK)
        (color.sum() + opacity.sum()).backward()
        results["ours"] = (w, color, opacity, s.grad, c.grad)

    def peer():
        s, c = sigma.clone().requires_grad_(True), rgb.clone().requires_grad_(True)
        s_pad = s.new_zeros(shape).index_put((ridx, col), s)
        c_pad = c.new_zeros(shape + (3,)).index_put((ridx, col), c)
        w, _, _ = nerfacc.render_weight_from_density(ts_pad, te_pad, s_pad)
        color, opacity = nerfacc.accumulate_along_rays(w, c_pad), nerfacc.accumulate_along_rays(w)[:, 0]
        (color.sum() + opacity.sum()).backward()
        results["nerfacc"] = (w[ridx, col], color, opacity, s.grad, c.grad)

    for name, fn in (("ours (packed)", ours), (f"nerfacc {nerfacc.__version__} (padded)", peer)):
        print(f"  {name:24s} {median_time(fn, repeats) * 1e3:8.2f} ms")
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(results["ours"], results["nerfacc"])]
    print("  max abs diff ours vs nerfacc: " + ", ".join(
        f"{k} {d:.2e}" for k, d in zip(("weights", "colour", "opacity", "d/dsigma", "d/drgb"), diffs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (2 instead of 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child_memory is not None:
        child_memory(args.child_memory)
        return
    warnings.simplefilter("ignore", RuntimeWarning)
    repeats = 2 if args.quick else 5
    print(f"MPOD123 stage 1 per-iteration cost, guidance excluded; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU, float32, hash-grid backend torch")
    bench_iterations(repeats)
    bench_memory(128, torch.get_num_threads())
    field = warm_field(256)
    bench_encoding(field, repeats)
    bench_compositing(field, repeats)


if __name__ == "__main__":
    main()
