"""The pack's orbit cameras vs threestudio's (whose zero123 guidance, like Zero123
itself and ComfyUI's StableZero123_Conditioning, conditions on
delta_azimuth = azimuth - reference_azimuth with sin/cos of it).

threestudio: z up, camera centre ``d (cos e cos a, cos e sin a, sin e)``, so
azimuth is counter-clockwise seen from above (+z) and a = 0 is on +x.
The pack: y up, centre ``d (cos e sin a, sin e, cos e cos a)``.
The axis map ``(x, y, z)_threestudio -> (y, z, x)_pack`` is a proper rotation
(a cyclic permutation, det +1); if it carries every threestudio camera onto the
pack's camera with the SAME (e, a), the two conventions agree in sense, and the
relative angles the Zero123 adapter feeds to ComfyUI's camera embedding
(e - e_ref, a - a_ref) mean what Zero123 was trained on.
"""
import math

import torch

from mpod_core import cameras as cam


def threestudio_center(e_deg, a_deg, d):
    e, a = math.radians(e_deg), math.radians(a_deg)
    return torch.tensor([d * math.cos(e) * math.cos(a), d * math.cos(e) * math.sin(a), d * math.sin(e)])


def test_axis_map_is_a_proper_rotation():
    perm = torch.zeros(3, 3)
    perm[0, 1] = perm[1, 2] = perm[2, 0] = 1  # pack = perm @ threestudio
    assert torch.allclose(perm @ torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert math.isclose(float(torch.linalg.det(perm)), 1.0)
    gen = torch.Generator().manual_seed(0)
    es = (torch.rand(50, generator=gen) * 170 - 85).tolist()
    az = (torch.rand(50, generator=gen) * 720 - 360).tolist()
    ours = cam.orbit_cameras(es, az, 2.5).centers.double()
    for i, (e, a) in enumerate(zip(es, az)):
        mapped = perm.double() @ threestudio_center(e, a, 2.5).double()
        assert torch.allclose(ours[i], mapped, atol=1e-5), (e, a, ours[i], mapped)


def test_azimuth_is_counter_clockwise_from_above():
    # Seen from above (+y toward the viewer), with +x to the right and +z toward the
    # bottom of the picture: front (+z, a=0) -> a=90 at +x is a counter-clockwise turn.
    c0, c90 = cam.orbit_cameras([0.0, 0.0], [0.0, 90.0], 1.0).centers
    assert torch.allclose(c0, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(c90, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    # picture coordinates (u right = x, v up = -z): angle goes from -90 to 0 degrees: increasing = CCW
    ang0 = math.degrees(math.atan2(-float(c0[2]), float(c0[0])))
    ang90 = math.degrees(math.atan2(-float(c90[2]), float(c90[0])))
    assert ang90 - ang0 == 90.0
