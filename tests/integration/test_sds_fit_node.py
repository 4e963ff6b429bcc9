"""SDS Image Fit in a live ComfyUI with a text encoder made to yield NaN (a NaN LoRA on
its last layer, loaded by core LoraLoader): the node stops with an error that names the
step and the likely causes instead of returning its input unchanged. (Its LOSS_MAP output
is checked in test_sds_workflows.py, drawn by core Plot Loss Graph.)"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness.comfy_server import ExecutionError

FIT = "MPOD3D_SDSImageFit"


def _fit_prompt(checkpoint, steps, clip):
    """Loader -> CLIP Text Encode (from ``clip``) -> SDS Image Fit on a 64x64 grey Empty Image."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": list(clip)}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}},
        "4": {"class_type": FIT, "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": ["3", 0], "positive": ["2", 0], "steps": steps,
            "learning_rate": 0.01, "guidance_scale": 7.5, "min_step": 0.02, "max_step": 0.98, "weighting": "sds",
            "elevation": 0.0, "azimuth": 0.0, "seed": 0}},
    }


@pytest.fixture
def nan_text_lora(comfy_server):
    """A rank-1 LoRA whose up-projection of the text encoder's last MLP is NaN: every token of
    the conditioning CLIP Text Encode returns is NaN (a corrupt LoRA, or a broken text encoder)."""
    name = "mpod3d_nan_text_encoder.safetensors"
    path = comfy_server.models_dir / "loras" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "lora_te_text_model_encoder_layers_11_mlp_fc2"
    save_file({f"{key}.lora_up.weight": torch.full((768, 1), float("nan"), dtype=torch.float16),
               f"{key}.lora_down.weight": torch.full((1, 3072), 0.01, dtype=torch.float16)}, str(path))
    yield name
    path.unlink(missing_ok=True)


def test_nan_conditioning_stops_sds_image_fit_with_the_causes(comfy_server, sd15_checkpoint, nan_text_lora):
    prompt = _fit_prompt(sd15_checkpoint, steps=20, clip=("6", 1))
    prompt["6"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": nan_text_lora, "strength_model": 0.0,
        "strength_clip": 1.0}}
    prompt["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    with pytest.raises(ExecutionError) as e:
        comfy_server.run(prompt, timeout=600)
    err = e.value
    assert err.node_type == FIT and err.exception_type.endswith("NonFiniteGuidanceError"), err
    msg = err.exception_message
    assert "Score distillation stopped at step 0: 100% of the gradient" in msg, msg
    for cause in ("MODEL", "text encoder", "CLIP vision", "VAE"):
        assert cause in msg, msg
