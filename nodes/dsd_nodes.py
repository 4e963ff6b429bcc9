"""ThemeStation's refinement: DSD Refine (dual score distillation of the concept and reference priors)."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..mpod_core.configdoc import field_spec
from ..mpod_core.guidance.dsd import (CONCEPT_PROMPT, REFERENCE_PROMPT, DSDConfig, dsd_prompts,
                                      themestation_terms)
from ..mpod_core.guidance.vsd import VSDConfig, VSDScore
from ..mpod_core.pipelines.dmtet_refine import RefineConfig, init_refine_state
from ..mpod_core.pipelines.dsd_init import init_state_from_mesh
from ..mpod_core.pipelines.dsd_refine import DSDRefineConfig, fit_dsd
from ..mpod_core.pipelines.refine_state_io import copy_refine_state
from ..mpod_core.texture_bake import TextureBakeConfig
from . import comfy_bridge as bridge
from .comfy_bridge.diffusion import ComfyTextDenoiser
from .comfy_bridge.vsd import ComfyScoreModel, conditioning_context
from .nerf_nodes import _check_field
from .refine_nodes import BACKEND_TOOLTIP, DMTetState, _bake, _check_state
from .schema import (FIELD_BACKENDS, RENDER_BACKENDS, Trimesh, backend_input, check_backend, config_input,
                     RadianceFieldType, loss_map_output, node_schema)

log = logging.getLogger(__name__)

NODE_TITLE = "DSD Refine"
#: Measured on this 2-core CPU (bench/README.md, bench_dsd.py): SD 1.5 priors at 512^2.
CPU_COST = ("one iteration at the paper's 512^2 costs 5.4x a guided SD 1.5 UNet pass with SDS (154 s measured on a "
            "2-core CPU: three guided terms, the renders, the VAE encoder's backward) and 10.3x with VSD (292 s: three "
            "LoRA forward+backward passes and three baseline predictions more), so the paper's 5000 iterations take "
            "9-17 days there; a GPU is the intended device")


def _family(model, name: str):
    """(kind, context width, channels, prediction) of an SD MODEL, for comparing the two priors."""
    inner = getattr(model, "model", None)
    config = getattr(getattr(inner, "model_config", None), "unet_config", None)
    if inner is None or config is None:
        raise ValueError(f"{name}: expected a MODEL from a checkpoint loader (or Theme Finetune), got "
                         f"{type(model).__name__}")
    return (type(inner).__name__, config.get("context_dim"), config.get("model_channels"),
            getattr(getattr(inner, "model_type", None), "name", None))


def _check_priors(concept_model, reference_model) -> None:
    a, b = _family(concept_model, "concept_model"), _family(reference_model, "reference_model")
    if a != b:
        raise ValueError(f"concept_model and reference_model are of different model families ({a[0]}, context "
                         f"{a[1]}, {a[2]} channels, {a[3]} vs {b[0]}, context {b[1]}, {b[2]} channels, {b[3]}): both "
                         "priors must be Theme Finetune LoRAs of the same base checkpoint, which the one VAE encodes "
                         "for")


def _encode(clip, text: str, name: str):
    """CONDITIONING of ``text``, as core CLIP Text Encode computes it."""
    if clip is None or not hasattr(clip, "tokenize"):
        raise ValueError(f"{name}: expected a CLIP (from the checkpoint loader or Theme Finetune)")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _initial_state(field, mesh, resume_state, config: DSDRefineConfig, backend: str, seed: int,
                   texture_steps: int):
    """(state, report line) from the one initial model given."""
    given = [n for n, v in (("field", field), ("mesh", mesh), ("resume_state", resume_state)) if v is not None]
    if resume_state is not None:
        state = copy_refine_state(_check_state(resume_state), backend=FIELD_BACKENDS[backend],
                                  device=bridge.torch_device())
        extra = f" ({' and '.join(n for n in given if n != 'resume_state')} ignored)" if len(given) > 1 else ""
        return state, f"resumed at iteration {state.steps_done}{extra}"
    if len(given) != 1:
        raise ValueError("connect exactly one initial model: field (a radiance field from Zero123 SDS NeRF) or mesh "
                         f"(any TRIMESH); got {' and '.join(given) if given else 'neither'}")
    if field is not None:
        refine = RefineConfig(grid_cells=config.grid_cells, density_threshold=config.density_threshold)
        state = init_refine_state(_check_field(field), refine, backend=FIELD_BACKENDS[backend])
        return state, f"initial model: the radiance field on a {config.grid_cells}-cell tet grid"
    state, report = init_state_from_mesh(mesh, config.grid_cells, backend=FIELD_BACKENDS[backend],
                                         device=bridge.torch_device(), texture_steps=texture_steps, seed=seed,
                                         progress=bridge.Progress(max(texture_steps, 1)))
    return state, f"initial model: the mesh ({report})"


class DSDRefine(io.ComfyNode):
    """ThemeStation stage 3: the initial model refined under the concept and reference priors (DSD)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        d, dsd, vsd, bake = DSDRefineConfig(), DSDConfig(), VSDConfig(), TextureBakeConfig()
        return node_schema(
            "MPOD3D_DSDRefine",
            description="ThemeStation's dual score distillation (paper §3.3, eq. 3; official "
                        "theme-station-optimization.yaml): the initial model (a radiance field or any mesh) becomes "
                        "a deformable tetrahedral SDF whose surface and texture are refined at random views "
                        "(elevation -5..30, fov 70-80) under two theme priors: the concept prior guides the colour "
                        "render at high noise (t in [0.5, 0.75], weight 0.2: the concept's identity) and the "
                        "reference prior guides the colour render and the normal map at low noise (t in [0.1, 0.25], "
                        "weight 1: the theme's details), each by VSD (a LoRA copy of the prior trained on the "
                        "renders predicts their score) or plain SDS; normal consistency 400, sparsity 10 and the "
                        "opacity term from step 2501 regularise. The mesh comes out UV-unwrapped with its texture "
                        f"baked. Long: {CPU_COST}. Memory (SD 1.5, 512^2): with VSD a float32 copy of each "
                        "prior's UNet (6.6 GB for the two) besides ComfyUI's model, and about 8.3 GB more during an "
                        "iteration with either score (bench/bench_dsd.py).",
            inputs=[
                RadianceFieldType.Input(
                    "field", optional=True, tooltip="Initial model as a radiance field (Zero123 SDS NeRF); or connect "
                                                    "mesh instead."),
                Trimesh.Input("mesh", optional=True,
                              tooltip="Initial model as any mesh (coloured or textured; converted to an SDF by its "
                                      "generalized winding number, so small holes are tolerated); or connect field."),
                io.Model.Input("concept_model", tooltip="The concept prior: Theme Finetune's model on the concept "
                                                        "image (and renders of the initial model)."),
                io.Clip.Input("concept_clip", tooltip="The concept prior's CLIP (Theme Finetune's clip output)."),
                io.Model.Input("reference_model", tooltip="The reference prior: Theme Finetune's model on the "
                                                          "exemplar renders (colour and normal maps)."),
                io.Clip.Input("reference_clip", tooltip="The reference prior's CLIP."),
                io.Vae.Input("vae", tooltip="The base checkpoint's VAE (both priors share it)."),
                DMTetState.Input("resume_state", optional=True,
                                 tooltip="Continue this state (from Save/Load DMTet State or a previous run): surface, "
                                         "texture, Adam moments and iteration count continue (the VSD LoRAs start "
                                         "afresh); field and mesh are then ignored."),
                io.String.Input("object", default="object",
                                tooltip="What the model is, for the prompts' {object} (Render Exemplars' object)."),
                io.String.Input("token", default="sks",
                                tooltip="The theme token both priors were fine-tuned with (official: sks)."),
                io.String.Input("concept_prompt", default=CONCEPT_PROMPT,
                                tooltip="Concept prior's prompt (official concept-prior caption \"a 3d model of sks "
                                        "{obj}\"); must contain {token}."),
                io.String.Input("reference_prompt", default=REFERENCE_PROMPT,
                                tooltip="Reference prior's prompt for the colour render (official exemplar caption); "
                                        "the normal map gets it + \", normal map\"; must contain {token}."),
                config_input(DSDRefineConfig, "iterations", "Long: see the node's description for the CPU cost."),
                config_input(DSDRefineConfig, "resolution"),
                config_input(DSDRefineConfig, "guidance_resolution", default=d.guidance_resolution),
                config_input(DSDRefineConfig, "grid_cells", "Ignored when resuming."),
                config_input(DSDRefineConfig, "learning_rate"),
                config_input(DSDRefineConfig, "density_threshold", "Radiance-field initial models only."),
                config_input(DSDConfig, "score", default=dsd.score),
                config_input(DSDConfig, "guidance_scale", default=dsd.guidance_scale),
                *(config_input(DSDConfig, name, default=getattr(dsd, name))
                  for name in ("concept_min_step", "concept_max_step", "concept_weight", "reference_min_step",
                               "reference_max_step", "reference_weight")),
                io.Int.Input("lora_rank", default=vsd.rank, min=1, max=128,
                             tooltip=f"VSD only. {field_spec(VSDConfig, 'rank').doc}"),
                io.Float.Input("lora_learning_rate", default=vsd.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip=f"VSD only. {field_spec(VSDConfig, 'learning_rate').doc}"),
                *(config_input(DSDRefineConfig, name) for name in DSDRefineConfig.LAMBDAS),
                config_input(DSDRefineConfig, "opaque_start"),
                io.Float.Input("elevation_min", default=d.elevation_range[0], min=-89.0, max=89.0, step=1.0,
                               tooltip="Lowest camera elevation, degrees (theme-station-optimization.yaml "
                                       "data.elevation_range: -5)."),
                io.Float.Input("elevation_max", default=d.elevation_range[1], min=-89.0, max=89.0, step=1.0,
                               tooltip="Highest camera elevation, degrees (data.elevation_range: 30)."),
                config_input(TextureBakeConfig, "fallback", "If xatlas fails on the final mesh, vertex colours "
                                                            "are used and report says so.", default=bake.fallback),
                io.Int.Input("texture_size", default=bake.size, min=16, max=8192, step=16,
                             tooltip=f"Side of the baked texture in texels (default {bake.size}, TextureBakeConfig."
                                     "size)."),
                io.Int.Input("texture_fit_steps", default=300, min=0, max=10000,
                             tooltip="Mesh initial models only: Adam steps fitting the texture field to the mesh's "
                                     "colours before refining (300: a mean colour error of a few 1/255 on textured "
                                     "meshes, about 3 minutes on a CPU at the full hash grid); 0 starts grey."),
                config_input(DSDRefineConfig, "seed"),
                backend_input(BACKEND_TOOLTIP),
            ],
            outputs=[
                Trimesh.Output("refined_mesh", display_name="mesh",  # id unlike the input's (V3 refuses repeats)
                               tooltip="The refined surface, UV-unwrapped with its texture baked (or vertex "
                                       "colours). Wire into Save Mesh."),
                DMTetState.Output("state", display_name="state",
                                  tooltip="The refine state: Save DMTet State keeps it for resuming."),
                io.String.Output("report", display_name="report",
                                 tooltip="What ran: initial model, prompts, score, iterations, faces, texture."),
                loss_map_output("concept_color, reference_color, reference_normal, vsd_concept, vsd_reference, "
                                "normal_consistency, sparsity, opaque"),
            ],
        )

    @classmethod
    def execute(cls, concept_model, concept_clip, reference_model, reference_clip, vae, object, token,
                concept_prompt, reference_prompt, iterations, resolution, guidance_resolution, grid_cells,
                learning_rate, density_threshold, score, guidance_scale, concept_min_step, concept_max_step,
                concept_weight, reference_min_step, reference_max_step, reference_weight, lora_rank, lora_learning_rate,
                lambda_normal_consistency, lambda_sparsity, lambda_opaque, opaque_start, elevation_min,
                elevation_max, fallback, texture_size, texture_fit_steps, seed, backend, field=None, mesh=None,
                resume_state=None) -> io.NodeOutput:
        check_backend(NODE_TITLE, backend)
        config = DSDRefineConfig(
            iterations=iterations, resolution=resolution, guidance_resolution=guidance_resolution,
            grid_cells=grid_cells, learning_rate=learning_rate, density_threshold=density_threshold,
            elevation_range=(elevation_min, elevation_max),
            dsd=DSDConfig(concept_min_step=concept_min_step, concept_max_step=concept_max_step,
                          reference_min_step=reference_min_step, reference_max_step=reference_max_step,
                          concept_weight=concept_weight, reference_weight=reference_weight,
                          guidance_scale=guidance_scale, score=score),
            lambda_normal_consistency=lambda_normal_consistency, lambda_sparsity=lambda_sparsity,
            lambda_opaque=lambda_opaque, opaque_start=opaque_start, seed=seed)
        config.validate()
        vsd_config = VSDConfig(rank=lora_rank, learning_rate=lora_learning_rate, seed=seed)
        vsd_config.validate()
        bake = TextureBakeConfig(fallback=fallback, size=texture_size)
        _check_priors(concept_model, reference_model)
        prompts = dsd_prompts(object, token, concept_prompt, reference_prompt)
        clips = {"concept_color": (concept_clip, "concept_clip"), "reference_color": (reference_clip, "reference_clip"),
                 "reference_normal": (reference_clip, "reference_clip")}
        conds = {k: _encode(clips[k][0], text, clips[k][1]) for k, text in prompts.items()}
        # The official prompt processors' negative prompt is empty; each prior encodes it with its own CLIP.
        negatives = {"concept": _encode(concept_clip, "", "concept_clip"),
                     "reference": _encode(reference_clip, "", "reference_clip")}
        report = [f"prompts: concept {prompts['concept_color']!r}; reference {prompts['reference_color']!r} and "
                  f"{prompts['reference_normal']!r}"]
        with torch.inference_mode(False), torch.enable_grad():
            state, how = _initial_state(field, mesh, resume_state, config, backend, seed, texture_fit_steps)
            report.insert(0, how)
            denoisers = [ComfyTextDenoiser(concept_model, vae, conds["concept_color"], negatives["concept"]),
                         ComfyTextDenoiser(reference_model, vae, conds["reference_color"], negatives["reference"]),
                         ComfyTextDenoiser(reference_model, vae, conds["reference_normal"], negatives["reference"])]
            scores = {}
            try:
                if config.dsd.score == "vsd":
                    scores["concept"] = VSDScore(
                        ComfyScoreModel(concept_model, concept_clip, vae, "concept_model"),
                        {"color": conditioning_context(conds["concept_color"], "concept")}, vsd_config, "concept")
                    scores["reference"] = VSDScore(
                        ComfyScoreModel(reference_model, reference_clip, vae, "reference_model"),
                        {"color": conditioning_context(conds["reference_color"], "reference"),
                         "normal": conditioning_context(conds["reference_normal"], "reference normal")},
                        vsd_config, "reference")
                baselines = {"concept_color": scores["concept"].baseline("color"),
                             "reference_color": scores["reference"].baseline("color"),
                             "reference_normal": scores["reference"].baseline("normal")} if scores else None
                terms = themestation_terms(config.dsd, *denoisers, baselines)
                result = fit_dsd(state, denoisers[0].encode, terms, config, scores=scores,
                                 backend=RENDER_BACKENDS[backend], progress=bridge.Progress(iterations))
            finally:
                for s in scores.values():
                    s.close()
                for den in denoisers:
                    den.close()
        report.append(f"score: {config.dsd.score}; iterations: {result.state.steps_done} in total ({iterations} this "
                      f"run); surface: {result.vertices.shape[0]} vertices, {result.faces.shape[0]} faces")
        mesh_out, how = _bake(result, bake, bridge.torch_device(), NODE_TITLE)
        report.append(how)
        return io.NodeOutput(mesh_out, result.state, "\n".join(report), result.loss_map, ui={"text": report})


NODES = [DSDRefine]
