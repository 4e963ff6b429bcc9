"""Benchmark: one DMTet Refine iteration on the CPU without the guidance, beside stage 1's, and the guidance's share.

``.venv/bin/python bench/bench_refine.py [--sizes 256,512,1024] [--memory 512,1024] [--cells 64] [--reps 3]
[--guidance | --no-guidance] [--comfyui .comfyui/ComfyUI] [--cache DIR]``

One run prints three things:

1. DMTet Refine without guidance. A stage-1 stand-in (the default ``NeRFFieldConfig``:
   16 levels x 2 features, 2^19 entries, the texture field's real size) whose density is
   a ball of radius 0.45 at the threshold, turned into the refine state
   (``init_refine_state``: grid of ``--cells`` cells on the tightened box), then
   ``fit_refine`` for one novel-view iteration at each of ``--sizes``: the stage-1
   outline at the guidance size (512, or the render size when smaller), marching tets,
   the render with the texture field as ``color_fn``, L_nvm, SDS through the Gaussian
   oracle (a no-op model), the regularisers, backward and Adam. Marching tets alone is
   timed on the same state (no grad). Memory (for the sizes in ``--memory``) is the peak
   growth of this process's resident set during one more iteration
   (``tests/harness/memory.py``: the kernel's high-water mark reset first, blocks of
   1 MiB and more mapped on their own, so memory kept from earlier iterations does not
   hide it).
2. Stage 1 for comparison, on the field ``bench_stage1.py`` times (fresh, occupancy grid
   warmed, 256 samples per ray): one novel-view iteration of ``fit_stage1`` at its defaults
   (128² render, 256² guidance through the same no-op oracle, shading, normals and their
   regularisers), and ``bench_stage1.py``'s bare step at 128² (render, stand-in loss,
   backward, Adam).
3. The guidance (``--guidance``; on by default when the ComfyUI tree ``--comfyui`` exists,
   ``--no-guidance`` skips it): one SDS step at 512² as ``sds_image_loss`` takes it
   (VAE encode with its graph, guided UNet prediction, loss, backward to the pixels) with
   the pack's ``ComfyTextDenoiser`` on a full-size random-weight SD 1.5 checkpoint loaded
   through ComfyUI (``comfy_bench.py``; written into ``--cache`` once, a temp dir by
   default: pass a folder to reuse it), the refine's SDS settings. Its share is
   SDS step / (refine iteration at 512² without guidance + SDS step), the cost of a
   whole novel-view iteration at 512².

Times are the median of ``--reps`` calls after a warm-up one (``bench/timing.py``). Parts 1
and 2 run before ComfyUI is loaded, so its 2 GiB checkpoint is not in their memory figures.
The 1-minute load average is printed at the start and the end (this run's own two threads
count for about 2): run under ``nice`` beside other jobs, a row can take several times its
quiet-machine time (marching tets, about 40 ms at 64 cells when quiet, shows it row by row).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from comfy_bench import (DEFAULT_COMFYUI, comfy_denoiser, pack_module, random_checkpoints,  # noqa: E402
                         sds_step, start_comfyui)
from harness.memory import peak_rss_growth  # noqa: E402
from timing import median_time  # noqa: E402

GUIDANCE = 512  # the refine's guidance size (renders above it are resized down to it)


def no_op_guidance(config, size: int):
    """The Gaussian oracle at ``size``² (a no-op model), guidance scale 1, for ``config``'s SDS."""
    import torch
    from mpod_core.guidance.oracle import OracleDenoiser

    config.sds.guidance_scale = 1.0
    return OracleDenoiser(target=torch.zeros(3, size, size))


def reference_image():
    import torch

    image, mask = torch.ones(64, 64, 3), torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    return image, mask


def bench_refine(sizes, memory_sizes, cells: int, reps: int) -> dict:
    """Print a row per render size; returns {size: seconds per iteration}."""
    import torch
    from mpod_core.fields import RadianceField
    from mpod_core.geometry import deform, marching_tets
    from mpod_core.pipelines.dmtet_refine import RefineConfig, fit_refine, init_refine_state

    torch.manual_seed(0)
    stage1 = RadianceField(backend="torch")
    stage1.field.density = lambda p: 10.0 + 20.0 * (0.45 - p.norm(dim=-1)) / 0.45
    image, mask = reference_image()
    print(f"\n1. DMTet Refine: one novel-view iteration of fit_refine, guidance a no-op; grid {cells} cells")
    print(f"{'render':>8}{'guidance':>10}{'faces':>8}{'marching (ms)':>15}{'iteration (s)':>15}{'memory (MiB)':>14}")
    seconds = {}
    for size in sizes:
        g = min(GUIDANCE, size)
        config = RefineConfig(iterations=1, resolution=size, guidance_resolution=g, grid_cells=cells,
                              reference_probability=0.0)
        denoiser = no_op_guidance(config, g)
        state = init_refine_state(stage1, config, backend="torch")
        with torch.no_grad():
            _, faces = state.surface()
            march = median_time(lambda: marching_tets(deform(state.grid, state.delta), state.grid, state.sdf), reps)

        def one():
            fit_refine(state, stage1, image, mask, denoiser, config, backend="torch")
        seconds[size] = median_time(one, reps)
        memory = f"{peak_rss_growth(one)[1] / 2 ** 20:.0f}" if size in memory_sizes else "-"
        print(f"{size:>7}²{g:>9}²{faces.shape[0]:>8}{march * 1e3:>15.0f}{seconds[size]:>15.2f}{memory:>14}")
    return seconds


