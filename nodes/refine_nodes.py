"""MPOD123 stage 2, the geometry side: DMTet Refine, and saving/loading its state for resuming."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..mpod_core.guidance import SDSConfig
from ..mpod_core.pipelines.dmtet_refine import RefineConfig, RefineState, fit_refine, init_refine_state
from ..mpod_core.pipelines.refine_state_io import (copy_refine_state, load_refine_state, read_refine_settings,
                                                   save_refine_state)
from ..mpod_core.texture_bake import TextureBakeConfig, bake_mesh
from . import comfy_bridge as bridge
from .comfy_bridge.diffusion import ComfyTextDenoiser
from .comfy_bridge.mrca import check_sd_model, mrca_patched_layers
from .nerf_nodes import _check_field, _field_input, _reference_inputs
from .registry import DMTET_STATE_TYPE
from .schema import (FIELD_BACKENDS, RENDER_BACKENDS, Trimesh, backend_input, check_backend, config_input,
                     loss_map_output, node_schema)

log = logging.getLogger(__name__)

NODE_TITLE = "DMTet Refine"
STATE_SUBFOLDER = "dmtet"
STATE_EXTENSIONS = (".safetensors",)
DMTetState = io.Custom(DMTET_STATE_TYPE)
BACKEND_TOOLTIP = ("Rasterizer and the texture field's hash grid: cuda = nvdiffrast + tinycudann (GPU, must be "
                   "installed), torch = pure PyTorch (any device), auto = cuda when available.")
#: One SD 1.5 guidance call at 512^2 and one 1024^2 render + backward on 2 CPU threads (bench/README.md).
CPU_COST = ("~55 s for SD 1.5's guidance at 512^2 plus ~14 s for a 1024^2 render and its backward per novel-view "
            "iteration, so the paper's 5000 iterations take days on a CPU; a GPU is the intended device")


def _check_state(state, name: str = "resume_state") -> RefineState:
    if not isinstance(state, RefineState):
        raise ValueError(f"{name}: expected a DMTet state from DMTet Refine or Load DMTet State, "
                         f"got {type(state).__name__}")
    return state


def _mrca_report(model) -> str:
    """One line on the MODEL's MRCA patch; a warning (also logged) when there is none."""
    layers = mrca_patched_layers(model)
    if layers:
        return f"MRCA: {layers} cross-attention layers patched; each novel view's stage-1 outline confines the token"
    message = ("WARNING: the MODEL carries no MRCA Attention Patch, so the learned token attends everywhere "
               "(MPOD123 without MRCA). Put MRCA Attention Patch between the checkpoint loader and this node.")
    log.warning("MPOD3D DMTet Refine: %s", message)
    return message


