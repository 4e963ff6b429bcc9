"""Volume rendering for NeRF-style fields: occupancy grid, ray marching with
empty-space skipping and packed-sample compositing, in pure PyTorch.

Public API::

    ray_aabb(origins, dirs, aabb) -> t_near (R,), t_far (R,), hit (R,)
    OccupancyGrid(aabb, resolution=32, ema_decay=0.95, threshold=0.01, warmup_steps=256)
        .update(step, density_fn, generator=None, *, step_size=1.0), .occupied(points) -> (N,) bool
    sample_along_rays(origins, dirs, t_near, t_far, step_size, grid=None, *, density_fn=None,
                      alpha_threshold=0.0, early_stop_eps=0.0) -> RaySamples
    render_weights(sigmas, t_starts, t_ends, ray_indices, n_rays) -> weights, transmittance, alphas
    accumulate(weights, values, ray_indices, n_rays) -> (R, C) or (R,)
    render_rays(field_fn, origins, dirs, aabb, step_size, grid=None, *, density_fn=None,
                alpha_threshold=0.0, early_stop_eps=0.0) -> {color, opacity, depth[, normal]}
    opacity_from_density(density_fn, origins, dirs, aabb, step_size, grid=None, *,
                         alpha_threshold=0.0, early_stop_eps=0.0) -> (R,)

Rays come from :func:`mpod_core.cameras.get_rays` (flattened to (R, 3)).
"""
from .occupancy import OccupancyGrid
from .rendering import (DEFAULT_CHUNK, DEFAULT_MAX_SAMPLES_PER_RAY, RaySamples, accumulate,
                        opacity_from_density, ray_aabb, render_rays, render_weights, sample_along_rays)

__all__ = ["DEFAULT_CHUNK", "DEFAULT_MAX_SAMPLES_PER_RAY", "OccupancyGrid", "RaySamples", "accumulate",
           "opacity_from_density", "ray_aabb", "render_rays", "render_weights", "sample_along_rays"]
