"""REPARO's layout alignment: entropic optimal transport between pixel clouds.

Public API (:mod:`.sinkhorn`)::

    sinkhorn(x, y, a=None, b=None, *, cost=squared_euclidean_cost, eps=1e-2, ...) -> SinkhornResult
    transport_plan(x, y, result, a, b, cost) -> (N, M)
    barycentric_targets(x, y, result, a, b, cost, block) -> (N, D)
    squared_euclidean_cost(x, y) -> (n, M);  grouped_norm_cost(groups) -> CostFn
    subsample(n, k, generator) -> (k,) indices

The multi-object scene (per-object translation and scale, DROT-style render
whose pixel positions and depths carry gradients) lives in :mod:`.scene`,
imported from there, not here, so the solver imports without the renderer.
"""
from .sinkhorn import (DEFAULT_BLOCK, CostFn, SinkhornResult, barycentric_targets, grouped_norm_cost, sinkhorn,
                       squared_euclidean_cost, subsample, transport_plan)

__all__ = ["DEFAULT_BLOCK", "CostFn", "SinkhornResult", "barycentric_targets", "grouped_norm_cost", "sinkhorn",
           "squared_euclidean_cost", "subsample", "transport_plan"]
