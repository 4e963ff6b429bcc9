"""Cost of one Theme Finetune (LoRA) step against one plain UNet forward and core Train LoRA's route, in ComfyUI.

Run with the python that runs ComfyUI (the repo's .venv after scripts/setup.sh)::

    .venv/bin/python bench/bench_theme_finetune.py [--comfyui .comfyui/ComfyUI] [--cache DIR] [--sizes 256,512]

It writes the full-size random-weight SD 1.5 checkpoint in the real single-file
format (cached in --cache), loads it with ComfyUI's loader code under
``torch.inference_mode()`` (as the loader nodes run), and times, for each image
size, batch 1:

* plain: one UNet forward the way sampling calls it (``model.model.apply_model``,
  ComfyUI's weights, no grad);
* ours: one step of ``train_theme_lora`` (rank 4, DreamBooth eps loss, AdamW) through
  the pack's adapter (``nodes/comfy_bridge/theme_finetune.py``: one float32 copy of the
  UNet and text encoder at set-up, forward hooks on the attention projections), with the
  text encoder trained (the default) and without. The run takes 1 + reps steps; the
  ``progress`` callback's timestamps give each step's time, so the one-time VAE encoding
  (and, text encoder off, the one-time caption encoding) and the warm-up step are left out;
* peer: core's experimental Train LoRA route (``comfy_extras/nodes_train.py``): a cloned
  ModelPatcher, ``LoRAAdapter.create_train(weight, rank=4, alpha=1.0)`` (a ``LoraDiff``)
  added with ``add_weight_wrapper`` on the same layers (UNet attention to_q / to_k / to_v /
  to_out.0), the patcher loaded with ``load_models_gpu(..., force_full_load=True)``, and per
  step ``noise_scaling``, ``apply_model`` with ``xt`` and ``sigma`` requiring grad (as its
  ``TrainSampler.fwd_bwd``), backward, AdamW, in float32 without gradient checkpointing (the
  node's defaults are bf16 and checkpointing; ours is float32 without). The loss is the same
  eps MSE (eps recovered from the denoised output). Everything runs under
  ``torch.inference_mode(False)``, the conditioning cloned there as the node's
  ``process_cond_list`` does.

  Core avoids "Inference tensors cannot be saved for backward" by wrapping *every* weight
  and bias (LoRA on the >= 2-D weights, ``BiasDiff`` on the rest): ``comfy.ops.cast_bias_weight``
  copies a weight that has a weight function (``cast_to(..., copy=True)``), and outside
  inference mode that copy is an ordinary tensor that autograd may save. With wrappers on the
  attention layers only, the other layers' weights stay inference tensors and the first of
  them in the backward's path fails; the bench shows that once on the shared model, then
  loads the checkpoint again under ``torch.inference_mode(False)`` for the same-layer peer.
  ``--core-all`` also times core's own route, every weight wrapped, on the inference-mode
  weights (more trained parameters: a different workload, shown for its copy cost).

Peak memory: growth of the process's resident set (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs`` after the warm-up step, glibc made to map blocks of 1 MiB or more on
their own as ``tests/harness/memory.py`` does) over the measured steps, above the resident set
just before the run, i.e. with the models (and ours' float32 copies, the peer's second load) in
memory. Afterwards no weight wrapper is left on the shared model (checked).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_bench import DEFAULT_COMFYUI, pack_module, random_checkpoints, start_comfyui  # noqa: E402
from timing import median_time  # noqa: E402

CAPTION = "a photo of a sks chair, front view"
RANK = 4
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M).group(1))


class StepProbe:
    """A ``progress(step, total, preview)`` callback timing each step of a run and the peak resident
    memory of the steps after the first, above the resident set when the probe was made."""

    def __init__(self):
        gc.collect()
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.malloc_trim(0)
        self.libc.mallopt(_M_MMAP_THRESHOLD, 2 ** 20)
        self.base = _status_kib("VmRSS")
        self.marks = [time.perf_counter()]
        self.peak = 0

    def __call__(self, step, total, preview=None):
        self.marks.append(time.perf_counter())
        if step == 1:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := VmRSS
        elif step == total:
            self.peak = _status_kib("VmHWM")

    def result(self):
        """(median seconds of the steps after the first, peak growth in MiB)."""
        self.libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)
        steps = [b - a for a, b in zip(self.marks[1:], self.marks[2:])]
        return statistics.median(steps), (self.peak - self.base) / 1024


def wrapped_modules(model) -> list:
    """Names of the modules of a MODEL's BaseModel that carry weight or bias functions."""
    return [n for n, m in model.model.named_modules()
            if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)]


