"""SDS Image Fit: the smallest real use of score distillation in the graph."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..mpod_core.guidance import SDSConfig, ViewCondition
from ..mpod_core.pipelines.sds_fit import SDSFitConfig, check_image_size, sds_fit
from . import comfy_bridge as bridge
from .schema import check_image, config_input, loss_map_output, node_schema
from .comfy_bridge.diffusion import ComfyTextDenoiser, ComfyZero123Denoiser

NODE_ID = "MPOD3D_SDSImageFit"


class SDSImageFit(io.ComfyNode):
    """Optimise an image toward a prompt or a Zero123 view by score distillation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            NODE_ID,
            description="Optimise an image by score distillation (SDS) alone: toward a text prompt "
                        "(positive/negative from CLIP Text Encode, any SD 1.x/2.x MODEL incl. LoRA and "
                        "attention patches) or toward a Stable Zero123 view of a reference image (connect "
                        "clip_vision and reference_image). The place to try guidance settings before a 3D run.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x/2.x or Stable Zero123 MODEL from ComfyUI's loaders."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE (its encoder is differentiated through)."),
                io.Image.Input("image", tooltip="Start image; its size must be a multiple of 8, and batch x "
                                                "height x width at most 512 x 512 (the VAE encoder's backward)."),
                io.Conditioning.Input("positive", optional=True, tooltip="Text mode: the prompt."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Text mode: the negative prompt (empty conditioning if left out)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Zero123 mode: CLIP_VISION from Image Only Checkpoint Loader."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="Zero123 mode: the reference (input) view of the object."),
                *(config_input(SDSFitConfig, name) for name in ("steps", "learning_rate")),
                *(config_input(SDSConfig, name) for name in ("guidance_scale", "min_step", "max_step", "weighting")),
                io.Float.Input("elevation", default=0.0, min=-90.0, max=90.0, step=0.5,
                               tooltip="Zero123 mode: target view elevation relative to the reference, degrees."),
                io.Float.Input("azimuth", default=0.0, min=-180.0, max=180.0, step=0.5,
                               tooltip="Zero123 mode: target view azimuth relative to the reference, degrees "
                                       "(counter-clockwise seen from above)."),
                config_input(SDSFitConfig, "seed"),
            ],
            outputs=[io.Image.Output("fitted_image", display_name="image", tooltip="The optimised image."),
                     loss_map_output()],
        )

    @classmethod
    def execute(cls, model, vae, image, steps, learning_rate, guidance_scale, min_step, max_step, weighting,
                elevation, azimuth, seed, positive=None, negative=None, clip_vision=None,
                reference_image=None) -> io.NodeOutput:
        check_image(image, "SDS Image Fit")
        if reference_image is not None:
            check_image(reference_image, "SDS Image Fit", "reference_image")
        # The image arrives by link, so its size is only known here: refuse it before any model work.
        check_image_size(*image.shape[:3], name="SDS Image Fit: image")
        zero123 = clip_vision is not None or reference_image is not None
        if zero123 and (clip_vision is None or reference_image is None):
            missing = "clip_vision" if clip_vision is None else "reference_image"
            raise ValueError(f"Zero123 mode needs both clip_vision and reference_image; {missing} is not connected")
        if not zero123 and positive is None:
            raise ValueError("connect positive (and negative) conditioning for a text model, or clip_vision and "
                             "reference_image for Stable Zero123")
        config = SDSFitConfig(steps=steps, learning_rate=learning_rate, seed=seed,
                              sds=SDSConfig(guidance_scale=guidance_scale, min_step=min_step, max_step=max_step,
                                            weighting=weighting))
        config.validate()
        device = bridge.torch_device()
        pixels = image[..., :3].movedim(-1, 1).to(device=device, dtype=torch.float32)
        with torch.inference_mode(False), torch.enable_grad():
            pixels = pixels.clone()  # a normal tensor: ComfyUI hands nodes inference tensors
            if zero123:
                denoiser = ComfyZero123Denoiser(model, clip_vision, vae, reference_image.clone())
                b = pixels.shape[0]
                views = ViewCondition(torch.full((b,), float(elevation)), torch.full((b,), float(azimuth)),
                                      torch.full((b,), 2.5))
            else:
                denoiser = ComfyTextDenoiser(model, vae, positive, negative)
                views = None
            with denoiser:
                result = sds_fit(pixels, denoiser, config, views=views, progress=bridge.Progress(steps))
        return io.NodeOutput(result.image.movedim(1, -1).float().cpu(), result.loss_map)


NODES = [SDSImageFit]
