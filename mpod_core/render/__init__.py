"""Differentiable mesh rasterization (nvdiffrast's split: rasterize, interpolate,
antialias, texture) with a pure-PyTorch backend and an optional nvdiffrast one.

Public API::

    rasterize(pos_clip, tri, resolution, backend="auto") -> rast (N, H, W, 4)
    interpolate(attr, rast, tri, backend="auto") -> (N, H, W, C)
    antialias(color, rast, pos_clip, tri, backend="auto") -> (N, H, W, C)
    texture_sample(texture, uv, backend="auto") -> (N, H, W, C)
    render_mesh(vertices, faces, cameras, width, height, ...) -> MeshRender

Images: row 0 is the top (NDC y = +1), as everywhere in the pack
(:mod:`mpod_core.cameras`). Note that ``mpod_core.render.rasterize`` is the
function; the torch backend module is reached with
``from mpod_core.render.rasterize import rasterize_torch`` (or
``importlib.import_module("mpod_core.render.rasterize")``).
"""
from .mesh_renderer import MeshRender, face_normals, render_mesh
from .ops import BACKENDS, antialias, interpolate, rasterize, texture_sample

__all__ = ["BACKENDS", "MeshRender", "antialias", "face_normals", "interpolate", "rasterize",
           "render_mesh", "texture_sample"]
