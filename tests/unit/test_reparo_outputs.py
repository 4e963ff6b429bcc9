"""What OT Layout Align hands on: the placed meshes, their scene and the layout JSON agree with
the placement; the semantic reference keeps the objects and nothing else."""
import json

import numpy as np
import torch
import trimesh

from mpod_core.cameras import orbit_cameras
from mpod_core.layout.align import LayoutResult
from mpod_core.mesh import object_name
from mpod_core.pipelines.reparo import Placement, placed_outputs, placement_matrix, semantic_reference


def _placement(k=2):
    t = torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.0]])[:k]
    s = torch.tensor([[2.0, 2.0, 2.0], [0.5, 0.7, 0.5]])[:k]
    centres = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.0]])[:k]
    matrices = torch.stack([placement_matrix(centres[i], s[i], t[i]) for i in range(k)])
    result = LayoutResult(t, s, {}, torch.zeros(4, 4, 3), torch.zeros(4, 4, dtype=torch.bool))
    return Placement(matrices, t, s, matrices.clone(), torch.zeros(4, 4, 3), torch.zeros(4, 4, 3),
                     orbit_cameras(0.0, 0.0), result), centres


def test_placed_meshes_scene_and_layout_agree_with_the_placement():
    meshes = [trimesh.creation.box(bounds=[[0, 0, 0], [1, 1, 1]]), trimesh.creation.icosphere(1, 0.5)]
    meshes[1].apply_translation([0.0, 1.0, 0.0])
    before = [m.vertices.copy() for m in meshes]
    placement, centres = _placement()
    names = [object_name(0), object_name(1)]
    placed, scene, layout = placed_outputs(meshes, placement, names)
    for k, (mesh, moved) in enumerate(zip(meshes, placed)):
        assert np.array_equal(mesh.vertices, before[k])  # the inputs are not modified
        expected = (before[k] - centres[k].numpy()) * placement.scales[k].numpy() + placement.translations[k].numpy()
        np.testing.assert_allclose(moved.vertices, expected, atol=1e-6)
        np.testing.assert_allclose(moved.bounds.mean(0), placement.translations[k].numpy(), atol=1e-6)
    assert sorted(scene.graph.nodes_geometry) == names
    for k, name in enumerate(names):
        transform, geometry = scene.graph[name]
        np.testing.assert_allclose(transform, placement.matrices[k].numpy(), atol=1e-9)
    assert json.loads(json.dumps(layout)) == layout  # JSON-ready
    assert [e["name"] for e in layout] == names
    np.testing.assert_allclose(layout[1]["scale"], [0.5, 0.7, 0.5], atol=1e-6)
    np.testing.assert_allclose(np.array(layout[0]["matrix"]), placement.matrices[0].numpy())


def test_semantic_reference_keeps_the_objects_and_greys_the_rest():
    image = torch.rand(6, 5, 3)
    masks = torch.zeros(2, 6, 5)
    masks[0, 1:3, 1:3] = 1.0
    masks[1, 4, 4] = 0.9
    masks[1, 0, 0] = 0.4  # below the 0.5 threshold: background
    ref = semantic_reference(image, masks, background=0.25)
    union = (masks.amax(0) > 0.5)[..., None]
    assert torch.equal(ref, torch.where(union, image, torch.full_like(image, 0.25)))
    assert torch.equal(semantic_reference(image, masks[0], 1.0)[1:3, 1:3], image[1:3, 1:3])
