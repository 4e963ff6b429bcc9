"""Tests for mpod_core.texture_bake: known colours read back through the baked texture
(with controls that must fail: flipped v, mismatched barycentrics), texel-centre convention,
coverage of every face, padding, GLB round trips (raw glTF accessors, trimesh, Save Mesh's
writer), chunk bounds, the vertex-colour fallback and errors."""
from __future__ import annotations

import importlib.util
import io
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image

from mpod_core import mesh as meshlib
from mpod_core import texture_bake as tb
from mpod_core.render import texture_sample

F64 = torch.float64
SIZE, PAD = 512, 4
needs_xatlas = pytest.mark.skipif(importlib.util.find_spec("xatlas") is None,
                                  reason="xatlas is not installed (pip install xatlas)")


def linear_colour(p: torch.Tensor) -> torch.Tensor:
    """c = (p + 1) / 2: the colour of a point on the unit sphere is its position."""
    return (p + 1) / 2


def wavy_colour(p: torch.Tensor) -> torch.Tensor:
    """A smooth non-linear colour (about 1.5 periods around the sphere)."""
    return 0.5 + 0.5 * torch.sin(3 * p + torch.tensor([0.0, 1.0, 2.0], dtype=p.dtype))


def sample(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup (the renderer's, trimesh's v convention) of (N, 2) uv -> (N, 3)."""
    return texture_sample(texture.to(F64), uv.to(F64)[None, None], backend="torch")[0, 0]


def random_surface_points(faces: torch.Tensor, n_per_face: int, seed: int = 0) -> torch.Tensor:
    """(F * n, 3) barycentric weights, uniform over each triangle, and the face of each."""
    g = torch.Generator().manual_seed(seed)
    r1 = torch.rand(faces.shape[0] * n_per_face, generator=g, dtype=F64).sqrt()
    r2 = torch.rand(faces.shape[0] * n_per_face, generator=g, dtype=F64)
    w = torch.stack([1 - r1, r1 * (1 - r2), r1 * r2], 1)
    face = torch.arange(faces.shape[0]).repeat_interleave(n_per_face)
    return w, face


def at(values: torch.Tensor, faces: torch.Tensor, w: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Per-vertex ``values`` interpolated at barycentric ``w`` of ``face``."""
    return torch.einsum("nk,nkd->nd", w, values.to(F64)[faces[face]])


@pytest.fixture(scope="module")
def sphere():
    m = trimesh.creation.icosphere(4)  # 5120 faces
    return torch.as_tensor(m.vertices), torch.as_tensor(m.faces)


@pytest.fixture(scope="module")
def unwrapped(sphere):
    if importlib.util.find_spec("xatlas") is None:
        pytest.skip("xatlas is not installed (pip install xatlas)")
    return tb.unwrap_uv(*sphere, resolution=SIZE, padding=PAD)


# ----------------------------------------------------------------------------- convention
def test_texel_centres_follow_the_trimesh_and_gltf_v_convention():
    # One quad over the whole UV square whose 3D position is (u, v, 0): the baked colour of
    # texel (row r, col c) is its centre's uv, row 0 the top of the image (v near 1).
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=F64)
    verts = torch.cat([uv, torch.zeros(4, 1, dtype=F64)], 1)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    h = 8
    tex = tb.bake_texture(verts, faces, uv, lambda p: p, size=h, padding=0)
    centres = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    assert torch.allclose(tex[..., 0], centres[None, :].expand(h, h), atol=1e-6)  # u along columns
    assert torch.allclose(tex[..., 1], (1 - centres)[:, None].expand(h, h), atol=1e-6)  # v = 1 at the top row
    assert (tb.rasterize_uv(uv, faces, h) >= 0).all()


def test_lower_left_triangle_lands_in_the_bottom_left_of_the_image():
    uv = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]], dtype=F64)
    ids = tb.rasterize_uv(uv, torch.tensor([[0, 1, 2]]), 16)
    rows, cols = (ids >= 0).nonzero().unbind(1)
    assert rows.min() >= 8 and cols.max() < 8 and rows.numel() > 20


