"""The multi-object layout scene (mpod_core.layout.scene): placement, and the
DROT-style render whose pixel positions and depths carry gradients w.r.t. the
per-object translation and scale."""
import pytest
import torch
import trimesh

from mpod_core.cameras import orbit_cameras
from mpod_core.layout.scene import LayoutScene, pixel_grid, render_scene, scene_object

CAM = orbit_cameras(0.0, 0.0, 2.5, 40.0)


def _cube(size=1.0, color=(0.9, 0.2, 0.2)):
    box = trimesh.creation.box(extents=(size, size, size))
    v = torch.tensor(box.vertices, dtype=torch.float32) + torch.tensor([5.0, -3.0, 2.0])  # off-origin own frame
    return scene_object(v, torch.tensor(box.faces), torch.tensor(color).expand(len(v), 3).clone())


def _scene(t=((-0.4, 0.0, 0.0), (0.4, 0.1, -0.2)), s=(0.3, 0.4)):
    return LayoutScene([_cube(), _cube(color=(0.2, 0.3, 0.9))], torch.tensor(t), torch.tensor(s))


def test_placement_puts_box_centres_at_the_translations():
    scene = _scene()
    boxes = scene.object_boxes().detach()
    v = scene.placed_vertices().detach()
    for k in range(2):
        mine = v[scene.object_of_vertex == k]
        torch.testing.assert_close(mine.amin(0), boxes[k, 0])
        torch.testing.assert_close(mine.amax(0), boxes[k, 1])
        torch.testing.assert_close(0.5 * (mine.amin(0) + mine.amax(0)), scene.translation[k].detach())
    torch.testing.assert_close(boxes[1, 1] - boxes[1, 0], torch.full((3,), 0.4))


def test_render_positions_are_the_pixel_centres_and_ids_are_right():
    scene = _scene()
    r = render_scene(scene, CAM, 48, 40)
    assert r.xy.shape == (40, 48, 2) and r.depth.shape == (40, 48) and r.color.shape == (40, 48, 3)
    grid = pixel_grid(48, 40)
    assert float((r.xy.detach() - grid)[r.covered].abs().max()) < 1e-5
    assert set(r.object_id.unique().tolist()) == {-1, 0, 1}
    # object 0 sits left (x < 0) of object 1 in the front view
    cols = torch.arange(48).expand(40, 48)
    assert cols[r.object_id == 0].float().mean() < cols[r.object_id == 1].float().mean()
    # depth: the front face of object 0 (z = 0.15) lies 2.35 from the camera; object 1's at 2.5 + 0.2 - 0.2 = 2.5
    assert abs(float(r.depth[r.object_id == 0].min()) - 2.35) < 0.02
    assert abs(float(r.depth[r.object_id == 1].min()) - 2.5) < 0.02
    assert torch.allclose(r.color[~r.covered & (r.alpha == 0)], torch.ones(3))


def test_gradients_point_the_right_way():
    scene = _scene()
    r = render_scene(scene, CAM, 64, 64)
    m0 = r.object_id == 0
    # mean screen x of object 0 grows when it moves right (+x), its screen y grows when it moves down (-y)
    gx, = torch.autograd.grad(r.xy[..., 0][m0].mean(), scene.translation, retain_graph=True)
    gy, = torch.autograd.grad(r.xy[..., 1][m0].mean(), scene.translation, retain_graph=True)
    gd, = torch.autograd.grad(r.depth[m0].mean(), scene.translation, retain_graph=True)
    assert gx[0, 0] > 0 and gy[0, 1] < 0 and gd[0, 2] < 0  # moving towards the camera (+z) brings it nearer
    assert gx[1].abs().sum() == 0  # the other object's pixels are not involved
    # the spread of object 0's pixels grows with its scale
    xy = r.xy[m0]
    spread = ((xy - xy.mean(0)) ** 2).sum(-1).mean()
    gs, = torch.autograd.grad(spread, scene.log_scale)
    assert gs[0, 0] > 0 and gs[0, 1] > 0
    # the antialiased colour gives the silhouette gradient pixel-wise L2 relies on
    g_col, = torch.autograd.grad(r.color.sum(), scene.translation)
    assert g_col[:, :2].abs().sum() > 0


def test_bad_scenes_are_refused():
    cube = _cube()
    with pytest.raises(ValueError, match="no faces"):
        scene_object(cube.vertices, torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        scene_object(cube.vertices, torch.tensor([[0, 1, 99]]))
    with pytest.raises(ValueError, match="no objects"):
        LayoutScene([], torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="for 2 objects"):
        LayoutScene([cube, cube], torch.zeros(3, 3), torch.ones(2))
    with pytest.raises(ValueError, match="> 0"):
        LayoutScene([cube], torch.zeros(1, 3), torch.zeros(1))
    with pytest.raises(ValueError, match="one camera"):
        render_scene(LayoutScene([cube], torch.zeros(1, 3), torch.ones(1)), orbit_cameras([0, 1], [0, 1]), 8, 8)
