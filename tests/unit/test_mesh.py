"""mpod_core.mesh: loading, saving (atomic), appearance round trips, errors."""
import os

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from mpod_core import mesh as meshlib


def colored_box():
    box = trimesh.creation.box(extents=(1.0, 2.0, 0.5))
    rng = np.random.default_rng(0)
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=rng.integers(0, 256, (len(box.vertices), 4), dtype=np.uint8))
    return box


def textured_sphere():
    sphere = trimesh.creation.uv_sphere(count=(8, 8))
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8))
    sphere.visual = trimesh.visual.TextureVisuals(uv=rng.random((len(sphere.vertices), 2)), image=image)
    return sphere, np.asarray(image, dtype=np.float32) / 255


@pytest.mark.parametrize("fmt", meshlib.SAVE_FORMATS)
def test_vertex_colors_survive_save_and_load(tmp_path, fmt):
    box = colored_box()
    written = meshlib.save_mesh(box, tmp_path / f"box.{fmt}")
    assert written[0] == tmp_path / f"box.{fmt}"
    back = meshlib.load_mesh(written[0])
    assert len(back.faces) == len(box.faces)
    np.testing.assert_allclose(back.bounds, box.bounds, atol=1e-6)
    got = meshlib.mesh_to_tensors(back).vertex_colors
    assert got is not None
    # match colours by position (formats may reorder/merge vertices)
    src = {tuple(np.round(v, 5)): c for v, c in zip(box.vertices, box.visual.vertex_colors[:, :3] / 255)}
    for v, c in zip(back.vertices, got.numpy()):
        np.testing.assert_allclose(c, src[tuple(np.round(v, 5))], atol=1 / 255 + 1e-6)


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_texture_survives_save_and_load(tmp_path, fmt):
    sphere, image = textured_sphere()
    meshlib.save_mesh(sphere, tmp_path / f"s.{fmt}")
    t = meshlib.mesh_to_tensors(meshlib.load_mesh(tmp_path / f"s.{fmt}"))
    assert t.texture is not None and t.uv is not None
    np.testing.assert_allclose(t.texture.numpy(), image, atol=1e-6)  # not darkened by a material factor
    assert t.uv.shape == (len(sphere.vertices), 2)


def test_ply_bakes_texture_to_vertex_colors(tmp_path):
    sphere, _ = textured_sphere()
    meshlib.save_mesh(sphere, tmp_path / "s.ply")
    t = meshlib.mesh_to_tensors(meshlib.load_mesh(tmp_path / "s.ply"))
    assert t.vertex_colors is not None and t.texture is None
    assert float(t.vertex_colors.std()) > 0.05  # real colours, not a constant


def test_two_obj_saves_in_one_folder_keep_their_own_textures(tmp_path):
    a, img_a = textured_sphere()
    b, _ = textured_sphere()
    b.visual.material.image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    meshlib.save_mesh(a, tmp_path / "a.obj")
    meshlib.save_mesh(b, tmp_path / "b.obj")
    np.testing.assert_allclose(meshlib.mesh_to_tensors(meshlib.load_mesh(tmp_path / "a.obj")).texture.numpy(),
                               img_a, atol=1e-6)


def test_normalize_fits_unit_cube():
    box = colored_box()
    box.apply_translation([3, -2, 7])
    out = meshlib.normalize_mesh(box)
    np.testing.assert_allclose(out.bounds, [[-0.25, -0.5, -0.125], [0.25, 0.5, 0.125]], atol=1e-9)
    np.testing.assert_allclose(box.bounds[0], [2.5, -3.0, 6.75])  # input untouched


def test_load_errors(tmp_path):
    with pytest.raises(meshlib.MeshError, match="not found"):
        meshlib.load_mesh(tmp_path / "missing.glb")
    (tmp_path / "x.fbx").write_bytes(b"whatever")
    with pytest.raises(meshlib.MeshError, match="unsupported mesh file 'x.fbx'"):
        meshlib.load_mesh(tmp_path / "x.fbx")
    (tmp_path / "bad.glb").write_bytes(b"not a glb")
    with pytest.raises(meshlib.MeshError, match="bad.glb"):
        meshlib.load_mesh(tmp_path / "bad.glb")
    (tmp_path / "points.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\n"
                                         "property float y\nproperty float z\nend_header\n0 0 0\n")
    with pytest.raises(meshlib.MeshError, match="points.ply"):
        meshlib.load_mesh(tmp_path / "points.ply")


def test_empty_mesh_is_rejected(tmp_path):
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(meshlib.MeshError, match="empty"):
        meshlib.save_mesh(empty, tmp_path / "e.glb")
    assert not list(tmp_path.iterdir())
    with pytest.raises(meshlib.MeshError, match="expected a trimesh"):
        meshlib.check_mesh("not a mesh")


def test_save_rejects_unknown_format(tmp_path):
    with pytest.raises(meshlib.MeshError, match="glb, obj, ply"):
        meshlib.save_mesh(colored_box(), tmp_path / "x.fbx")


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    sphere, _ = textured_sphere()
    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # fail after the first file of the OBJ set was moved in
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        meshlib.save_mesh(sphere, tmp_path / "s.obj")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".part")], names  # no temporaries left behind
    assert "s.obj" not in names, names  # the mesh file appears last, only when complete


def test_tensors_round_trip():
    box = colored_box()
    t = meshlib.mesh_to_tensors(box, dtype=torch.float64)
    back = meshlib.tensors_to_mesh(t.vertices, t.faces, t.vertex_colors)
    np.testing.assert_allclose(back.vertices, box.vertices)
    np.testing.assert_array_equal(back.visual.vertex_colors[:, :3], box.visual.vertex_colors[:, :3])
    with pytest.raises(meshlib.MeshError, match=r"expected \(V, 3\)"):
        meshlib.tensors_to_mesh(torch.zeros(4, 2), t.faces)
