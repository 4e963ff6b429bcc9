"""Mesh I/O and rendering nodes: Load Mesh, Save Mesh, Render Mesh Views, the
conversions to and from ComfyUI's native MESH, and Mesh List / Compose Scene for
several objects. A TRIMESH value is a trimesh.Trimesh or a trimesh.Scene of named
objects; nodes that need one mesh flatten a scene (mpod_core.mesh.flatten_scene)."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import Types, io

from ..mpod_core import cameras as cam
from ..mpod_core import mesh as meshlib
from ..mpod_core.render import render_mesh
from ..mpod_core.render.mesh_renderer import MAX_RENDER_PIXELS
from . import comfy_bridge as bridge
from .schema import RENDER_BACKEND_TOOLTIP, RENDER_BACKENDS, Trimesh, backend_input, check_backend, node_schema


class LoadMesh(io.ComfyNode):
    """Load a mesh file from ComfyUI's input folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_LoadMesh",
            description="Load a .glb/.gltf/.obj/.ply/.stl mesh from ComfyUI's input folder (its top level and "
                        "input/3d, where the upload button puts files). Keeps vertex colours and UV textures.",
            inputs=[
                io.Combo.Input("mesh_file",
                               options=bridge.list_input_files(meshlib.LOAD_EXTENSIONS, [bridge.MESH_UPLOAD_SUBFOLDER]),
                               upload=io.UploadType.model,
                               tooltip="Mesh file at the top level of ComfyUI's input folder or under input/3d "
                                       "(other names under input/ load when typed in a workflow). Supported: "
                                       + ", ".join(meshlib.LOAD_EXTENSIONS)
                                       + ". A .gltf needs its .bin and textures beside it; prefer .glb."),
                io.Boolean.Input("normalize", default=False,
                                 tooltip="Centre the mesh and scale its longest side to 1 (the unit cube "
                                         "[-0.5, 0.5]^3 the pack's cameras frame by default). Off keeps the "
                                         "file's own coordinates."),
            ],
            outputs=[Trimesh.Output("mesh", display_name="mesh",
                                    tooltip="The mesh (trimesh.Trimesh), with its colours or texture; a file "
                                            "with several objects becomes one mesh, their placements applied.")],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, mesh_file: str) -> bool | str:
        try:
            path = bridge.resolve_input_file(mesh_file)
        except ValueError as exc:
            return f"Load Mesh: {exc}"
        if path.suffix.lower() not in meshlib.LOAD_EXTENSIONS:
            return (f"Load Mesh: unsupported mesh file '{mesh_file}': expected one of "
                    f"{', '.join(meshlib.LOAD_EXTENSIONS)}")
        if not path.is_file():
            return (f"Load Mesh: mesh file '{mesh_file}' not found in ComfyUI's input folder "
                    f"({bridge.input_directory()})")
        return True

    @classmethod
    def fingerprint_inputs(cls, mesh_file: str, **_):
        return bridge.file_fingerprint(mesh_file, bridge.resolve_input_file)

    @classmethod
    def execute(cls, mesh_file: str, normalize: bool) -> io.NodeOutput:
        mesh = meshlib.load_mesh(bridge.resolve_input_file(mesh_file))
        if normalize:
            mesh = meshlib.normalize_mesh(mesh)
        return io.NodeOutput(mesh)


