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


# ---------------------------------------------------------------- scenes (several objects)
def translation(x, y=0.0, z=0.0):
    matrix = np.eye(4)
    matrix[:3, 3] = [x, y, z]
    return matrix


def colored_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    rng = np.random.default_rng(2)
    sphere.visual = trimesh.visual.ColorVisuals(
        sphere, vertex_colors=rng.integers(0, 256, (len(sphere.vertices), 4), dtype=np.uint8))
    return sphere


def _sample_at_vertices(t: meshlib.MeshTensors) -> np.ndarray:
    """Texture colour at each vertex, read the way the renderer reads it (bilinear, wrap)."""
    from mpod_core.render import texture_sample
    return texture_sample(t.texture.double(), t.uv.double()[None, None], backend="torch")[0, 0].numpy()


def test_compose_scene_names_copies_and_errors():
    box, sphere = colored_box(), colored_sphere()
    scene = meshlib.compose_scene([box, sphere])
    assert [o.name for o in meshlib.scene_objects(scene)] == ["object_00", "object_01"]
    assert sorted(scene.geometry) == ["object_00", "object_01"]
    scene.geometry["object_00"].apply_translation([5, 0, 0])
    np.testing.assert_allclose(box.bounds, colored_box().bounds)  # the input is not modified
    named = meshlib.compose_scene([box, sphere, box, box], " chair, ,chair, world")
    assert [o.name for o in meshlib.scene_objects(named)] == ["chair", "object_01", "chair_2", "world_2"]
    with pytest.raises(meshlib.MeshError, match="2 object names given for 3 meshes"):
        meshlib.compose_scene([box, box, box], "a, b")
    with pytest.raises(meshlib.MeshError, match="no meshes"):
        meshlib.compose_scene([])
    with pytest.raises(meshlib.MeshError, match=r"compose_scene: object_01.*empty"):
        meshlib.compose_scene([box, trimesh.Trimesh(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64))])


def test_scene_glb_keeps_named_objects_colours_and_placements(tmp_path):
    import pygltflib

    box, sphere = colored_box(), colored_sphere()
    shift = translation(3.0, -1.0, 0.5)
    scene = meshlib.compose_scene([box, sphere], ["box", "ball"], [np.eye(4), shift])
    meshlib.save_mesh(scene, tmp_path / "scene.glb")

    gltf = pygltflib.GLTF2().load(str(tmp_path / "scene.glb"))
    roots = [gltf.nodes[i] for i in gltf.scenes[gltf.scene or 0].nodes]
    assert [n.name for n in roots] == ["box", "ball"]
    assert [gltf.meshes[n.mesh].name for n in roots] == ["box", "ball"]
    assert all(not n.children for n in roots)
    np.testing.assert_allclose(np.asarray(roots[1].matrix).reshape(4, 4).T, shift)  # column-major in glTF
    assert roots[0].matrix is None  # identity stays implicit

    back = meshlib.load_mesh(tmp_path / "scene.glb", keep_objects=True)
    objects = meshlib.scene_objects(back)
    assert [o.name for o in objects] == ["box", "ball"]
    for obj, source, placement in zip(objects, [box, sphere], [np.eye(4), shift]):
        np.testing.assert_allclose(obj.mesh.vertices, source.vertices, atol=1e-6)
        np.testing.assert_array_equal(obj.mesh.faces, source.faces)
        np.testing.assert_array_equal(obj.mesh.visual.vertex_colors, source.visual.vertex_colors)
        np.testing.assert_allclose(obj.transform, placement, atol=1e-7)
    world = meshlib.flatten_scene(back)  # the default load: one mesh, placements applied
    flat = meshlib.load_mesh(tmp_path / "scene.glb")
    assert isinstance(flat, trimesh.Trimesh)
    np.testing.assert_allclose(flat.vertices, world.vertices)
    ball = flat.vertices[len(box.vertices):]
    np.testing.assert_allclose([ball.min(0), ball.max(0)], sphere.bounds + shift[:3, 3], atol=1e-6)


