"""Cost of one textual-inversion step against one plain UNet forward, in ComfyUI.

Run with the python that runs ComfyUI (the repo's .venv after scripts/setup.sh)::

    .venv/bin/python bench/bench_textual_inversion.py [--comfyui .comfyui/ComfyUI] [--cache DIR] [--sizes 256,512]

It writes the full-size random-weight SD 1.5 checkpoint in the real single-file
format (cached in --cache), loads it with ComfyUI's loader code, builds the
pack's training adapter (``nodes/comfy_bridge/textual_inversion.py``) and times,
for each image size, batch 1:

* plain: one UNet forward the way sampling calls it (``model.model.apply_model``,
  ComfyUI's weights, no grad);
* TI step: one step of ``train_textual_inversion`` (augment, VAE encode, CLIP
  text encoder forward, UNet forward, backward through both to the token, AdamW);
* its parts: VAE encode (no grad), text encoder forward+backward, UNet
  forward+backward to the context;
* copy: cloning every UNet weight once, what an identity weight wrapper
  (``ModelPatcher.add_weight_wrapper``, core Train LoRA's route) adds to every
  forward, against the adapter's one copy at set-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_bench import DEFAULT_COMFYUI, pack_module, random_checkpoints, start_comfyui  # noqa: E402
from timing import median_time  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=DEFAULT_COMFYUI)
    ap.add_argument("--cache", default=None, help="folder for the random checkpoint (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sizes", default="256,512")
    args = ap.parse_args(argv)

    path = random_checkpoints(["sd15"], args.cache, args.comfyui)["sd15"]
    start_comfyui(args.comfyui)
    import torch
    import comfy.sd

    bridge = pack_module("nodes.comfy_bridge.textual_inversion")
    ti_core = pack_module("mpod_core.guidance.textual_inversion")

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.reps} after a warm-up; "
          "batch 1")
    with torch.inference_mode(False), torch.enable_grad():
        t0 = time.perf_counter()
        ti = bridge.ComfyTextualInversionModel(model, clip, vae)
        setup = time.perf_counter() - t0
        copy_once = median_time(lambda: [p.clone() for p in ti.unet.parameters()], args.reps)
        print(f"adapter set-up (load + float32 copies of UNet and text encoder): {setup:.1f} s; "
              f"cloning every UNet weight once: {copy_once * 1e3:.0f} ms")
        start = ti.token_embedding("dog")
        print(f"{'image':>6}{'latent':>8}{'plain fwd (s)':>15}{'VAE enc (s)':>13}{'text f+b (s)':>14}"
              f"{'UNet f+b (s)':>14}{'TI step (s)':>13}{'step/plain':>12}")
        for size in (int(s) for s in args.sizes.split(",")):
            image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            lat = size // 8
            x = torch.randn(1, 4, lat, lat)
            t = torch.tensor([500])
            sigma = model.model.model_sampling.sigmas[t].float()
            ctx0 = ti.encode_text(["a photo of a {}"], start).detach()

            def plain():
                with torch.no_grad():
                    model.model.apply_model(x, sigma, c_crossattn=ctx0)

            def vae_encode():
                ti.encode_images(image)

            def text_fb():
                emb = start.clone().requires_grad_(True)
                ti.encode_text(["a photo of a {}"], emb).square().sum().backward()

            def unet_fb():
                ctx = ctx0.clone().requires_grad_(True)
                ti.predict(x, t, ctx).square().sum().backward()

            config = ti_core.TextualInversionConfig(steps=1, resolution=size, batch_size=1)

            def step():
                ti_core.train_textual_inversion(image, ti, config, start)

            times = [median_time(fn, args.reps) for fn in (plain, vae_encode, text_fb, unet_fb, step)]
            print(f"{size:>5}²{lat:>7}²" + "".join(f"{v:>{w}.2f}" for v, w in zip(times, (15, 13, 14, 14, 13)))
                  + f"{times[-1] / times[0]:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