def add_core_wrappers(mp, rank, only=None):
    """core Train LoRA's adapter set-up (``TrainLoraNode.execute``, float32, new LoRA): a ``LoraDiff`` on every
    >= 2-D weight and a ``BiasDiff`` on every other weight of the modules named in ``only``; when ``only`` is
    None, of all modules, with a ``BiasDiff`` on every bias too, as the node does. Returns the trainable
    parameters."""
    import torch
    from comfy.weight_adapter import adapter_maps
    from comfy_extras.nodes_train import BiasDiff

    params = []
    for n, m in mp.model.named_modules():
        if not hasattr(m, "weight_function") or (only is not None and n not in only):
            continue
        if m.weight is not None:
            key = f"{n}.weight"
            if m.weight.ndim >= 2:
                adapter = adapter_maps["LoRA"].create_train(m.weight, rank=rank, alpha=1.0).to(torch.float32)
                params += list(adapter.parameters())
            else:
                adapter = BiasDiff(torch.nn.Parameter(torch.zeros(m.weight.shape, requires_grad=True)))
                params.append(adapter.bias)
            mp.add_weight_wrapper(key, adapter)
        if getattr(m, "bias", None) is not None and only is None:
            adapter = BiasDiff(torch.nn.Parameter(torch.zeros(m.bias.shape, requires_grad=True)))
            params.append(adapter.bias)
            mp.add_weight_wrapper(f"{n}.bias", adapter)
    return [p for p in params if p.requires_grad]


def core_train(mp, params, latent, context, steps, progress, seed=0):
    """``steps`` steps of core Train LoRA's loop (``TrainSampler.fwd_bwd`` + AdamW) on one latent, with the
    eps MSE of :func:`~mpod_core.guidance.theme_finetune.dreambooth_loss`; ``progress`` after each step."""
    import torch
    import torch.nn.functional as F

    optimiser = torch.optim.AdamW(params, lr=1e-4)
    sampling = mp.model.model_sampling
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        sigma = torch.tensor([float(sampling.percent_to_sigma(torch.rand((1,), generator=generator).item()))])
        noise = torch.randn(latent.shape, generator=generator)
        xt = sampling.noise_scaling(sigma, noise, latent, False)
        denoised = mp.model.apply_model(xt.requires_grad_(True), sigma.requires_grad_(True), c_crossattn=context)
        eps = (xt - denoised) / sigma.reshape(-1, 1, 1, 1)
        F.mse_loss(eps.float(), noise).backward()
        optimiser.step()
        optimiser.zero_grad()
        progress(step + 1, steps)


def run_peer(mp, only, latent, context, reps):
    """Wrap ``mp`` (a clone) as core Train LoRA does, load it, train 1 + reps steps: (s per step, peak MiB)."""
    import comfy.model_management

    params = add_core_wrappers(mp, RANK, only)
    mp.model.requires_grad_(False)
    comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
    try:
        probe = StepProbe()
        core_train(mp, params, latent, context, 1 + reps, probe)
        return probe.result()
    finally:
        release(mp)