def test_scene_glb_keeps_each_texture(tmp_path):
    sphere, image = textured_sphere()
    other, _ = textured_sphere()
    other.visual.material.image = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    meshlib.save_mesh(meshlib.compose_scene([sphere, other], transforms=[np.eye(4), translation(2)]),
                      tmp_path / "t.glb")
    objects = meshlib.scene_objects(meshlib.load_mesh(tmp_path / "t.glb", keep_objects=True))
    first = meshlib.mesh_to_tensors(objects[0].mesh)
    np.testing.assert_allclose(first.texture.numpy(), image, atol=1e-6)
    np.testing.assert_allclose(first.uv.numpy(), sphere.visual.uv, atol=1e-6)
    np.testing.assert_allclose(meshlib.mesh_to_tensors(objects[1].mesh).texture.numpy(), 200 / 255, atol=1e-6)


def test_glb_stores_non_trs_placements_baked(tmp_path):
    shear = np.eye(4)
    shear[0, 1] = 0.5  # glTF node matrices must decompose into translation, rotation, scale
    scene = meshlib.compose_scene([colored_box()], transforms=[shear])
    meshlib.save_mesh(scene, tmp_path / "s.glb")
    back = meshlib.load_mesh(tmp_path / "s.glb", keep_objects=True)
    np.testing.assert_allclose(meshlib.scene_objects(back)[0].transform, np.eye(4))
    np.testing.assert_allclose(meshlib.flatten_scene(back).vertices,
                               trimesh.transform_points(colored_box().vertices, shear), atol=1e-6)


def test_flatten_scene_vertex_colours_exact():
    box, sphere, plain = colored_box(), colored_sphere(), trimesh.creation.box()
    scene = meshlib.compose_scene([box, sphere, plain], transforms=[np.eye(4), translation(2), translation(-2)])
    flat = meshlib.flatten_scene(scene)
    sizes = [len(box.vertices), len(sphere.vertices), len(plain.vertices)]
    assert len(flat.vertices) == sum(sizes) and len(flat.faces) == len(box.faces) + len(sphere.faces) + 12
    np.testing.assert_allclose(flat.bounds, [[-2.5, -1.0, -0.5], [2.5, 1.0, 0.5]])
    colors = flat.visual.vertex_colors
    np.testing.assert_array_equal(colors[:sizes[0]], box.visual.vertex_colors)
    np.testing.assert_array_equal(colors[sizes[0]:sizes[0] + sizes[1]], sphere.visual.vertex_colors)
    np.testing.assert_array_equal(np.asarray(colors[-sizes[2]:]),
                                  np.tile(np.round(np.array(meshlib.UNCOLORED_RGBA) * 255), (sizes[2], 1)))
    assert meshlib.flatten_scene(box) is box  # a plain mesh passes through
    np.testing.assert_allclose(meshlib.flatten_scene(meshlib.compose_scene([plain, plain])).bounds,
                               plain.bounds)  # both at the origin


def test_flatten_scene_texture_atlas_reads_what_each_texture_read():
    sphere, _ = textured_sphere()
    wide = trimesh.creation.uv_sphere(count=(6, 6))
    rng = np.random.default_rng(5)
    uv = rng.random((len(wide.vertices), 2)) * 1.5 - 0.25  # some outside [0, 1]: wrapped per vertex
    wide.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(
        rng.integers(0, 256, (5, 12, 3), dtype=np.uint8)))
    plain = trimesh.creation.box()
    plain.visual = trimesh.visual.TextureVisuals(material=trimesh.visual.material.PBRMaterial(
        baseColorFactor=[255, 0, 0, 255]))  # a uniform colour: a 1x1 patch of the atlas
    scene = meshlib.compose_scene([sphere, wide, plain], transforms=[np.eye(4), translation(2), translation(4)])
    t = meshlib.mesh_to_tensors(scene)
    assert t.texture is not None and t.vertex_colors is None
    want = np.concatenate([_sample_at_vertices(meshlib.mesh_to_tensors(sphere)),
                           _sample_at_vertices(meshlib.mesh_to_tensors(wide)),
                           np.tile([1.0, 0.0, 0.0], (len(plain.vertices), 1))])
    np.testing.assert_allclose(_sample_at_vertices(t), want, atol=1e-5)


