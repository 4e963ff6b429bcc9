"""Cost of the depth estimator in REPARO's layout loss: Depth Anything Small on a render, on this CPU.

    python bench/bench_depth.py                     # fwd+bwd at 256² and 518², forward only at 1036²
    python bench/bench_depth.py --sizes 256 --forward-sizes --reps 1
    python bench/bench_depth.py --threads 1          # steadiest on a shared machine (see below)

REPARO's official code runs the frozen depth model on every render of the layout loop (eq. 4's D),
so each iteration pays one forward and one backward through it (to the image; the weights are
frozen). This builds Depth-Anything-V2-Small's architecture in memory with random weights (DINOv2
ViT-S/14 backbone: hidden 384, 12 layers, 6 heads, features of layers 3, 6, 9, 12; DPT neck 48 / 96 /
192 / 384, fusion 64, head 32: its config.json; 24.8 M parameters), nothing read or saved, and times
``mpod_core.depth_estimation.estimate_depth`` (the torch pre-processing included) on an N x N image with
the processor's own rules at ``resolution`` = N (the model input: N rounded to a multiple of 14, so
256 -> 252², 518 -> 518²), then ``depth.mean().backward()`` to the image.

Forward only at ``--forward-sizes`` (1036² = Estimate Depth's input limit, 4 x 518²). Each row runs in
a fresh process: its peak RSS growth is the first (cold) call's (forward+backward, or forward),
sampled every millisecond (``bench.timing.peak_rss_growth_kib``); the times are medians of
``--reps`` warm calls, wall clock and this process's CPU time (all threads): on a shared machine the
wall clock stretches with the load. With several threads the CPU time grows too (OpenMP threads spin
while they wait for a core), so ``--threads 1`` gives the steadiest figure on a loaded machine: its
CPU time is the work itself. Compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: Depth-Anything-V2-Small-hf's config.json (architecture only).
SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, out_indices=[3, 6, 9, 12],
             neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32,
             reassemble_hidden_size=384)


def small_depth_anything():
    """A Depth-Anything-V2-Small-sized ``DepthAnythingForDepthEstimation``, random weights, frozen, eval."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=SMALL["hidden_size"], num_hidden_layers=SMALL["num_hidden_layers"],
                            num_attention_heads=SMALL["num_attention_heads"], patch_size=14, image_size=518,
                            mlp_ratio=4, layerscale_value=1.0, out_indices=SMALL["out_indices"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone.to_dict(), patch_size=14,
                                 neck_hidden_sizes=SMALL["neck_hidden_sizes"],
                                 fusion_hidden_size=SMALL["fusion_hidden_size"],
                                 head_hidden_size=SMALL["head_hidden_size"],
                                 reassemble_hidden_size=SMALL["reassemble_hidden_size"])
    torch.manual_seed(0)
    return DepthAnythingForDepthEstimation(config).eval().requires_grad_(False)


def one(size: int, reps: int, mode: str) -> dict:
    import torch

    from bench.timing import peak_rss_growth_kib
    from mpod_core.depth_estimation import DepthPreprocess, estimate_depth

    model = small_depth_anything()
    # Depth-Anything-V2-Small-hf's preprocessor_config.json
    settings = DepthPreprocess(height=518, width=518, keep_aspect_ratio=True, ensure_multiple_of=14,
                               resample="bicubic", do_resize=True, scale=1.0, mean=(0.485, 0.456, 0.406),
                               std=(0.229, 0.224, 0.225))
    image = torch.rand(1, size, size, 3)

    def forward_backward():
        x = image.clone().requires_grad_(True)
        estimate_depth(model, settings, x, resolution=size, normalise=False).mean().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0

    def forward():
        with torch.no_grad():
            estimate_depth(model, settings, image, resolution=size, normalise=False)

    fn = forward_backward if mode == "fwdbwd" else forward
    peak = peak_rss_growth_kib(fn)
    times = {}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward))[:2 if mode == "fwdbwd" else 1]:
        fn()
        runs, cpu = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            runs.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        times[name] = sorted(runs)[len(runs) // 2]
        times[name + "_cpu"] = sorted(cpu)[len(cpu) // 2]
    return dict(size=size, mode=mode, model_input=settings.input_size(size, size, size), params=sum(p.numel() for p in
                model.parameters()), peak_kib=peak, threads=torch.get_num_threads(), **times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 518])
    parser.add_argument("--forward-sizes", type=int, nargs="*", default=[1036],
                        help="sizes timed without the backward (what Estimate Depth runs)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fwdbwd", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(one(args.one, args.reps, args.mode)))
        return
    rows = []
    for size, mode in [(s, "fwdbwd") for s in args.sizes] + [(s, "fwd") for s in args.forward_sizes]:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), "--reps", str(args.reps), "--mode", mode,
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nDepth Anything V2 Small architecture, random weights ({rows[0]['params'] / 1e6:.1f} M parameters), "
          f"{rows[0]['threads']} threads, median of {args.reps}\n")
    print("| image | model input | forward (no grad): wall / CPU | forward + backward to the image: wall / CPU "
          "| peak RSS growth (cold) |")
    print("|---|---|---|---|---|")
    for r in rows:
        h, w = r["model_input"]
        both = (f"{r['forward_backward']:.2f} s / {r['forward_backward_cpu']:.2f} s" if "forward_backward" in r
                else "not run")
        print(f"| {r['size']}² | {h}×{w} | {r['forward']:.2f} s / {r['forward_cpu']:.2f} s | {both} | "
              f"{r['peak_kib'] / 1024:.0f} MiB ({'fwd+bwd' if r['mode'] == 'fwdbwd' else 'forward'}) |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