# ----------------------------------------------------------------------------- known colours
@needs_xatlas
@pytest.mark.parametrize("colour_fn, tol", [(linear_colour, 2e-4), (wavy_colour, 5e-4)])
def test_texture_reproduces_the_colour_at_random_surface_points(unwrapped, colour_fn, tol):
    verts, faces, uv, _ = unwrapped
    tex = tb.bake_texture(verts, faces, uv, colour_fn, size=SIZE, padding=PAD)
    w, face = random_surface_points(faces, 4)
    want = colour_fn(at(verts, faces, w, face))
    err = (sample(tex, at(uv, faces, w, face)) - want).abs()
    assert err.mean() < tol, f"mean abs error {err.mean():.4g}"
    assert err.max() < 0.02, f"max abs error {err.max():.4g}"  # points next to seams read padding
    # Face centroids lie far from chart borders: a linear colour is exact up to float32 there.
    centroid_err = (sample(tex, uv[faces].mean(1)) - colour_fn(verts[faces].mean(1))).abs().mean()
    assert centroid_err < tol / 2

    # Control: reading with v flipped (the glTF-vs-OpenGL mistake) is far off.
    flipped = at(uv, faces, w, face) * torch.tensor([1.0, -1.0], dtype=F64) + torch.tensor([0.0, 1.0], dtype=F64)
    assert (sample(tex, flipped) - want).abs().mean() > 0.1


@needs_xatlas
def test_mismatched_barycentrics_control_fails(unwrapped):
    # Bake a mesh whose UV corners are rotated against its 3D corners (what wrong
    # barycentrics do): the texture no longer reproduces the colour.
    verts, faces, uv, _ = unwrapped
    soup_v = verts[faces].reshape(-1, 3)
    soup_uv = uv[faces[:, [1, 2, 0]]].reshape(-1, 2)
    soup_f = torch.arange(soup_v.shape[0]).view(-1, 3)
    tex = tb.bake_texture(soup_v, soup_f, soup_uv, linear_colour, size=SIZE, padding=PAD)
    w, face = random_surface_points(faces, 2)
    err = (sample(tex, at(uv, faces, w, face)) - linear_colour(at(verts, faces, w, face))).abs().mean()
    assert err > 10 * 2e-4  # 35x the tolerance above, though the triangles are small


# ----------------------------------------------------------------------------- unwrap, coverage, padding
@needs_xatlas
def test_unwrap_keeps_faces_winding_and_vertex_mapping(sphere, unwrapped):
    v0, f0 = sphere
    verts, faces, uv, vmap = unwrapped
    assert faces.shape == f0.shape and uv.shape == (verts.shape[0], 2)
    assert torch.equal(vmap[faces], f0)  # face i is input face i, corners in order
    assert torch.equal(verts, v0.to(verts.dtype)[vmap])
    assert verts.shape[0] > v0.shape[0]  # seams duplicate vertices


@needs_xatlas
def test_every_face_is_inside_the_unit_square_and_covers_texels(unwrapped):
    verts, faces, uv, _ = unwrapped
    assert uv.min() >= 0 and uv.max() <= 1
    ids = tb.rasterize_uv(uv, faces, SIZE)
    covered = torch.bincount(ids[ids >= 0], minlength=faces.shape[0])
    assert (covered > 0).all(), f"{int((covered == 0).sum())} faces have no texel"
    # Charts do not overlap: the covered texel count matches the UV area (to within edges).
    area = 0.5 * torch.linalg.det(torch.cat([uv[faces].double(), torch.ones(faces.shape[0], 3, 1, dtype=F64)], 2)).abs()
    assert abs(int((ids >= 0).sum()) / (float(area.sum()) * SIZE * SIZE) - 1) < 0.05