class SaveMesh(io.ComfyNode):
    """Save a mesh under ComfyUI's output folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_SaveMesh",
            description="Save a mesh as GLB (default), OBJ (+ .mtl and texture) or PLY under ComfyUI's output "
                        "folder. Files appear only when complete. Wire mesh_path into core Preview3D to see it. "
                        "A scene (Compose Scene) is one file with one named object per mesh; a list of meshes "
                        "(Mesh List) gives one file per mesh, each with its own counter.",
            is_output_node=True,
            inputs=[
                Trimesh.Input("mesh", tooltip="A mesh, a scene of named objects, or a list of meshes (the node "
                                              "then runs once per mesh and writes one file each)."),
                io.String.Input("filename_prefix", default="mesh/mpod3d",
                                tooltip="Name relative to the output folder; may include sub-folders and "
                                        "%year%-style variables. A counter is appended: mesh/mpod3d_00001_.glb"),
                io.Combo.Input("format", options=list(meshlib.SAVE_FORMATS), default="glb",
                               tooltip="glb keeps vertex colours and textures in one file, and a scene's "
                                       "objects as named nodes; obj writes .obj + .mtl + texture image; ply "
                                       "keeps vertex colours (a texture is baked to vertex colours). obj and ply "
                                       "flatten a scene into one mesh (obj keeps one 'o' group per object)."),
            ],
            outputs=[io.String.Output("mesh_path", display_name="mesh_path",
                                      tooltip="Saved file, relative to the output folder (the model_file "
                                              "that core Preview3D expects).")],
        )

    @classmethod
    def execute(cls, mesh: meshlib.MeshLike, filename_prefix: str, format: str) -> io.NodeOutput:
        meshlib.check_mesh(mesh, "Save Mesh input")
        if format not in meshlib.SAVE_FORMATS:
            raise ValueError(f"Save Mesh: format must be one of {', '.join(meshlib.SAVE_FORMATS)}, got '{format}'")
        path, relative = bridge.next_output_path(filename_prefix, format)
        meshlib.save_mesh(mesh, path, format)
        subfolder = os.path.dirname(relative)
        ui = {"3d": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]}
        return io.NodeOutput(relative, ui=ui)


class RenderMeshViews(io.ComfyNode):
    """Render a mesh from orbit cameras."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_RenderMeshViews",
            description="Render a mesh (or a scene, all its objects together) from orbit cameras (y up, "
                        "azimuth 0 / elevation 0 = front view on +z) to colour, normal and depth images and a "
                        "silhouette mask.",
            inputs=[
                Trimesh.Input("mesh"),
                io.String.Input("azimuths", default="0, 90, 180, 270",
                                tooltip="Azimuths in degrees, comma separated; counter-clockwise seen from "
                                        "above, 0 = front (+z), 90 = right side (+x)."),
                io.String.Input("elevations", default="0",
                                tooltip="Elevations in degrees above the horizon: one value for all views, "
                                        "or one per azimuth."),
                io.Float.Input("distance", default=cam.REFERENCE_VIEW["distance"], min=0.0, max=1000.0, step=0.01,
                               tooltip="Camera distance from the origin (the papers use 2.5 for a unit-size "
                                       "object). Must be > 0."),
                io.Float.Input("fov", default=cam.REFERENCE_VIEW["fov"], min=0.0, max=179.0, step=0.1,
                               tooltip="Vertical field of view in degrees (papers: 40). Must be in (0, 180)."),
                io.Int.Input("width", default=256, min=8, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=256, min=8, max=4096, step=8, tooltip="Image height in pixels."),
                io.Boolean.Input("frame_mesh", default=True,
                                 tooltip="Centre the mesh and scale it to the unit cube for this render only "
                                         "(the mesh itself is not changed), so any file fills the view."),
                io.Float.Input("background", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Grey level of the background of the colour image (1 = white)."),
                io.Boolean.Input("antialias", default=True, tooltip="Anti-alias silhouette edges."),
                backend_input(RENDER_BACKEND_TOOLTIP),
            ],
            outputs=[
                io.Image.Output("image", display_name="image",
                                tooltip="Colour renders (vertex colours or texture; plain shaded grey when the "
                                        "mesh has neither)."),
                io.Image.Output("normal", display_name="normal",
                                tooltip="World-space normals mapped to [0, 1] as (n + 1) / 2."),
                io.Image.Output("depth", display_name="depth",
                                tooltip="View depth, white = near, black = far/background (normalised per image)."),
                io.Mask.Output("mask", display_name="mask", tooltip="Silhouette (1 = object)."),
            ],
        )

    @classmethod  # named arguments only: with **kwargs ComfyUI skips its own range/option checks of every input
    def validate_inputs(cls, azimuths: str, elevations: str, width: int, height: int) -> bool | str:
        try:
            n_views = len(cam.parse_view_lists(elevations, azimuths)[0])
        except (TypeError, ValueError):  # linked (None here) or malformed: reported when the node runs
            return True
        pixels = n_views * int(width) * int(height)
        if pixels > MAX_RENDER_PIXELS:
            return (f"Render Mesh Views: views x width x height = {n_views} x {width} x {height} = {pixels} exceeds "
                    f"{MAX_RENDER_PIXELS} (two 4096x4096 views), the most its output images may hold in memory; "
                    f"render fewer views or smaller images")
        return True

    @classmethod
    def execute(cls, mesh, azimuths, elevations, distance, fov, width, height, frame_mesh, background,
                antialias, backend) -> io.NodeOutput:
        meshlib.check_mesh(mesh, "Render Mesh Views input")
        elev, azim = cam.parse_view_lists(elevations, azimuths)
        device = bridge.torch_device()
        cameras = cam.orbit_cameras(elev, azim, distance, fov, device=device)
        mesh = meshlib.flatten_scene(mesh)
        tensors = meshlib.mesh_to_tensors(meshlib.normalize_mesh(mesh) if frame_mesh else mesh, device=device)
        out = render_mesh(tensors.vertices, tensors.faces, cameras, width, height,
                          vertex_colors=tensors.vertex_colors, uv=tensors.uv, texture=tensors.texture,
                          background=(background,) * 3, antialias=antialias,
                          backend=RENDER_BACKENDS[check_backend("Render Mesh Views", backend)],
                          progress=bridge.Progress(len(cameras)))
        normal = torch.where(out.alpha[..., None] > 0, out.normal * 0.5 + 0.5, torch.zeros_like(out.normal))
        return io.NodeOutput(out.color.cpu(), normal.cpu(), _depth_image(out.depth, out.alpha).cpu(),
                             out.alpha.cpu())