def release(mp):
    """Unload ``mp`` and take its wrappers off the modules it shares (ComfyUI leaves them on a fully loaded
    model until the next load)."""
    import comfy.model_management
    import comfy.model_patcher

    comfy.model_management.unload_all_models()
    for m in mp.model.modules():
        comfy.model_patcher.wipe_lowvram_weight(m)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=DEFAULT_COMFYUI)
    ap.add_argument("--cache", default=None, help="folder for the random checkpoint (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=1, help="measured steps / forwards after a warm-up one")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--core-all", action="store_true",
                    help="also time core Train LoRA's own route: every UNet weight and bias wrapped")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    path = random_checkpoints(["sd15"], args.cache, args.comfyui)["sd15"]
    start_comfyui(args.comfyui)
    import torch
    import comfy.model_management
    import comfy.sd

    bridge = pack_module("nodes.comfy_bridge.theme_finetune")
    core = pack_module("mpod_core.guidance.theme_finetune")
    targets = pack_module("mpod_core.guidance.theme_finetune_diffusers")

    t0 = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI's loader nodes run
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
        context = clip.encode_from_tokens(clip.tokenize(CAPTION))
    load = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.reps} step(s) after a "
          f"warm-up; batch 1, LoRA rank {RANK}; UNet {model.model.get_dtype()}; checkpoint load {load:.1f} s")
    images = {s: torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0)) for s in sizes}
    rows = {s: {} for s in sizes}
    setups, peer_loads = [], []
    with torch.inference_mode(False), torch.enable_grad():
        context_grad = context.clone()  # the node's conditioning, cloned outside inference mode (process_cond_list)
        unet_layers = set(targets.linear_targets(model.model.diffusion_model, targets.UNET_TARGETS,
                                                 "diffusion_model."))
        # core's mechanism with wrappers on the attention layers only, on inference-mode weights: it fails.
        mp = model.clone()
        params = add_core_wrappers(mp, RANK, unet_layers)
        mp.model.requires_grad_(False)
        comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
        try:
            core_train(mp, params, torch.randn(1, 4, sizes[0] // 8, sizes[0] // 8), context_grad, 1, lambda *a: None)
            failure = "ran"
        except RuntimeError as exc:
            failure = f"RuntimeError: {str(exc).splitlines()[0]}"
        finally:
            release(mp)
            del mp, params
        left = wrapped_modules(model)
        assert not left, f"weight wrappers left on the shared model: {left[:3]}"
        print(f"peer, wrappers on the {len(unet_layers)} attention layers only, weights loaded under inference "
              f"mode: {failure}")

        # Per size, one block: plain, ours (fresh adapter), peer (fresh second load), so that a change of the
        # machine's load hits the three alike; only one of ours' copies and the peer's load is in memory.
        for size in sizes:
            lat = size // 8
            x = torch.randn(1, 4, lat, lat)
            sigma = model.model.model_sampling.sigmas[torch.tensor([500])].float()

            def plain():
                with torch.no_grad():
                    model.model.apply_model(x, sigma, c_crossattn=context)

            rows[size]["plain"] = median_time(plain, args.reps)
            rows[size]["load"] = [os.getloadavg()[0]]

            t0 = time.perf_counter()
            ours = bridge.ComfyFinetuneModel(model, clip, vae)
            setups.append(time.perf_counter() - t0)
            assert set(ours.lora_targets(False)) == unet_layers
            for text in (True, False):
                config = core.ThemeFinetuneConfig(steps=1 + args.reps, batch_size=1, resolution=size, rank=RANK,
                                                  alpha=float(RANK), train_text_encoder=text)
                probe = StepProbe()
                result = core.train_theme_lora(images[size], [CAPTION], ours, config, progress=probe)
                result.lora.remove()
                del result
                rows[size]["ours_te" if text else "ours"] = probe.result()
                rows[size]["load"].append(os.getloadavg()[0])
            text_layers = len(ours.lora_targets(True)) - len(unet_layers)
            latent = ours.encode_images(images[size]).float()
            del ours
            gc.collect()

            if args.core_all:
                rows[size]["core_all"] = run_peer(model.clone(), None, latent, context_grad, args.reps)
                rows[size]["load"].append(os.getloadavg()[0])
                left = wrapped_modules(model)
                assert not left, f"weight wrappers left on the shared model: {left[:3]}"

            t0 = time.perf_counter()
            peer_model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
            peer_loads.append(time.perf_counter() - t0)
            rows[size]["peer"] = run_peer(peer_model.clone(), unet_layers, latent, context_grad, args.reps)
            rows[size]["load"].append(os.getloadavg()[0])
            left = wrapped_modules(peer_model) + wrapped_modules(model)
            assert not left, f"weight wrappers left after the peer: {left[:3]}"
            del peer_model
            gc.collect()

    print(f"ours: adapter set-up (float32 copies of UNet and text encoder) {min(setups):.1f} s; LoRA on "
          f"{len(unet_layers)} UNet layers (+{text_layers} text encoder layers with TE); peer: UNet loaded again "
          f"under inference_mode(False) in {min(peer_loads):.1f} s, LoRA on the same {len(unet_layers)} UNet layers")
    print("step: seconds per training step; /plain: against the plain forward; peak: RSS growth (MiB)")
    head = (f"{'image':>6}{'latent':>8}{'plain fwd':>11}"
            f"{'ours+TE':>9}{'/plain':>8}{'peak':>7}"
            f"{'ours':>7}{'/plain':>8}{'peak':>7}"
            f"{'peer':>7}{'/plain':>8}{'peak':>7}{'ours/peer':>11}{'ours+TE/peer':>14}")
    if args.core_all:
        head += f"{'core all':>10}{'peak':>7}"
    print(head)
    for size in sizes:
        r = rows[size]
        plain = r["plain"]
        line = f"{size:>5}²{size // 8:>7}²{plain:>11.2f}"
        for key, w in (("ours_te", 9), ("ours", 7), ("peer", 7)):
            step, peak = r[key]
            line += f"{step:>{w}.2f}{step / plain:>8.2f}{peak:>7.0f}"
        line += f"{r['ours'][0] / r['peer'][0]:>11.2f}{r['ours_te'][0] / r['peer'][0]:>14.2f}"
        if args.core_all:
            line += f"{r['core_all'][0]:>10.2f}{r['core_all'][1]:>7.0f}"
        print(line)
    print("1-min load average after each measurement (plain, ours+TE, ours, " + ("core all, " if args.core_all else "")
          + "peer): " + "; ".join(f"{s}²: " + ", ".join(f"{v:.1f}" for v in rows[s]["load"]) for s in sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
