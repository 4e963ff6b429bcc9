"""Textual Inversion: learn the reference image's token for MPOD123 stage 2's prompt."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import folder_paths

from ..mpod_core.guidance.embedding_io import check_embedding_name, find_embedding_file, load_embedding, save_embedding
from ..mpod_core.guidance.textual_inversion import MAX_PASS_PIXELS, TextualInversionConfig, refine_prompt, train_textual_inversion
from . import comfy_bridge as bridge
from .schema import check_image, check_masks, config_input, loss_map_output, node_schema, training_batch_error

NODE_ID = "MPOD3D_TextualInversion"
log = logging.getLogger(__name__)

#: The config fields the node shows as widgets (the rest keep Magic123's values).
WIDGETS = ("steps", "learning_rate", "resolution", "batch_size", "micro_batch", "background", "seed")


def embeddings_folder():
    """ComfyUI's first ``embeddings`` folder (where CLIP Text Encode looks up ``embedding:NAME``)."""
    from pathlib import Path
    return Path(folder_paths.get_folder_paths("embeddings")[0])


class TextualInversion(io.ComfyNode):
    """Learn one token embedding of the reference image, saved for ``embedding:NAME`` prompts."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            NODE_ID,
            description="Learn one token embedding of the reference image with the SD model frozen (RealFusion / "
                        "Magic123 textual inversion: augmented references, 27 'a photo of a {}' templates, "
                        "diffusion loss at uniform timesteps, AdamW on the token). Saves models/embeddings/NAME."
                        "safetensors and outputs the refine prompt 'A high-resolution DSLR image of embedding:NAME' "
                        "for CLIP Text Encode. SD 1.x/2.x only. Defaults are Magic123's (512^2, batch 16, 3000 steps: "
                        "2-2.5 h on a V100). Measured on a 2-core CPU (bench/bench_textual_inversion.py): one image at "
                        "512^2 costs ~83 s per step (2.9x a UNet forward), ~39 s at 256^2, so a batch-16 step takes "
                        "~20 min and the defaults weeks: lower resolution, batch and steps on a CPU.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x/2.x MODEL from Load Checkpoint (frozen; not modified)."),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP (frozen; not modified)."),
                io.Vae.Input("vae", tooltip="The same checkpoint's VAE (encodes the augmented references)."),
                io.Image.Input("image", tooltip="The reference image (several images: each training sample picks one). "
                                                "A 4-channel IMAGE's alpha is used as the mask when no mask is "
                                                "connected."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Object mask, 1 = object: the image is composited on the background where it "
                                      "is 0. Load Image's MASK is 1 - alpha: put Invert Mask after it."),
                io.String.Input("embedding_name", default="mpod3d_reference",
                                tooltip="File name in models/embeddings (letters, digits, _ - .; .safetensors is "
                                        "added); prompts use it as embedding:NAME."),
                io.String.Input("initializer_word", default="object",
                                tooltip="A single-token word the token starts from: a coarse name of the object "
                                        "('chair', 'dog', 'toy'), as in Magic123's scripts."),
                *(config_input(TextualInversionConfig, name) for name in WIDGETS),
                io.Boolean.Input("resume", default=False,
                                 tooltip="If models/embeddings/NAME (.safetensors, .pt or .bin, e.g. Magic123's "
                                         "learned_embeds.bin renamed) exists, start from it and train 'steps' more, "
                                         "then save NAME.safetensors. Off: an existing NAME is an error, never "
                                         "overwritten."),
            ],
            outputs=[io.String.Output("embedding", display_name="embedding_name",
                                      tooltip="The saved embedding's name (NAME of embedding:NAME)."),
                     io.String.Output("prompt", display_name="prompt",
                                      tooltip="'A high-resolution DSLR image of embedding:NAME', MPOD123's refine "
                                              "prompt: wire it into CLIP Text Encode's text."),
                     loss_map_output()],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, embedding_name, initializer_word, resolution, batch_size, micro_batch):
        # Widget values only (links arrive as None during validation).
        for value, check in ((embedding_name, check_embedding_name), (initializer_word, _check_initializer)):
            if value is not None:
                try:
                    check(value)
                except ValueError as exc:
                    return str(exc)
        return training_batch_error(resolution, batch_size, micro_batch, MAX_PASS_PIXELS) or True

    @classmethod
    def execute(cls, model, clip, vae, image, embedding_name, initializer_word, steps, learning_rate, resolution,
                batch_size, micro_batch, background, seed, resume, mask=None) -> io.NodeOutput:
        name = check_embedding_name(embedding_name)
        word = _check_initializer(initializer_word)
        check_image(image, "Textual Inversion")
        masks = check_masks(mask, "Textual Inversion", "mask", size=tuple(image.shape[1:3])) if mask is not None \
            else (image[..., 3] if image.shape[-1] == 4 else None)
        config = TextualInversionConfig(steps=steps, learning_rate=learning_rate, resolution=resolution,
                                        batch_size=batch_size, micro_batch=micro_batch, background=background,
                                        seed=seed)
        config.validate()
        folder = embeddings_folder()
        existing = find_embedding_file(folder, name)
        if existing is not None and not resume:
            raise ValueError(f"embedding_name: {existing} already exists; turn 'resume' on to continue training it, "
                             "or choose another name (an existing embedding is never overwritten)")
        from .comfy_bridge.textual_inversion import ComfyTextualInversionModel
        with torch.inference_mode(False), torch.enable_grad():
            ti = ComfyTextualInversionModel(model, clip, vae)
            if existing is not None:
                start = load_embedding(existing, ti.embedding_dim)
                log.info("Textual Inversion: resuming from %s", existing)
            else:
                start = ti.token_embedding(word)
            pixels = image[..., :3].movedim(-1, 1).float().clone()
            masks = None if masks is None else masks.float().clone()
            result = train_textual_inversion(pixels, ti, config, start, masks=masks,
                                             progress=bridge.Progress(config.steps))
        save_embedding(folder / f"{name}.safetensors", result.embedding)
        return io.NodeOutput(name, refine_prompt(name), result.loss_map)


def _check_initializer(word: str) -> str:
    """A non-empty single word of one CLIP token (counted with ComfyUI's CLIP tokenizer, which SD 1.x
    and 2.x share)."""
    if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
        raise ValueError(f"initializer_word: {word!r} must be one word (a single CLIP token)")
    from .comfy_bridge.textual_inversion import count_clip_tokens
    n = count_clip_tokens(word.strip())
    if n != 1:
        raise ValueError(f"initializer_word: {word!r} is {n} CLIP tokens; it must be a single token "
                         "(a common word such as 'dog', 'chair', 'toy')")
    return word.strip()


NODES = [TextualInversion]