def _depth_image(depth: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(N, H, W) view depth -> (N, H, W, 3) image, white near, black far, per-image range."""
    covered = alpha > 0
    big = torch.finfo(depth.dtype).max
    near = torch.where(covered, depth, torch.full_like(depth, big)).amin(dim=(1, 2), keepdim=True)
    far = torch.where(covered, depth, torch.full_like(depth, -big)).amax(dim=(1, 2), keepdim=True)
    scaled = 1 - (depth - near) / (far - near).clamp_min(1e-8) * 0.8  # keep the far side visibly grey
    scaled = torch.where(covered, scaled, torch.zeros_like(scaled))
    return scaled[..., None].expand(*scaled.shape, 3).contiguous()


class MeshToComfyMesh(io.ComfyNode):
    """TRIMESH -> core MESH (for core Save GLB)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_MeshToComfyMesh",
            description="Convert a mesh to ComfyUI's native MESH (geometry only: native MESH has no colours), "
                        "for core nodes such as Save GLB. A scene becomes one mesh with its placements applied.",
            inputs=[Trimesh.Input("mesh")],
            outputs=[io.Mesh.Output("MESH", display_name="MESH")],
        )

    @classmethod
    def execute(cls, mesh) -> io.NodeOutput:
        meshlib.check_mesh(mesh, "Mesh to ComfyUI MESH input")
        mesh = meshlib.flatten_scene(mesh)
        vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32)[None]
        faces = torch.as_tensor(mesh.faces, dtype=torch.int64)[None]
        return io.NodeOutput(Types.MESH(vertices, faces))


