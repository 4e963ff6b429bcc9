"""Mesh container helpers over ``trimesh.Trimesh`` and ``trimesh.Scene``.

Meshes travel between nodes as ``trimesh.Trimesh`` objects (type name
``TRIMESH`` in the graph); a value of that type may also be a
``trimesh.Scene`` of several named objects (REPARO's composed layout), each
node holding one Trimesh placed by its transform. Appearance lives in
``mesh.visual``: either per-vertex colours (``ColorVisuals``) or per-vertex
UVs with a texture image (``TextureVisuals``). This module loads, validates,
normalises, composes and flattens scenes, converts to torch tensors for
rendering, and saves meshes atomically. It never imports ComfyUI.
"""
from __future__ import annotations

import os
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import trimesh
from PIL import Image

from .atomic import atomic_write

#: File extensions :func:`load_mesh` reads (lower case, with the dot).
LOAD_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl")
#: Formats :func:`save_mesh` writes.
SAVE_FORMATS = ("glb", "obj", "ply")
#: Node names :func:`compose_scene` gives objects without a name: object_00, object_01, ...
DEFAULT_OBJECT_NAME = "object_{:02d}"


def object_name(index: int) -> str:
    """The name of object ``index`` (0-based) in every output and message: object_00, object_01, ..."""
    return DEFAULT_OBJECT_NAME.format(index)
#: RGBA in [0, 1] that :func:`flatten_scene` gives uncoloured objects flattened together with
#: coloured or textured ones (the renderer's plain grey).
UNCOLORED_RGBA = (0.8, 0.8, 0.8, 1.0)
#: Texels of wrap-around padding around each image in a flattened scene's texture atlas
#: (bilinear sampling reads at most one texel beyond an image's edge).
ATLAS_PADDING = 2

#: What a TRIMESH value may be.
MeshLike = Union[trimesh.Trimesh, trimesh.Scene]


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


