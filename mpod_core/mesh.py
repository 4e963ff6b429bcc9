"""Mesh container helpers over ``trimesh.Trimesh``.

Meshes travel between nodes as ``trimesh.Trimesh`` objects (type name
``TRIMESH`` in the graph). Appearance lives in ``mesh.visual``: either
per-vertex colours (``ColorVisuals``) or per-vertex UVs with a texture image
(``TextureVisuals``). This module loads, validates, normalises, converts to
torch tensors for rendering, and saves meshes atomically. It never imports
ComfyUI.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import trimesh
from PIL import Image

#: File extensions :func:`load_mesh` reads (lower case, with the dot).
LOAD_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl")
#: Formats :func:`save_mesh` writes.
SAVE_FORMATS = ("glb", "obj", "ply")


class MeshError(ValueError):
    """A mesh that cannot be used: missing file, unsupported format, no faces."""


@dataclass
class MeshTensors:
    """A mesh as torch tensors, ready for :func:`mpod_core.render.render_mesh`.

    Attributes:
        vertices: (V, 3) float positions.
        faces: (F, 3) int64 vertex indices.
        vertex_colors: (V, 3) float RGB in [0, 1], or None.
        uv: (V, 2) float texture coordinates (glTF/trimesh: v = 0 at the image bottom), or None.
        texture: (Ht, Wt, 3) float RGB in [0, 1], or None (set together with ``uv``).
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_colors: Optional[torch.Tensor] = None
    uv: Optional[torch.Tensor] = None
    texture: Optional[torch.Tensor] = None


