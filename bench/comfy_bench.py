"""Shared set-up of the benchmarks that run inside ComfyUI's python: random checkpoints, ComfyUI, the pack."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = str(REPO / ".comfyui" / "ComfyUI")


def random_checkpoints(kinds, cache, comfyui: str) -> dict:
    """{kind: path} of full-size random-weight checkpoints ("sd15", "zero123") in the real single-file
    formats, written once into ``cache`` (a temp dir when None)."""
    sys.path.insert(0, str(REPO / "tests"))
    from harness.checkpoints import write_sd15_checkpoint, write_stable_zero123_checkpoint
    writers = {"sd15": write_sd15_checkpoint, "zero123": write_stable_zero123_checkpoint}
    folder = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="mpod3d-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in sorted(set(kinds)):
        path = folder / f"random_{kind}.safetensors"
        if not path.is_file():
            t0 = time.perf_counter()
            writers[kind](path, comfyui=comfyui, python=sys.executable)
            print(f"wrote {path.name} in {time.perf_counter() - t0:.1f} s")
        files[kind] = path
    return files


def start_comfyui(comfyui: str) -> None:
    """Make ComfyUI importable on the CPU, as ``main.py --cpu`` would."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfyui)
    import comfy.options
    comfy.options.enable_args_parsing()


def import_pack(name: str = "comfyui_mpod3d_bench") -> str:
    """Import the pack as ComfyUI does (a package named after its folder); returns the package name."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return name


def pack_module(relative: str):
    """A module of the pack, e.g. ``pack_module("nodes.comfy_bridge.diffusion")``."""
    return importlib.import_module(f"{import_pack()}.{relative}")


def comfy_denoiser(kind: str, path, size: int):
    """The pack's ComfyUI denoiser for a checkpoint loaded as the loader nodes load it, with what an
    SDS step passes it: ``(denoiser, views, guidance scale)``. SD 1.5: ``ComfyTextDenoiser`` on the
    prompt "a DSLR photo of a wooden chair", no negative, scale 100; Stable Zero123:
    ``ComfyZero123Denoiser`` on a random ``size``² reference, one view, scale 3. Call
    :func:`start_comfyui` first."""
    import torch
    import comfy.sd

    diffusion = pack_module("nodes.comfy_bridge.diffusion")
    guidance = pack_module("mpod_core.guidance")
    torch.set_grad_enabled(True)
    with torch.inference_mode():  # as ComfyUI's loader nodes run
        if kind == "sd15":
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True,
                                                                     output_clip=True)[:3]
            cond, pooled = clip.encode_from_tokens(clip.tokenize("a DSLR photo of a wooden chair"),
                                                   return_pooled=True)
            positive = [[cond, {"pooled_output": pooled}]]
        else:
            out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False,
                                                        output_clipvision=True)
            model, clip_vision, vae = out[0], out[3], out[2]
    if kind == "sd15":
        return diffusion.ComfyTextDenoiser(model, vae, positive, None), None, 100.0
    reference = torch.rand(1, size, size, 3)
    views = guidance.ViewCondition(torch.tensor([15.0]), torch.tensor([60.0]), torch.tensor([2.5]))
    return diffusion.ComfyZero123Denoiser(model, clip_vision, vae, reference), views, 3.0


def sds_step(denoiser, image, config, views=None, generator=None):
    """A call that takes one SDS step as the loops do (``sds_image_loss``: encode with the VAE's graph,
    guided noise prediction, loss) on a fresh leaf copy of ``image`` (1, 3, H, W) and backpropagates it
    to the pixels."""
    import torch

    guidance = pack_module("mpod_core.guidance")

    def step():
        pixels = image.clone().requires_grad_(True)
        guidance.sds_image_loss(pixels, denoiser, config, 0, views, generator).loss.backward()
        assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0

    return step