def _check_trimesh(mesh, name: str) -> trimesh.Trimesh:
    if not isinstance(mesh, trimesh.Trimesh):
        raise MeshError(f"{name}: expected a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.faces) == 0 or len(mesh.vertices) == 0:
        raise MeshError(f"{name}: the mesh is empty ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces)")
    if not np.isfinite(np.asarray(mesh.vertices)).all():
        raise MeshError(f"{name}: vertex positions contain NaN or infinity")
    if int(np.asarray(mesh.faces).max()) >= len(mesh.vertices) or int(np.asarray(mesh.faces).min()) < 0:
        raise MeshError(f"{name}: face indices out of range for {len(mesh.vertices)} vertices")
    return mesh


def check_mesh(mesh, name: str = "mesh") -> MeshLike:
    """Raise :class:`MeshError` unless ``mesh`` is a usable TRIMESH value; returns it.

    A ``trimesh.Trimesh`` needs finite vertices and at least one face; a
    ``trimesh.Scene`` needs at least one object, every object a Trimesh that
    passes the same check (the error names the node), and finite transforms.
    """
    if isinstance(mesh, trimesh.Scene):
        scene_objects(mesh, name)
        return mesh
    if not isinstance(mesh, trimesh.Trimesh):
        raise MeshError(f"{name}: expected a trimesh.Trimesh or trimesh.Scene, got {type(mesh).__name__}")
    return _check_trimesh(mesh, name)


class SceneMesh(NamedTuple):
    """One object of a scene: its node name, its mesh (not copied, in its own frame) and the
    (4, 4) transform from that frame to the world."""

    name: str
    mesh: trimesh.Trimesh
    transform: np.ndarray


def scene_objects(scene: trimesh.Scene, name: str = "scene") -> list[SceneMesh]:
    """The objects of a scene, checked: one :class:`SceneMesh` per node that holds a geometry.

    Order: the order of the scene's geometries (the order they were added, or the
    mesh order of a loaded glTF), then the order of the nodes. A node hierarchy is
    resolved into world transforms.

    Raises:
        MeshError: the scene holds no object, a node's geometry is not a Trimesh with
            faces, or a transform is not finite; the message names the node.
    """
    if not isinstance(scene, trimesh.Scene):
        raise MeshError(f"{name}: expected a trimesh.Scene, got {type(scene).__name__}")
    nodes = list(scene.graph.nodes_geometry)
    if not nodes:
        raise MeshError(f"{name}: the scene is empty (no object)")
    geometry_rank = {key: i for i, key in enumerate(scene.geometry)}
    out = []
    for node in nodes:
        transform, geometry_name = scene.graph[node]
        geometry = scene.geometry.get(geometry_name)
        where = f"{name}: object '{node}'"
        if not isinstance(geometry, trimesh.Trimesh):
            raise MeshError(f"{where} holds a {type(geometry).__name__}, not a triangle mesh")
        _check_trimesh(geometry, where)
        transform = np.asarray(transform, dtype=np.float64)
        if transform.shape != (4, 4) or not np.isfinite(transform).all():
            raise MeshError(f"{where}: its transform is not a finite 4x4 matrix")
        out.append((geometry_rank.get(geometry_name, len(geometry_rank)), len(out),
                    SceneMesh(str(node), geometry, transform)))
    return [item for *_, item in sorted(out, key=lambda t: t[:2])]


def mesh_list(values: Sequence, what: str = "meshes") -> list[trimesh.Trimesh]:
    """A node's mesh input as a flat list of meshes: each connected value checked (``None`` skipped),
    and a single Scene standing for its objects (each moved to its place in the scene).

    Raises:
        MeshError: a value is not a mesh (named by its position, as ``what: object_01``).
    """
    meshes = [m for m in values if m is not None]
    if len(meshes) == 1 and isinstance(meshes[0], trimesh.Scene):
        return [obj.mesh.copy().apply_transform(obj.transform) for obj in scene_objects(meshes[0], what)]
    names = object_names(None, len(meshes))
    return [check_mesh(m, f"{what}: {names[i]}") for i, m in enumerate(meshes)]


def _unique_names(names: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    """``names`` with repeats (and ``reserved`` ones) suffixed _2, _3, ... to make them unique."""
    taken = set(reserved)
    out = []
    for base in names:
        candidate, k = base, 1
        while candidate in taken:
            k += 1
            candidate = f"{base}_{k}"
        taken.add(candidate)
        out.append(candidate)
    return out


def object_names(names: Union[None, str, Sequence[str]], count: int) -> list[str]:
    """Node names for ``count`` objects.

    Args:
        names: None or empty for :data:`DEFAULT_OBJECT_NAME` names, a comma-separated
            string, or a sequence of strings; blank entries get the default name of
            their position, repeats get a suffix (_2, _3, ...).
        count: number of objects.

    Raises:
        MeshError: ``names`` gives a different number of names than ``count``.
    """
    if isinstance(names, str):
        names = names.split(",") if names.strip() else None
    names = [str(n).strip() for n in names] if names else []
    if not names:
        names = [""] * count
    if len(names) != count:
        raise MeshError(f"{len(names)} object names given for {count} meshes: give one name per mesh, "
                        "comma separated, or none for object_00, object_01, ...")
    return _unique_names([n or DEFAULT_OBJECT_NAME.format(i) for i, n in enumerate(names)], reserved=("world",))


def compose_scene(meshes: Sequence[MeshLike], names: Union[None, str, Sequence[str]] = None,
                  transforms: Optional[Sequence] = None) -> trimesh.Scene:
    """A scene with one named node per mesh.

    Args:
        meshes: K >= 1 meshes; a Scene among them is flattened into one object
            (:func:`flatten_scene`). The inputs are copied, never modified.
        names: node (and mesh) names, see :func:`object_names`; default object_00, object_01, ...
        transforms: optional K (4, 4) placements (mesh frame -> world); default identity.

    Returns:
        A ``trimesh.Scene`` whose node ``names[i]`` holds geometry ``names[i]``.

    Raises:
        MeshError: no meshes, a bad mesh (named by position and name), a name count
            or transform that does not fit.
    """
    meshes = list(meshes)
    if not meshes:
        raise MeshError("compose_scene: no meshes given")
    node_names = object_names(names, len(meshes))
    if transforms is not None and len(transforms) != len(meshes):
        raise MeshError(f"compose_scene: {len(transforms)} transforms for {len(meshes)} meshes")
    scene = trimesh.Scene()
    for i, (mesh, node) in enumerate(zip(meshes, node_names)):
        where = f"compose_scene: {node}"
        check_mesh(mesh, where)
        geometry = flatten_scene(mesh) if isinstance(mesh, trimesh.Scene) else mesh.copy()
        transform = np.eye(4) if transforms is None else np.asarray(transforms[i], dtype=np.float64)
        if transform.shape != (4, 4) or not np.isfinite(transform).all():
            raise MeshError(f"{where}: transform must be a finite (4, 4) matrix, got shape {transform.shape}")
        scene.add_geometry(geometry, node_name=node, geom_name=node, transform=transform)
    return scene


def _placed(obj: SceneMesh) -> trimesh.Trimesh:
    """A copy of the object's mesh moved to its world position."""
    mesh = obj.mesh.copy()
    if not np.array_equal(obj.transform, np.eye(4)):
        mesh.apply_transform(obj.transform)
    return mesh


def flatten_scene(mesh: MeshLike) -> trimesh.Trimesh:
    """One Trimesh with every object of a scene at its world position.

    A Trimesh is returned as is (not copied); a one-object scene gives a copy of
    that object, transformed, with its visual untouched. Several objects are
    concatenated in :func:`scene_objects` order (vertex count = the sum, vertex
    order kept within each object), and their appearance is merged:

    - no object textured: vertex colours (exact); an uncoloured object among coloured
      ones gets :data:`UNCOLORED_RGBA`; none coloured: no colours;
    - some textured, every other object one uniform colour (or uncoloured): one texture
      atlas (the images stacked with wrap-around padding, each multiplied by its glTF
      base colour factor; a 1x1 patch per uniform colour), UVs remapped so that bilinear
      sampling with wrap addressing reads exactly what it read before;
    - textured objects with objects whose vertex colours vary: every texture is sampled
      at its vertices into vertex colours.

    Lost: several materials (one per object) become one; alpha of textures; metallic,
    roughness, normal and emissive maps; vertex colours inside faces of textured
    objects in the last case (texture detail there); UVs outside [0, 1] are wrapped
    per vertex, exact only when each face stays inside one repeat of its texture; the
    node names (only :func:`export_mesh_bytes`'s OBJ keeps them as ``o`` groups).
    """
    check_mesh(mesh)
    if isinstance(mesh, trimesh.Trimesh):
        return mesh
    objects = scene_objects(mesh)
    placed = [_placed(obj) for obj in objects]
    if len(placed) == 1:
        return placed[0]
    offsets = np.cumsum([0] + [len(m.vertices) for m in placed])
    vertices = np.concatenate([np.asarray(m.vertices, dtype=np.float64) for m in placed])
    faces = np.concatenate([np.asarray(m.faces, dtype=np.int64) + off for m, off in zip(placed, offsets)])
    looks = [_appearance(m) for m in placed]
    kinds = {kind for kind, _ in looks}
    if kinds == {"none"}:
        visual = None
    elif "texture" not in kinds:
        visual = trimesh.visual.ColorVisuals(vertex_colors=_to_uint8(np.concatenate(
            [_look_colors(look, len(m.vertices)) for look, m in zip(looks, placed)])))
    elif any(kind == "colors" and not _uniform(data) for kind, data in looks):
        visual = trimesh.visual.ColorVisuals(vertex_colors=_to_uint8(np.concatenate(
            [_bake(look) if look[0] == "texture" else _look_colors(look, len(m.vertices))
             for look, m in zip(looks, placed)])))
    else:
        uv, atlas = _atlas(looks, [len(m.vertices) for m in placed])
        visual = trimesh.visual.TextureVisuals(uv=uv, material=trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(_to_uint8(atlas)), baseColorFactor=[255, 255, 255, 255],
            metallicFactor=0.0, roughnessFactor=1.0))
    out = trimesh.Trimesh(vertices, faces, process=False)
    if visual is not None:
        out.visual = visual
    return _check_trimesh(out, "flattened scene")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return (np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8)


def _uniform(colors: np.ndarray) -> bool:
    return bool(np.all(colors[:, :3] == colors[:1, :3]))


def _look_colors(look, n_vertices: int) -> np.ndarray:
    """(V, 4) RGBA in [0, 1] of a non-textured appearance."""
    kind, data = look
    if kind == "colors":
        return data
    return np.tile(np.asarray(UNCOLORED_RGBA, dtype=np.float32), (n_vertices, 1))


def _bake(look) -> np.ndarray:
    """(V, 4) colours of a textured appearance sampled at its vertices like the renderer does."""
    from .render import texture_sample  # the renderer's own lookup (bilinear, wrap)

    _, (uv, texture) = look
    sampled = texture_sample(torch.as_tensor(texture, dtype=torch.float64),
                             torch.as_tensor(uv, dtype=torch.float64)[None, None], backend="torch")[0, 0]
    return np.concatenate([sampled.numpy(), np.ones((len(uv), 1))], axis=1).astype(np.float32)


def _atlas(looks, n_vertices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stack the textures (and 1x1 patches of uniform colours) into one image; returns
    (sum V, 2) remapped UVs and the (H, W, 3) atlas. Identical textures share one block."""
    pad = ATLAS_PADDING
    blocks: list[np.ndarray] = []
    block_of: dict[bytes, int] = {}
    placements = []  # per object: block index and its UVs in [0, 1]
    for look, n in zip(looks, n_vertices):
        kind, data = look
        if kind == "texture":
            uv, image = data
            uv = np.asarray(uv, dtype=np.float64).copy()
            outside = (uv < 0) | (uv > 1)
            uv[outside] -= np.floor(uv[outside])
        else:
            image = _look_colors(look, n)[:1, :3].reshape(1, 1, 3)
            uv = np.full((n, 2), 0.5)
        image = np.ascontiguousarray(image, dtype=np.float32)
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).digest()
        if key not in block_of:
            block_of[key] = len(blocks)
            blocks.append(image)
        placements.append((block_of[key], uv))
    width = max(b.shape[1] for b in blocks) + 2 * pad
    tops = np.cumsum([0] + [b.shape[0] + 2 * pad for b in blocks])
    atlas = np.zeros((int(tops[-1]), width, 3), dtype=np.float32)
    for block, top in zip(blocks, tops):
        h, w = block.shape[:2]
        atlas[top:top + h + 2 * pad, :w + 2 * pad] = np.pad(block, ((pad, pad), (pad, pad), (0, 0)), mode="wrap")
    uvs = []
    for index, uv in placements:
        h, w = blocks[index].shape[:2]
        x = pad + uv[:, 0] * w                   # texel units: the same position inside the block
        y = tops[index] + pad + (1 - uv[:, 1]) * h  # rows from the top of the atlas
        uvs.append(np.stack([x / width, 1 - y / atlas.shape[0]], axis=1))
    return np.concatenate(uvs), atlas


def _appearance(mesh: trimesh.Trimesh):
    """A mesh's colour as ("texture", (uv (V, 2), image (H, W, 3) float32)), ("colors",
    (V, 4) float32 RGBA) or ("none", None); values in [0, 1].

    A UV texture is multiplied by a glTF material's base colour factor; a material
    without an image gives its factor as a constant colour.
    """
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
            return "texture", (np.asarray(visual.uv, dtype=np.float64), tex)
        if factor is not None:
            rgba = np.concatenate([factor[:4], np.ones(4 - min(len(factor), 4))]).astype(np.float32)
            return "colors", np.tile(rgba, (len(mesh.vertices), 1))
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind in ("vertex", "face"):
        return "colors", np.asarray(visual.vertex_colors, dtype=np.float32) / 255.0
    return "none", None


def load_mesh(path: str | os.PathLike, keep_objects: bool = False) -> MeshLike:
    """Load a mesh file as one ``trimesh.Trimesh``, or as a Scene of its objects.

    Vertex order is kept (no merging), so colours and UVs stay attached. Geometry
    other than triangle meshes (points, lines) and objects without faces are skipped.

    Args:
        path: a file with one of :data:`LOAD_EXTENSIONS`.
        keep_objects: return a ``trimesh.Scene`` with one node per object of the file
            (its node names, world transforms; a hierarchy is resolved to one level)
            instead of one mesh with the objects' transforms applied
            (:func:`flatten_scene`, the default).

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
        loaded = trimesh.load(str(path), force="scene", process=False)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise MeshError(f"could not read mesh file '{path.name}': {exc}") from exc
    scene = trimesh.Scene()
    geometry_rank = {key: i for i, key in enumerate(loaded.geometry)}
    nodes = sorted(loaded.graph.nodes_geometry, key=lambda n: geometry_rank.get(loaded.graph[n][1], 0))
    for node, name in zip(nodes, _unique_names([str(n) for n in nodes], reserved=("world",))):
        transform, geometry_name = loaded.graph[node]
        geometry = loaded.geometry.get(geometry_name)
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) and len(geometry.vertices):
            scene.add_geometry(geometry, node_name=name, geom_name=name, transform=transform)
    if not scene.graph.nodes_geometry:
        raise MeshError(f"'{path.name}' holds no triangle mesh")
    check_mesh(scene, f"'{path.name}'")
    return scene if keep_objects else flatten_scene(scene)


