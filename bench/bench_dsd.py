"""Benchmark: one DSD Refine iteration (SDS and VSD) against one plain SD 1.5 UNet forward, in ComfyUI, on the CPU.

``nice -n 10 .venv/bin/python bench/bench_dsd.py [--sizes 256,512] [--reps 2] [--scores sds,vsd]
[--comfyui .comfyui/ComfyUI] [--cache DIR]``

The full-size random-weight SD 1.5 checkpoint (``comfy_bench.py``; written into ``--cache`` once, a temp
dir by default: pass a folder to reuse it) is loaded with ComfyUI's loader code under
``torch.inference_mode()``, as the loader nodes run, and the three prompts of the node's defaults
(``dsd_prompts("chair", "sks")``) and the empty negative are encoded with its CLIP as the node does
(``clip.encode_from_tokens_scheduled(clip.tokenize(text))``). Both priors are this one MODEL and CLIP
(the node is normally given two Theme Finetune LoRAs of one base; the cost is the same). Rows, for each
image size of ``--sizes`` (latents 1/8 of it):

1. UNet forward, the yardstick: one ``ComfyTextDenoiser.predict_noise`` at guidance 7.5 on one (1, 4,
   s/8, s/8) latent: ComfyUI's sampling path with cond and uncond in one batch of 2, no grad. Timed
   before the size's DSD rows and again after them; the row and the multiples use the mean of the two
   (both are printed under the table: a wide gap means the machine's load changed during the size).
2. DSD iteration, SDS / VSD (``--scores``): one iteration of ``fit_dsd`` (``iterations=1``, ``resolution =
   guidance_resolution`` = the size, the node's other defaults: 96-cell grid, ThemeStation's terms and
   regularisers) built as ``DSDRefine.execute`` builds it: three ``ComfyTextDenoiser`` (concept colour,
   reference colour, reference normal) and, for VSD, a ``ComfyScoreModel`` (a float32 trainable copy of
   the UNet) per prior wrapped in ``VSDScore`` (LoRA rank 4) whose baselines go into the terms. One
   iteration: marching tets, the colour and normal renders, two VAE encodes with their graph, three
   guided predictions (each a batch of 2), with VSD three LoRA baseline predictions (batch 1), the
   backward, Adam, then with VSD the LoRA steps (forward and backward of the copy: one render for the
   concept prior, two for the reference prior). The state: ``init_state_from_mesh`` of a grey icosphere
   (radius 0.42, subdivisions 4) on the 96-cell grid with the default texture field, ``texture_steps=0``;
   each row refines its own copy of it (``copy_refine_state``). The VSD scores are built before the first
   VSD row and serve every size (the LoRA keeps training, as in a run).
3. Building the VSD scores (both ``ComfyScoreModel`` + ``VSDScore``): once, not a median.

Time: median of ``--reps`` calls after a warm-up call (``bench/timing.py``), and as a multiple of the
UNet forward of the same size. Memory: peak growth of this process's resident set during one more call
(``tests/harness/memory.py``: the kernel's high-water mark reset first, blocks of 1 MiB and more mapped
on their own), above what is resident then (the checkpoint, and once built the two copies). Each DSD row
runs ``reps + 2`` iterations; bench/README.md gives a run's length and figures.

Caveats: a 2-core CPU, run under ``nice`` beside other jobs: the 1-minute load average is printed at
the start and the end (this run's own two threads count for about 2), and a busy machine can stretch a
row several times; compare rows of one run. Random weights cost what trained ones do on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from comfy_bench import DEFAULT_COMFYUI, pack_module, random_checkpoints, start_comfyui  # noqa: E402
from harness.memory import peak_rss_growth  # noqa: E402
from timing import median_time  # noqa: E402

OBJECT, TOKEN = "chair", "sks"
GRID_CELLS = 96  # DSDRefineConfig's default
MiB = 2 ** 20


def load_priors(path):
    """(model, clip, vae) of the checkpoint and the node's conditionings ``{name: CONDITIONING}``
    (``concept_color``, ``reference_color``, ``reference_normal``, ``negative``), all made under
    inference mode as ComfyUI runs its nodes."""
    import torch
    import comfy.sd

    prompts = pack_module("mpod_core.guidance.dsd").dsd_prompts(OBJECT, TOKEN)
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
        conds = {k: clip.encode_from_tokens_scheduled(clip.tokenize(text)) for k, text in
                 {**prompts, "negative": ""}.items()}
    return model, clip, vae, conds


def initial_state():
    """The refine state of a grey icosphere on the default grid (texture field untrained)."""
    import numpy as np
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.42)
    mesh.visual.vertex_colors = np.tile([150, 150, 150, 255], (len(mesh.vertices), 1))
    init = pack_module("mpod_core.pipelines.dsd_init")
    state, _ = init.init_state_from_mesh(mesh, GRID_CELLS, backend="torch", texture_steps=0)
    return state


def build_scores(model, clip, vae, conds, vsd_config) -> dict:
    """The two VSD scores as ``DSDRefine.execute`` builds them (both priors the same MODEL and CLIP)."""
    vsd = pack_module("mpod_core.guidance.vsd")
    bridge = pack_module("nodes.comfy_bridge.vsd")
    ctx = bridge.conditioning_context
    return {"concept": vsd.VSDScore(bridge.ComfyScoreModel(model, clip, vae, "concept_model"),
                                    {"color": ctx(conds["concept_color"], "concept")}, vsd_config, "concept"),
            "reference": vsd.VSDScore(bridge.ComfyScoreModel(model, clip, vae, "reference_model"),
                                      {"color": ctx(conds["reference_color"], "reference"),
                                       "normal": ctx(conds["reference_normal"], "reference normal")},
                                      vsd_config, "reference")}


def bench(sizes, scores, comfyui: str, cache, reps: int):
    """``(rows, notes)``: rows ``(what, size or None, seconds, multiple of the UNet forward or None, peak MiB)``,
    each size's UNet forward then its DSD rows, the VSD build last; notes: the two yardstick times of each size."""
    files = random_checkpoints(["sd15"], cache, comfyui)
    start_comfyui(comfyui)
    import torch

    dsd = pack_module("mpod_core.guidance.dsd")
    refine = pack_module("mpod_core.pipelines.dsd_refine")
    state_io = pack_module("mpod_core.pipelines.refine_state_io")
    vsd = pack_module("mpod_core.guidance.vsd")
    diffusion = pack_module("nodes.comfy_bridge.diffusion")

    model, clip, vae, conds = load_priors(files["sd15"])
    rows, notes = [], []
    with torch.inference_mode(False), torch.enable_grad():
        state = initial_state()
        with torch.no_grad():
            faces = state.surface()[1].shape[0]
        print(f"initial state: icosphere on a {GRID_CELLS}-cell grid, {faces} faces")
        denoisers = [diffusion.ComfyTextDenoiser(model, vae, conds["concept_color"], conds["negative"]),
                     diffusion.ComfyTextDenoiser(model, vae, conds["reference_color"], conds["negative"]),
                     diffusion.ComfyTextDenoiser(model, vae, conds["reference_normal"], conds["negative"])]
        vsd_scores, baselines, build = {}, None, None
        try:
            for size in sizes:
                latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))

                def forward():
                    denoisers[0].predict_noise(latents, torch.tensor([500]), 7.5)
                before = median_time(forward, reps)
                memory = peak_rss_growth(forward)[1] / MiB
                print(f"  UNet forward at {size}²: {before:.2f} s", flush=True)
                dsd_rows = []
                for score in scores:
                    if score == "vsd" and not vsd_scores:
                        t0 = time.perf_counter()
                        vsd_scores, grown = peak_rss_growth(
                            lambda: build_scores(model, clip, vae, conds, vsd.VSDConfig()))
                        build = ("building the two VSD scores (float32 UNet copies + LoRA)", None,
                                 time.perf_counter() - t0, None, grown / MiB)
                        print(f"  VSD scores built in {build[2]:.1f} s, {build[4]:.0f} MiB", flush=True)
                        baselines = {"concept_color": vsd_scores["concept"].baseline("color"),
                                     "reference_color": vsd_scores["reference"].baseline("color"),
                                     "reference_normal": vsd_scores["reference"].baseline("normal")}
                    config = refine.DSDRefineConfig(iterations=1, resolution=size, guidance_resolution=size,
                                                    grid_cells=GRID_CELLS, dsd=dsd.DSDConfig(score=score))
                    terms = dsd.themestation_terms(config.dsd, *denoisers, baselines if score == "vsd" else None)
                    row_state = state_io.copy_refine_state(state, backend="torch")

                    def one():
                        refine.fit_dsd(row_state, denoisers[0].encode, terms, config,
                                       scores=vsd_scores if score == "vsd" else None, backend="torch")
                    seconds = median_time(one, reps)
                    dsd_rows.append((f"DSD iteration, {score.upper()}", size, seconds, peak_rss_growth(one)[1] / MiB))
                    print(f"  DSD iteration ({score}) at {size}²: {seconds:.2f} s", flush=True)
                # The yardstick again after the size's DSD rows: the load of a shared machine drifts.
                after = median_time(forward, reps)
                unet = (before + after) / 2
                print(f"  UNet forward at {size}² again: {after:.2f} s", flush=True)
                notes.append(f"UNet forward at {size}²: {before:.2f} s before the DSD rows, {after:.2f} s after")
                rows.append(("UNet forward (cond + uncond, guidance 7.5)", size, unet, 1.0, memory))
                rows.extend((what, sz, sec, sec / unet, mib) for what, sz, sec, mib in dsd_rows)
        finally:
            for s in vsd_scores.values():
                s.close()
            for den in denoisers:
                den.close()
    return rows + ([build] if build else []), notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512", help="image sizes (render = guidance), multiples of 8")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--scores", default="sds,vsd", help="DSD scores to time: sds, vsd or both")
    ap.add_argument("--comfyui", default=DEFAULT_COMFYUI)
    ap.add_argument("--cache", default=None, help="folder for the random SD 1.5 checkpoint (default: a temp dir)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    scores = [s.strip() for s in args.scores.split(",") if s.strip()]
    if any(s not in ("sds", "vsd") for s in scores) or any(s % 8 or s < 64 for s in sizes):
        ap.error("--scores takes sds and/or vsd; --sizes multiples of 8, >= 64")
    import torch

    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.reps} after a warm-up; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows, notes = bench(sizes, scores, args.comfyui, args.cache, args.reps)
    print("\n| row | image | latents | time | x UNet forward | peak memory |\n|---|---|---|---|---|---|")
    for what, size, seconds, ratio, mib in rows:
        image, lat = (f"{size}²", f"{size // 8}²") if size else ("", "")
        multiple = f"{ratio:.1f}x" if ratio is not None else ""
        print(f"| {what} | {image} | {lat} | {seconds:.2f} s | {multiple} | {mib:,.0f} MiB |")
    print("\n" + "\n".join(notes))
    print(f"load average {os.getloadavg()[0]:.1f} (this run's own 2 threads count for about 2 of it); "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
