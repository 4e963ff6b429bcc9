"""MRCA's overhead per UNet call, against the same model unpatched, in ComfyUI.

Run with the python that runs ComfyUI (the repo's .venv after scripts/setup.sh)::

    .venv/bin/python bench/bench_mrca.py [--cache DIR] [--reps 3] [--sizes 256,512]

Loads the full-size random-weight SD 1.5 checkpoint (written once into --cache)
with ComfyUI's loader and times one guided noise prediction (cond + uncond in
one batch, through ``sampling_function`` as KSampler calls it) for:

* plain: the model as loaded;
* static: MRCA on every cross-attention layer with a static half mask;
* per view: the same patch with the mask of each call passed in
  ``ViewCondition.extras`` (a new tensor per call, as DMTet Refine does).

The goal (issue 12) is at most 1.1x the plain call.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_bench import DEFAULT_COMFYUI, pack_module, random_checkpoints, start_comfyui  # noqa: E402

PROMPT = "A high-resolution DSLR image of a wooden chair"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=DEFAULT_COMFYUI)
    ap.add_argument("--cache", default=None, help="folder for the random checkpoint (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="256,512", help="image sizes (latents are 1/8)")
    args = ap.parse_args(argv)
    files = random_checkpoints(["sd15"], args.cache, args.comfyui)
    start_comfyui(args.comfyui)
    import torch
    import comfy.sd

    diffusion = pack_module("nodes.comfy_bridge.diffusion")
    mrca = pack_module("nodes.comfy_bridge.mrca")
    protocol = pack_module("mpod_core.guidance.protocol")
    with torch.inference_mode():  # as ComfyUI's loader nodes run
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(files["sd15"]), output_vae=True,
                                                                 output_clip=True)[:3]
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    columns = mrca.token_columns(clip, PROMPT, "chair")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.reps} alternating rounds")
    print(f"{'image':>6}{'latent':>8}{'plain (ms)':>12}{'static (ms)':>13}{'ratio':>7}{'per view (ms)':>15}"
          f"{'ratio':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        half = torch.zeros(1, size, size)
        half[:, :, : size // 2] = 1
        patched = mrca.apply_mrca(model, mrca.MRCAPatch(columns, half))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, size // 8, size // 8, generator=g)
        t = torch.tensor([500])

        def per_view():
            mask = half.clone()  # a new tensor each call, as a refine loop renders one per view
            return protocol.ViewCondition(torch.zeros(1), torch.zeros(1), torch.ones(1),
                                          extras={mrca.MASK_OPTION_KEY: mask})

        def one_call(m, views_fn):
            """Seconds of the second of two calls in one sampling context (the first loads and prepares)."""
            with torch.inference_mode(False), diffusion.ComfyTextDenoiser(m, vae, positive) as d:
                d.predict_noise(x, t, 7.5, views_fn())
                t0 = time.perf_counter()
                d.predict_noise(x, t, 7.5, views_fn())
                return time.perf_counter() - t0

        # Rounds alternate the three variants, so a change in the machine's load hits them alike.
        variants = {"plain": (model, lambda: None), "static": (patched, lambda: None), "per view": (patched, per_view)}
        times = {name: [] for name in variants}
        for _ in range(args.reps):
            for name, (m, views_fn) in variants.items():
                times[name].append(one_call(m, views_fn))
        plain, static, dynamic = (statistics.median(times[name]) for name in variants)
        print(f"{size:>5}²{size // 8:>7}²{plain * 1e3:>12.0f}{static * 1e3:>13.0f}{static / plain:>7.3f}"
              f"{dynamic * 1e3:>15.0f}{dynamic / plain:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