def _normalization(bounds: np.ndarray, size: float) -> np.ndarray:
    """(4, 4) matrix that centres ``bounds`` at the origin and scales its longest side to ``size``."""
    if size <= 0:
        raise MeshError(f"normalisation size must be > 0, got {size}")
    lo, hi = bounds
    extent = float((hi - lo).max())
    if extent <= 0:
        raise MeshError("the mesh has zero extent (all vertices coincide); it cannot be normalised")
    matrix = np.eye(4)
    matrix[:3, :3] *= size / extent
    matrix[:3, 3] = -(lo + hi) / 2 * (size / extent)
    return matrix


def normalize_mesh(mesh: MeshLike, size: float = 1.0) -> MeshLike:
    """Centre the bounding box at the origin and scale its longest side to ``size``.

    ``size = 1`` fits the mesh in the unit cube [-0.5, 0.5]^3. Returns a copy; a Scene
    stays a Scene (the same move and scale for every object, composed into its transform).
    """
    check_mesh(mesh)
    if isinstance(mesh, trimesh.Scene):
        objects = scene_objects(mesh)
        world = np.concatenate([trimesh.transformations.transform_points(o.mesh.vertices, o.transform)
                                for o in objects])
        matrix = _normalization(np.stack([world.min(0), world.max(0)]), size)
        return compose_scene([o.mesh for o in objects], [o.name for o in objects],
                             [matrix @ o.transform for o in objects])
    matrix = _normalization(mesh.bounds, size)
    out = mesh.copy()
    out.apply_transform(matrix)
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


