"""The papers' evaluation figures as nodes: ThemeStation's Mesh Diversity (geometry and visual diversity of
generated meshes) and Concept CLIP Similarity (the CLIP score of a mesh against its concept image), and
REPARO's Scene Evaluation (a generated scene against the ground truth from shared views: PSNR, SSIM, LPIPS,
CLIP score)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from comfy_api.latest import io, ui

from ..mpod_core import mesh as meshlib
from ..mpod_core.metrics import (MetricConfig, check_pixels, concept_similarity, mesh_diversity,
                                similarity_report)
from ..mpod_core.scene_evaluation import (LPIPS_BACKBONE_FILE, LPIPS_BACKBONE_URL, SceneEvalConfig, evaluate_scene,
                                          evaluation_plot, load_lpips, render_pairs)
from . import comfy_bridge as bridge
from .schema import (RENDER_BACKEND_TOOLTIP, RENDER_BACKENDS, Trimesh, backend_input, check_backend, check_image,
                     config_input, node_schema)

DIVERSITY_TITLE = "Mesh Diversity"
SIMILARITY_TITLE = "Concept CLIP Similarity"
#: Mesh inputs of Mesh Diversity: the first two required.
DIVERSITY_SLOTS = 6
EVALUATION_TITLE = "Scene Evaluation"
#: ComfyUI model folder of the LPIPS backbone (models/lpips), its file types and the "no file" choice.
LPIPS_FOLDER = "lpips"
LPIPS_EXTENSIONS = (".pth", ".pt", ".safetensors")
NO_LPIPS = "none"
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
        embed = _clip_embedder(clip_vision, SIMILARITY_TITLE)
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
            score, per_view = concept_similarity(mesh, pixels, embed, config, device=bridge.torch_device(),
                                                 progress=bridge.Progress(views + 1))
        except ValueError as exc:
            raise ValueError(f"{SIMILARITY_TITLE}: {exc}") from None
        report = similarity_report(per_view, config)
        return io.NodeOutput(score, report, ui={"text": [report]})


def _clip_embedder(clip_vision, node: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, H, W, 3) in [0, 1] -> (B, D)`` CLIP image embeddings of a CLIP_VISION (its projected
    ``image_embeds``, what the CLIP score compares).

    Raises:
        ValueError: ``clip_vision`` is not a CLIP_VISION, naming ``node``.
    """
    if not callable(getattr(clip_vision, "encode_image", None)):
        raise ValueError(f"{node}: clip_vision: expected a CLIP_VISION (core Load CLIP Vision), "
                         f"got {type(clip_vision).__name__}")
    return lambda images: clip_vision.encode_image(images).image_embeds


def _lpips_options() -> list[str]:
    return [*bridge.list_model_files(LPIPS_FOLDER, LPIPS_EXTENSIONS), NO_LPIPS]


def _lpips_hint() -> str:
    folders = ", ".join(map(str, bridge.ensure_model_folder(LPIPS_FOLDER)))
    return (f"for LPIPS put torchvision's AlexNet weights {LPIPS_BACKBONE_FILE} ({LPIPS_BACKBONE_URL}) in ComfyUI's "
            f"models/{LPIPS_FOLDER} folder ({folders}) and pick it in lpips_weights")


def _lpips_network(lpips_weights: str, device) -> tuple[Optional[torch.nn.Module], list[str]]:
    """(LPIPS network, []) for the chosen backbone file, or (None, [why LPIPS is left out]) when none is chosen
    or the file is not there (a workflow from another machine still runs and says so).

    Raises:
        ValueError: a file that is there but is not torchvision's AlexNet, or a name leaving the folder.
    """
    if lpips_weights == NO_LPIPS:
        return None, [f"LPIPS left out: no backbone weights chosen (lpips_weights = {NO_LPIPS}); {_lpips_hint()}."]
    try:
        path = bridge.resolve_model_file(LPIPS_FOLDER, lpips_weights)
    except FileNotFoundError as exc:
        return None, [f"LPIPS left out: {exc}; {_lpips_hint()}."]
    except ValueError as exc:
        raise ValueError(f"{EVALUATION_TITLE}: lpips_weights: {exc}") from None
    try:
        return load_lpips(path, device=device), []
    except ValueError as exc:
        raise ValueError(f"{EVALUATION_TITLE}: lpips_weights: {exc}") from None


