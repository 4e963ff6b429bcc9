"""ThemeStation's evaluation figures as nodes: Mesh Diversity (geometry and visual diversity of generated
meshes) and Concept CLIP Similarity (the CLIP score of a mesh against its concept image)."""
from __future__ import annotations

from comfy_api.latest import io

from ..mpod_core import mesh as meshlib
from ..mpod_core.metrics import (MetricConfig, check_pixels, concept_similarity, mesh_diversity,
                                similarity_report)
from . import comfy_bridge as bridge
from .schema import Trimesh, check_image, config_input, node_schema

DIVERSITY_TITLE = "Mesh Diversity"
SIMILARITY_TITLE = "Concept CLIP Similarity"
#: Mesh inputs of Mesh Diversity: the first two required.
DIVERSITY_SLOTS = 6
LPIPS_NOTE = ("LPIPS, the paper's visual-diversity metric, needs downloaded network weights, so per-pixel MSE and "
              "1 - SSIM stand in (not comparable with LPIPS figures).")


class MeshDiversity(io.ComfyNode):
    """ThemeStation's diversity among generated meshes: pairwise voxel 1 − IoU and image distances."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_MeshDiversity",
            description="ThemeStation's diversity figures (paper §4.1.3) for 2 to 6 generated meshes, each "
                        "normalised to a unit box first (shape, not scale or placement, is compared): geometry "
                        "diversity = mean pairwise 1 - IoU of their occupancy on a voxel_resolution^3 grid "
                        "(libigl winding number); visual diversity = mean pairwise distance between renders from "
                        "the same `views` cameras (azimuth i x 360/views, elevation 15, distance 1.5, fov 49.1, on "
                        f"white). {LPIPS_NOTE} Shows the pairwise matrices on the node.",
            inputs=[Trimesh.Input(f"mesh_{i}", optional=i > 2,
                                  tooltip=f"Generated mesh {i}{' (optional)' if i > 2 else ''}; a scene counts as "
                                          "one mesh.")
                    for i in range(1, DIVERSITY_SLOTS + 1)]
                   + [config_input(MetricConfig, name) for name in ("voxel_resolution", "views", "resolution")],
            outputs=[
                io.Float.Output("voxel_diversity", display_name="voxel_diversity",
                                tooltip="Mean pairwise 1 - IoU of the voxelised meshes (geometry diversity; 0 = "
                                        "identical shapes)."),
                io.Float.Output("image_distance", display_name="image_distance",
                                tooltip="Mean pairwise per-pixel MSE of same-camera renders, over pairs and views "
                                        "(stands in for LPIPS)."),
                io.Float.Output("ssim_distance", display_name="ssim_distance",
                                tooltip="Mean pairwise 1 - SSIM of same-camera renders (stands in for LPIPS)."),
                io.String.Output("report", display_name="report",
                                 tooltip="The three means and their pairwise matrices as text."),
            ],
            is_output_node=True,
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, views, resolution) -> bool | str:
        if views is None or resolution is None:  # linked: checked when the node runs
            return True
        try:
            check_pixels(2, MetricConfig(views=int(views), resolution=int(resolution)))
        except ValueError as exc:
            return f"{DIVERSITY_TITLE}: {exc}"
        return True

    @classmethod
    def execute(cls, voxel_resolution, views, resolution, **slots) -> io.NodeOutput:
        names = [f"mesh_{i}" for i in range(1, DIVERSITY_SLOTS + 1) if slots.get(f"mesh_{i}") is not None]
        meshes = [meshlib.check_mesh(slots[name], f"{DIVERSITY_TITLE} {name}") for name in names]
        config = MetricConfig(voxel_resolution=voxel_resolution, views=views, resolution=resolution)
        try:
            result = mesh_diversity(meshes, config, device=bridge.torch_device(),
                                    progress=bridge.Progress(2 * len(meshes)))
        except ValueError as exc:
            raise ValueError(f"{DIVERSITY_TITLE}: {exc}") from None
        report = result.report(names)
        return io.NodeOutput(result.voxel_diversity, result.image_distance, result.ssim_distance, report,
                             ui={"text": [report]})


class ConceptSimilarity(io.ComfyNode):
    """ThemeStation's CLIP score: the concept image against renders of the generated mesh."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_ConceptSimilarity",
            description="ThemeStation's CLIP score (paper §4.1.3, semantic coherence): the mesh, normalised to a "
                        "unit box, is rendered from `views` cameras (azimuth i x 360/views, elevation 15, distance "
                        "1.5, fov 49.1) on white; the output is the cosine similarity between the CLIP image "
                        "embedding of the concept image and of each render, averaged over the views. Needs a CLIP "
                        "model in CLIP_VISION (core Load CLIP Vision, e.g. CLIP ViT-L/14; a DINOv2 file gives a "
                        "DINO similarity instead, not the paper's figure). The paper's other fidelity metric, "
                        "contextual distance, needs downloaded VGG weights and is not computed.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="A CLIP image encoder from core Load CLIP Vision (or the "
                                                           "CLIP_VISION of Image Only Checkpoint Loader)."),
                io.Image.Input("concept_image", tooltip="The concept image (one image; an RGBA image is composited "
                                                        "on white by its alpha, like the renders). Non-square "
                                                        "images are centre-cropped by CLIP's preprocessing."),
                Trimesh.Input("mesh", tooltip="The generated mesh (a scene counts as one mesh)."),
                config_input(MetricConfig, "views"),
            ],
            outputs=[
                io.Float.Output("clip_score", display_name="clip_score",
                                tooltip="Mean cosine similarity over the views, in [-1, 1] (1 = same embedding)."),
                io.String.Output("report", display_name="report", tooltip="The mean and each view's cosine."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clip_vision, concept_image, mesh, views) -> io.NodeOutput:
        if not callable(getattr(clip_vision, "encode_image", None)):
            raise ValueError(f"{SIMILARITY_TITLE}: clip_vision: expected a CLIP_VISION (core Load CLIP Vision), "
                             f"got {type(clip_vision).__name__}")
        image = check_image(concept_image, SIMILARITY_TITLE, "concept_image")
        if image.shape[0] != 1:
            raise ValueError(f"{SIMILARITY_TITLE}: concept_image: expected one image, got a batch of "
                             f"{image.shape[0]}; pick one (core Image From Batch)")
        pixels = image[..., :3].float()
        if image.shape[-1] == 4:  # on white, as the renders
            alpha = image[..., 3:].float()
            pixels = pixels * alpha + (1 - alpha)
        meshlib.check_mesh(mesh, f"{SIMILARITY_TITLE} mesh")
        config = MetricConfig(views=views)
        try:
            score, per_view = concept_similarity(mesh, pixels, lambda x: clip_vision.encode_image(x).image_embeds,
                                                 config, device=bridge.torch_device(),
                                                 progress=bridge.Progress(views + 1))
        except ValueError as exc:
            raise ValueError(f"{SIMILARITY_TITLE}: {exc}") from None
        report = similarity_report(per_view, config)
        return io.NodeOutput(score, report, ui={"text": [report]})


NODES = [MeshDiversity, ConceptSimilarity]
