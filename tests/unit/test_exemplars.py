"""ThemeStation's exemplar renders (mpod_core.exemplars): a sphere's normal map against the analytic
(n + 1) / 2, the official cameras, the unit-box normalisation, captions in step with the images."""
import dataclasses

import numpy as np
import pytest
import torch
import trimesh

from mpod_core.cameras import get_rays, orbit_cameras
from mpod_core.exemplars import (MAX_EXEMPLAR_PIXELS, ExemplarConfig, exemplar_angles, exemplar_captions,
                                 render_exemplars, smooth_vertex_normals)


def _sphere(subdivisions=5, radius=3.0, centre=(10.0, -4.0, 2.0)):
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    mesh.apply_translation(centre)           # anywhere, any size: the renderer normalises it to the unit box
    return mesh


def test_a_spheres_normal_map_is_the_analytic_one_to_one_level():
    config = ExemplarConfig(views=4, resolution=96, seed=3)
    out = render_exemplars([_sphere()], config, backend="torch")
    normal_maps = out.images[4:]
    # The analytic sphere the mesh approximates: radius 0.5 (unit box) at the origin, ray-cast per pixel.
    cams = orbit_cameras(out.elevations[0], out.azimuths, config.distance, config.fov)
    o, d = get_rays(cams, 96, 96)
    b = (o * d).sum(-1)
    disc = b ** 2 - (o.square().sum(-1) - 0.25)
    t = -b - disc.clamp_min(0).sqrt()
    expected = ((o + t[..., None] * d) / 0.5 + 1) / 2
    # Pixels well inside the silhouette (the mesh's polygonal outline differs from the sphere's there).
    inner = disc > 0.25 * 0.1
    error = (normal_maps - expected).abs().amax(-1)[inner]
    assert inner.sum() > 4 * 2000 and float(error.max()) < 1 / 255, float(error.max())
    outside = disc < -0.01                                                     # clear of antialiased edges
    assert outside.sum() > 4 * 2000 and torch.all(normal_maps[outside] == 1.0)   # white background
    # The control: the renderer's own flat face normals of the same mesh miss it.
    from mpod_core.mesh import mesh_to_tensors, normalize_mesh
    from mpod_core.render import render_mesh
    t = mesh_to_tensors(normalize_mesh(_sphere()))
    flat = (render_mesh(t.vertices, t.faces, cams, 96, 96, backend="torch").normal + 1) / 2
    assert float((flat - expected).abs().amax(-1)[inner].max()) > 2 / 255


def test_smooth_normals_merge_duplicated_vertices():
    mesh = _sphere(subdivisions=3, radius=1.0, centre=(0, 0, 0))
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    f = torch.tensor(mesh.faces)
    split = torch.cat([v, v[f[:100].reshape(-1)]])                              # 300 seam duplicates
    faces = f.clone()
    faces[:100] = torch.arange(len(v), len(v) + 300).reshape(100, 3)
    n = smooth_vertex_normals(split, faces)
    whole = smooth_vertex_normals(v, f)
    assert torch.allclose(n[:len(v)], whole, atol=1e-6)                         # as if never split
    assert torch.allclose(n[len(v):], whole[f[:100].reshape(-1)], atol=1e-6)
    assert float((whole - torch.nn.functional.normalize(v, dim=1)).norm(dim=1).max()) < 0.02   # ~radial


def test_cameras_are_the_official_ones_and_seeded():
    config = ExemplarConfig(seed=7)
    elev, azim = exemplar_angles(config, 3)
    assert torch.equal(azim, torch.arange(30, dtype=torch.float64) * 12.0)
    assert elev.shape == (3, 30) and torch.equal(elev, elev.round())
    assert int(elev.min()) >= -5 and int(elev.max()) <= 30 and len(set(elev.flatten().tolist())) > 15
    assert not torch.equal(elev[0], elev[1])                                  # each mesh its own draw
    assert torch.equal(exemplar_angles(ExemplarConfig(seed=7), 3)[0], elev)
    assert torch.equal(exemplar_angles(ExemplarConfig(seed=7), 1)[0], elev[:1])   # adding meshes keeps the first's
    assert not torch.equal(exemplar_angles(ExemplarConfig(seed=8), 3)[0], elev)
    assert torch.equal(exemplar_angles(ExemplarConfig(views=4), 1)[1], torch.tensor([0.0, 90.0, 180.0, 270.0],
                                                                                    dtype=torch.float64))


