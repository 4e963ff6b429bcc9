"""Neural fields: the stage-1 NeRF (hash grid + MLP, blob init), the
:class:`RadianceField` that travels between nodes, its file format, and mesh
extraction by marching cubes.

Public API::

    NeRFFieldConfig, NeRFField(config, backend)      # density, albedo, normals
    RadianceField(config, samples_per_ray, grid_resolution, backend, meta)
        .render(cameras, W, H, ...) -> {color, opacity, depth[, normal]} (N, H, W, ...)
        .opacity(cameras, W, H) -> (N, H, W)    # MPOD123 eq. 3-5, density only
    save_radiance_field(field, path), load_radiance_field(path), read_settings(path)
"""
from .io import FORMAT_VERSION, load_radiance_field, read_settings, save_radiance_field
from .nerf import NeRFField, NeRFFieldConfig
from .radiance_field import CAMERA_CONVENTION, RadianceField

__all__ = ["CAMERA_CONVENTION", "FORMAT_VERSION", "NeRFField", "NeRFFieldConfig", "RadianceField",
           "load_radiance_field", "read_settings", "save_radiance_field"]
