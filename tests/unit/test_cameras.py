"""Camera convention: hand-computed values (see mpod_core/cameras.py docstring)."""
import math

import pytest
import torch

from mpod_core import cameras as cam


def test_reference_view_is_front_camera_on_plus_z():
    c = cam.reference_camera(dtype=torch.float64)
    torch.testing.assert_close(c.centers[0], torch.tensor([0.0, 0.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(c.c2w[0, :3, :3], torch.eye(3, dtype=torch.float64))
    assert float(c.fovy[0]) == 40.0


@pytest.mark.parametrize("elev,azim,center,right,up", [
    (0, 90, (2.5, 0, 0), (0, 0, -1), (0, 1, 0)),        # right side view from +x
    (0, 180, (0, 0, -2.5), (-1, 0, 0), (0, 1, 0)),      # back view
    (0, -90, (-2.5, 0, 0), (0, 0, 1), (0, 1, 0)),
    (90, 0, (0, 2.5, 0), (1, 0, 0), (0, 0, -1)),        # top view: image-up is -z, no singularity
    (-90, 0, (0, -2.5, 0), (1, 0, 0), (0, 0, 1)),
    (30, 0, (0, 2.5 * 0.5, 2.5 * math.cos(math.pi / 6)), (1, 0, 0), (0, math.cos(math.pi / 6), -0.5)),
])
def test_orbit_axes_hand_computed(elev, azim, center, right, up):
    c = cam.orbit_cameras(elev, azim, 2.5, 40, dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(c.centers[0], torch.tensor(center, **f64), atol=1e-12, rtol=0)
    torch.testing.assert_close(c.c2w[0, :3, 0], torch.tensor(right, **f64), atol=1e-12, rtol=0)
    torch.testing.assert_close(c.c2w[0, :3, 1], torch.tensor(up, **f64), atol=1e-12, rtol=0)
    # rotation is orthonormal and right-handed
    rot = c.c2w[0, :3, :3]
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, **f64), atol=1e-12, rtol=0)
    assert torch.det(rot) == pytest.approx(1.0)


def test_azimuth_is_counter_clockwise_from_above():
    # From above (+y) with x to the right, +z points down the page: az 0 (+z) -> az 90 (+x)
    # is a counter-clockwise turn, i.e. a positive rotation about +y.
    c = cam.orbit_cameras(0, [0, 45, 90], 1.0, 40, dtype=torch.float64)
    angles = torch.atan2(c.centers[:, 0], c.centers[:, 2])
    torch.testing.assert_close(angles, torch.deg2rad(torch.tensor([0.0, 45.0, 90.0], dtype=torch.float64)))


def test_projection_of_known_points():
    c = cam.reference_camera(dtype=torch.float64)
    h = 2.5 * math.tan(math.radians(20))  # half height of the view at the origin plane
    pts = torch.tensor([[0, 0, 0], [0, h, 0], [h, 0, 0], [0, 0, 1.0]], dtype=torch.float64)
    clip = cam.world_to_clip(pts, c, 64, 32)[0]
    ndc = clip[:, :3] / clip[:, 3:]
    assert clip[0, 3] == pytest.approx(2.5)  # w = view depth
    torch.testing.assert_close(ndc[1, :2], torch.tensor([0.0, 1.0], dtype=torch.float64))  # top edge
    torch.testing.assert_close(ndc[2, :2], torch.tensor([0.5, 0.0], dtype=torch.float64))  # aspect 2
    assert -1 < ndc[3, 2] < ndc[0, 2] < 1  # the nearer point has the smaller z_ndc
    pix = cam.ndc_to_pixel(ndc[:2, :2], 64, 32)
    torch.testing.assert_close(pix, torch.tensor([[32.0, 16.0], [32.0, 0.0]], dtype=torch.float64))


def test_ray_directions_hand_computed():
    c = cam.orbit_cameras(0, 0, 1.0, 90.0, dtype=torch.float64)  # f = 0.5 * H for fov 90
    origins, dirs = cam.get_rays(c, 2, 2, normalize=False)
    torch.testing.assert_close(dirs[0, 0, 0], torch.tensor([-0.5, 0.5, -1.0], dtype=torch.float64))
    torch.testing.assert_close(dirs[0, 1, 1], torch.tensor([0.5, -0.5, -1.0], dtype=torch.float64))
    torch.testing.assert_close(origins[0, 0, 0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_rays_reproject_to_their_pixel_centres():
    c = cam.orbit_cameras([10, -35, 60], [0, 123, 250], [2.5, 3.0, 1.7], [40, 30, 60], dtype=torch.float64)
    w, h = 7, 5
    origins, dirs = cam.get_rays(c, w, h)
    pts = origins + 1.3 * dirs
    clip = cam.world_to_clip(pts.reshape(3, -1, 3), c, w, h)
    pix = cam.ndc_to_pixel(clip[..., :2] / clip[..., 3:], w, h).reshape(3, h, w, 2)
    jj, ii = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    expected = torch.stack([ii + 0.5, jj + 0.5], -1).expand(3, h, w, 2)
    torch.testing.assert_close(pix, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(distance=0.0), "distance"), (dict(distance=-1.0), "distance"),
    (dict(fov=0.0), "fov"), (dict(fov=-5.0), "fov"), (dict(fov=180.0), "fov"),
    (dict(elevation=[0, 1], azimuth=[0, 1, 2]), "same number"),
    (dict(elevation=float("nan")), "finite"),
])
def test_bad_camera_arguments_raise(kwargs, match):
    args = dict(elevation=0.0, azimuth=0.0, distance=2.5, fov=40.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cam.orbit_cameras(**args)


def test_parse_angle_list():
    assert cam.parse_angle_list("0, 90,180  270", "azimuths") == [0, 90, 180, 270]
    with pytest.raises(ValueError, match="azimuths"):
        cam.parse_angle_list("0, ninety", "azimuths")
    with pytest.raises(ValueError, match="elevations"):
        cam.parse_angle_list("  ", "elevations")
