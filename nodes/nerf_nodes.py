"""MPOD123 stage 1 nodes: Zero123 SDS NeRF, Opacity Mask, Field to Mesh, and
saving/loading radiance fields."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..mpod_core import cameras as cam
from ..mpod_core.fields import RadianceField, load_radiance_field, read_settings, save_radiance_field
from ..mpod_core.fields.extract import MAX_SURFACE_CELLS, extract_mesh
from ..mpod_core.fields.radiance_field import MAX_OPACITY_PIXELS
from ..mpod_core.fields.nerf import NeRFFieldConfig
from ..mpod_core.configdoc import field_docs
from ..mpod_core.guidance import SDSConfig
from ..mpod_core.guidance.schedules import TIMESTEP_PRESETS, TimestepSchedule
from ..mpod_core.pipelines.mpod123 import (MAX_GUIDANCE_PIXELS, MAX_SAMPLES_PER_RAY, Stage1Config,
                                           fit_stage1, prepare_reference, turntable_cameras)
from . import comfy_bridge as bridge
from .comfy_bridge.diffusion import ComfyZero123Denoiser
from .schema import (FIELD_BACKEND_TOOLTIP, FIELD_BACKENDS, RadianceFieldType, Trimesh, backend_input, check_backend,
                     check_image, check_masks, config_input, loss_map_output, node_schema)


FIELD_EXTENSIONS = (".safetensors",)


def _field_input():
    return RadianceFieldType.Input("field", tooltip="A radiance field from Zero123 SDS NeRF or Load Radiance Field.")


def _check_field(field, name: str = "field") -> RadianceField:
    if not isinstance(field, RadianceField):
        raise ValueError(f"{name}: expected a radiance field from Zero123 SDS NeRF or Load Radiance Field, "
                         f"got {type(field).__name__}")
    return field


def _reference_inputs(image: torch.Tensor, mask, invert_mask: bool, node: str = "Zero123 SDS NeRF"):
    """ComfyUI IMAGE (+ MASK) -> (H, W, 3) image and (H, W) foreground mask."""
    img = check_image(image, node)[0].float()
    if mask is not None:
        m = check_masks(mask, node, "mask", size=tuple(img.shape[:2]))[0].float()
    elif img.shape[-1] == 4:
        m = img[..., 3]
    else:
        raise ValueError(f"{node}: no mask: connect the object's MASK (e.g. from a background-removal node, or Load "
                         "Image's MASK with invert_mask on), or give an RGBA image")
    if invert_mask:
        m = 1.0 - m
    return img[..., :3], m


class Zero123SDSNeRF(io.ComfyNode):
    """MPOD123 stage 1: a NeRF from one image under Zero123 score distillation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = Stage1Config()
        custom = d.custom_timesteps
        presets = "; ".join(f"{k}: {v.source}" for k, v in TIMESTEP_PRESETS.items())
        return node_schema(
            "MPOD3D_Zero123SDSNeRF",
            description="MPOD123 stage 1: optimise a hash-grid NeRF so that its front view matches the image "
                        "(RGB + mask losses) and its novel views are likely under Stable Zero123 (score "
                        "distillation), with the reference implementations' timestep schedule, learning rates, "
                        "regularisers, shading augmentation and coarse-to-fine hash grid. 75% of iterations are "
                        "random novel views, 25% the reference view. Long: on a 2-core CPU a novel-view iteration "
                        "at 128^2 takes seconds for the render and ~9 s for Zero123 at 256^2 (see the README's "
                        "Performance); the paper runs 5000 on a GPU. Memory stays bounded at any resolution.",
            inputs=[
                io.Model.Input("model", tooltip="Stable Zero123 MODEL from Image Only Checkpoint Loader."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP_VISION from the same loader."),
                io.Vae.Input("vae", tooltip="VAE from the same loader (a float32 copy of its encoder is "
                                            "differentiated through)."),
                io.Image.Input("image", tooltip="The reference image: square, object centred, seen from the "
                                                "reference camera (elevation reference_elevation, azimuth 0). "
                                                "The first image of a batch is used."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Object mask, 1 = object. Left out: the image's alpha channel (RGBA images)."),
                RadianceFieldType.Input("resume_field", optional=True,
                                        tooltip="Continue optimising this field (e.g. from Load Radiance Field): "
                                                "its iteration count, occupancy grid and Adam moments continue."),
                io.Boolean.Input("invert_mask", default=False,
                                 tooltip="Turn on when the mask is 1 on the background, e.g. Load Image's MASK "
                                         "(1 where the picture is transparent)."),
                config_input(Stage1Config, "iterations"),
                config_input(Stage1Config, "resolution", "Render size of every view; memory stays bounded "
                                                         "(two-pass backward), time grows with the pixels."),
                config_input(Stage1Config, "guidance_resolution", f"batch_size x guidance_resolution^2 may not "
                                                                  f"exceed {MAX_GUIDANCE_PIXELS} (the encoder's "
                                                                  f"backward memory)."),
                config_input(Stage1Config, "batch_size", "Views per SDS step."),
                config_input(Stage1Config, "learning_rate", field_docs(Stage1Config)["encoding_lr_scale"]),
                io.Float.Input("guidance_scale", default=d.sds.guidance_scale, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance of Zero123 (threestudio "
                                       "configs/stable-zero123.yaml guidance_scale: 3)."),
                config_input(Stage1Config, "timestep_preset", "Noise levels sampled for SDS, annealed over "
                                                              f"fractions of the run. {presets}; custom: the six "
                                                              "widgets below."),
                io.Float.Input("min_step", default=custom.min_step, min=0.0, max=1.0, step=0.01,
                               tooltip="custom preset only: lowest timestep at the start, fraction of the schedule."),
                io.Float.Input("max_step", default=custom.max_step, min=0.0, max=1.0, step=0.01,
                               tooltip="custom preset only: highest timestep at the start."),
                io.Float.Input("anneal_min_step", default=custom.min_step, min=0.0, max=1.0, step=0.01,
                               tooltip="custom preset only: lowest timestep after the anneal."),
                io.Float.Input("anneal_max_step", default=custom.max_step, min=0.0, max=1.0, step=0.01,
                               tooltip="custom preset only: highest timestep after the anneal."),
                *(config_input(TimestepSchedule, name, "custom preset only.", default=getattr(custom, name), min=0.0,
                               max=1.0, step=0.01) for name in ("anneal_start", "anneal_end")),
                config_input(Stage1Config, "reference_probability"),
                config_input(Stage1Config, "reference_elevation"),
                io.Float.Input("elevation_min", default=d.elevation_range[0], min=-89.0, max=89.0, step=1.0,
                               tooltip="Lowest elevation of random novel views, degrees (Magic123: -45)."),
                io.Float.Input("elevation_max", default=d.elevation_range[1], min=-89.0, max=89.0, step=1.0,
                               tooltip="Highest elevation of random novel views, degrees (Magic123: 45)."),
                config_input(Stage1Config, "distance"),
                config_input(Stage1Config, "fov"),
                config_input(Stage1Config, "lambda_orient", "Penalises normals facing away from the camera on "
                                                            "visible matter (DreamFusion); 0 = off."),
                config_input(Stage1Config, "lambda_normal_smooth", "Smooths the rendered normal map; 0 = off."),
                config_input(Stage1Config, "lambda_sparsity", "Against haze: mean opacity of novel views; 0 = off."),
                config_input(Stage1Config, "lambda_opaque", "Pushes pixels to empty or opaque; 0 = off."),
                config_input(Stage1Config, "shading_augmentation"),
                config_input(Stage1Config, "coarse_levels", f"For the first {d.coarse_fraction:.0%} of the run."),
                io.Int.Input("samples_per_ray", default=256, min=16, max=MAX_SAMPLES_PER_RAY,
                             tooltip="Marching samples across the field's cube diagonal (a fresh field's; a "
                                     "resumed field keeps its own): more is sharper and slower. "
                                     f"At most {MAX_SAMPLES_PER_RAY}, the ray marcher's cap."),
                io.Int.Input("turntable_frames", default=8, min=1, max=360,
                             tooltip="Views of the turntable output (one full turn at elevation 0)."),
                config_input(Stage1Config, "seed", "Also seeds a fresh field's initial weights."),
                backend_input(FIELD_BACKEND_TOOLTIP),
            ],
            outputs=[
                RadianceFieldType.Output("field", display_name="field",
                                         tooltip="The radiance field (with its occupancy grid, cameras and Adam "
                                                 "moments)."),
                io.Image.Output("turntable", display_name="turntable",
                                tooltip="Renders of the field from turntable_frames views on white."),
                loss_map_output("rgb, mask, sds, orient, ..."),
            ],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, batch_size: int, guidance_resolution: int) -> bool | str:
        pixels = int(batch_size) * int(guidance_resolution) ** 2
        if pixels > MAX_GUIDANCE_PIXELS:
            return (f"Zero123 SDS NeRF: batch_size x guidance_resolution^2 = {pixels} exceeds {MAX_GUIDANCE_PIXELS} "
                    f"(4 views at 256^2), the most the VAE encoder's backward is allowed to hold; lower batch_size "
                    f"or guidance_resolution")
        return True

    @classmethod
    def execute(cls, model, clip_vision, vae, image, invert_mask, iterations, resolution, guidance_resolution,
                batch_size, learning_rate, guidance_scale, timestep_preset, min_step, max_step, anneal_min_step,
                anneal_max_step, anneal_start, anneal_end, reference_probability, reference_elevation,
                elevation_min, elevation_max, distance, fov, lambda_orient, lambda_normal_smooth,
                lambda_sparsity, lambda_opaque, shading_augmentation, coarse_levels, samples_per_ray,
                turntable_frames, seed, backend, mask=None, resume_field=None) -> io.NodeOutput:
        ref_image, ref_mask = _reference_inputs(image, mask, invert_mask)
        config = Stage1Config(
            iterations=iterations, resolution=resolution, guidance_resolution=guidance_resolution,
            batch_size=batch_size, learning_rate=learning_rate, reference_probability=reference_probability,
            reference_elevation=reference_elevation, elevation_range=(elevation_min, elevation_max),
            distance=distance, fov=fov, seed=seed, sds=SDSConfig(guidance_scale=guidance_scale),
            timestep_preset=timestep_preset,
            custom_timesteps=TimestepSchedule(min_step, max_step, anneal_min_step, anneal_max_step, anneal_start,
                                              anneal_end),
            lambda_orient=lambda_orient, lambda_normal_smooth=lambda_normal_smooth, lambda_sparsity=lambda_sparsity,
            lambda_opaque=lambda_opaque, shading_augmentation=shading_augmentation, coarse_levels=coarse_levels)
        config.validate()
        check_backend("Zero123 SDS NeRF", backend)
        device = bridge.torch_device()
        with torch.inference_mode(False), torch.enable_grad():
            if resume_field is not None:
                # ComfyUI caches node outputs: train a copy, never the upstream field.
                field = _check_field(resume_field, "resume_field").copy(backend=FIELD_BACKENDS[backend], device=device)
            else:
                with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching global state
                    torch.manual_seed(seed)
                    field = RadianceField(NeRFFieldConfig(), samples_per_ray=samples_per_ray,
                                          backend=FIELD_BACKENDS[backend]).to(device)
            # Validates image and mask (clear errors) and gives the object over white at full size:
            # Zero123 is conditioned on that, as the reference loss sees it.
            white, _ = prepare_reference(ref_image, ref_mask, ref_image.shape[0], 1.0)
            denoiser = ComfyZero123Denoiser(model, clip_vision, vae, white[None].clone(),
                                            reference_view=(reference_elevation, 0.0))
            with denoiser:
                result = fit_stage1(ref_image.clone(), ref_mask.clone(), denoiser, config, field=field,
                                    progress=bridge.Progress(iterations))
        field = result.field
        field.meta["training"] = {"image_size": list(ref_image.shape[:2]), "seed": seed,
                                  "guidance_scale": guidance_scale, "timestep_preset": timestep_preset,
                                  "iterations_last_run": iterations}
        cams = turntable_cameras(turntable_frames, 0.0, distance, fov)
        with torch.no_grad():
            turntable = _render_views(field, cams, resolution)
        return io.NodeOutput(field.eval(), turntable, result.loss_map)


def _render_views(field: RadianceField, cams, resolution: int) -> torch.Tensor:
    """(N, res, res, 3) colour renders on white, view by view with progress."""
    progress = bridge.Progress(len(cams))
    frames = []
    for k in range(len(cams)):
        one = cams.select([k])
        frame = field.render(one, resolution, resolution, background=1.0)["color"][0].clamp(0, 1)
        frames.append(frame.cpu())
        progress(k + 1, len(cams), frame)
    return torch.stack(frames)


def _default_view(field: RadianceField) -> dict:
    return {**cam.REFERENCE_VIEW, **field.meta.get("reference_view", {})}


class OpacityMask(io.ComfyNode):
    """MPOD123 eq. 3-5: outline masks of a field from its accumulated opacity."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_OpacityMask",
            description="Outline masks of a radiance field (MPOD123 eq. 3-5): the opacity accumulated from density "
                        "alone, thresholded. These masks drive the mask-rectified attention of stage 2.",
            inputs=[
                _field_input(),
                io.String.Input("azimuths", default="0, 90, 180, 270",
                                tooltip="Azimuths in degrees, comma separated; counter-clockwise seen from above, "
                                        "0 = the reference (front) view."),
                io.String.Input("elevations", default="0",
                                tooltip="Elevations in degrees: one value for all views, or one per azimuth."),
                io.Float.Input("distance", default=0.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Camera distance; 0 = the distance the field was fitted with."),
                io.Float.Input("fov", default=0.0, min=0.0, max=179.0, step=0.5,
                               tooltip="Vertical field of view, degrees; 0 = the field's own."),
                io.Int.Input("resolution", default=128, min=8, max=2048, step=8,
                             tooltip=f"Mask size in pixels (views x resolution^2 at most {MAX_OPACITY_PIXELS}, "
                                     f"16 views of 2048)."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=0.999, step=0.01,
                               tooltip="A pixel is inside the outline when its opacity exceeds this (paper: 0.5)."),
            ],
            outputs=[
                io.Mask.Output("outline_mask", display_name="mask", tooltip="Outline masks, 1 = inside."),
                io.Image.Output("opacity_image", display_name="opacity", tooltip="The raw opacity as a grey image."),
            ],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, azimuths: str, elevations: str, resolution: int) -> bool | str:
        try:
            n_views = len(cam.parse_view_lists(elevations, azimuths)[0])
        except (TypeError, ValueError):  # linked (None here) or malformed: reported when the node runs
            return True
        pixels = n_views * int(resolution) ** 2
        if pixels > MAX_OPACITY_PIXELS:
            return (f"Opacity Mask: views x resolution^2 = {n_views} x {resolution}^2 = {pixels} exceeds "
                    f"{MAX_OPACITY_PIXELS} (16 views of 2048x2048), the most its output masks may hold in memory; "
                    f"ask for fewer views or a smaller resolution")
        return True

    @classmethod
    def execute(cls, field, azimuths, elevations, distance, fov, resolution, threshold) -> io.NodeOutput:
        _check_field(field)
        elev, azim = cam.parse_view_lists(elevations, azimuths)
        view = _default_view(field)
        cams = cam.orbit_cameras(elev, azim, distance or view["distance"], fov or view["fov"])
        progress = bridge.Progress(len(cams))
        masks, opacities = [], []
        for k in range(len(cams)):
            one = cams.select([k])
            m, o = field.opacity_mask(one, resolution, resolution, threshold)
            masks.append(m[0].cpu())
            opacities.append(o[0].cpu())
            progress(k + 1, len(cams), o[0, ..., None].expand(-1, -1, 3))
        opacity = torch.stack(opacities)
        return io.NodeOutput(torch.stack(masks), opacity[..., None].expand(-1, -1, -1, 3).contiguous())


class FieldToMesh(io.ComfyNode):
    """Marching cubes on the field's density, albedo as vertex colours."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_FieldToMesh",
            description="Extract a mesh from a radiance field: marching cubes on the density at the threshold, "
                        "vertex colours from the field's albedo. Wire it into Save Mesh.",
            inputs=[
                _field_input(),
                io.Int.Input("resolution", default=128, min=16, max=512, step=8,
                             tooltip=f"Marching-cubes lattice per axis over the field's cube (memory grows as its cube: "
                                     f"~0.6 GiB at 512). A surface crossing more than {MAX_SURFACE_CELLS} "
                                     f"cells is refused before meshing (~2 KB of mesh work a cell)."),
                io.Float.Input("threshold", default=10.0, min=0.001, max=1000.0, step=0.5,
                               tooltip="Density of the surface. Lower: fuller, puffier shape; higher: only dense "
                                       "matter. A fresh field's blob peaks at ~10."),
            ],
            outputs=[Trimesh.Output("mesh", display_name="mesh", tooltip="Mesh with vertex colours.")],
        )

    @classmethod
    def execute(cls, field, resolution, threshold) -> io.NodeOutput:
        _check_field(field)
        with torch.no_grad():
            mesh = extract_mesh(field.field.density, field.aabb, resolution=resolution, threshold=threshold,
                                color_fn=field.field.albedo, device=field.device,
                                progress=bridge.Progress(resolution))
        return io.NodeOutput(mesh)


class SaveRadianceField(io.ComfyNode):
    """Write a field to output/ as .safetensors (settings in its header)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_SaveRadianceField",
            description="Save a radiance field under ComfyUI's output folder as one .safetensors file (weights, "
                        "occupancy grid and settings). Load Radiance Field lists it for resuming.",
            is_output_node=True,
            inputs=[
                _field_input(),
                io.String.Input("filename_prefix", default=f"{bridge.FIELD_SUBFOLDER}/mpod3d",
                                tooltip="Name relative to the output folder; a counter is appended. Load "
                                        "Radiance Field lists what is saved under output/fields."),
            ],
            outputs=[io.String.Output("field_path", display_name="field_path",
                                      tooltip="Saved file, relative to the output folder.")],
        )

    @classmethod
    def execute(cls, field, filename_prefix) -> io.NodeOutput:
        _check_field(field)
        path, relative = bridge.next_output_path(filename_prefix, "safetensors")
        save_radiance_field(field, path)
        return io.NodeOutput(relative, ui={"text": [relative]})


class LoadRadianceField(io.ComfyNode):
    """Read a field saved by Save Radiance Field."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_LoadRadianceField",
            description="Load a radiance field (.safetensors from Save Radiance Field) from the input folder (top "
                        "level and input/fields) or, marked [output], from output/fields.",
            inputs=[
                io.Combo.Input("field_file",
                               options=bridge.list_input_and_output_files(FIELD_EXTENSIONS, [bridge.FIELD_SUBFOLDER]),
                               tooltip="Field file; entries marked [output] are in ComfyUI's output/fields folder."),
                backend_input(FIELD_BACKEND_TOOLTIP + " Files work with both."),
            ],
            outputs=[RadianceFieldType.Output("field", display_name="field")],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, field_file: str) -> bool | str:
        return bridge.check_listed_file("Load Radiance Field", field_file)

    @classmethod
    def fingerprint_inputs(cls, field_file: str, **_):
        return bridge.file_fingerprint(field_file, bridge.resolve_input_or_output_file)

    @classmethod
    def execute(cls, field_file, backend) -> io.NodeOutput:
        path = bridge.resolve_input_or_output_file(field_file)
        read_settings(path)  # clear errors for foreign files and other versions before any tensor is read
        field = load_radiance_field(path, backend=FIELD_BACKENDS[backend], device=bridge.torch_device())
        return io.NodeOutput(field.eval())


NODES = [Zero123SDSNeRF, OpacityMask, FieldToMesh, SaveRadianceField, LoadRadianceField]
