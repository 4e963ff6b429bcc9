"""Full-size checkpoints with random weights, in the real single-file formats.

No model weights can be downloaded here, yet the end-to-end tests must load
checkpoints through ComfyUI's own loaders. These writers produce files that
``CheckpointLoaderSimple`` detects as SD 1.5 (MODEL, CLIP, VAE), as SD 1.5
inpainting (the same with a 9-channel UNet input: noisy latent + mask +
masked-image latent, as ``sd-v1-5-inpainting.ckpt``) and
``ImageOnlyCheckpointLoader`` detects as Stable Zero123 (MODEL with
``cc_projection``, CLIP_VISION from ``cond_stage_model.model.visual.``, VAE).

Key names and shapes are not typed by hand: they come from ComfyUI's own
module classes (UNet, VAE, CLIP text model), instantiated on the ``meta``
device in a subprocess run by the ComfyUI python, so they match exactly what
the loaders expect. The CLIP vision tower is written in the OpenAI-CLIP layout
(``transformer.resblocks.N.attn.in_proj_weight`` ...) that the original
Zero123 / Stable Zero123 checkpoints use; ComfyUI converts it on load.

Weights: fp16, ``N(0, 0.02)`` for matrices/convolutions/embeddings, ones for
1-D ``.weight`` tensors (norm scales), zeros for biases, so activations stay
finite through the full-depth networks.

Use from tests::

    write_sd15_checkpoint(path)            # ~2.1 GB
    write_sd15_inpaint_checkpoint(path)    # ~2.1 GB
    write_stable_zero123_checkpoint(path)  # ~2.3 GB

or from a shell (with the ComfyUI python)::

    python tests/harness/checkpoints.py sd15 out.safetensors --comfyui /path/to/ComfyUI
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

#: OpenAI CLIP ViT-L/14 image tower (Zero123's FrozenCLIPImageEmbedder): its
#: 768-d image embedding + 4 camera numbers = the 772 inputs of cc_projection.
VIT_L14 = {"width": 1024, "layers": 24, "mlp": 4096, "patch": 14, "tokens": 257, "embed": 768}


# --------------------------------------------------------------- in the child
def _comfy_setup(comfyui: str) -> None:
    sys.path.insert(0, comfyui)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()


def _shapes(kind: str) -> dict:
    """{key: (shape, dtype-name)} of a checkpoint of ``kind`` (needs comfy importable)."""
    import torch
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    table: dict = {}
    unet_cfg = dict(SD15_UNET, dtype=torch.float16)
    if kind == "zero123":
        unet_cfg["in_channels"] = 8  # noisy latent + reference latent
    elif kind == "sd15_inpaint":
        unet_cfg["in_channels"] = 9  # noisy latent + mask + masked-image latent (comfy: in_channels > 4 = inpaint)
    unet = UNetModel(**unet_cfg, device="meta", operations=comfy.ops.disable_weight_init)
    for k, v in unet.state_dict().items():
        table["model.diffusion_model." + k] = (tuple(v.shape), "f16")
    del unet
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    for k, v in vae.state_dict().items():
        table["first_stage_model." + k] = (tuple(v.shape), "f16")
    del vae
    if kind in ("sd15", "sd15_inpaint"):
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        for k, v in clip.state_dict().items():
            if k in ("logit_scale", "transformer.text_projection.weight"):
                continue  # not in SD 1.5 checkpoints
            table["cond_stage_model." + k] = (tuple(v.shape), "f16")
        table["cond_stage_model.transformer.text_model.embeddings.position_ids"] = ((1, 77), "i64")
    else:
        c = VIT_L14
        p = "cond_stage_model.model.visual."
        w = c["width"]
        table[p + "class_embedding"] = ((w,), "f16")
        table[p + "positional_embedding"] = ((c["tokens"], w), "f16")
        table[p + "conv1.weight"] = ((w, 3, c["patch"], c["patch"]), "f16")
        table[p + "proj"] = ((w, c["embed"]), "f16")
        for n in ("ln_pre", "ln_post"):
            table[p + n + ".weight"] = ((w,), "f16")
            table[p + n + ".bias"] = ((w,), "f16")
        for i in range(c["layers"]):
            r = f"{p}transformer.resblocks.{i}."
            for n in ("ln_1", "ln_2"):
                table[r + n + ".weight"] = ((w,), "f16")
                table[r + n + ".bias"] = ((w,), "f16")
            table[r + "attn.in_proj_weight"] = ((3 * w, w), "f16")
            table[r + "attn.in_proj_bias"] = ((3 * w,), "f16")
            table[r + "attn.out_proj.weight"] = ((w, w), "f16")
            table[r + "attn.out_proj.bias"] = ((w,), "f16")
            table[r + "mlp.c_fc.weight"] = ((c["mlp"], w), "f16")
            table[r + "mlp.c_fc.bias"] = ((c["mlp"],), "f16")
            table[r + "mlp.c_proj.weight"] = ((w, c["mlp"]), "f16")
            table[r + "mlp.c_proj.bias"] = ((w,), "f16")
        # Zero123's camera projection: [CLIP image embed (768), 4 camera numbers] -> 768.
        # Identity on the embedding part (as Zero123 initialises it) + small camera weights.
        table["cc_projection.weight"] = ((768, 768 + 4), "f16")
        table["cc_projection.bias"] = ((768,), "f16")
    return table


def _fill(table: dict, seed: int) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, kind) in table.items():
        if kind == "i64":
            out[key] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        elif key.endswith("bias") or key.endswith("_bias"):
            out[key] = torch.zeros(shape, dtype=torch.float16)
        elif len(shape) == 1 and key.endswith(".weight"):
            out[key] = torch.ones(shape, dtype=torch.float16)  # norm scales
        elif key == "cc_projection.weight":
            w = torch.randn(shape, generator=g) * 0.02
            w[:, :768] += torch.eye(768)
            out[key] = w.half()
        else:
            out[key] = (torch.randn(shape, generator=g).mul_(0.02)).half()
    return out


def _write_child(kind: str, path: str, seed: int) -> None:
    from safetensors.torch import save_file
    t0 = time.monotonic()
    table = _shapes(kind)
    sd = _fill(table, seed)
    tmp = path + ".partial"
    save_file(sd, tmp, metadata={"format": "pt", "mpod3d_random_weights": kind})
    os.replace(tmp, path)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {kind} random checkpoint {path}: {len(sd)} tensors, {n / 1e6:.0f} M params, "
          f"{time.monotonic() - t0:.1f} s", flush=True)


# -------------------------------------------------------------- in the tests
def _write(kind: str, path, seed: int, comfyui=None, python=None, timeout: float = 600.0) -> Path:
    from harness.paths import find_comfyui, find_python
    path = Path(path)
    comfy = Path(comfyui) if comfyui else find_comfyui()
    if comfy is None:
        raise RuntimeError("no ComfyUI tree found (set COMFYUI_PATH) to take checkpoint layouts from")
    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python or find_python(), str(Path(__file__).resolve()), kind, str(path),
                           "--comfyui", str(comfy), "--seed", str(seed)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"writing the {kind} checkpoint failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return path


def write_sd15_checkpoint(path, seed: int = 0, **kw) -> Path:
    """An SD 1.5 single-file checkpoint (UNet, CLIP-L text, VAE) with random weights."""
    return _write("sd15", path, seed, **kw)


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def write_sd15_inpaint_checkpoint(path, seed: int = 0, base=None, **kw) -> Path:
    """An SD 1.5 inpainting single-file checkpoint (``sd-v1-5-inpainting.ckpt``'s layout: the UNet's
    ``input_blocks.0.0.weight`` is (320, 9, 3, 3)) with random weights, fp16.

    With ``base`` (a random SD 1.5 file from :func:`write_sd15_checkpoint`) its tensors are copied and only
    the UNet's input convolution widened, as the official inpainting model was made from SD 1.x (the 4
    latent channels kept, 5 for the mask and the masked-image latent added; random N(0, 0.02) here, so they
    act): a read and a write instead of a second 1 G-parameter fill (seconds instead of about a minute)."""
    if base is None:
        return _write("sd15_inpaint", path, seed, **kw)
    import torch
    from safetensors.torch import load_file, save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = load_file(str(base))
    old = state[CONV_IN]
    extra = torch.randn((old.shape[0], 5) + tuple(old.shape[2:]), generator=torch.Generator().manual_seed(seed))
    state[CONV_IN] = torch.cat([old, (extra * 0.02).to(old.dtype)], 1).contiguous()
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt", "mpod3d_random_weights": "sd15_inpaint"})
    os.replace(tmp, path)
    return path


def write_stable_zero123_checkpoint(path, seed: int = 0, **kw) -> Path:
    """A Stable Zero123 single-file checkpoint (8-channel UNet + cc_projection,
    CLIP ViT-L/14 image tower, VAE) with random weights."""
    return _write("zero123", path, seed, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("sd15", "sd15_inpaint", "zero123"))
    ap.add_argument("path")
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    _comfy_setup(a.comfyui)
    _write_child(a.kind, a.path, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