class DMTetRefine(io.ComfyNode):
    """MPOD123 stage 2: the stage-1 field as a DMTet surface, refined under SD score distillation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = RefineConfig()
        bake = TextureBakeConfig()
        return node_schema(
            "MPOD3D_DMTetRefine",
            description="MPOD123 stage 2 (paper §3.3, §4.2): the stage-1 radiance field becomes a deformable "
                        "tetrahedral SDF (DMTet, sdf = density_threshold - density on a box tightened to the "
                        "object + 10%) whose surface and texture are refined at high resolution: 25% of "
                        "iterations fit the reference view (RGB + mask), 75% distil Stable Diffusion's score at a "
                        "random view through the MRCA-patched MODEL (guidance 100, timesteps [0.02, 0.5]: Magic123's refine), the stage-1 outline of that same view "
                        "confining the learned token (MRCA) and pulling the silhouette (L_nvm), with normal "
                        "consistency and Laplacian smoothing. The mesh comes out UV-unwrapped with its texture "
                        f"baked (Save Mesh writes a textured GLB). Long: {CPU_COST}. Memory is bounded: renders "
                        "are refused above 1024^2 (~1.3 GiB of autograd graph there).",
            inputs=[
                _field_input(),
                io.Model.Input("model", tooltip="SD 1.x/2.x MODEL with the MRCA Attention Patch (from Load "
                                                "Checkpoint -> MRCA Attention Patch); works without the patch, "
                                                "with a warning in report."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE (a float32 copy of its encoder is "
                                            "differentiated through)."),
                io.Conditioning.Input("positive", tooltip="The prompt with the learned embedding, e.g. CLIP Text "
                                                          "Encode of Textual Inversion's prompt."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt (an empty prompt's zeros if left out)."),
                io.Image.Input("image", tooltip="The reference image stage 1 was fitted to (square; the first of "
                                                "a batch)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Object mask, 1 = object, the image's size. Left out: the image's alpha."),
                DMTetState.Input("resume_state", optional=True,
                                 tooltip="Continue refining this state (from Load DMTet State or a previous "
                                         "run): its surface, texture, Adam moments and iteration count continue; "
                                         "grid_cells and density_threshold are then the state's own."),
                io.Boolean.Input("invert_mask", default=False,
                                 tooltip="Turn on when the mask is 1 on the background, e.g. Load Image's MASK."),
                config_input(RefineConfig, "iterations", "Long: see the node's description for the CPU cost."),
                config_input(RefineConfig, "resolution"),
                config_input(RefineConfig, "guidance_resolution", default=d.guidance_resolution),
                config_input(RefineConfig, "grid_cells", "Ignored when resuming."),
                config_input(RefineConfig, "learning_rate"),
                config_input(RefineConfig, "density_threshold", "Ignored when resuming."),
                config_input(SDSConfig, "guidance_scale", "Stable Diffusion's classifier-free guidance "
                                                         "(Magic123 refine: 100).", default=d.sds.guidance_scale),
                config_input(RefineConfig, "timestep_preset"),
                config_input(SDSConfig, "min_step", "custom preset only: lowest timestep, fraction of the "
                                                    "schedule (Magic123 refine: 0.02).", default=d.sds.min_step),
                config_input(SDSConfig, "max_step", "custom preset only: highest timestep (Magic123 refine: 0.5).",
                             default=d.sds.max_step),
                config_input(RefineConfig, "reference_probability"),
                io.Float.Input("elevation_min", default=d.elevation_range[0], min=-89.0, max=89.0, step=1.0,
                               tooltip="Lowest elevation of random views, degrees (magic123-refine-sd.yaml: -45)."),
                io.Float.Input("elevation_max", default=d.elevation_range[1], min=-89.0, max=89.0, step=1.0,
                               tooltip="Highest elevation of random views, degrees (magic123-refine-sd.yaml: 45)."),
                *(config_input(RefineConfig, name) for name in RefineConfig.LAMBDAS),
                config_input(RefineConfig, "mrca_masks", "Off: no mask is sent (the patch then leaves attention "
                                                         "unchanged), L_nvm still applies."),
                config_input(TextureBakeConfig, "fallback", "If xatlas fails on the final mesh, vertex colours "
                                                            "are used and report says so.", default=bake.fallback),
                io.Int.Input("texture_size", default=bake.size, min=16, max=8192, step=16,
                             tooltip=f"Side of the baked texture in texels (default {bake.size}, TextureBakeConfig."
                                     "size: the render resolution of the paper)."),
                config_input(RefineConfig, "seed"),
                backend_input(BACKEND_TOOLTIP),
            ],
            outputs=[
                Trimesh.Output("mesh", display_name="mesh",
                                            tooltip="The refined surface, UV-unwrapped with its texture baked (or "
                                                    "vertex colours). Wire into Save Mesh."),
                DMTetState.Output("state", display_name="state",
                                  tooltip="The refine state (grid, SDF, deformation, texture field, Adam moments): "
                                          "Save DMTet State keeps it for resuming."),
                io.String.Output("report", display_name="report",
                                 tooltip="What ran: MRCA patch found or not, iterations, faces, texture or fallback."),
                loss_map_output("rgb, mask, sds, nvm, normal_consistency, laplacian"),
            ],
        )

    @classmethod
    def execute(cls, field, model, vae, positive, image, invert_mask, iterations, resolution, guidance_resolution,
                grid_cells, learning_rate, density_threshold, guidance_scale, timestep_preset, min_step, max_step,
                reference_probability, elevation_min, elevation_max, lambda_sds, lambda_rgb, lambda_mask, lambda_nvm,
                lambda_normal_consistency, lambda_laplacian, mrca_masks, fallback, texture_size, seed, backend,
                negative=None, mask=None, resume_state=None) -> io.NodeOutput:
        stage1 = _check_field(field)
        check_backend(NODE_TITLE, backend)
        check_sd_model(model)
        ref_image, ref_mask = _reference_inputs(image, mask, invert_mask, NODE_TITLE)
        config = RefineConfig(
            iterations=iterations, resolution=resolution, guidance_resolution=guidance_resolution,
            grid_cells=grid_cells, learning_rate=learning_rate, density_threshold=density_threshold,
            reference_probability=reference_probability, elevation_range=(elevation_min, elevation_max),
            sds=SDSConfig(guidance_scale=guidance_scale, min_step=min_step, max_step=max_step),
            timestep_preset=timestep_preset,
            lambda_sds=lambda_sds, lambda_rgb=lambda_rgb, lambda_mask=lambda_mask, lambda_nvm=lambda_nvm,
            lambda_normal_consistency=lambda_normal_consistency, lambda_laplacian=lambda_laplacian,
            mrca_masks=mrca_masks, seed=seed)
        config.validate()
        bake = TextureBakeConfig(fallback=fallback, size=texture_size)
        report = [_mrca_report(model)]
        device = bridge.torch_device()
        with torch.inference_mode(False), torch.enable_grad():
            if resume_state is not None:  # ComfyUI caches node outputs: refine a copy
                state = copy_refine_state(_check_state(resume_state), backend=FIELD_BACKENDS[backend], device=device)
            else:
                state = init_refine_state(stage1, config, backend=FIELD_BACKENDS[backend])
            denoiser = ComfyTextDenoiser(model, vae, positive, negative)
            with denoiser:
                result = fit_refine(state, stage1, ref_image.clone(), ref_mask.clone(), denoiser, config,
                                    backend=RENDER_BACKENDS[backend], progress=bridge.Progress(iterations))
        report.append(f"iterations: {result.state.steps_done} in total ({iterations} this run); surface: "
                      f"{result.vertices.shape[0]} vertices, {result.faces.shape[0]} faces")
        mesh, how = _bake(result, bake, device)
        report.append(how)
        return io.NodeOutput(mesh, result.state, "\n".join(report), result.loss_map, ui={"text": report})


def _bake(result, bake: TextureBakeConfig, device, title: str = NODE_TITLE):
    """(mesh, report line): the texture field baked (:func:`~mpod_core.texture_bake.bake_mesh`)."""
    def colour(points):
        with torch.no_grad():
            return result.state.albedo(points.to(device))
    mesh, how = bake_mesh(result.vertices.cpu(), result.faces.cpu(), colour, bake, progress=bridge.Progress(1))
    if how.startswith("WARNING"):
        log.warning("MPOD3D %s: %s", title, how)
    return mesh, how


class SaveDMTetState(io.ComfyNode):
    """Write a refine state to output/ as .safetensors."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_SaveDMTetState",
            description="Save a DMTet refine state (grid, SDF, deformation, texture field, Adam moments, iteration "
                        "count) as one .safetensors file under ComfyUI's output folder; Load DMTet State lists it "
                        "for resuming. Written atomically: an interrupted save leaves no file.",
            is_output_node=True,
            inputs=[
                DMTetState.Input("state", tooltip="From DMTet Refine."),
                io.String.Input("filename_prefix", default=f"{STATE_SUBFOLDER}/mpod3d",
                                tooltip="Name relative to the output folder; a counter is appended. Load DMTet "
                                        f"State lists what is saved under output/{STATE_SUBFOLDER}."),
            ],
            outputs=[io.String.Output("state_path", display_name="state_path",
                                      tooltip="Saved file, relative to the output folder.")],
        )

    @classmethod
    def execute(cls, state, filename_prefix) -> io.NodeOutput:
        _check_state(state, "state")
        path, relative = bridge.next_output_path(filename_prefix, "safetensors")
        save_refine_state(state, path)
        return io.NodeOutput(relative, ui={"text": [relative]})