def check_mesh(mesh, name: str = "mesh") -> trimesh.Trimesh:
    """Raise :class:`MeshError` unless ``mesh`` is a Trimesh with finite vertices and at least one face."""
    if not isinstance(mesh, trimesh.Trimesh):
        raise MeshError(f"{name}: expected a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.faces) == 0 or len(mesh.vertices) == 0:
        raise MeshError(f"{name}: the mesh is empty ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces)")
    if not np.isfinite(np.asarray(mesh.vertices)).all():
        raise MeshError(f"{name}: vertex positions contain NaN or infinity")
    if int(np.asarray(mesh.faces).max()) >= len(mesh.vertices) or int(np.asarray(mesh.faces).min()) < 0:
        raise MeshError(f"{name}: face indices out of range for {len(mesh.vertices)} vertices")
    return mesh


def load_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Load a mesh file as one ``trimesh.Trimesh`` (scenes are flattened with their transforms).

    Vertex order is kept (no merging), so colours and UVs stay attached.

    Raises:
        MeshError: the file is missing, its extension is not one of :data:`LOAD_EXTENSIONS`,
            it cannot be parsed, or it holds no triangles.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in LOAD_EXTENSIONS:
        raise MeshError(f"unsupported mesh file '{path.name}': expected one of {', '.join(LOAD_EXTENSIONS)}")
    if not path.is_file():
        raise MeshError(f"mesh file not found: {path}")
    try:
        loaded = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise MeshError(f"could not read mesh file '{path.name}': {exc}") from exc
    if not isinstance(loaded, trimesh.Trimesh):
        raise MeshError(f"'{path.name}' holds no triangle mesh (got {type(loaded).__name__})")
    return check_mesh(loaded, f"'{path.name}'")


def normalize_mesh(mesh: trimesh.Trimesh, size: float = 1.0) -> trimesh.Trimesh:
    """Centre the bounding box at the origin and scale its longest side to ``size``.

    ``size = 1`` fits the mesh in the unit cube [-0.5, 0.5]^3. Returns a copy.
    """
    check_mesh(mesh)
    if size <= 0:
        raise MeshError(f"normalisation size must be > 0, got {size}")
    out = mesh.copy()
    lo, hi = out.bounds
    extent = float((hi - lo).max())
    if extent <= 0:
        raise MeshError("the mesh has zero extent (all vertices coincide); it cannot be normalised")
    out.apply_translation(-(lo + hi) / 2)
    out.apply_scale(size / extent)
    return out


def _material_texture(material) -> Optional[Image.Image]:
    """The base colour image of a trimesh material, or None."""
    image = getattr(material, "baseColorTexture", None)
    if image is None:
        image = getattr(material, "image", None)
    return image if isinstance(image, Image.Image) else None


def _material_color(material) -> Optional[np.ndarray]:
    """The base colour factor of a material as RGBA in [0, 1], or None."""
    factor = getattr(material, "baseColorFactor", None)
    if factor is None:
        factor = getattr(material, "main_color", None)
    if factor is None:
        return None
    factor = np.asarray(factor, dtype=np.float64).reshape(-1)
    return factor / 255.0 if factor.max() > 1.0 else factor


def mesh_to_tensors(mesh: trimesh.Trimesh, device=None, dtype: torch.dtype = torch.float32) -> MeshTensors:
    """Convert a Trimesh to tensors, keeping its appearance.

    A UV texture becomes ``uv`` + ``texture`` (multiplied by a glTF material's base
    colour factor); a material without an image becomes a constant vertex colour;
    vertex or face colours become ``vertex_colors``. Alpha is dropped.
    """
    check_mesh(mesh)
    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=dtype, device=device)
    faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64, device=device)
    out = MeshTensors(verts, faces)
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        material = getattr(visual, "material", None)
        image = _material_texture(material)
        factor = _material_color(material)
        if image is not None and visual.uv is not None and len(visual.uv) == len(mesh.vertices):
            tex = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            # glTF multiplies the texture by baseColorFactor; OBJ's Kd beside a map_Kd is
            # ignored by common viewers (and trimesh writes a grey 0.4 there), so only PBR.
            if factor is not None and isinstance(material, trimesh.visual.material.PBRMaterial):
                tex = tex * factor[:3].astype(np.float32)
            out.uv = torch.as_tensor(np.asarray(visual.uv), dtype=dtype, device=device)
            out.texture = torch.as_tensor(tex, dtype=dtype, device=device)
        elif factor is not None:
            out.vertex_colors = torch.as_tensor(factor[:3], dtype=dtype, device=device).expand(len(verts), 3).clone()
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind in ("vertex", "face"):
        colors = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
        out.vertex_colors = torch.as_tensor(colors, dtype=dtype, device=device)
    return out