def bench_stage1_iteration(reps: int) -> float:
    """Print stage 1's iteration, in ``fit_stage1`` and as ``bench_stage1.py`` times it; returns the former."""
    from bench_stage1 import training_step, warm_field
    from mpod_core.pipelines.mpod123 import Stage1Config, fit_stage1

    config = Stage1Config(iterations=1, reference_probability=0.0)
    denoiser = no_op_guidance(config, config.guidance_resolution)
    field = warm_field(256)
    image, mask = reference_image()
    seconds = median_time(lambda: fit_stage1(image, mask, denoiser, config, field=field), reps)
    bare = median_time(training_step(warm_field(256), config.resolution)[0], reps)
    print(f"\n2. Stage 1: one novel-view iteration at {config.resolution}², 256 samples per ray\n"
          f"   fit_stage1 ({config.guidance_resolution}² guidance a no-op, shading, normals and their "
          f"regularisers): {seconds:.2f} s\n"
          f"   bench_stage1.py's step (render, stand-in loss, backward, Adam): {bare:.2f} s")
    return seconds


def bench_guidance(comfyui: str, cache, reps: int) -> float:
    files = random_checkpoints(["sd15"], cache, comfyui)
    start_comfyui(comfyui)
    import torch

    config = pack_module("mpod_core.pipelines.dmtet_refine").refine_sds_config()
    denoiser, views, _ = comfy_denoiser("sd15", files["sd15"], GUIDANCE)
    image = torch.rand(1, 3, GUIDANCE, GUIDANCE)
    with denoiser:
        seconds = median_time(sds_step(denoiser, image, config, views, torch.Generator().manual_seed(0)), reps)
    print(f"\n3. Guidance: one SD 1.5 SDS step at {GUIDANCE}² (VAE encode with grad, guided UNet prediction, "
          f"backward; random weights, ComfyUI, ComfyTextDenoiser): {seconds:.2f} s")
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024", help="render sizes of the refine iteration")
    ap.add_argument("--memory", default="512,1024", help="render sizes whose peak memory is measured")
    ap.add_argument("--cells", type=int, default=64, help="DMTet grid cells per axis")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--guidance", action=argparse.BooleanOptionalAction, default=None,
                    help="time one real SD 1.5 SDS step (default: when --comfyui exists)")
    ap.add_argument("--comfyui", default=DEFAULT_COMFYUI)
    ap.add_argument("--cache", default=None, help="folder for the random SD 1.5 checkpoint (default: a temp dir)")
    args = ap.parse_args(argv)
    guidance = (Path(args.comfyui) / "comfy").is_dir() if args.guidance is None else args.guidance
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.reps} after a warm-up; "
          f"load average {os.getloadavg()[0]:.1f}")
    refine = bench_refine([int(s) for s in args.sizes.split(",")], {int(s) for s in args.memory.split(",") if s.strip()},
                          args.cells, args.reps)
    stage1 = bench_stage1_iteration(args.reps)
    if GUIDANCE in refine:
        print(f"   refine iteration at {GUIDANCE}² without guidance / stage-1 iteration: "
              f"{refine[GUIDANCE] / stage1:.1f}x")
    if not guidance:
        print("\n3. Guidance: skipped (--no-guidance, or no ComfyUI tree at --comfyui)")
        print(f"   load average {os.getloadavg()[0]:.1f}")
        return 0
    sds = bench_guidance(args.comfyui, args.cache, args.reps)
    print(f"   load average {os.getloadavg()[0]:.1f} (this run's own 2 threads count for about 2 of it)")
    if GUIDANCE in refine:
        total = refine[GUIDANCE] + sds
        print(f"   novel-view iteration at {GUIDANCE}²: {refine[GUIDANCE]:.2f} s + {sds:.2f} s = {total:.2f} s; "
              f"the guidance's share {sds / total:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
