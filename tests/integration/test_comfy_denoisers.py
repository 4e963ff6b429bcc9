"""The ComfyUI denoiser adapters (nodes/comfy_bridge/diffusion.py) inside a live
ComfyUI, driven through the SDS Image Fit node, with full-size random-weight
SD 1.5 and Stable Zero123 checkpoints loaded by ComfyUI's own loaders.

Plus one in-process check with the ComfyUI python (a subprocess): the adapters'
conditioning and noise prediction equal what core ComfyUI computes
(StableZero123_Conditioning, its sampling_function) for the same inputs, and
the bad-input errors no server run can produce (NaN images, flow models).

Costs on a 2-core CPU: writing each checkpoint ~15-25 s, one SDS step at 64x64
(8x8 latents, cond + uncond through the full UNet) ~7-10 s.
"""
from __future__ import annotations

import json
import math
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from harness.comfy_server import ExecutionError
from harness.progress import ProgressWatcher
from harness.paths import REPO_ROOT

pytestmark = pytest.mark.comfyui

GREY = 0x808080
STEPS = 2


# ------------------------------------------------------------------ prompts
def _fit_inputs(steps=STEPS, guidance=7.5, **extra) -> dict:
    inputs = {"steps": steps, "learning_rate": 0.05, "guidance_scale": guidance, "min_step": 0.02,
              "max_step": 0.98, "weighting": "sds", "elevation": 0.0, "azimuth": 0.0, "seed": 3}
    inputs.update(extra)
    return inputs