@needs_xatlas
def test_padding_fills_every_texel_within_padding_of_a_chart(unwrapped):
    verts, faces, uv, _ = unwrapped
    ids = tb.rasterize_uv(uv, faces, SIZE)
    mask = ids >= 0
    tex = tb.sample_texels(verts, faces, uv, ids, linear_colour)
    filled = tb.fill_padding(tex, mask, PAD, background=(1.0, 0.0, 1.0))
    near = F.max_pool2d(mask[None, None].float(), 2 * PAD + 1, stride=1, padding=PAD)[0, 0] > 0
    magenta = (filled == torch.tensor([1.0, 0.0, 1.0])).all(-1)
    assert int((magenta & near).sum()) == 0  # no background within PAD texels of a chart
    assert int(magenta.sum()) > 0 and int((near & ~mask).sum()) > 0  # there was background to fill
    assert torch.equal(filled[mask], tex[mask])  # covered texels unchanged
    # Bilinear reads anywhere on the surface see no background: a constant colour stays exact.
    const = tb.fill_padding(tb.sample_texels(verts, faces, uv, ids, lambda p: torch.full_like(p, 0.25)),
                            mask, PAD, background=(1.0, 0.0, 1.0))
    w, face = random_surface_points(faces, 4, seed=1)
    assert torch.allclose(sample(const, at(uv, faces, w, face)), torch.full((1,), 0.25, dtype=F64), atol=1e-6)
    # Without padding the same reads do catch the background at chart borders.
    bare = tb.fill_padding(tb.sample_texels(verts, faces, uv, ids, lambda p: torch.full_like(p, 0.25)),
                           mask, 0, background=(1.0, 0.0, 1.0))
    assert (sample(bare, at(uv, faces, w, face)) - 0.25).abs().max() > 0.1


def test_fill_padding_extends_each_chart_with_its_own_colour():
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[5:10, 5:10] = True
    mask[25:35, 20:30] = True
    tex = torch.zeros(40, 40, 3)
    tex[5:10, 5:10] = 0.2
    tex[25:35, 20:30] = 1.0
    out = tb.fill_padding(tex, mask, 3)
    assert torch.allclose(out[2:13, 2:13], torch.full((11, 11, 3), 0.2))  # Chebyshev ring of 3
    assert torch.allclose(out[22:38, 17:33], torch.ones(16, 16, 3))
    mean = (25 * 0.2 + 100 * 1.0) / 125  # beyond the ring: the mean covered colour
    assert torch.allclose(out[0, 39], torch.full((3,), mean))
    assert torch.allclose(out[14, 14], torch.full((3,), mean))


# ----------------------------------------------------------------------------- GLB
def _glb_parts(data: bytes):
    """(json dict, binary chunk) of a GLB, parsed by hand."""
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON"
    doc = json.loads(data[20:20 + json_len])
    bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
    assert bin_type == b"BIN\x00"
    return doc, data[28 + json_len:28 + json_len + bin_len]


