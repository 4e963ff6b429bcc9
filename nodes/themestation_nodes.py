"""ThemeStation nodes: Render Exemplars (the priors' training images and captions) and Theme Finetune
(the reference and concept priors, as LoRAs)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.latest import io

import folder_paths

from ..mpod_core import mesh as meshlib
from ..mpod_core.configdoc import config_from_values
from ..mpod_core.exemplars import MAX_EXEMPLAR_PIXELS, ExemplarConfig, images_per_view, render_exemplars
from . import comfy_bridge as bridge
from ..mpod_core.guidance.embedding_io import check_model_name
from ..mpod_core.guidance.lora import save_lora
from ..mpod_core.guidance.textual_inversion import MAX_PASS_PIXELS
from ..mpod_core.guidance.theme_finetune import (ThemeFinetuneConfig, settings_metadata, split_captions,
                                                 train_theme_lora)
from .schema import (RENDER_BACKEND_TOOLTIP, RENDER_BACKENDS, Trimesh, backend_input, check_backend, check_image,
                     config_input, loss_map_output, node_schema, single_value,
                     training_batch_error)

log = logging.getLogger(__name__)

NODE_TITLE = "Render Exemplars"


class RenderExemplars(io.ComfyNode):
    """ThemeStation: colour renders and normal maps of the exemplar meshes, with captions."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_RenderExemplars",
            description="ThemeStation's training data for its priors (paper §3, the official renders): each "
                        "exemplar mesh, normalised to a unit box, rendered from `views` cameras (azimuth i x "
                        "360/views, elevation a seeded random integer in [elevation_min, elevation_max], distance "
                        "1.5, fov 49.1) on white, as a colour image and (normal_maps) a normal map ((n+1)/2 of the "
                        "smooth world normals, y up), with one caption per image: `caption` (default \"a 3d model "
                        "of {object}, in the style of {token}\") and \"..., normal map\". Images come per mesh: its "
                        "colour renders, then its normal maps; captions are one per line, line i for image i.",
            is_input_list=True,
            inputs=[
                Trimesh.Input("meshes", tooltip="The exemplars: one mesh, a Mesh List (all go into one batch) or a "
                                                "scene (each object is one exemplar)."),
                *(config_input(ExemplarConfig, name) for name in ("views", "resolution", "elevation_min",
                                                                  "elevation_max", "distance", "fov", "object",
                                                                  "token", "caption", "normal_maps", "seed")),
                backend_input(RENDER_BACKEND_TOOLTIP),
            ],
            outputs=[
                io.Image.Output("images", display_name="images",
                                tooltip="Per mesh: `views` colour renders, then (normal_maps) `views` normal maps, "
                                        "on white."),
                io.String.Output("captions", display_name="captions",
                                 tooltip="One caption per image, one per line, in the images' order (what Theme "
                                         "Finetune reads)."),
            ],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, views, resolution, normal_maps) -> bool | str:
        try:
            per_view = 1 if single_value(normal_maps, "normal_maps", NODE_TITLE) is False else 2
            pixels = per_view * int(single_value(views, "views", NODE_TITLE)) \
                * int(single_value(resolution, "resolution", NODE_TITLE)) ** 2
        except (TypeError, ValueError):  # linked (None here): reported when the node runs
            return True
        if pixels > MAX_EXEMPLAR_PIXELS:
            return (f"{NODE_TITLE}: {per_view} x views x resolution^2 = {pixels} exceeds {MAX_EXEMPLAR_PIXELS} per "
                    "mesh, the most the output images may hold in memory; lower views or resolution")
        return True

    @classmethod
    def execute(cls, meshes, **kwargs) -> io.NodeOutput:
        args = {k: single_value(v, k, NODE_TITLE) for k, v in kwargs.items()}
        backend = RENDER_BACKENDS[check_backend(NODE_TITLE, args.pop("backend"))]
        config = config_from_values(ExemplarConfig, args)
        meshes = meshlib.mesh_list(meshes or [], f"{NODE_TITLE}: meshes")
        if not meshes:
            raise ValueError(f"{NODE_TITLE}: meshes: no exemplar mesh connected (one mesh, a Mesh List or a scene)")
        try:
            out = render_exemplars(meshes, config, device=bridge.torch_device(), backend=backend,
                                   progress=bridge.Progress(images_per_view(config) * config.views * len(meshes)))
        except ValueError as exc:
            raise ValueError(f"{NODE_TITLE}: {exc}") from None
        return io.NodeOutput(out.images, "\n".join(out.captions))


FINETUNE_TITLE = "Theme Finetune"
#: The config fields shown as widgets, in this order (saved workflows store widget values by position).
FINETUNE_WIDGETS = ("steps", "learning_rate", "rank", "alpha", "train_text_encoder", "resolution", "batch_size",
                    "micro_batch", "seed")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")