def test_any_mesh_is_rendered_as_its_unit_box_version():
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    box.visual.vertex_colors = np.tile([200, 40, 40, 255], (len(box.vertices), 1))
    moved = box.copy()
    moved.apply_scale(37.0)
    moved.apply_translation((100.0, -50.0, 3.0))
    config = ExemplarConfig(views=3, resolution=64)
    a = render_exemplars([box], config, backend="torch").images
    b = render_exemplars([moved], config, backend="torch").images
    assert float((a - b).abs().max()) < 1e-3
    # The longest side spans exactly the unit box: the front face of the normalised 1 x 0.5 x 0.25 box is 1.375
    # from the camera (distance 1.5 - 0.125), so at fov 49.1 it covers 1 / (2 * 1.375 * tan(24.55°)) = 79.6% of
    # the image width (counted on the middle row).
    front = render_exemplars([box], ExemplarConfig(views=1, resolution=256, elevation_min=0, elevation_max=0),
                             backend="torch").images[0]
    row = (front[128] < 0.99).any(-1).float().sum()
    assert abs(float(row) / 256 - 1 / (2 * 1.375 * np.tan(np.radians(49.1 / 2)))) < 0.01


def test_captions_are_in_step_with_the_images():
    box = trimesh.creation.box()
    config = ExemplarConfig(views=2, resolution=32, object="chair", token="zwx")
    out = render_exemplars([box, _sphere(2)], config, backend="torch")
    assert out.images.shape == (8, 32, 32, 3) and len(out.captions) == 8
    colour = "a 3d model of chair, in the style of zwx"
    assert out.captions == [colour, colour, colour + ", normal map", colour + ", normal map"] * 2
    # The normal maps are the colourful ones (an uncoloured mesh renders grey).
    spread = (out.images.amax(-1) - out.images.amin(-1)).amax((1, 2))
    assert all((float(s) > 0.2) == c.endswith("normal map") for s, c in zip(spread, out.captions))


def test_caption_template_for_the_concept_prior():
    config = ExemplarConfig(views=2, object="chair", token="sks", caption="a 3d model of {token} {object}")
    assert exemplar_captions(config, 2) == ["a 3d model of sks chair"] * 2 + ["a 3d model of sks chair, normal map"] * 2
    colour_only = render_exemplars([trimesh.creation.box()], dataclasses.replace(config, normal_maps=False,
                                                                                resolution=16), backend="torch")
    assert colour_only.images.shape == (2, 16, 16, 3) and colour_only.captions == ["a 3d model of sks chair"] * 2
    for bad in ("a 3d model of {thing}", "a {} model", "two\nlines", "{object"):
        with pytest.raises(ValueError, match="caption"):
            ExemplarConfig(caption=bad).validate()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no exemplar mesh"):
        render_exemplars([], ExemplarConfig())
    with pytest.raises(ValueError, match="object must be one line"):
        render_exemplars([trimesh.creation.box()], ExemplarConfig(object="a\nb"))
    with pytest.raises(ValueError, match="elevation_min <= elevation_max"):
        render_exemplars([trimesh.creation.box()], ExemplarConfig(elevation_min=40, elevation_max=30))
    too_many = MAX_EXEMPLAR_PIXELS // (2 * 30 * 512 ** 2) + 1
    with pytest.raises(ValueError, match="exceed"):
        render_exemplars([trimesh.creation.box()] * too_many, ExemplarConfig())