class LoadDMTetState(io.ComfyNode):
    """Read a refine state saved by Save DMTet State."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_LoadDMTetState",
            description=f"Load a DMTet refine state (.safetensors from Save DMTet State) from the input folder (top "
                        f"level and input/{STATE_SUBFOLDER}) or, marked [output], from output/{STATE_SUBFOLDER}; "
                        "wire it into DMTet Refine's resume_state.",
            inputs=[
                io.Combo.Input("state_file",
                               options=bridge.list_input_and_output_files(STATE_EXTENSIONS, [STATE_SUBFOLDER]),
                               tooltip=f"State file; entries marked [output] are in output/{STATE_SUBFOLDER}."),
                backend_input(BACKEND_TOOLTIP + " Files work with both."),
            ],
            outputs=[DMTetState.Output("state", display_name="state")],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, state_file: str) -> bool | str:
        return bridge.check_listed_file("Load DMTet State", state_file)

    @classmethod
    def fingerprint_inputs(cls, state_file: str, **_):
        return bridge.file_fingerprint(state_file, bridge.resolve_input_or_output_file)

    @classmethod
    def execute(cls, state_file, backend) -> io.NodeOutput:
        path = bridge.resolve_input_or_output_file(state_file)
        read_refine_settings(path)  # clear errors for fields and foreign files before any tensor is read
        return io.NodeOutput(load_refine_state(path, backend=FIELD_BACKENDS[backend], device=bridge.torch_device()))


NODES = [DMTetRefine, SaveDMTetState, LoadDMTetState]