def _accessor(doc, blob, index) -> np.ndarray:
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    n_comp = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[acc["type"]]
    dtype = {5126: np.float32, 5125: np.uint32, 5123: np.uint16}[acc["componentType"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    arr = np.frombuffer(blob, dtype=dtype, count=acc["count"] * n_comp, offset=start)
    return arr.reshape(acc["count"], n_comp)


@pytest.fixture(scope="module")
def textured():
    """(input mesh, its textured_mesh with the linear colour at 256^2)."""
    if importlib.util.find_spec("xatlas") is None:
        pytest.skip("xatlas is not installed (pip install xatlas)")
    m = trimesh.creation.icosphere(3)
    return m, tb.textured_mesh(m.vertices, m.faces, linear_colour, size=256)


def test_glb_samples_the_colours_under_gltfs_own_uv_convention(textured):
    _, mesh = textured
    doc, blob = _glb_parts(mesh.export(file_type="glb"))
    prim = doc["meshes"][0]["primitives"][0]
    pos = _accessor(doc, blob, prim["attributes"]["POSITION"]).astype(np.float64)
    uv = _accessor(doc, blob, prim["attributes"]["TEXCOORD_0"]).astype(np.float64)
    tri = _accessor(doc, blob, prim["indices"]).reshape(-1, 3).astype(np.int64)
    tex_index = doc["materials"][prim["material"]]["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    view = doc["bufferViews"][doc["images"][doc["textures"][tex_index]["source"]]["bufferView"]]
    image = Image.open(io.BytesIO(blob[view.get("byteOffset", 0):view.get("byteOffset", 0) + view["byteLength"]]))
    img = torch.as_tensor(np.asarray(image.convert("RGB"), dtype=np.float64) / 255)
    # glTF: uv (0, 0) is the image's top-left, so row = v * H (no flip); sample bilinearly
    # by converting to the renderer's convention explicitly.
    cuv = torch.as_tensor(uv[tri].mean(1))
    got = sample(img, torch.stack([cuv[:, 0], 1 - cuv[:, 1]], 1))
    want = linear_colour(torch.as_tensor(pos[tri].mean(1)))
    assert (got - want).abs().mean() < 3 / 255  # uint8 quantisation
    assert (sample(img, cuv) - want).abs().mean() > 0.05  # the v-flip mistake is visible


def test_glb_round_trip_through_trimesh_and_save_mesh(textured, tmp_path):
    m, mesh = textured
    assert isinstance(mesh.visual.material, trimesh.visual.material.PBRMaterial)
    assert mesh.visual.material.baseColorTexture.size == (256, 256)
    # Faces stay wound as given: each face's corners sit at the input corners, in order.
    assert np.allclose(mesh.vertices[mesh.faces], m.vertices[m.faces])

    back = trimesh.load(io.BytesIO(mesh.export(file_type="glb")), file_type="glb", force="mesh", process=False)
    tensors = meshlib.mesh_to_tensors(back, dtype=F64)
    assert tensors.texture is not None and tensors.uv is not None
    f = tensors.faces
    got = sample(tensors.texture, tensors.uv[f].mean(1))
    assert (got - linear_colour(tensors.vertices[f].mean(1))).abs().mean() < 3 / 255  # uint8 texture

    path = meshlib.save_mesh(mesh, tmp_path / "baked.glb")[0]  # what Save Mesh calls
    pygltflib = pytest.importorskip("pygltflib")
    gltf = pygltflib.GLTF2().load(str(path))
    pbr = gltf.materials[0].pbrMetallicRoughness
    assert pbr.baseColorTexture is not None and len(gltf.images) == 1
    assert gltf.meshes[0].primitives[0].attributes.TEXCOORD_0 is not None
    loaded = meshlib.load_mesh(path)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals) and len(loaded.faces) == len(m.faces)
    # The Khronos validator (what setup.sh --test installs) finds no error in the file.
    from harness.gltf import error_messages, validate_gltf, validator_unavailable_reason
    if validator_unavailable_reason() is None:
        report = validate_gltf(path)
        assert report["issues"]["numErrors"] == 0, error_messages(report)
        assert report["info"]["totalTriangleCount"] == len(m.faces)


# ----------------------------------------------------------------------------- chunks, fallback, errors
@needs_xatlas
def test_colour_fn_never_sees_more_than_chunk_points(unwrapped):
    verts, faces, uv, _ = unwrapped
    calls = []

    def spy(p):
        calls.append(p.shape[0])
        assert torch.is_tensor(p) and p.shape[1] == 3 and p.dtype == torch.float32 and not torch.is_grad_enabled()
        return linear_colour(p)

    steps = []
    tb.bake_texture(verts, faces, uv, spy, size=128, padding=2, chunk=1000,
                    progress=lambda done, total, preview: steps.append((done, total)))
    covered = int((tb.rasterize_uv(uv, faces, 128) >= 0).sum())
    assert max(calls) <= 1000 and sum(calls) == covered and len(calls) == -(-covered // 1000)
    assert steps[-1] == (covered, covered) and len(steps) == len(calls)
    calls.clear()
    tb.textured_mesh(verts, faces, spy, fallback="vertex_colors", chunk=700)
    assert max(calls) <= 700 and sum(calls) == verts.shape[0]


def test_vertex_colour_fallback_equals_colour_fn_at_the_vertices(monkeypatch):
    m = trimesh.creation.icosphere(2)
    # No xatlas needed: hide it and the fallback still works.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xatlas" else real(name, *a))
    mesh = tb.textured_mesh(m.vertices, m.faces, wavy_colour, fallback="vertex_colors")
    want = wavy_colour(torch.as_tensor(m.vertices)).numpy()
    assert np.array_equal(mesh.faces, m.faces) and np.allclose(mesh.vertices, m.vertices)
    colours = np.asarray(mesh.visual.vertex_colors)
    assert np.abs(colours[:, :3] / 255 - want).max() <= 0.5 / 255 + 1e-9
    assert (colours[:, 3] == 255).all()
    with pytest.raises(ImportError, match="pip install xatlas"):
        tb.textured_mesh(m.vertices, m.faces, wavy_colour, fallback="texture")


@needs_xatlas
def test_a_crashing_xatlas_is_an_error_not_a_dead_process(monkeypatch):
    # xatlas segfaults on some meshes (jpcy/xatlas#151); it runs in a child process.
    monkeypatch.setattr(tb, "_XATLAS_WORKER", "import ctypes; ctypes.string_at(0)")
    m = trimesh.creation.icosphere(1)
    with pytest.raises(RuntimeError, match="signal 11.*vertex_colors"):
        tb.unwrap_uv(m.vertices, m.faces)


@needs_xatlas
def test_bake_mesh_keeps_the_mesh_when_xatlas_crashes(monkeypatch):
    """The refined surface survives an unwrapping crash: vertex colours and a warning line instead."""
    m = trimesh.creation.icosphere(1)
    config = tb.TextureBakeConfig(size=64)
    mesh, line = tb.bake_mesh(m.vertices, m.faces, wavy_colour, config)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals) and line == "colours: UV texture 64x64 (xatlas)"
    monkeypatch.setattr(tb, "_XATLAS_WORKER", "import ctypes; ctypes.string_at(0)")
    mesh, line = tb.bake_mesh(m.vertices, m.faces, wavy_colour, config)
    assert line.startswith("WARNING: texture bake failed (xatlas failed") and "signal 11" in line
    assert mesh.visual.kind == "vertex" and np.array_equal(mesh.faces, m.faces)
    mesh, line = tb.bake_mesh(m.vertices, m.faces, wavy_colour, tb.TextureBakeConfig(fallback="vertex_colors"))
    assert mesh.visual.kind == "vertex" and line == "colours: vertex colours"


def test_config_defaults_are_the_functions_defaults():
    # Nodes build their widgets from TextureBakeConfig; the library's defaults must match it.
    import inspect
    cfg = tb.TextureBakeConfig()
    params = inspect.signature(tb.textured_mesh).parameters
    for name in ("fallback", "size", "padding", "chunk"):
        assert params[name].default == getattr(cfg, name), name
    assert inspect.signature(tb.bake_texture).parameters["padding"].default == cfg.padding


def test_input_errors():
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    f = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"colour_fn must return \(N, 3\)"):
        tb.bake_texture(v, f, uv, lambda p: p[:, :2], size=16)
    with pytest.raises(ValueError, match="non-finite"):
        tb.bake_texture(v, f, uv, lambda p: p * float("nan"), size=16)
    with pytest.raises(ValueError, match=r"faces: indices must be in \[0, 3\)"):
        tb.bake_texture(v, f + 1, uv, linear_colour, size=16)
    with pytest.raises(ValueError, match=r"uvs: expected shape \(N, 2\)"):
        tb.bake_texture(v, f, v, linear_colour, size=16)
    with pytest.raises(ValueError, match="size"):
        tb.bake_texture(v, f, uv, linear_colour, size=0)
    with pytest.raises(ValueError, match="fallback must be one of texture, vertex_colors"):
        tb.textured_mesh(v, f, linear_colour, fallback="vertex")