def tensors_to_mesh(vertices: torch.Tensor, faces: torch.Tensor,
                    vertex_colors: Optional[torch.Tensor] = None) -> trimesh.Trimesh:
    """Build a Trimesh from (V, 3) vertices, (F, 3) faces and optional (V, 3|4) colours in [0, 1]."""
    if vertices.dim() != 2 or vertices.shape[-1] != 3:
        raise MeshError(f"vertices: expected (V, 3), got {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise MeshError(f"faces: expected (F, 3), got {tuple(faces.shape)}")
    kwargs = {}
    if vertex_colors is not None:
        if vertex_colors.shape[0] != vertices.shape[0]:
            raise MeshError(f"vertex_colors: expected {vertices.shape[0]} rows, got {vertex_colors.shape[0]}")
        kwargs["vertex_colors"] = (vertex_colors.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    mesh = trimesh.Trimesh(vertices.detach().cpu().double().numpy(), faces.detach().cpu().numpy(),
                           process=False, **kwargs)
    return check_mesh(mesh)


def _with_pbr_material(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The mesh with a plain UV texture expressed as a glTF PBR material.

    trimesh's ``SimpleMaterial`` carries a grey 0.4 diffuse colour that its glTF
    exporter writes as ``baseColorFactor`` (and metallic 1), which darkens the
    texture in every viewer. A texture that came without a PBR material is
    exported as base colour x 1, non-metallic, fully rough instead.
    """
    visual = mesh.visual
    if not isinstance(visual, trimesh.visual.TextureVisuals):
        return mesh
    material = getattr(visual, "material", None)
    if isinstance(material, trimesh.visual.material.PBRMaterial):
        return mesh
    image = _material_texture(material)
    if image is None:
        return mesh
    out = mesh.copy()
    out.visual = trimesh.visual.TextureVisuals(
        uv=visual.uv, material=trimesh.visual.material.PBRMaterial(
            baseColorTexture=image, baseColorFactor=[255, 255, 255, 255],
            metallicFactor=0.0, roughnessFactor=1.0))
    return out


def bake_texture_to_vertex_colors(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy whose UV texture is sampled at the vertices into vertex colours (for PLY)."""
    out = mesh.copy()
    if isinstance(out.visual, trimesh.visual.TextureVisuals):
        out.visual = out.visual.to_color()
    return out


def _atomic_write(files: dict[Path, bytes]) -> None:
    """Write several files so that none is ever seen half-written.

    Each file is written to a temporary name in its own folder and renamed into
    place only after every file of the set has been written; on any error the
    temporaries are removed and no target is touched.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for target, data in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            temps.append((tmp, target))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, target in temps:
            os.replace(tmp, target)
        temps = []
    finally:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def export_mesh_bytes(mesh: trimesh.Trimesh, file_format: str, stem: str = "mesh") -> dict[str, bytes]:
    """Serialise a mesh; returns {file name: bytes} (OBJ adds its .mtl and texture files).

    Args:
        mesh: the mesh (vertex colours and UV textures are kept where the format allows;
            PLY gets a texture baked into vertex colours).
        file_format: one of :data:`SAVE_FORMATS`.
        stem: file name without extension.
    """
    check_mesh(mesh)
    fmt = file_format.lower().lstrip(".")
    if fmt not in SAVE_FORMATS:
        raise MeshError(f"unsupported save format '{file_format}': expected one of {', '.join(SAVE_FORMATS)}")
    if fmt == "glb":
        return {f"{stem}.glb": _with_pbr_material(mesh).export(file_type="glb")}
    if fmt == "ply":
        return {f"{stem}.ply": trimesh.exchange.ply.export_ply(bake_texture_to_vertex_colors(mesh), encoding="binary")}
    text, extra = trimesh.exchange.obj.export_obj(
        mesh, include_color=True, include_texture=True, return_texture=True, mtl_name=f"{stem}.mtl")
    # trimesh names texture images after the material ("material_0.png"); prefix them
    # with the stem so two OBJs saved in one folder never overwrite each other's textures.
    renames = {name: f"{stem}_{name}" for name in extra if not name.endswith(".mtl")}
    files = {f"{stem}.obj": text.encode("utf-8")}
    for name, data in extra.items():
        if name.endswith(".mtl"):
            mtl = data.decode("utf-8")
            for old, new in renames.items():
                mtl = mtl.replace(old, new)
            files[name] = mtl.encode("utf-8")
        else:
            files[renames[name]] = data
    return files


def save_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike, file_format: Optional[str] = None) -> list[Path]:
    """Save a mesh atomically; returns the written paths, the mesh file first.

    Args:
        mesh: mesh to save.
        path: target file; its suffix gives the format unless ``file_format`` is given.
        file_format: one of :data:`SAVE_FORMATS`.
    """
    path = Path(path)
    fmt = (file_format or path.suffix).lower().lstrip(".")
    files = export_mesh_bytes(mesh, fmt, stem=path.stem)
    main = path.parent / f"{path.stem}.{fmt}"
    # Companions (.mtl, textures) are moved in first and the mesh file last, so a
    # mesh file that exists always has everything it refers to.
    targets = {path.parent / name: data for name, data in files.items() if path.parent / name != main}
    targets[main] = files[main.name]
    _atomic_write(targets)
    return [main] + [p for p in targets if p != main]