def mesh_to_tensors(mesh: MeshLike, device=None, dtype: torch.dtype = torch.float32) -> MeshTensors:
    """Convert a Trimesh (or a Scene, flattened by :func:`flatten_scene`) to tensors,
    keeping its appearance.

    A UV texture becomes ``uv`` + ``texture`` (multiplied by a glTF material's base
    colour factor); a material without an image becomes a constant vertex colour;
    vertex or face colours become ``vertex_colors``. Alpha is dropped.
    """
    mesh = flatten_scene(mesh)
    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=dtype, device=device)
    faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64, device=device)
    out = MeshTensors(verts, faces)
    kind, data = _appearance(mesh)
    if kind == "texture":
        out.uv = torch.as_tensor(data[0], dtype=dtype, device=device)
        out.texture = torch.as_tensor(data[1], dtype=dtype, device=device)
    elif kind == "colors":
        out.vertex_colors = torch.as_tensor(data[:, :3], dtype=dtype, device=device)
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


def _is_trs(matrix: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether a 4x4 matrix is translation x rotation x scale, as a glTF node matrix must be."""
    if not np.allclose(matrix[3], [0, 0, 0, 1], atol=tol):
        return False
    linear = matrix[:3, :3]
    gram = linear.T @ linear  # diagonal iff the columns are orthogonal (no shear)
    off = gram - np.diag(np.diag(gram))
    return bool(np.abs(off).max() <= tol * max(float(np.abs(gram).max()), 1e-30)) and abs(np.linalg.det(linear)) > 0


def _gltf_scene(scene: trimesh.Scene) -> trimesh.Scene:
    """The scene as glTF will store it: one node per object under the root, node and mesh
    named after the object, textures as PBR materials; a transform glTF cannot store
    (shear, projection) is baked into the vertices."""
    out = trimesh.Scene()
    for obj in scene_objects(scene):
        geometry, transform = _with_pbr_material(obj.mesh), obj.transform
        if not _is_trs(transform):
            geometry, transform = _placed(SceneMesh(obj.name, geometry, transform)), np.eye(4)
        out.add_geometry(geometry, node_name=obj.name, geom_name=obj.name, transform=transform)
    return out


def _obj_object_groups(text: str, names: Sequence[str], face_counts: Sequence[int]) -> str:
    """Insert one ``o name`` line (and the current ``usemtl``) before each object's faces in
    the OBJ text of a flattened scene, so tools that split by object (Blender) see them."""
    lines = text.split("\n")
    usemtl = next((line for line in lines if line.startswith("usemtl ")), None)
    starts = {}
    first_face = next(i for i, line in enumerate(lines) if line.startswith("f "))
    offset = 0
    for name, count in zip(names, face_counts):
        starts[first_face + offset] = name
        offset += count
    out = []
    for i, line in enumerate(lines):
        if i in starts:
            out.append(f"o {starts[i]}")
            if usemtl:
                out.append(usemtl)
        out.append(line)
    return "\n".join(out)


def export_mesh_bytes(mesh: MeshLike, file_format: str, stem: str = "mesh") -> dict[str, bytes]:
    """Serialise a mesh or a scene; returns {file name: bytes} (OBJ adds its .mtl and texture files).

    Args:
        mesh: a Trimesh (vertex colours and UV textures are kept where the format allows;
            PLY gets a texture baked into vertex colours) or a Scene. GLB keeps a scene's
            objects: one node per object, node and mesh named after it, its transform
            (baked into the vertices if glTF cannot store it), its own colours or texture.
            OBJ and PLY store the scene flattened into one mesh (:func:`flatten_scene`);
            OBJ adds one ``o <name>`` group per object.
        file_format: one of :data:`SAVE_FORMATS`.
        stem: file name without extension.
    """
    check_mesh(mesh)
    fmt = file_format.lower().lstrip(".")
    if fmt not in SAVE_FORMATS:
        raise MeshError(f"unsupported save format '{file_format}': expected one of {', '.join(SAVE_FORMATS)}")
    if fmt == "glb":
        if isinstance(mesh, trimesh.Scene):
            return {f"{stem}.glb": _gltf_scene(mesh).export(file_type="glb")}
        return {f"{stem}.glb": _with_pbr_material(mesh).export(file_type="glb")}
    objects = scene_objects(mesh) if isinstance(mesh, trimesh.Scene) else None
    mesh = flatten_scene(mesh)
    if fmt == "ply":
        return {f"{stem}.ply": trimesh.exchange.ply.export_ply(bake_texture_to_vertex_colors(mesh), encoding="binary")}
    text, extra = trimesh.exchange.obj.export_obj(
        mesh, include_color=True, include_texture=True, return_texture=True, mtl_name=f"{stem}.mtl")
    if objects is not None:
        text = _obj_object_groups(text, [o.name for o in objects], [len(o.mesh.faces) for o in objects])
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


def save_mesh(mesh: MeshLike, path: str | os.PathLike, file_format: Optional[str] = None) -> list[Path]:
    """Save a mesh or a scene atomically; returns the written paths, the mesh file first.

    Args:
        mesh: mesh or scene to save (see :func:`export_mesh_bytes` for what each format keeps).
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
    atomic_write(targets)
    return [main] + [p for p in targets if p != main]

