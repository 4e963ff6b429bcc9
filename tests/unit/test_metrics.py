"""ThemeStation's evaluation figures (mpod_core.metrics) against known answers: a cube against its
inscribed sphere (1 − π/6), a mesh against itself (0), invariance to scale and placement (not to
rotation), constant images' closed-form MSE and SSIM, and closed-form cosines."""
import math

import numpy as np
import pytest
import torch
import trimesh

from mpod_core.mesh import compose_scene
from mpod_core.metrics import (MAX_METRIC_PIXELS, MetricConfig, clip_similarity, concept_similarity, mesh_diversity,
                               mesh_occupancy, pairwise_image_distance, pairwise_voxel_iou_distance,
                               render_metric_views, voxelize)

SMALL = MetricConfig(voxel_resolution=32, views=3, resolution=48)


def _cube():
    return trimesh.creation.box(extents=(1.0, 1.0, 1.0))


def _ball(subdivisions=5):
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)


def _ell():
    """An asymmetric closed shape: two overlapping boxes (an L), red."""
    mesh = trimesh.util.concatenate([trimesh.creation.box(extents=(1.0, 0.3, 0.4)),
                                     trimesh.creation.box(extents=(0.3, 0.8, 0.4),
                                                          transform=trimesh.transformations.translation_matrix(
                                                              (0.35, 0.4, 0.0)))])
    mesh.visual.vertex_colors = np.tile([220, 30, 30, 255], (len(mesh.vertices), 1))
    return mesh


def test_cube_against_its_inscribed_sphere_is_one_minus_pi_over_six():
    distance, matrix = pairwise_voxel_iou_distance([_cube(), _ball()], 64)
    # Voxel error at 64^3 plus the icosphere's polygon deficit (its volume is 0.9993 of the sphere's) are
    # ~0.0005; a bounding-box inside test gives 0, a surface shell ~1, a sign error 1.
    assert abs(distance - (1 - math.pi / 6)) < 0.003, distance
    assert matrix[0, 1] == matrix[1, 0] == distance and matrix[0, 0] == matrix[1, 1] == 0
    assert bool(mesh_occupancy(_cube(), 16).all())                 # every voxel centre is inside the cube
    assert abs(float(mesh_occupancy(_ball(), 64).float().mean()) - math.pi / 6) < 0.003


def test_a_mesh_against_itself_is_zero_and_the_matrix_is_symmetric():
    meshes = [_ell(), _cube(), _ball(3), _ell()]
    distance, matrix = pairwise_voxel_iou_distance(meshes, 32)
    assert matrix.shape == (4, 4) and torch.equal(matrix, matrix.T)
    assert torch.all(matrix.diagonal() == 0) and matrix[0, 3] == 0
    off = matrix[~torch.eye(4, dtype=torch.bool)]
    assert abs(distance - float(off.mean())) < 1e-12
    assert float(matrix[0, 1]) > 0.2 and float(matrix[1, 2]) > 0.4    # the L, cube and ball differ


def test_scale_and_placement_do_not_count_but_rotation_does():
    ell = _ell()
    moved = ell.copy()
    moved.apply_scale(3.7)
    moved.apply_translation((5.0, -2.0, 11.0))
    assert pairwise_voxel_iou_distance([ell, moved], 48)[0] < 1e-3
    turned = ell.copy()
    turned.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, (0, 0, 1)))
    assert pairwise_voxel_iou_distance([ell, turned], 48)[0] > 0.2   # the control: a different shape in the box
    # the renders do not change either (up to rasterisation rounding)
    a, b = render_metric_views(ell, SMALL, backend="torch"), render_metric_views(moved, SMALL, backend="torch")
    assert float((a - b).abs().max()) < 1e-3


def test_inward_faces_a_scene_and_chunking_give_the_same_occupancy():
    ell = _ell()
    inverted = ell.copy()
    inverted.invert()
    reference = voxelize(ell.vertices, ell.faces, 24)
    assert reference.shape == (24, 24, 24) and reference.dtype == torch.bool and 0.1 < reference.float().mean() < 0.5
    assert torch.equal(voxelize(inverted.vertices, inverted.faces, 24), reference)
    assert torch.equal(voxelize(torch.as_tensor(ell.vertices), torch.as_tensor(ell.faces), 24, chunk_points=1000),
                       reference)
    parts = [trimesh.creation.box(extents=(1.0, 0.3, 0.4)),
             trimesh.creation.box(extents=(0.3, 0.8, 0.4),
                                  transform=trimesh.transformations.translation_matrix((0.35, 0.4, 0.0)))]
    assert torch.equal(mesh_occupancy(compose_scene(parts), 24), reference)


