"""Cost of one SDS step against the model's plain noise prediction, in ComfyUI.

Run with the python that runs ComfyUI (the repo's .venv after scripts/setup.sh)::

    .venv/bin/python bench/bench_sds.py [--comfyui .comfyui/ComfyUI] [--cache DIR] [--reps 3]

It writes full-size random-weight checkpoints in the real single-file formats
(SD 1.5 and Stable Zero123; cached in --cache), loads them with ComfyUI's own
loader code, builds the pack's denoiser adapters and times, for each model and
image size:

* plain: one guided noise prediction (cond + uncond in one batch), no grad;
* SDS step: encode the image (differentiable VAE encoder) -> noise -> guided
  prediction -> gradient back to the image (``loss.backward()``).

The ratio SDS / plain says what score distillation costs beyond the model's
own forward; the encoder column (VAE encoder forward + backward alone) and the
rest (step - plain - encoder: noise, weighting, loss) show where it goes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_bench import (DEFAULT_COMFYUI, comfy_denoiser, pack_module, random_checkpoints,  # noqa: E402
                         sds_step, start_comfyui)
from timing import median_time  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=DEFAULT_COMFYUI)
    ap.add_argument("--cache", default=None, help="folder for the random checkpoints (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="sd15:256,zero123:256",
                    help="model:image-size pairs to time")
    args = ap.parse_args(argv)

    cases = [(m, int(s)) for m, s in (p.split(":") for p in args.sizes.split(","))]
    files = random_checkpoints([m for m, _ in cases], args.cache, args.comfyui)
    start_comfyui(args.comfyui)
    import torch

    guidance = pack_module("mpod_core.guidance")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.reps} after a warm-up")
    print(f"{'model':<9}{'image':>7}{'latent':>8}{'plain (ms)':>13}{'encoder (ms)':>15}{'SDS step (ms)':>16}"
          f"{'ratio':>8}{'rest (ms)':>12}")
    print("plain = guided noise prediction (cond+uncond batch); encoder = VAE encoder forward+backward; "
          "rest = SDS step - plain - encoder")
    for kind, size in cases:
        denoiser, views, scale = comfy_denoiser(kind, files[kind], size)
        config = guidance.SDSConfig(guidance_scale=scale)
        generator = torch.Generator().manual_seed(0)
        image = torch.rand(1, 3, size, size)
        with denoiser:
            latents = denoiser.encode(image).detach()
            t = torch.tensor([500])
            latents_t = latents + 0.5 * torch.randn_like(latents)

            def plain():
                with torch.no_grad():
                    denoiser.predict_noise(latents_t, t, scale, views)

            def encoder_only():
                pixels = image.clone().requires_grad_(True)
                denoiser.encode(pixels).square().sum().backward()

            t_plain = median_time(plain, args.reps)
            t_sds = median_time(sds_step(denoiser, image, config, views, generator), args.reps)
            t_enc = median_time(encoder_only, args.reps)
        print(f"{kind:<9}{size:>6}²{latents.shape[-1]:>7}²{t_plain * 1e3:>13.0f}{t_enc * 1e3:>15.0f}"
              f"{t_sds * 1e3:>16.0f}{t_sds / t_plain:>8.2f}{(t_sds - t_plain - t_enc) * 1e3:>12.0f}")
        denoiser = None  # free this model before loading the next
    return 0


if __name__ == "__main__":
    sys.exit(main())
