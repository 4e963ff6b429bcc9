"""Textual Inversion in a real ComfyUI with the full-size random-weight SD 1.5 checkpoint.

* In-process (ComfyUI's python in a subprocess, as test_comfy_denoisers.py): the adapter trains
  the token with gradients through ComfyUI's own UNet and CLIP text encoder while every
  UNet / CLIP weight stays bit-identical (hashes of every state-dict tensor before and after);
  the saved file used as ``embedding:NAME`` in core CLIP Text Encode gives exactly the context
  the in-memory token gives, and so does Magic123's ``learned_embeds.bin`` layout; a prompt
  with a missing embedding gives another one (the comparison can fail); bad models, CLIPs and
  initializer words are refused naming the input.
* Through ``/prompt``: the node resumes from a Magic123 ``.bin``, saves NAME.safetensors, and
  core CLIP Text Encode in the same prompt reads it (no "does not exist" warning, whereas a
  missing name gets one); an existing name without ``resume`` is refused; Cancel leaves no
  file; widget errors are refused at validation.

Costs on the 2-core box: one training step at 64x64 (batch 1) ~15 s, copying the UNet and the
text encoder for training ~10 s, loading the checkpoint in the subprocess ~10 s.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from harness.comfy_server import ExecutionError
from harness.inprocess import run_script
from harness.progress import assert_cancel_leaves_no_file

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

TI = "MPOD3D_TextualInversion"

ADAPTER_SCRIPT = r'''
EMB_DIR = WORK_DIR
from mpod3d_pack.nodes.comfy_bridge.textual_inversion import ComfyTextualInversionModel
from mpod3d_pack.mpod_core.guidance.textual_inversion import (REFINE_TEMPLATE, TextualInversionConfig, refine_prompt,
                                                              train_textual_inversion, cosine)
from mpod3d_pack.mpod_core.guidance.embedding_io import save_embedding, load_embedding

t0 = time.perf_counter()
with torch.inference_mode():
    m, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(SD15, output_vae=True, output_clip=True,
                                                            embedding_directory=[EMB_DIR])
res["load_s"] = time.perf_counter() - t0
before_unet, before_clip = digest(m.model), digest(clip.cond_stage_model)
with torch.inference_mode(False), torch.enable_grad():
    t0 = time.perf_counter()
    ti = ComfyTextualInversionModel(m, clip, vae)
    res["adapter_s"] = time.perf_counter() - t0
    dog = ti.token_embedding("dog")
    times = []
    def progress(step, total, preview):
        times.append(time.perf_counter())
    config = TextualInversionConfig(steps=1, learning_rate=1e-2, resolution=64, batch_size=1, seed=0)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    result = train_textual_inversion(image, ti, config, dog, progress=progress)
    res["step_s"] = [b - a for a, b in zip([t0] + times[:-1], times)]
    res["loss"] = result.loss_map["loss"]
    res["moved"] = float((result.embedding - dog).abs().max())
    res["cos_dog"] = cosine(result.embedding, dog)
    emb = result.embedding
    # parity: the saved file as embedding:NAME in core CLIP Text Encode == the in-memory token
    save_embedding(f"{EMB_DIR}/ti_parity.safetensors", emb)
    ours = ti.encode_text([REFINE_TEMPLATE], emb).detach()
    ours_dog = ti.encode_text([REFINE_TEMPLATE], dog).detach()
import nodes as core_nodes
with torch.inference_mode():
    def core(text):
        return core_nodes.CLIPTextEncode().encode(clip, text)[0][0][0]
    core_emb = core(refine_prompt("ti_parity"))
    core_word = core(REFINE_TEMPLATE.format("dog"))
    core_missing = core(refine_prompt("no_such_embedding"))
    torch.save({"_ironman_": emb.clone()}, f"{EMB_DIR}/magic123.bin")
    core_bin = core(refine_prompt("magic123"))
    toks = clip.tokenize(refine_prompt("ti_parity"))["l"][0]
    res["embedding_token_index"] = [i for i, (t, w) in enumerate(toks) if torch.is_tensor(t)]
res["parity_maxdiff"] = float((ours - core_emb).abs().max())
res["parity_word_maxdiff"] = float((ours_dog - core_word).abs().max())
res["missing_vs_emb_maxdiff"] = float((core_missing - core_emb).abs().max())
res["bin_vs_emb_maxdiff"] = float((core_bin - core_emb).abs().max())
res["bin_loaded_maxdiff"] = float((load_embedding(f"{EMB_DIR}/magic123.bin", 768) - emb).abs().max())
res["cond_std"] = float(core_emb.std())
res["unet_unchanged"] = digest(m.model) == before_unet
res["clip_unchanged"] = digest(clip.cond_stage_model) == before_clip
# bad inputs
res["errors"] = errors = refusals(ComfyTextualInversionModel, m, clip, vae)
with torch.inference_mode(False):
    try:
        ti.token_embedding("ironmanxyzzy"); errors["multi_token"] = None
    except ValueError as e:
        errors["multi_token"] = str(e)
print("RESULT " + json.dumps(res))
'''


def test_adapter_trains_only_the_token_and_matches_clip_text_encode(comfy_server, sd15_checkpoint, tmp_path):
    emb_dir = tmp_path / "embeddings"
    emb_dir.mkdir()
    res = run_script(comfy_server, ADAPTER_SCRIPT, sd15_checkpoint, emb_dir)
    assert res["unet_unchanged"] and res["clip_unchanged"]
    assert res["moved"] > 1e-3 and all(l > 0 for l in res["loss"])  # the gradient reached the token
    assert res["cond_std"] > 0.1
    assert res["parity_maxdiff"] < 1e-5 and res["parity_word_maxdiff"] < 1e-5
    assert res["bin_loaded_maxdiff"] == 0 and res["bin_vs_emb_maxdiff"] < 1e-5
    assert res["missing_vs_emb_maxdiff"] > 1e-2  # the parity check can fail
    assert res["embedding_token_index"] == [8]  # "<start> a high - resolution dslr image of <e>"
    errs = res["errors"]
    assert "initializer_word" in errs["multi_token"] and "4 CLIP tokens" in errs["multi_token"]
    assert errs["sdxl"].startswith("model:") and "SDXL" in errs["sdxl"]
    assert errs["flow"].startswith("model:") and "FLOW" in errs["flow"]
    assert errs["clip"].startswith("clip:")


def _ti_prompt(ckpt, name, steps=1, resume=False, text_encode=True, **widgets):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "mask": ["3", 0],
              "embedding_name": name, "initializer_word": "dog", "steps": steps, "learning_rate": 1e-2,
              "resolution": 64, "batch_size": 1, "micro_batch": 1, "background": "white", "seed": 0,
              "resume": resume}
    inputs.update(widgets)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xC04020}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "4": {"class_type": TI, "inputs": inputs},
    }
    if text_encode:
        prompt["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": ["4", 1], "clip": ["1", 1]}}
        prompt["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    return prompt


def _embeddings(server):
    return server.models_dir / "embeddings"


def test_node_resumes_from_magic123_bin_and_clip_text_encode_reads_the_file(comfy_server, sd15_checkpoint):
    name = "ti_live"
    folder = _embeddings(comfy_server)
    start = torch.randn(768, generator=torch.Generator().manual_seed(3)) * 0.02
    torch.save({"_ti_live_": start}, folder / f"{name}.bin")  # Magic123's learned_embeds.bin layout
    try:
        entry = comfy_server.run(_ti_prompt(sd15_checkpoint, name, resume=True), timeout=600)
        saved = load_file(str(folder / f"{name}.safetensors"))
        assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (1, 768)
        moved = (saved["emb_params"][0] - start).abs().max()
        assert 1e-3 < moved < 0.05, moved  # one AdamW step of lr 1e-2 from the .bin, not from "dog"
        assert "6" in entry["outputs"]  # CLIP Text Encode ran on the node's prompt output
        log = comfy_server.log_text()
        assert f"embedding:{name} does not exist" not in log
        # the same check sees a missing embedding
        missing = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
                   "5": {"class_type": "CLIPTextEncode",
                         "inputs": {"text": "A high-resolution DSLR image of embedding:ti_nowhere", "clip": ["1", 1]}},
                   "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}
        comfy_server.run(missing, timeout=300)
        assert "embedding:ti_nowhere does not exist" in comfy_server.log_text()
        # an existing name without resume is refused, before any training, naming the input
        with pytest.raises(ExecutionError) as info:
            comfy_server.run(_ti_prompt(sd15_checkpoint, name, resume=False, text_encode=False, seed=1), timeout=300)
        assert info.value.node_type == TI
        assert info.value.exception_message.startswith("embedding_name:") and "resume" in info.value.exception_message
    finally:
        for suffix in (".bin", ".safetensors"):
            (folder / f"{name}{suffix}").unlink(missing_ok=True)


def test_interrupt_leaves_no_file(comfy_server, sd15_checkpoint):
    name = "ti_interrupted"
    assert_cancel_leaves_no_file(comfy_server, _ti_prompt(sd15_checkpoint, name, steps=500, text_encode=False), "4", 500, _embeddings(comfy_server), name)


@pytest.mark.parametrize("widgets,needle", [
    ({"embedding_name": "../escape"}, "embedding_name"),
    ({"embedding_name": ""}, "embedding_name"),
    ({"initializer_word": "ironmanxyzzy"}, "initializer_word"),
    ({"initializer_word": "two words"}, "initializer_word"),
    ({"resolution": 68}, "resolution"),
    ({"resolution": 1024}, "resolution"),                                   # above the widget's max, 512
    ({"batch_size": 4, "micro_batch": 2, "resolution": 512}, "exceeds 262144"),  # two 512^2 images a pass
])
def test_bad_widgets_are_refused_at_validation(comfy_server, sd15_checkpoint, widgets, needle):
    errors = comfy_server.rejection(_ti_prompt(sd15_checkpoint, "ti_bad", text_encode=False, **widgets), "4")
    assert needle in errors, errors