def loras_folder() -> Path:
    """ComfyUI's first ``loras`` folder (where core Load LoRA lists files)."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def check_lora_name(name: str) -> str:
    """A LoRA file name without suffix, directly in models/loras (no path characters)."""
    return check_model_name(name, "lora_name", "loras", LORA_SUFFIXES, "LoRA")


class ThemeFinetune(io.ComfyNode):
    """ThemeStation's reference / concept prior: a LoRA trained with DreamBooth's loss, saved as a standard LoRA."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_ThemeFinetune",
            description="ThemeStation's theme priors (paper §3.1-3.2): fine-tune the MODEL on captioned images with "
                        "DreamBooth's loss (eps- or v-MSE, the model's own target, at uniform timesteps), as a LoRA "
                        "on the UNet's attention and, optionally, the text encoder's. Reference prior: the "
                        "exemplars' renders from Render Exemplars, 150 steps; concept prior: the concept image plus "
                        "renders of the initial model, 300 steps. Saves models/loras/NAME.safetensors (core Load "
                        "LoRA reads it) and outputs the MODEL and CLIP with it applied, exactly as Load LoRA would. "
                        "SD 1.x/2.x checkpoints. The official code fine-tunes the whole model at lr 2e-6; a LoRA at "
                        "1e-4 is the cheaper deviation. Measured on a 2-core CPU (bench/bench_theme_finetune.py): "
                        "one 512^2 image costs ~37 s per step (2.9x a UNet forward), one 256^2 image ~9 s, so "
                        "the defaults (150 steps x 8 images at 512^2) take ~12 h there: lower resolution, "
                        "batch_size and steps on a CPU.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x/2.x MODEL from Load Checkpoint (not modified: the LoRA goes "
                                                "onto a copy)."),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP (encodes the captions; not modified)."),
                io.Vae.Input("vae", tooltip="The same checkpoint's VAE (encodes the training images once)."),
                io.Image.Input("images", tooltip="Training images (Render Exemplars' output, or a batch of your own). "
                                                 "Non-square images are centre-cropped; a 4-channel IMAGE is "
                                                 "composited on white by its alpha."),
                io.String.Input("captions", force_input=True,
                                tooltip="One caption per image, one per line, in the images' order (Render "
                                        "Exemplars' captions output)."),
                io.String.Input("lora_name", default="theme_reference_prior",
                                tooltip="File name in models/loras (letters, digits, _ - .; .safetensors is added)."),
                *(config_input(ThemeFinetuneConfig, name) for name in FINETUNE_WIDGETS),
                io.Boolean.Input("resume", default=False,
                                 tooltip="If models/loras/NAME.safetensors exists, continue training it ('steps' "
                                         "more; its rank and alpha are kept) and overwrite it. Off: an existing "
                                         "NAME is an error, never overwritten. A Load LoRA node that already read "
                                         "NAME in this session keeps its cached copy until its file name changes."),
            ],
            outputs=[
                io.Model.Output("lora_model", display_name="MODEL", tooltip="The MODEL with the trained LoRA applied."),
                io.Clip.Output("lora_clip", display_name="CLIP",
                               tooltip="The CLIP with the LoRA's text-encoder part applied (unchanged when "
                                       "train_text_encoder is off)."),
                io.String.Output("lora", display_name="lora_name",
                                 tooltip="The saved file's name in models/loras (what Load LoRA lists)."),
                loss_map_output(),
            ],
            is_output_node=True,
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, lora_name, resolution, batch_size, micro_batch) -> bool | str:
        if lora_name is not None:
            try:
                check_lora_name(lora_name)
            except ValueError as exc:
                return str(exc)
        return training_batch_error(resolution, batch_size, micro_batch, MAX_PASS_PIXELS) or True

    @classmethod
    def execute(cls, model, clip, vae, images, captions, lora_name, resume, **widgets) -> io.NodeOutput:
        name = check_lora_name(lora_name)
        check_image(images, FINETUNE_TITLE, "images")
        lines = split_captions(captions, images.shape[0])
        config = ThemeFinetuneConfig(**widgets)
        config.validate()
        path = loras_folder() / f"{name}.safetensors"
        others = [p for p in (loras_folder() / f"{name}{suffix}" for suffix in LORA_SUFFIXES[1:]) if p.is_file()]
        if others:  # Load LoRA would list both; resume reads only what this node writes
            raise ValueError(f"lora_name: {others[0]} already exists in another format; choose another name")
        if path.is_file() and not resume:
            raise ValueError(f"lora_name: {path} already exists; turn 'resume' on to continue training it, or "
                             "choose another name (an existing LoRA is never overwritten otherwise)")
        initial = None
        if resume and path.is_file():
            from safetensors.torch import load_file
            try:
                initial = load_file(str(path), device="cpu")
            except Exception as exc:  # safetensors raises its own error type for a cut or foreign file
                raise ValueError(f"lora_name: {path} is not a readable .safetensors LoRA ({exc}); resume needs the "
                                 "file this node wrote") from None
            log.info("%s: resuming from %s", FINETUNE_TITLE, path)
        from .comfy_bridge.theme_finetune import ComfyFinetuneModel, patched_models
        pixels = images[..., :3].float()
        if images.shape[-1] == 4:  # on white, as Render Exemplars' renders
            alpha = images[..., 3:].float()
            pixels = pixels * alpha + (1 - alpha)
        with torch.inference_mode(False), torch.enable_grad():
            try:
                trainer = ComfyFinetuneModel(model, clip, vae)
                result = train_theme_lora(pixels.movedim(-1, 1).clone(), lines, trainer, config, initial=initial,
                                          progress=bridge.Progress(max(1, config.steps)), status=bridge.node_text)
            except ValueError as exc:
                raise ValueError(f"{FINETUNE_TITLE}: {exc}") from None
            result.lora.remove()
            save_lora(path, result.lora, settings_metadata(config, result.lora, resumed=initial is not None))
            del trainer
        new_model, new_clip = patched_models(model, clip, path)
        return io.NodeOutput(new_model, new_clip, path.name, result.loss_map)


NODES = [RenderExemplars, ThemeFinetune]
