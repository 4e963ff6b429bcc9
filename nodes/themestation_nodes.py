"""ThemeStation nodes: Render Exemplars (the reference prior's training images and captions)."""
from __future__ import annotations

from comfy_api.latest import io

from ..mpod_core import mesh as meshlib
from ..mpod_core.configdoc import config_from_values
from ..mpod_core.exemplars import MAX_EXEMPLAR_PIXELS, ExemplarConfig, render_exemplars
from . import comfy_bridge as bridge
from .schema import (RENDER_BACKEND_TOOLTIP, RENDER_BACKENDS, Trimesh, backend_input, check_backend, config_input,
                     node_schema, single_value)

NODE_TITLE = "Render Exemplars"


class RenderExemplars(io.ComfyNode):
    """ThemeStation: colour renders and normal maps of the exemplar meshes, with captions."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_RenderExemplars",
            description="ThemeStation's training data for the reference prior (paper §3, the official renders): "
                        "each exemplar mesh, normalised to a unit box, rendered from `views` cameras (azimuth "
                        "i x 360/views, elevation a seeded random integer in [elevation_min, elevation_max], "
                        "distance 1.5, fov 49.1) on white, as a colour image and a normal map ((n+1)/2 of the "
                        "smooth world normals, y up), with one caption per image: \"a 3d model of {object}, in the "
                        "style of {token}\" and \"..., normal map\". Images come per mesh: its colour renders, "
                        "then its normal maps; captions are one per line, line i for image i.",
            is_input_list=True,
            inputs=[
                Trimesh.Input("meshes", tooltip="The exemplars: one mesh, a Mesh List (all go into one batch) or a "
                                                "scene (each object is one exemplar)."),
                *(config_input(ExemplarConfig, name) for name in ("views", "resolution", "elevation_min",
                                                                  "elevation_max", "distance", "fov", "object",
                                                                  "token", "seed")),
                backend_input(RENDER_BACKEND_TOOLTIP),
            ],
            outputs=[
                io.Image.Output("images", display_name="images",
                                tooltip="Per mesh: `views` colour renders, then `views` normal maps, on white."),
                io.String.Output("captions", display_name="captions",
                                 tooltip="One caption per image, one per line, in the images' order (what Theme "
                                         "Finetune reads)."),
            ],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, views, resolution) -> bool | str:
        try:
            pixels = 2 * int(single_value(views, "views", NODE_TITLE)) * int(single_value(resolution, "resolution", NODE_TITLE)) ** 2
        except (TypeError, ValueError):  # linked (None here): reported when the node runs
            return True
        if pixels > MAX_EXEMPLAR_PIXELS:
            return (f"{NODE_TITLE}: 2 x views x resolution^2 = {pixels} exceeds {MAX_EXEMPLAR_PIXELS} per mesh, the "
                    "most the output images may hold in memory; lower views or resolution")
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
                                   progress=bridge.Progress(2 * config.views * len(meshes)))
        except ValueError as exc:
            raise ValueError(f"{NODE_TITLE}: {exc}") from None
        return io.NodeOutput(out.images, "\n".join(out.captions))


NODES = [RenderExemplars]
