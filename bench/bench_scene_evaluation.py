"""Benchmark: Scene Evaluation's cost (REPARO sec. 4: 18 views x 256², PSNR, SSIM, LPIPS, CLIP) on the CPU.

``.venv/bin/python bench/bench_scene_evaluation.py [--views 18] [--resolution 256] [--clip] [--cache DIR]
[--threads N]``

A two-object scene of about 20k triangles (an icosphere(5) of 20,480 faces and a box, vertex colours)
against itself with the ball moved by 0.1; LPIPS on a random AlexNet backbone in torchvision's format
(the real network's cost); with ``--clip``, the CLIP score through the CLIP_VISION of a full-size
random-weight Stable Zero123 checkpoint (ViT-L/14, loaded with ComfyUI's loader code; written once into
``--cache``). Prints the time of each stage (renders of both scenes, per-view figures) from the
progress callback, after one warm-up call at 64².
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _scene(shift: float):
    import numpy as np
    import trimesh
    from mpod_core.mesh import compose_scene
    ball = trimesh.creation.icosphere(subdivisions=5, radius=0.3)
    ball.visual.vertex_colors = np.tile([40, 60, 200, 255], (len(ball.vertices), 1))
    ball.apply_translation((0.3 + shift, 0.0, 0.0))
    box = trimesh.creation.box(extents=(0.4, 0.5, 0.4))
    box.visual.vertex_colors = np.tile([200, 50, 50, 255], (len(box.vertices), 1))
    box.apply_translation((-0.35, 0.0, 0.0))
    return compose_scene([box, ball], ["box", "ball"])


def _clip_embedder(cache):
    """images -> CLIP image embeddings of a random Stable Zero123 checkpoint's CLIP_VISION."""
    import torch
    from comfy_bench import DEFAULT_COMFYUI, random_checkpoints, start_comfyui
    path = random_checkpoints(["zero123"], cache, DEFAULT_COMFYUI)["zero123"]
    start_comfyui(DEFAULT_COMFYUI)
    import comfy.sd
    with torch.inference_mode():
        clip_vision = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                            output_clipvision=True)[3]

    def embed(images):
        with torch.inference_mode():
            return clip_vision.encode_image(images).image_embeds
    return embed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=18)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--clip", action="store_true", help="add the CLIP score (ViT-L/14 of a random Stable Zero123)")
    ap.add_argument("--cache", default=None, help="folder for the random checkpoint (--clip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision
    from mpod_core.scene_evaluation import SceneEvalConfig, evaluate_scene, evaluation_plot, load_lpips

    torch.manual_seed(0)
    backbone = Path(tempfile.mkdtemp(prefix="mpod3d-bench-")) / "random_alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), backbone)
    start = time.perf_counter()
    lpips_model = load_lpips(backbone)
    load_seconds = time.perf_counter() - start
    embed = _clip_embedder(args.cache) if args.clip else None
    scene, reference = _scene(0.1), _scene(0.0)
    faces = sum(len(g.faces) for g in scene.geometry.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; scene of {faces} faces; "
          f"LPIPS load {load_seconds:.2f} s")
    evaluate_scene(scene, reference, SceneEvalConfig(views=2, resolution=64), lpips_model=lpips_model,
                   embed=embed, backend="torch")
    config = SceneEvalConfig(views=args.views, resolution=args.resolution)
    marks = {}
    n = args.views
    start = time.perf_counter()
    result = evaluate_scene(scene, reference, config, lpips_model=lpips_model, embed=embed, backend="torch",
                            progress=lambda done, total, _p: marks.setdefault(done, time.perf_counter()))
    evaluated = time.perf_counter()
    evaluation_plot(result)
    end = time.perf_counter()
    renders = marks[2 * n] - start
    figures = marks[3 * n] - marks[2 * n]
    print(f"{n} views x {args.resolution}², LPIPS{' + CLIP' if embed else ''}: {evaluated - start:.1f} s in all "
          f"(renders of both scenes {renders:.1f} s, {renders / (2 * n) * 1e3:.0f} ms an image; per-view figures "
          f"{figures:.1f} s, {figures / n * 1e3:.0f} ms a view; plot {end - evaluated:.2f} s)")
    print("means:", {k: None if v is None else round(v, 4) for k, v in result.means().items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
