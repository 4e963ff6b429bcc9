"""REPARO's multi-view evaluation (mpod_core.scene_evaluation) against known answers: identical scenes give
the PSNR cap, SSIM 1, LPIPS 0 and CLIP 1; one object of two moved further and further makes every figure
worse, strictly; the cameras are the reference's (its centre, its bounding sphere filling the view, shared by
both scenes), a scene moved as a whole counts (nothing renormalised); bad inputs are named.

LPIPS runs on an AlexNet backbone with random weights written in torchvision's format (seed 0): its figures
are not the paper's, but 0 for identical views and monotone in the shift here (checked; the linear layers
are the package's real ones)."""
import json
import math

import numpy as np
import pytest
import torch
import trimesh

from mpod_core.mesh import MeshError, compose_scene
from mpod_core.scene_evaluation import (LPIPS_BACKBONE_FILE, PSNR_CAP_DB, SceneEvalConfig, evaluate_scene,
                                        evaluation_cameras, evaluation_plot, load_lpips, lpips_per_view,
                                        psnr_per_view, render_pairs)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMALL = SceneEvalConfig(views=6, resolution=64)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A random AlexNet backbone in torchvision's format (``alexnet().state_dict()`` saved), seed 0."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / LPIPS_BACKBONE_FILE
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def lpips_model(alexnet_file):
    return load_lpips(alexnet_file)


