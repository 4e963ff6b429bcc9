"""The MRCA Attention Patch (nodes/comfy_bridge/mrca.py, nodes/mrca_nodes.py) against ComfyUI's own attention
and sampling, with the random full-size SD 1.5 checkpoint.

In-process (a subprocess with the ComfyUI python): the token columns of CLIP's tokenization, the patch
against ``optimized_attention`` in both cond/uncond batch orders, every cross-attention site of the UNet
hit by one ``sampling_function`` call with the layer sizes of a 32^2 latent, and a per-view mask reaching
the patch through the denoiser's ``ViewCondition.extras``. In the live server: KSampler with the patched
MODEL and a static mask (all ones: the unpatched image; half: another image), and the bad inputs.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from harness.comfy_server import ExecutionError
from harness.paths import REPO_ROOT

pytestmark = pytest.mark.comfyui

MRCA_SCRIPT = r'''
import importlib.util, json, sys
import torch
COMFY, REPO, SD15, EMB = sys.argv[1:5]
sys.path.insert(0, COMFY)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options; comfy.options.enable_args_parsing()
spec = importlib.util.spec_from_file_location("mpod3d_pack", REPO + "/__init__.py", submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec); sys.modules["mpod3d_pack"] = pack; spec.loader.exec_module(pack)
import comfy.sd, comfy.samplers, comfy.sampler_helpers, comfy.model_management
from comfy.ldm.modules.attention import optimized_attention
from mpod3d_pack.nodes.comfy_bridge.mrca import (MASK_OPTION_KEY, MRCAPatch, apply_mrca, cross_attention_sites,
                                                 token_columns)
from mpod3d_pack.nodes.comfy_bridge.diffusion import ComfyTextDenoiser
from mpod3d_pack.mpod_core.guidance.protocol import ViewCondition
res = {}
with torch.inference_mode():
    m, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(SD15, output_vae=True, output_clip=True,
                                                            embedding_directory=[EMB])
PROMPT = "A high-resolution DSLR image of embedding:X"
res["embedding_columns"] = list(token_columns(clip, PROMPT, "embedding:X").positions)
res["default_columns"] = list(token_columns(clip, PROMPT, "").positions)
res["cat_columns"] = list(token_columns(clip, "a photo of a cat and a cat", "cat").positions)
res["multi_token_word"] = list(token_columns(clip, PROMPT, "high-resolution").positions)
res["end_columns"] = len(token_columns(clip, PROMPT, "embedding:X", confine_end_tokens=True).positions)
errors = {}
for name, args in {"absent": ("a photo of a dog", "cat"), "no_embedding": ("a photo of a dog", ""),
                   "missing_file": ("a photo of embedding:Nope", "embedding:Nope")}.items():
    try:
        token_columns(clip, *args); errors[name] = None
    except ValueError as e:
        errors[name] = str(e)
res["errors"] = errors

# ---- the patch against ComfyUI's own attention, both batch orders
cols = token_columns(clip, PROMPT, "embedding:X")
g = torch.Generator().manual_seed(0)
heads, dim = 8, 40
q = torch.randn(4, 64, heads * dim, generator=g); k = torch.randn(4, 77, heads * dim, generator=g)
v = torch.randn(4, 77, heads * dim, generator=g)
plain = optimized_attention(q, k, v, heads)
keep = [i for i in range(77) if i != 8]
deleted = optimized_attention(q, k[:, keep], v[:, keep], heads)
ones, zeros = torch.ones(1, 64, 64), torch.zeros(1, 64, 64)
for order in ([0, 1], [1, 0]):
    opts = {"n_heads": heads, "activations_shape": [4, 320, 8, 8], "cond_or_uncond": order}
    res[f"ones_maxdiff_{order}"] = float((MRCAPatch(cols, ones)(q, k, v, opts) - plain).abs().max())
    out = MRCAPatch(cols, zeros)(q, k, v, opts)
    cond = torch.tensor(order).repeat_interleave(2) == 0
    res[f"uncond_maxdiff_{order}"] = float((out[~cond] - plain[~cond]).abs().max())
    res[f"cond_vs_deleted_{order}"] = float((out[cond] - deleted[cond]).abs().max())
    res[f"cond_changed_{order}"] = float((out[cond] - plain[cond]).abs().max())

# ---- every cross-attention site, once per sampling_function call, at a 32^2 latent's sizes (a 512^2 mask
# resized to each; 32^2, not SD's usual 64^2: the same sites and pyramid with a quarter of the pixels)
sites = cross_attention_sites(m.model.diffusion_model)
res["sites"] = len(sites)
with torch.inference_mode():
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
patch = MRCAPatch(cols, torch.ones(1, 512, 512))
patched = apply_mrca(m, patch)
res["user_model_untouched"] = "attn2" not in m.model_options.get("transformer_options", {}).get("patches_replace", {})
with torch.inference_mode(False):
    patch.trace = []
    x = torch.randn(1, 4, 32, 32, generator=g)
    with ComfyTextDenoiser(patched, vae, pos, neg) as d:
        d.predict_noise(x, torch.tensor([500]), 7.5)
    res["trace_hits_every_site"] = {(b[0], b[1], i) for b, i, _ in patch.trace} == set(sites)
    res["trace_calls"] = len(patch.trace)
    res["trace_sizes"] = sorted({hw[0] for _, _, hw in patch.trace})
    # ---- a per-view mask reaches the patch (ViewCondition.extras), overriding the static one
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    cams = dict(elevation=torch.zeros(2), azimuth=torch.zeros(2), distance=torch.ones(2))
    with ComfyTextDenoiser(m, vae, pos, neg) as d:
        eps_plain = d.predict_noise(x, t, 7.5)
    half = torch.zeros(2, 64, 64); half[:, :, :32] = 1
    results = {}
    for name, extras in {"none": None, "ones": torch.ones(2, 64, 64), "half": half}.items():
        patch.trace = []
        views = ViewCondition(**cams, extras={} if extras is None else {MASK_OPTION_KEY: extras})
        with ComfyTextDenoiser(patched, vae, pos, neg) as d:
            results[name] = float((d.predict_noise(x, t, 7.5, views) - eps_plain).abs().max())
    res["extras_eps_change"] = results
# ---- models MRCA does not support are refused, naming the input
import comfy.model_base
refusals = {}
for name, mtype in {"flow": comfy.model_base.ModelType.FLOW, "edm": comfy.model_base.ModelType.EDM}.items():
    saved, m.model.model_type = m.model.model_type, mtype
    try:
        apply_mrca(m, patch); refusals[name] = None
    except ValueError as e:
        refusals[name] = str(e)
    m.model.model_type = saved
res["refusals"] = refusals
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def mrca_results(comfy_server, sd15_checkpoint, tmp_path_factory):
    from safetensors.torch import save_file
    import torch
    folder = tmp_path_factory.mktemp("mrca")
    emb = folder / "embeddings"
    emb.mkdir()
    save_file({"emb_params": torch.randn(1, 768, generator=torch.Generator().manual_seed(3)) * 0.02},
              str(emb / "X.safetensors"))
    script = folder / "mrca.py"
    script.write_text(MRCA_SCRIPT)
    ckpt = (comfy_server.models_dir / "checkpoints" / sd15_checkpoint).resolve()
    proc = subprocess.run([comfy_server.python, str(script), str(comfy_server.comfyui_dir), str(REPO_ROOT),
                           str(ckpt), str(emb)], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(res, indent=1))
    return res


def test_token_columns_follow_clips_tokenization(mrca_results):
    res = mrca_results
    # [BOS, a, high, -, resolution, dslr, image, of, <e>]: the embedding is column 8.
    assert res["embedding_columns"] == [8] and res["default_columns"] == [8]
    assert res["cat_columns"] == [5, 8]                    # every occurrence
    assert res["multi_token_word"] == [2, 3, 4]            # a word of several CLIP tokens
    assert res["end_columns"] == 1 + (77 - 9)              # the token, then the end token and all padding
    errors = res["errors"]
    assert "does not contain the token to confine" in errors["absent"]
    assert "has none" in errors["no_embedding"]
    assert "not found in models/embeddings" in errors["missing_file"]


def test_the_patch_against_comfyuis_attention_in_both_batch_orders(mrca_results):
    res = mrca_results
    for order in ("[0, 1]", "[1, 0]"):
        assert res[f"ones_maxdiff_{order}"] <= 1e-6
        assert res[f"uncond_maxdiff_{order}"] <= 1e-6
        assert res[f"cond_vs_deleted_{order}"] <= 1e-5          # outside the mask: the column deleted
        assert res[f"cond_changed_{order}"] > 1e-3


def test_one_sampling_call_hits_every_cross_attention_site_at_the_latents_sizes(mrca_results):
    res = mrca_results
    assert res["sites"] == 16                                   # SD 1.5: 6 down, 1 middle, 9 up
    assert res["trace_hits_every_site"]
    assert res["trace_calls"] == 16                             # each site once (cond and uncond batched)
    assert res["trace_sizes"] == [4, 8, 16, 32]                # the 32^2 latent and its 3 halvings
    assert res["user_model_untouched"]


def test_models_other_than_sd1_and_sd2_are_refused(mrca_results):
    for message in mrca_results["refusals"].values():
        assert message and message.startswith("model: MRCA supports SD 1.x / 2.x UNets"), message


def test_a_per_view_mask_reaches_the_patch_through_the_denoiser(mrca_results):
    change = mrca_results["extras_eps_change"]
    assert change["ones"] <= 1e-5                               # all ones overrides the static ones: unchanged
    assert change["none"] <= 1e-5                               # the static all-ones mask
    assert change["half"] > 1e-3


# ------------------------------------------------------------ live server
def _half_alpha_png(path, size=64):
    rgba = np.full((size, size, 4), 200, np.uint8)
    rgba[:, size // 2:, 3] = 0                                  # right half transparent
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def _ksampler_prompt(ckpt, mask_image=None, mrca=True, prefix="mrca", **mrca_inputs) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["6", 0] if mrca else ["1", 0], "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
                                                   "steps": 1, "cfg": 7.5, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if mrca:
        prompt["6"] = {"class_type": "MPOD3D_MRCAAttentionPatch",
                       "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": "a photo of a cat", "token": "cat",
                                  "invert_mask": True, "confine_end_tokens": False, "mask_resize": "area",
                                  **mrca_inputs}}
        if mask_image is not None:
            prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": mask_image}}
            prompt["6"]["inputs"]["mask"] = ["9", 1]
    return prompt


def _image(server, entry) -> np.ndarray:
    files = [p for p in server.output_files(entry) if p.suffix == ".png"]
    assert len(files) == 1, files
    return np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.int16)


def test_ksampler_with_a_static_mask(comfy_server, sd15_checkpoint, tmp_path):
    opaque = tmp_path / "mrca_opaque.png"
    Image.fromarray(np.full((64, 64, 4), 255, np.uint8), "RGBA").save(opaque)
    ones = comfy_server.upload(opaque)["name"]
    half = comfy_server.upload(_half_alpha_png(tmp_path / "mrca_half.png"))["name"]
    plain = _image(comfy_server, comfy_server.run(_ksampler_prompt(sd15_checkpoint, mrca=False, prefix="mrca_plain")))
    with_ones = _image(comfy_server, comfy_server.run(_ksampler_prompt(sd15_checkpoint, ones, prefix="mrca_ones")))
    with_half = _image(comfy_server, comfy_server.run(_ksampler_prompt(sd15_checkpoint, half, prefix="mrca_half")))
    assert np.array_equal(with_ones, plain)
    assert np.abs(with_half - plain).max() > 2


def test_bad_inputs_are_clear_errors(comfy_server, sd15_checkpoint, tmp_path):
    wide = tmp_path / "mrca_wide.png"
    Image.fromarray(np.full((32, 64, 4), 255, np.uint8), "RGBA").save(wide)
    wide = comfy_server.upload(wide)["name"]
    cases = [({"token": "dog"}, None, "does not contain the token to confine"),
             ({"token": "embedding:Nope", "prompt": "a photo of embedding:Nope"}, None, "not found"),
             ({"token": "cat"}, wide, "aspect ratio"),
             ({"prompt": "A high-resolution DSLR image of embedding:NAME", "token": ""}, None, "replace NAME")]
    for inputs, mask_image, message in cases:
        with pytest.raises(ExecutionError) as info:
            comfy_server.run(_ksampler_prompt(sd15_checkpoint, mask_image, prefix="mrca_never", **inputs))
        assert message in info.value.exception_message, (inputs, info.value)


def test_bundled_textual_inversion_mrca_workflow_runs(comfy_server, sd15_checkpoint, tmp_path, load_workflow):
    """workflows/textual_inversion_mrca.json as users load it, shrunk for the CPU (2 training steps at 64^2,
    one sampling step): the token is learned and saved, CLIP Text Encode reads it through the prompt link,
    MRCA confines it to the reference's alpha, KSampler draws, and the loss map has both steps."""
    from harness.loss_graph import add_loss_graph, check_loss_graph
    from harness.workflow_convert import ui_to_api
    from harness.workflows import set_inputs
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 60, 40, 255)                    # an opaque square on a transparent ground
    path = tmp_path / "ti_mrca_reference.png"
    Image.fromarray(rgba, "RGBA").save(path)
    uploaded = comfy_server.upload(path)["name"]
    api = ui_to_api(load_workflow("textual_inversion_mrca"), comfy_server.object_info())
    kinds = {node["class_type"]: nid for nid, node in api.items()}
    assert {"MPOD3D_TextualInversion", "MPOD3D_MRCAAttentionPatch", "KSampler", "InvertMask"} <= set(kinds)
    ti = api[kinds["MPOD3D_TextualInversion"]]["inputs"]
    assert (ti["steps"], ti["resolution"], ti["batch_size"]) == (3000, 512, 16)   # the workflow keeps Magic123's
    name = "mrca_workflow_token"
    ti.update(steps=2, resolution=64, batch_size=1, embedding_name=name)
    set_inputs(api, {"CheckpointLoaderSimple": {"ckpt_name": sd15_checkpoint}, "LoadImage": {"image": uploaded},
                     "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 1}})
    linked = [n["inputs"]["text"] for n in api.values() if n["class_type"] == "CLIPTextEncode"
              and isinstance(n["inputs"]["text"], list)]
    assert linked == [[kinds["MPOD3D_TextualInversion"], 1]]   # the positive prompt is Textual Inversion's
    assert api[kinds["MPOD3D_MRCAAttentionPatch"]]["inputs"]["prompt"] == [kinds["MPOD3D_TextualInversion"], 1]
    add_loss_graph(api, kinds["MPOD3D_TextualInversion"], 2)
    saved = comfy_server.models_dir / "embeddings" / f"{name}.safetensors"
    try:
        entry = comfy_server.run(api, timeout=900)
        assert saved.is_file()
        check_loss_graph(comfy_server, entry, steps=2)
        previews = comfy_server.output_files(entry, kinds=("images",))
        assert len(previews) == 1, previews
        image = np.asarray(Image.open(previews[0]).convert("RGB"))
        assert image.shape == (64, 64, 3)
    finally:
        saved.unlink(missing_ok=True)