def sd15_prompt(ckpt: str, size=64, steps=STEPS, prefix="sds_sd15") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": GREY}},
        "5": {"class_type": "MPOD3D_SDSImageFit",
              "inputs": {"model": ["1", 0], "vae": ["1", 2], "image": ["4", 0], "positive": ["2", 0],
                         "negative": ["3", 0], **_fit_inputs(steps=steps, guidance=100.0)}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def zero123_prompt(ckpt: str, size=64, steps=STEPS, prefix="sds_z123") -> dict:
    return {
        "1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": ckpt}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": GREY}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 80, "batch_size": 1, "color": 0xC04020}},
        "5": {"class_type": "MPOD3D_SDSImageFit",
              "inputs": {"model": ["1", 0], "vae": ["1", 2], "image": ["4", 0], "clip_vision": ["1", 1],
                         "reference_image": ["7", 0],
                         **_fit_inputs(steps=steps, guidance=3.0, elevation=15.0, azimuth=-60.0)}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def _saved_image(server, entry) -> np.ndarray:
    files = [p for p in server.output_files(entry) if p.suffix == ".png"]
    assert len(files) == 1, files
    return np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.float32) / 255.0


def _check_fit_output(server, entry, size=64):
    out = _saved_image(server, entry)
    assert out.shape == (size, size, 3)
    assert np.isfinite(out).all()
    start = ((GREY >> 16) & 255) / 255.0
    changed = np.abs(out - start)
    # Adam moves every pixel that got a non-zero finite gradient by ~lr per step.
    assert changed.max() > 0.02, f"the image did not move (max change {changed.max():.4f})"
    assert (changed > 1 / 255).mean() > 0.5, "most pixels should have moved"


# -------------------------------------------------------------------- runs
def test_sd15_sds_image_fit_runs(comfy_server, sd15_checkpoint):
    t0 = time.monotonic()
    entry = comfy_server.run(sd15_prompt(sd15_checkpoint), timeout=300)
    _check_fit_output(comfy_server, entry)
    print(f"SD1.5 load + {STEPS} SDS steps at 64x64: {time.monotonic() - t0:.1f} s")


def test_zero123_sds_image_fit_runs(comfy_server, zero123_checkpoint):
    t0 = time.monotonic()
    entry = comfy_server.run(zero123_prompt(zero123_checkpoint), timeout=300)
    _check_fit_output(comfy_server, entry)
    print(f"Zero123 load + {STEPS} SDS steps at 64x64: {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------- interrupt
def test_interrupt_stops_within_one_step(comfy_server, sd15_checkpoint):
    prompt = sd15_prompt(sd15_checkpoint, steps=500, prefix="sds_interrupt")
    with ProgressWatcher(comfy_server) as watch:
        pid = comfy_server.queue(prompt)
        deadline = time.monotonic() + 240
        while len(watch.progress_of("5")) < 2:  # two steps done: we know a step's duration
            assert time.monotonic() < deadline, "no progress from SDS Image Fit"
            assert comfy_server.history(pid) is None, "the run ended before any progress"
            time.sleep(0.1)
        (t1, p1), (t2, p2) = watch.progress_of("5")[:2]
        step_seconds = t2 - t1
        assert p2["max"] == 500
        t_int = time.monotonic()
        comfy_server.interrupt(pid)
        entry = comfy_server.wait(pid, timeout=120)
        stopped_after = time.monotonic() - t_int
    with pytest.raises(ExecutionError) as info:
        comfy_server.raise_for_status(entry)
    assert info.value.interrupted
    steps_seen = max(p["value"] for _, p in watch.progress_of("5"))
    assert steps_seen < 10
    assert stopped_after < 1.5 * step_seconds + 5, (stopped_after, step_seconds)
    assert comfy_server.alive
    print(f"one SD1.5 SDS step at 64x64 in the server: {step_seconds:.1f} s; stopped {stopped_after:.1f} s "
          "after the interrupt")


# ------------------------------------------------------------- bad inputs
def _expect_error(server, prompt, *needles):
    with pytest.raises(ExecutionError) as info:
        server.run(prompt, timeout=300)
    err = info.value
    assert not err.interrupted
    assert err.node_type == "MPOD3D_SDSImageFit", str(err)
    for n in needles:
        assert n in (err.exception_message or ""), err.exception_message
    assert server.alive
    return err


def test_size_not_multiple_of_8(comfy_server, sd15_checkpoint):
    _expect_error(comfy_server, sd15_prompt(sd15_checkpoint, size=60), "multiples of 8", "60x60")


def test_zero123_without_clip_vision(comfy_server, zero123_checkpoint):
    p = zero123_prompt(zero123_checkpoint)
    del p["5"]["inputs"]["clip_vision"]
    _expect_error(comfy_server, p, "clip_vision")


def test_sd_model_in_zero123_mode(comfy_server, sd15_checkpoint, zero123_checkpoint):
    p = zero123_prompt(zero123_checkpoint)
    p["8"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}}
    p["5"]["inputs"]["model"] = ["8", 0]
    _expect_error(comfy_server, p, "cc_projection")


def test_zero123_model_in_text_mode(comfy_server, sd15_checkpoint, zero123_checkpoint):
    p = sd15_prompt(sd15_checkpoint)
    p["8"] = {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": zero123_checkpoint}}
    p["5"]["inputs"]["model"] = ["8", 0]
    _expect_error(comfy_server, p, "image conditioning")


# ------------------------------------------------- parity with core ComfyUI
PARITY_SCRIPT = r'''
import importlib.util, json, sys
import torch
COMFY, REPO, SD15, Z123 = sys.argv[1:5]
sys.path.insert(0, COMFY)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options; comfy.options.enable_args_parsing()
spec = importlib.util.spec_from_file_location("mpod3d_pack", REPO + "/__init__.py", submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec); sys.modules["mpod3d_pack"] = pack; spec.loader.exec_module(pack)
import comfy.sd, comfy.samplers, comfy.sampler_helpers, comfy.model_management
import comfy_extras.nodes_stable3d as s3d
from mpod3d_pack.nodes.comfy_bridge.diffusion import ComfyTextDenoiser, ComfyZero123Denoiser, zero123_camera_embeddings
from mpod3d_pack.mpod_core.guidance.protocol import ViewCondition
res = {}

def core_eps(model, pos, neg, x_t, t, scale):
    """eps the way a KSampler step sees it: core sampling code on sigma-space x."""
    inner = model.model
    comfy.model_management.load_models_gpu([model])
    sigma = inner.model_sampling.sigmas[t].float()
    abar = 1 / (1 + sigma ** 2)
    x = x_t / abar.sqrt().reshape(-1, 1, 1, 1)
    conds = {"positive": comfy.sampler_helpers.convert_cond(pos), "negative": comfy.sampler_helpers.convert_cond(neg)}
    conds = comfy.samplers.process_conds(inner, x, conds, model.load_device)
    model.pre_run()
    try:
      with torch.inference_mode():
        x0 = comfy.samplers.sampling_function(inner, x, sigma, conds["negative"], conds["positive"], scale, model.model_options)
    finally:
        model.cleanup()
    return (x - x0) / sigma.reshape(-1, 1, 1, 1)

# camera embedding: batched form == core per-view function
for e, a in [(0, 0), (15, -60), (-30, 170), (45, 90)]:
    ours = zero123_camera_embeddings(torch.tensor([float(e)]), torch.tensor([float(a)]))
    core = s3d.camera_embeddings(float(e), float(a))
    assert torch.allclose(ours, core), (e, a, ours, core)
res["camera_embeddings"] = "equal"

# ---- Stable Zero123
with torch.inference_mode():
    m, _, vae, cv = comfy.sd.load_checkpoint_guess_config(Z123, output_vae=True, output_clip=False, output_clipvision=True)
ref = torch.rand(1, 80, 96, 3, generator=torch.Generator().manual_seed(0))
ref_view = (10.0, 30.0)
target = ViewCondition(torch.tensor([25.0]), torch.tensor([-60.0]), torch.tensor([2.5]))
with torch.inference_mode():
    pos, neg, _ = s3d.StableZero123_Conditioning.execute(cv, ref, vae, 64, 64, 1, 15.0, -90.0)
with torch.inference_mode(False):
    d = ComfyZero123Denoiser(m, cv, vae, ref.clone(), ref_view)
    mine = d._conds(target, 1, 8, 8)
    # core's node fixes the 4th camera component at pi/2; ours is the reference's polar angle
    # (threestudio's StableZero123Guidance): 90 - 10 degrees here. Everything else equals core's.
    res["z123_cross_attn_maxdiff"] = float((mine["positive"][0]["cross_attn"][..., :-1] - pos[0][0][..., :-1]).abs().max())
    res["z123_polar_component"] = float(mine["positive"][0]["cross_attn"][0, 0, -1])
    res["z123_encoder_dtype"] = str(next(d._encoder.parameters()).dtype)
    res["z123_concat_maxdiff"] = float((mine["positive"][0]["concat_latent_image"] - pos[0][1]["concat_latent_image"]).abs().max())
    res["z123_neg_maxdiff"] = float((mine["negative"][0]["cross_attn"] - neg[0][0]).abs().max())
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([600])
    # eps against core's: a reference at elevation 0 (where both embeddings agree), same relative view
    d0 = ComfyZero123Denoiser(m, cv, vae, ref.clone(), (0.0, ref_view[1]))
    target0 = ViewCondition(torch.tensor([15.0]), target.azimuth, target.distance)
    with d0:
        eps_ours = d0.predict_noise(x_t, t, 3.0, target0)
    eps_core = core_eps(m, pos, neg, x_t, t, 3.0)
    res["z123_eps_maxdiff"] = float((eps_ours - eps_core).abs().max())
    res["z123_eps_std"] = float(eps_core.std())
    # differentiable encode, finite non-zero gradient
    img = torch.rand(1, 3, 64, 64, requires_grad=True)
    with torch.enable_grad():
        lat = d.encode(img)
        lat.square().sum().backward()
    res["z123_encode_shape"] = list(lat.shape)
    res["z123_encode_grad_norm"] = float(img.grad.norm())
    with torch.inference_mode():
        raw = vae.encode(img.detach().movedim(1, -1))
    res["z123_encode_vs_vae_maxdiff"] = float((lat.detach() - m.model.process_latent_in(raw)).abs().max())
    errors = {}
    for name, fn in {
        "nan_image": lambda: d.encode(torch.full((1, 3, 64, 64), float("nan"))),
        "nan_reference": lambda: ComfyZero123Denoiser(m, cv, vae, torch.full((1, 64, 64, 3), float("nan"))),
        "no_clip_vision": lambda: ComfyZero123Denoiser(m, None, vae, ref.clone()),
    }.items():
        try:
            fn(); errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    res["errors"] = errors
    # a VAE loaded in bfloat16 still gets a float32 encoder copy (bf16 gradients blur SDS)
    vae.first_stage_model.to(torch.bfloat16)
    vae.vae_dtype = torch.bfloat16
    d16 = ComfyZero123Denoiser(m, cv, vae, ref.clone(), ref_view)
    res["z123_encoder_dtype_bf16_vae"] = str(next(d16._encoder.parameters()).dtype)
    with torch.enable_grad():
        res["z123_encode_bf16_vae_maxdiff"] = float((d16.encode(img.detach()) - lat.detach()).abs().max())
del m, vae, cv, d, d0, d16

# ---- SD 1.5
with torch.inference_mode():
    m, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(SD15, output_vae=True, output_clip=True)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red apple"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
with torch.inference_mode(False):
    d = ComfyTextDenoiser(m, vae, pos, neg)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 900])
    with d:
        eps_ours = d.predict_noise(x_t, t, 7.5)
    eps_core = core_eps(m, pos, neg, x_t, t, 7.5)
    res["sd15_eps_maxdiff"] = float((eps_ours - eps_core).abs().max())
    res["sd15_eps_std"] = float(eps_core.std())
    ac = m.model.model_sampling.alphas_cumprod if hasattr(m.model.model_sampling, "alphas_cumprod") else None
    res["sd15_abar_first_last"] = [float(d.alphas_cumprod[0]), float(d.alphas_cumprod[-1])]
    # model patches reach the prediction: an attention patch (set_model_attn2_replace)
    # and a weight patch (what a LoRA loader adds) each change eps
    from comfy.ldm.modules.attention import optimized_attention
    calls = []
    def zero_attn(q, k, v, extra_options):
        calls.append(tuple(extra_options.get("activations_shape", ())))
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.0
    patched = m.clone()
    patched.set_model_attn2_replace(zero_attn, "input", 1)
    with ComfyTextDenoiser(patched, vae, pos, neg) as dp:
        eps_attn = dp.predict_noise(x_t, t, 7.5)
    res["attn_patch_calls"] = len(calls)
    res["attn_patch_eps_change"] = float((eps_attn - eps_ours).abs().max())
    key = "diffusion_model.out.2.weight"
    weight = m.model.state_dict()[key]
    lora = m.clone()
    lora.add_patches({key: (torch.full_like(weight, 0.05),)}, 1.0)
    with ComfyTextDenoiser(lora, vae, pos, neg) as dl:
        eps_lora = dl.predict_noise(x_t, t, 7.5)
    res["weight_patch_eps_change"] = float((eps_lora - eps_ours).abs().max())
    comfy.model_management.unload_all_models()
    with ComfyTextDenoiser(m, vae, pos, neg) as du:
        res["unpatched_again_maxdiff"] = float((du.predict_noise(x_t, t, 7.5) - eps_ours).abs().max())
    # a flow model is refused with a clear message
    import comfy.model_base, comfy.model_sampling
    ms = m.model.model_sampling
    m.model.model_type = comfy.model_base.ModelType.FLOW
    try:
        ComfyTextDenoiser(m, vae, pos, neg); res["flow_error"] = None
    except ValueError as e:
        res["flow_error"] = str(e)
    m.model.model_type = comfy.model_base.ModelType.EPS
print("RESULT " + json.dumps(res))
'''


def test_adapters_match_core_comfyui(comfy_server, sd15_checkpoint, zero123_checkpoint, tmp_path):
    ckpts = comfy_server.models_dir / "checkpoints"
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    proc = subprocess.run([comfy_server.python, str(script), str(comfy_server.comfyui_dir), str(REPO_ROOT),
                           str((ckpts / sd15_checkpoint).resolve()), str((ckpts / zero123_checkpoint).resolve())],
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(res, indent=1))
    assert res["camera_embeddings"] == "equal"
    assert res["z123_cross_attn_maxdiff"] == 0.0
    assert abs(res["z123_polar_component"] - math.radians(80.0)) < 1e-6
    assert res["z123_encoder_dtype"] == "torch.float32"
    assert res["z123_encoder_dtype_bf16_vae"] == "torch.float32"  # whatever dtype the VAE was loaded in
    assert res["z123_encode_bf16_vae_maxdiff"] < 0.1  # bf16-rounded weights, computed in float32
    assert res["z123_concat_maxdiff"] == 0.0
    assert res["z123_neg_maxdiff"] == 0.0
    assert res["z123_eps_std"] > 0
    assert res["z123_eps_maxdiff"] < 1e-4 * max(1.0, res["z123_eps_std"])
    assert res["sd15_eps_std"] > 0
    assert res["sd15_eps_maxdiff"] < 1e-4 * max(1.0, res["sd15_eps_std"])
    assert res["z123_encode_shape"] == [1, 4, 8, 8]
    assert 0 < res["z123_encode_grad_norm"] < float("inf")
    assert res["z123_encode_vs_vae_maxdiff"] < 1e-4
    abar0, abar_last = res["sd15_abar_first_last"]
    assert abs(abar0 - 0.99915) < 1e-4 and abs(abar_last - 0.0047) < 2e-4
    errs = res["errors"]
    assert errs["nan_image"] and "NaN" in errs["nan_image"]
    assert errs["nan_reference"] and "reference_image" in errs["nan_reference"]
    assert errs["no_clip_vision"] and "clip_vision" in errs["no_clip_vision"]
    assert res["flow_error"] and "flow" in res["flow_error"]
    # patches on the MODEL act inside the adapter, and do not leak into the unpatched model
    assert res["attn_patch_calls"] > 0
    assert res["attn_patch_eps_change"] > 1e-3 * max(1.0, res["sd15_eps_std"])
    assert res["weight_patch_eps_change"] > 1e-3 * max(1.0, res["sd15_eps_std"])
    assert res["unpatched_again_maxdiff"] < 1e-4 * max(1.0, res["sd15_eps_std"])