def test_flatten_scene_mixed_texture_and_vertex_colours_bakes_the_texture():
    sphere, _ = textured_sphere()
    box = colored_box()
    t = meshlib.mesh_to_tensors(meshlib.compose_scene([sphere, box]))
    assert t.texture is None
    np.testing.assert_allclose(t.vertex_colors[:len(sphere.vertices)].numpy(),
                               _sample_at_vertices(meshlib.mesh_to_tensors(sphere)), atol=1 / 255)
    np.testing.assert_allclose(t.vertex_colors[len(sphere.vertices):].numpy(),
                               box.visual.vertex_colors[:, :3] / 255, atol=1e-6)


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_scene_obj_and_ply_are_flattened(tmp_path, fmt):
    box, sphere = colored_box(), colored_sphere()
    scene = meshlib.compose_scene([box, sphere], ["box", "ball"], [np.eye(4), translation(3)])
    flat = meshlib.flatten_scene(scene)
    written = meshlib.save_mesh(scene, tmp_path / f"scene.{fmt}")
    back = meshlib.load_mesh(written[0])
    assert len(back.vertices) == len(flat.vertices) and len(back.faces) == len(flat.faces)
    np.testing.assert_allclose(back.vertices, flat.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.visual.vertex_colors[:, :3], flat.visual.vertex_colors[:, :3])
    if fmt == "obj":  # one object group per object, for tools that split by object
        lines = written[0].read_text().splitlines()
        assert [line for line in lines if line.startswith("o ")] == ["o box", "o ball"]
        assert sum(line.startswith("f ") for line in lines[lines.index("o ball"):]) == len(sphere.faces)


def test_scene_obj_keeps_textures_in_one_atlas(tmp_path):
    sphere, _ = textured_sphere()
    other, _ = textured_sphere()
    other.visual.material.image = Image.fromarray(np.full((4, 4, 3), 30, np.uint8))
    scene = meshlib.compose_scene([sphere, other], transforms=[np.eye(4), translation(2)])
    meshlib.save_mesh(scene, tmp_path / "t.obj")
    back = meshlib.mesh_to_tensors(meshlib.load_mesh(tmp_path / "t.obj"))
    want = np.concatenate([_sample_at_vertices(meshlib.mesh_to_tensors(m)) for m in (sphere, other)])
    np.testing.assert_allclose(_sample_at_vertices(back), want, atol=1e-5)


def test_check_mesh_scene_errors():
    with pytest.raises(meshlib.MeshError, match="the scene is empty"):
        meshlib.check_mesh(trimesh.Scene(), "the scene")
    no_faces = trimesh.Scene()
    no_faces.add_geometry(colored_box(), node_name="good", geom_name="good")
    no_faces.add_geometry(trimesh.Trimesh(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64)),
                          node_name="flat", geom_name="flat")
    with pytest.raises(meshlib.MeshError, match="object 'flat': the mesh is empty"):
        meshlib.check_mesh(no_faces)
    points = trimesh.Scene()
    points.add_geometry(trimesh.PointCloud(np.zeros((4, 3))), node_name="cloud", geom_name="cloud")
    with pytest.raises(meshlib.MeshError, match="object 'cloud' holds a PointCloud"):
        meshlib.save_mesh(points, "/nonexistent/never_written.glb")
    with pytest.raises(meshlib.MeshError, match="trimesh.Trimesh or trimesh.Scene"):
        meshlib.check_mesh([colored_box()])


def test_normalize_scene_keeps_objects():
    scene = meshlib.compose_scene([colored_box(), colored_sphere()], transforms=[translation(4), translation(-4)])
    out = meshlib.normalize_mesh(scene)
    assert isinstance(out, trimesh.Scene) and [o.name for o in meshlib.scene_objects(out)] == ["object_00",
                                                                                               "object_01"]
    bounds = meshlib.flatten_scene(out).bounds
    np.testing.assert_allclose(bounds.max(0) - bounds.min(0), [1.0, 2 / 9, 1 / 9], atol=1e-9)
    np.testing.assert_allclose(bounds.sum(0), 0, atol=1e-9)
