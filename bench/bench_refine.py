"""Benchmark: one DMTet Refine iteration on the CPU, the guidance's model call excluded.

``.venv/bin/python bench/bench_refine.py [--sizes 128,512,1024] [--cells 64] [--reps 3]``

A stage-1 stand-in (the default ``NeRFFieldConfig``: 16 levels x 2 features, 2^19
entries, the texture field's real size) whose density is a ball of radius 0.45 at
the threshold, turned into the refine state (``init_refine_state``: grid of
``--cells`` cells on the tightened box), then ``fit_refine`` for one novel-view
iteration at each render size: the stage-1 outline at the guidance size (512, or
the render size when smaller), marching tets, the render with the texture field as
``color_fn``, L_nvm, SDS through the Gaussian oracle (a no-op model: what a real
model costs is in bench_sds.py, 54.8 s per SD 1.5 call at 512²), the regularisers,
backward and Adam. Time is the median of ``--reps`` iterations after a warm-up one;
memory the peak growth of this process's resident set during one more iteration
(``tests/harness/memory.py``: the kernel's high-water mark reset first, blocks of
1 MiB and more mapped on their own, so memory kept from earlier iterations does
not hide it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from harness.memory import peak_rss_growth  # noqa: E402
from timing import median_time  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,512,1024")
    ap.add_argument("--cells", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import torch
    from mpod_core.fields import RadianceField
    from mpod_core.geometry import marching_tets, deform
    from mpod_core.guidance.oracle import OracleDenoiser
    from mpod_core.pipelines.dmtet_refine import RefineConfig, fit_refine, init_refine_state

    torch.manual_seed(0)
    stage1 = RadianceField(backend="torch")
    stage1.field.density = lambda p: 10.0 + 20.0 * (0.45 - p.norm(dim=-1)) / 0.45
    image = torch.ones(64, 64, 3)
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; grid {args.cells} cells; "
          f"median of {args.reps} after a warm-up")
    print(f"{'render':>8}{'guidance':>10}{'faces':>8}{'marching (ms)':>15}{'iteration (s)':>15}{'memory (MiB)':>14}")
    for size in (int(s) for s in args.sizes.split(",")):
        g = min(512, size)
        config = RefineConfig(iterations=1, resolution=size, guidance_resolution=g, grid_cells=args.cells,
                              reference_probability=0.0)
        config.sds.guidance_scale = 1.0
        state = init_refine_state(stage1, config, backend="torch")
        denoiser = OracleDenoiser(target=torch.zeros(3, g, g))
        with torch.no_grad():
            _, faces = state.surface()
            march = median_time(lambda: marching_tets(deform(state.grid, state.delta), state.grid, state.sdf),
                                args.reps)

        def one():
            fit_refine(state, stage1, image, mask, denoiser, config, backend="torch")
        seconds = median_time(one, args.reps)
        memory = peak_rss_growth(one)[1] / 2 ** 20
        print(f"{size:>7}²{g:>9}²{faces.shape[0]:>8}{march * 1e3:>15.0f}{seconds:>15.2f}{memory:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