def _embed(images):
    """A stand-in image encoder: a fixed random projection of the pixels to 32 numbers."""
    flat = images.reshape(images.shape[0], -1).double()
    weights = torch.randn(flat.shape[1], 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (flat - 0.5) @ weights


def _coloured(mesh, rgb):
    mesh.visual.vertex_colors = np.tile([*rgb, 255], (len(mesh.vertices), 1))
    return mesh


def _scene(shift=0.0, offset=(0.0, 0.0, 0.0)):
    """Two objects, about one unit across: a red box and a blue ball, the ball moved by ``shift`` along x."""
    box = _coloured(trimesh.creation.box(extents=(0.4, 0.5, 0.4)), (200, 50, 50))
    box.apply_translation(np.add((-0.3, 0.0, 0.0), offset))
    ball = _coloured(trimesh.creation.icosphere(subdivisions=3, radius=0.25), (40, 60, 200))
    ball.apply_translation(np.add((0.3 + shift, 0.0, 0.0), offset))
    return compose_scene([box, ball], ["box", "ball"])


def test_identical_scenes_give_the_cap_one_zero_and_one(lpips_model):
    seen, calls = [], []

    def embed(images):
        calls.append(images.shape[0])
        return _embed(images)

    result = evaluate_scene(_scene(), _scene(), SMALL, lpips_model=lpips_model, embed=embed, backend="torch",
                            progress=lambda done, total, preview: seen.append((done, total)))
    assert calls == [8, 4]                                   # 4 views' two renders a call, then the last 2 views
    assert torch.all(result.psnr == PSNR_CAP_DB)
    assert float((result.ssim - 1).abs().max()) < 1e-6
    assert float(result.lpips.abs().max()) < 1e-6
    assert float((result.clip - 1).abs().max()) < 1e-6
    assert result.means() == pytest.approx({"psnr": PSNR_CAP_DB, "ssim": 1.0, "lpips": 0.0, "clip": 1.0}, abs=1e-6)
    assert seen[-1] == (18, 18) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert [d for d, _ in seen][-6:] == list(range(13, 19))                  # one step per view's figures


def test_figures_worsen_strictly_as_one_object_moves(lpips_model):
    reference = _scene()
    means = [evaluate_scene(_scene(shift), reference, SMALL, lpips_model=lpips_model, embed=_embed,
                            backend="torch").means() for shift in (0.05, 0.1, 0.2, 0.4)]
    psnr, ssim, lpips, clip = ([m[k] for m in means] for k in ("psnr", "ssim", "lpips", "clip"))
    assert all(a > b for a, b in zip(psnr, psnr[1:])), psnr
    assert all(a > b for a, b in zip(ssim, ssim[1:])), ssim
    assert all(a < b for a, b in zip(lpips, lpips[1:])), lpips
    assert psnr[0] < 40 and ssim[0] < 0.99 and lpips[0] > 1e-3 and max(clip) < 0.999, means  # 0.05 already shows


def test_a_scene_moved_as_a_whole_counts():
    # An evaluation that renormalised each scene would see two identical scenes here.
    moved = evaluate_scene(_scene(offset=(0.2, 0.0, 0.0)), _scene(), SMALL, backend="torch")
    assert moved.means()["psnr"] < 30 and moved.means()["ssim"] < 0.97, moved.means()


def test_cameras_orbit_the_reference_centre_and_frame_its_bounding_sphere():
    centre = np.array([3.0, -1.0, 2.0])
    radius = 0.4
    ball = _coloured(trimesh.creation.icosphere(subdivisions=4, radius=radius), (40, 60, 200))
    ball.apply_translation(centre)
    config = SceneEvalConfig(views=4, resolution=64, elevation=30.0, fov=40.0)
    cams = evaluation_cameras(torch.as_tensor(ball.vertices), config)
    half_diagonal = float(np.linalg.norm(ball.bounds[1] - ball.bounds[0])) / 2
    assert cams.radius == pytest.approx(half_diagonal) and np.allclose(cams.centre, ball.bounds.mean(0))
    assert cams.distance == pytest.approx(half_diagonal / math.sin(math.radians(20)))
    c2w = cams.cameras.c2w.double()
    to_centre = torch.as_tensor(cams.centre) - c2w[:, :3, 3]
    torch.testing.assert_close(to_centre.norm(dim=1), torch.full((4,), cams.distance, dtype=torch.float64))
    torch.testing.assert_close(-c2w[:, :3, 2], to_centre / to_centre.norm(dim=1, keepdim=True))  # looking at it
    elevations = torch.rad2deg(torch.asin(-to_centre[:, 1] / to_centre.norm(dim=1)))
    torch.testing.assert_close(elevations, torch.full((4,), 30.0, dtype=torch.float64))

    # The ball far from the origin is drawn at the centre of every view at the size the framing predicts: its
    # bounding box's sphere (radius sqrt(3) x the ball's) fills the view, so the ball spans
    # tan(asin(sin(fov / 2) / sqrt(3))) / tan(fov / 2) of the image height.
    elsewhere = _coloured(trimesh.creation.box(extents=(0.1, 0.1, 0.1)), (0, 0, 0))
    result = evaluate_scene(elsewhere, ball, config, backend="torch")
    assert np.allclose(result.cameras.centre, ball.bounds.mean(0))     # the reference's, not the scene's
    blue = (result.reference_renders[..., 2] > 0.5) & (result.reference_renders[..., 0] < 0.5)
    rows = torch.arange(64, dtype=torch.float64) + 0.5
    for view in blue:
        ys, xs = torch.nonzero(view, as_tuple=True)
        assert abs(float(rows[ys].mean()) - 32) < 0.5 and abs(float(rows[xs].mean()) - 32) < 0.5
        diameter = float(view.sum(0).gt(0).sum())
        expected = 64 * math.tan(math.asin(math.sin(math.radians(20)) / math.sqrt(3))) / math.tan(math.radians(20))
        assert abs(diameter - expected) <= 2, (diameter, expected)
    assert float(result.renders.min()) > 0.99    # the small box at the origin is far outside these views


def test_psnr_is_the_closed_form_and_lpips_reads_the_backbone_file(alexnet_file, lpips_model):
    a, b = torch.zeros(2, 8, 8, 3), torch.full((2, 8, 8, 3), 0.1)
    torch.testing.assert_close(psnr_per_view(a, b), torch.full((2,), 20.0, dtype=torch.float64))
    state = torch.load(alexnet_file, weights_only=True)
    backbone = lpips_model.net.state_dict()
    assert torch.equal(backbone["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(backbone["slice5.10.bias"], state["features.10.bias"])
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert float(lpips_per_view(lpips_model, images, images).abs().max()) < 1e-6
    assert float(lpips_per_view(lpips_model, images, images.flip(0)).min()) > 0.01


def test_report_json_plot_and_pairs_without_lpips_or_clip():
    result = evaluate_scene(_scene(0.1), _scene(), SceneEvalConfig(views=3, resolution=48), backend="torch",
                            notes=["LPIPS left out: no weights"])
    data = json.loads(result.to_json())
    assert data["views"] == 3 and len(data["per_view"]) == 3 and data["psnr_cap_db"] == PSNR_CAP_DB
    assert data["mean"]["lpips"] is None and data["mean"]["clip"] is None and data["per_view"][1]["lpips"] is None
    assert data["mean"]["psnr"] == pytest.approx(float(result.psnr.mean()))
    assert [row["azimuth"] for row in data["per_view"]] == [0.0, 120.0, 240.0]
    assert data["notes"] == ["LPIPS left out: no weights"]
    report = result.report()
    assert "LPIPS left out: no weights" in report and f"{float(result.ssim[2]):.4f}" in report
    plot = evaluation_plot(result)
    assert plot.ndim == 3 and plot.shape[-1] == 3 and plot.dtype == torch.float32 and float(plot.std()) > 0.05
    pairs = render_pairs(result)
    assert pairs.shape == (3, 48, 98, 3)
    assert torch.equal(pairs[:, :, :48], result.renders) and torch.equal(pairs[:, :, 50:], result.reference_renders)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="views must be >= 1"):
        evaluate_scene(_scene(), _scene(), SceneEvalConfig(views=0, resolution=32))
    with pytest.raises(ValueError, match="resolution must be >= 32"):
        evaluate_scene(_scene(), _scene(), SceneEvalConfig(views=2, resolution=16))
    with pytest.raises(MeshError, match="^scene: the scene is empty"):
        evaluate_scene(trimesh.Scene(), _scene(), SMALL)
    with pytest.raises(MeshError, match="^reference_scene: the scene is empty"):
        evaluate_scene(_scene(), trimesh.Scene(), SMALL)
    with pytest.raises(MeshError, match="^reference_scene: the mesh is empty"):
        evaluate_scene(_scene(), trimesh.Trimesh(), SMALL)
    with pytest.raises(ValueError, match="exceed"):
        evaluate_scene(_scene(), _scene(), SceneEvalConfig(views=64, resolution=1024))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not torchvision's AlexNet.*features.0.weight"):
        load_lpips(other)
    with pytest.raises(ValueError, match=r"embed: expected \(4, D\)"):
        evaluate_scene(_scene(), _scene(), SceneEvalConfig(views=2, resolution=32), embed=lambda x: _embed(x)[:3],
                       backend="torch")
    torn = tmp_path / "torn.pth"
    torn.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="torn.pth: not a readable weights file"):
        load_lpips(torn)