class SceneEvaluation(io.ComfyNode):
    """REPARO's evaluation: a generated scene against the ground truth from shared views."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        options = _lpips_options()
        return node_schema(
            "MPOD3D_SceneEvaluation",
            description="REPARO's evaluation (paper sec. 4): renders the scene and the reference scene from the same "
                        "`views` cameras (azimuth i x 360/views, `elevation`, fov 40) on an orbit around the "
                        "REFERENCE's bounding-box centre, at the distance that frames its bounding sphere, on white; "
                        "both in the same world frame (nothing is renormalised, so a misplaced or mis-scaled object "
                        "counts). Per view and as means: PSNR (identical views: 100 dB), SSIM (Gaussian 11x11, "
                        "sigma 1.5), LPIPS (AlexNet, the lpips package; needs torchvision's "
                        f"{LPIPS_BACKBONE_FILE} in models/{LPIPS_FOLDER}, else left out with a note) and the CLIP "
                        "score (cosine of the two renders' CLIP image embeddings; with a clip_vision). Shows the "
                        "report and a plot on the node.",
            inputs=[
                Trimesh.Input("scene", tooltip="The generated scene (e.g. OT Layout Align's), in the reference's "
                                               "world frame; a single mesh works too."),
                Trimesh.Input("reference_scene", tooltip="The ground truth (e.g. Load Mesh of the scene's GLB, "
                                                         "normalize off); the cameras orbit its centre."),
                config_input(SceneEvalConfig, "views"),
                config_input(SceneEvalConfig, "resolution"),
                config_input(SceneEvalConfig, "elevation"),
                io.Combo.Input("lpips_weights", options=options,
                               default=LPIPS_BACKBONE_FILE if LPIPS_BACKBONE_FILE in options else options[0],
                               tooltip=f"LPIPS' AlexNet backbone: torchvision's {LPIPS_BACKBONE_FILE} "
                                       f"({LPIPS_BACKBONE_URL}) in models/{LPIPS_FOLDER} (never downloaded by the "
                                       f"pack; LPIPS' linear layers come with the lpips package). {NO_LPIPS} or a "
                                       "file that is not there: LPIPS is left out and the report says why."),
                backend_input(RENDER_BACKEND_TOOLTIP),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A CLIP image encoder (core Load CLIP Vision, e.g. CLIP ViT-L/14) for "
                                            "the CLIP score; unconnected: the CLIP score is left out."),
            ],
            outputs=[
                io.String.Output("report", display_name="report",
                                 tooltip="Settings, the means and each view's figures as text, and notes."),
                io.String.Output("metrics_json", display_name="metrics_json",
                                 tooltip="The same as JSON: settings, \"mean\" and \"per_view\" (null for a "
                                         "metric left out), \"notes\"."),
                io.Image.Output("plot", display_name="plot",
                                tooltip="Per-view charts of each metric and the two render strips."),
                io.Image.Output("renders", display_name="renders",
                                tooltip="One image per view: the scene's render left, the reference's right."),
            ],
            is_output_node=True,
        )

    @classmethod  # named arguments only: ComfyUI then skips its own range and list checks of these inputs
    def validate_inputs(cls, views, resolution, lpips_weights) -> bool | str:
        # lpips_weights may name a file that is not there (a workflow from elsewhere): LPIPS is left out with a note
        if views is None or resolution is None:  # linked: checked when the node runs
            return True
        try:
            config = SceneEvalConfig(views=int(views), resolution=int(resolution))
            config.validate()
            check_pixels(2, config)
        except ValueError as exc:
            return f"{EVALUATION_TITLE}: {exc}"
        return True

    @classmethod
    def fingerprint_inputs(cls, lpips_weights, **_):
        return bridge.file_fingerprint(lpips_weights, lambda name: bridge.resolve_model_file(LPIPS_FOLDER, name))

    @classmethod
    def execute(cls, scene, reference_scene, views, resolution, elevation, lpips_weights, backend,
                clip_vision=None) -> io.NodeOutput:
        check_backend(EVALUATION_TITLE, backend)
        embed = None if clip_vision is None else _clip_embedder(clip_vision, EVALUATION_TITLE)
        device = bridge.torch_device()
        lpips_model, notes = _lpips_network(lpips_weights, device)
        if embed is None:
            notes.append("CLIP score left out: no clip_vision connected.")
        config = SceneEvalConfig(views=views, resolution=resolution, elevation=elevation)
        try:
            result = evaluate_scene(scene, reference_scene, config, lpips_model=lpips_model, embed=embed, notes=notes,
                                    device=device, backend=RENDER_BACKENDS[backend], progress=bridge.Progress(3 * views))
        except ValueError as exc:
            raise ValueError(f"{EVALUATION_TITLE}: {exc}") from None
        report = result.report()
        plot = evaluation_plot(result)[None]
        return io.NodeOutput(report, result.to_json(), plot, render_pairs(result),
                             ui={"text": [report], **ui.PreviewImage(plot, cls=cls).as_dict()})


NODES = [MeshDiversity, ConceptSimilarity, SceneEvaluation]