def test_bad_meshes_are_errors():
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], [[0, 1, 2], [1, 3, 2]])
    with pytest.raises(ValueError, match="mesh 2 has no inside voxel"):
        pairwise_voxel_iou_distance([_cube(), plane], 16)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_voxel_iou_distance([_cube()], 16)
    with pytest.raises(ValueError, match=r"expected vertices \(V, 3\)"):
        voxelize(np.zeros((4, 2)), np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        voxelize(np.zeros((3, 3)) + np.eye(3), np.array([[0, 1, 5]]))


def test_image_distances_of_constant_images_are_the_closed_forms():
    black, grey = torch.zeros(2, 16, 16, 3), torch.full((2, 16, 16, 3), 0.5)
    out = pairwise_image_distance([black, grey, black.clone()])
    assert out["mse"] == pytest.approx((0.25 + 0.25 + 0) / 3, abs=1e-12)
    # Constant images have no variance: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = 0.01^2.
    c1 = 0.01 ** 2
    assert float(out["ssim_matrix"][0, 1]) == pytest.approx(1 - c1 / (0.25 + c1), abs=1e-9)
    assert out["mse_matrix"][0, 2] == 0 and out["ssim_matrix"][0, 2] == 0
    assert torch.equal(out["mse_matrix"], out["mse_matrix"].T) and torch.equal(out["ssim_matrix"], out["ssim_matrix"].T)
    with pytest.raises(ValueError, match="renders 2"):
        pairwise_image_distance([black, torch.zeros(3, 16, 16, 3)])
    with pytest.raises(ValueError, match="too small"):
        pairwise_image_distance([torch.zeros(1, 4, 4, 3)] * 2)


def test_renders_are_the_meshes_colours_on_white():
    views = render_metric_views(_ell(), SMALL, backend="torch")
    assert views.shape == (3, 48, 48, 3) and views.dtype == torch.float32
    assert torch.all(views[:, 0, 0] == 1.0)                                      # white corners
    red = (views[..., 0] > 0.8) & (views[..., 1] < 0.2) & (views[..., 2] < 0.2)
    assert bool(red.flatten(1).any(1).all())                                    # the mesh's red in every view


def test_mesh_diversity_copies_are_exactly_zero_and_different_meshes_are_not():
    same = mesh_diversity([_ell(), _ell()], SMALL, backend="torch")
    assert (same.voxel_diversity, same.image_distance, same.ssim_distance) == (0.0, 0.0, 0.0)
    seen = []
    different = mesh_diversity([_ell(), _cube(), _ball(3)], SMALL, backend="torch",
                               progress=lambda d, n, p: seen.append((d, n)))
    assert different.voxel_diversity > 0.3 and different.image_distance > 0.01 and different.ssim_distance > 0.05
    assert seen[-1] == (6, 6) and len(seen) == 6
    report = different.report(["ell", "cube", "ball"])
    assert report.count("ell") == 3 * 2 and "LPIPS" in report                  # 3 matrices: a header and a row each
    for matrix in (different.voxel_matrix, different.mse_matrix, different.ssim_matrix):
        assert f"{float(matrix[0, 2]):.4f}" in report
    with pytest.raises(ValueError, match=str(MAX_METRIC_PIXELS)):
        mesh_diversity([_ell(), _cube()], MetricConfig(views=64, resolution=1024))


def test_clip_similarity_is_the_mean_cosine():
    embeds = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    mean, per_view = clip_similarity(embeds, torch.tensor([[5.0, 0.0]]))
    expected = torch.tensor([1.0, 0.0, 1 / math.sqrt(2), -1.0], dtype=torch.float64)
    torch.testing.assert_close(per_view, expected)
    assert mean == pytest.approx(float(expected.mean()))
    with pytest.raises(ValueError, match="expected render_embeds"):
        clip_similarity(embeds, torch.zeros(3))
    with pytest.raises(ValueError, match="zero or not finite"):
        clip_similarity(embeds, torch.zeros(2))


def test_concept_similarity_of_a_render_against_its_own_views():
    ell = _ell()
    concept = render_metric_views(ell, SMALL, backend="torch")[0]
    calls = []

    def embed(images):  # a stand-in encoder: the centred pixels
        calls.append(images.shape[0])
        flat = images.reshape(images.shape[0], -1)
        return flat - 0.5

    mean, per_view = concept_similarity(ell, concept, embed, SMALL, backend="torch", chunk=2)
    assert calls == [2, 1, 1]                             # renders in chunks of 2, then the concept image
    assert float(per_view[0]) == pytest.approx(1.0, abs=1e-6) and float(per_view[1:].max()) < 0.999
    assert mean == pytest.approx(float(per_view.mean()))
    with pytest.raises(ValueError, match="one"):
        concept_similarity(ell, torch.zeros(2, 8, 8, 3), embed, SMALL)
