"""Rebuild the bundled example mesh ``workflows/inputs/example.glb``.

The mesh is the pack's own: a small house with a tree beside it, built from
trimesh primitives with one vertex colour per part (walls, roof, door,
windows, chimney, trunk, crown with a light-to-dark gradient, ground plate)
and written with the pack's ``mpod_core.mesh.save_mesh``. It is asymmetric on
purpose, so the four views of ``workflows/mesh_roundtrip.json`` (azimuths 0,
90, 180, 270) all look different: the door faces the front (+z), the
chimney sits at the back right, the tree stands on the left (-x).

scripts/setup.sh copies it to ``.comfyui/base/input/3d/example.glb``, the
file ``workflows/mesh_roundtrip.json`` loads.

Usage: .venv/bin/python scripts/make_example_inputs.py [--out workflows/inputs]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import trimesh

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpod_core import mesh as meshlib  # noqa: E402


def _part(mesh: trimesh.Trimesh, rgb, gradient: float = 0.0) -> trimesh.Trimesh:
    """``mesh`` with every vertex coloured ``rgb`` (0-255); ``gradient`` > 0
    darkens the lower vertices by up to that fraction (a little depth cue)."""
    colors = np.tile(np.asarray(rgb, dtype=np.float64), (len(mesh.vertices), 1))
    if gradient:
        y = mesh.vertices[:, 1]
        t = (y - y.min()) / max(float(np.ptp(y)), 1e-9)
        colors *= (1.0 - gradient * (1.0 - t))[:, None]
    rgba = np.concatenate([colors.round(), np.full((len(colors), 1), 255.0)], axis=1).astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    return mesh


def _box(extents, center, rgb) -> trimesh.Trimesh:
    return _part(trimesh.creation.box(extents=extents, transform=trimesh.transformations.translation_matrix(center)),
                 rgb)


def _roof(width: float, depth: float, height: float, base_y: float, rgb) -> trimesh.Trimesh:
    """A gable roof: a triangular prism along z, ridge parallel to the front."""
    w, d = width / 2, depth / 2
    profile = [(-w, base_y), (w, base_y), (0.0, base_y + height)]
    vertices = [(x, y, z) for z in (d, -d) for x, y in profile]
    faces = [(0, 1, 2), (3, 5, 4),            # front and back gables (outward winding)
             (0, 3, 4), (0, 4, 1),            # bottom
             (1, 4, 5), (1, 5, 2),            # right slope
             (0, 2, 5), (0, 5, 3)]            # left slope
    mesh = trimesh.Trimesh(vertices=np.asarray(vertices), faces=np.asarray(faces), process=False)
    mesh.fix_normals()
    return _part(mesh, rgb)


def build_example_mesh() -> trimesh.Trimesh:
    """The example scene as one vertex-coloured mesh (+y up, front on +z)."""
    wall_w, wall_h, wall_d = 0.8, 0.5, 0.6
    parts = [
        _box((1.5, 0.04, 1.0), (-0.2, -0.02, 0.0), (96, 160, 72)),                 # ground plate
        _box((wall_w, wall_h, wall_d), (0.0, wall_h / 2, 0.0), (236, 222, 190)),   # walls
        _roof(wall_w + 0.12, wall_d + 0.12, 0.32, wall_h, (178, 48, 38)),          # roof
        _box((0.18, 0.3, 0.02), (0.0, 0.15, wall_d / 2 + 0.01), (110, 70, 40)),    # door (front)
        _box((0.14, 0.14, 0.02), (0.25, 0.3, wall_d / 2 + 0.01), (80, 140, 210)),  # front window
        _box((0.02, 0.14, 0.18), (wall_w / 2 + 0.01, 0.3, 0.0), (80, 140, 210)),   # right window
        _box((0.1, 0.3, 0.1), (0.22, 0.75, -0.15), (120, 120, 128)),               # chimney (back right)
        _part(trimesh.creation.cylinder(radius=0.05, height=0.35, sections=12,
                                        transform=trimesh.transformations.translation_matrix((-0.7, 0.175, 0.15))
                                        @ trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0))),
              (120, 80, 45)),                                                       # trunk
        _part(trimesh.creation.icosphere(subdivisions=2, radius=0.22).apply_translation((-0.7, 0.5, 0.15)),
              (60, 170, 70), gradient=0.45),                                        # crown
    ]
    mesh = trimesh.util.concatenate(parts)
    meshlib.check_mesh(mesh, "example mesh")
    return mesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "workflows" / "inputs",
                        help="folder to write example.glb into (default: workflows/inputs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = meshlib.save_mesh(build_example_mesh(), args.out / "example.glb")[0]
    path.chmod(0o644)  # save_mesh writes through a private temporary file
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