class ComfyMeshToMesh(io.ComfyNode):
    """core MESH -> TRIMESH."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_ComfyMeshToMesh",
            description="Convert ComfyUI's native MESH (e.g. from Hunyuan3D's VAE decode) to the pack's mesh type.",
            inputs=[
                io.Mesh.Input("MESH"),
                io.Int.Input("batch_index", default=0, min=0, max=4095,
                             tooltip="Which mesh of the MESH batch to take."),
            ],
            outputs=[Trimesh.Output("mesh", display_name="mesh")],
        )

    @classmethod
    def execute(cls, MESH, batch_index: int) -> io.NodeOutput:
        vertices, faces = MESH.vertices, MESH.faces
        if vertices.dim() != 3 or faces.dim() != 3:
            raise ValueError(f"ComfyUI MESH to Mesh: expected batched (B, V, 3) vertices and (B, F, 3) faces, "
                             f"got {tuple(vertices.shape)} and {tuple(faces.shape)}")
        if not 0 <= batch_index < vertices.shape[0]:
            raise ValueError(f"ComfyUI MESH to Mesh: batch_index {batch_index} out of range for a batch of "
                             f"{vertices.shape[0]}")
        return io.NodeOutput(meshlib.tensors_to_mesh(vertices[batch_index].float(), faces[batch_index].long()))


#: Inputs of Mesh List.
MESH_LIST_SLOTS = 8


class MeshList(io.ComfyNode):
    """Several meshes -> one ComfyUI list of meshes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_MeshList",
            description=f"Gather up to {MESH_LIST_SLOTS} meshes into a list, in input order, skipping unconnected "
                        "inputs. A node that takes one mesh runs once per item (Save Mesh: one file each); "
                        "Compose Scene takes the whole list. An input that is itself a list adds all its meshes.",
            is_input_list=True,
            inputs=[Trimesh.Input("mesh_1", tooltip="First mesh (or scene, or list of meshes).")]
                   + [Trimesh.Input(f"mesh_{i}", optional=True, tooltip=f"Mesh {i} (optional).")
                      for i in range(2, MESH_LIST_SLOTS + 1)],
            outputs=[Trimesh.Output("meshes", display_name="meshes", is_output_list=True,
                                    tooltip="The meshes as a ComfyUI list, in input order.")],
        )

    @classmethod
    def execute(cls, **slots) -> io.NodeOutput:
        meshes = []
        for i in range(1, MESH_LIST_SLOTS + 1):
            for mesh in slots.get(f"mesh_{i}") or []:
                if mesh is not None:
                    meshes.append(meshlib.check_mesh(mesh, f"Mesh List mesh_{i}"))
        return io.NodeOutput(meshes)


class ComposeScene(io.ComfyNode):
    """A list of meshes -> one scene with a named node per mesh."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_ComposeScene",
            description="Put a list of meshes (e.g. from Mesh List) into one scene with one named object per "
                        "mesh, each where its vertices already are. Save Mesh writes a scene as one GLB with "
                        "named nodes; Render Mesh Views renders all objects together.",
            is_input_list=True,
            inputs=[
                Trimesh.Input("meshes", tooltip="The objects, as a list of meshes (a scene among them becomes "
                                                "one object)."),
                io.String.Input("names", default="",
                                tooltip="Object names, comma separated, one per mesh in list order; empty for "
                                        "object_00, object_01, ... Blank entries get their default name, "
                                        "repeats a suffix (_2, _3)."),
            ],
            outputs=[Trimesh.Output("scene", display_name="scene",
                                    tooltip="A trimesh.Scene: node i holds mesh i under its name.")],
        )

    @classmethod
    def execute(cls, meshes: list, names: list) -> io.NodeOutput:
        # names arrives as a list too: one string (comma separated), or one string per mesh
        # when the widget is fed by a list of strings.
        names = names[0] if len(names) == 1 else list(names)
        return io.NodeOutput(meshlib.compose_scene(meshes, names))


NODES = [LoadMesh, SaveMesh, RenderMeshViews, MeshToComfyMesh, ComfyMeshToMesh, MeshList, ComposeScene]
