"""Render views and backpropagate an image-space loss with bounded memory.

Autograd keeps every sample of a render for the backward pass (about 3 KB per
sample for the default field), so a whole 512^2 view in one graph needs tens
of GiB. :func:`render_and_backprop` avoids that without changing the result:

1. render every view WITHOUT autograd (memory: the output images only);
2. evaluate the loss on those images as leaf tensors and backpropagate to them:
   ``d loss / d image`` (the loss may be anything differentiable, e.g. a VAE
   encoder and score distillation);
3. re-render the same rays in blocks WITH autograd and call
   ``torch.autograd.backward(block_outputs, d loss / d block_outputs)``, which
   accumulates exactly the parameter gradients of the full render.

Step 3 reproduces the samples of step 1 because the jitter of a ray depends
only on the seed and the ray's index (:func:`mpod_core.volume.hashed_uniform`),
and the occupancy grid and the field do not change in between. Blocks are cut
by the samples each ray evaluated in step 1, so a block holds at most about
``grad_sample_budget`` samples in its graph at any resolution. When the whole
render cannot exceed the budget (rays x samples_per_ray <= budget), one pass
with autograd is used instead (same gradients, no second render), and also when the caller's
estimate of the samples (e.g. the previous iteration's count) is at most half
the budget.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..cameras import Cameras
from ..volume.rendering import DEFAULT_CHUNK, jitter_seed_from
from .radiance_field import RadianceField
from .shading import Shading

#: Samples held in one autograd graph by default: about 1.5 GiB for the default field with
#: analytic normals (double backward keeps ~6 KB per sample; measured at 512^2 in the live test).
DEFAULT_GRAD_SAMPLE_BUDGET = 1 << 18

#: ``loss_fn(outputs) -> (loss, terms)``: outputs as :meth:`RadianceField.render`
#: returns them ((N, H, W, ...) tensors); terms are floats for the loss history.
ImageLossFn = Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, float]]]


def _block_bounds(samples: torch.Tensor, budget: int) -> List[Tuple[int, int]]:
    """Split rays (in order) into contiguous blocks of about ``budget`` samples.

    Args:
        samples: (R,) samples per ray.
        budget: samples per block (a block may exceed it by one ray's samples).

    Returns:
        [(lo, hi)] covering [0, R).
    """
    r = samples.shape[0]
    if r == 0:
        return []
    before = torch.cumsum(samples, 0) - samples  # samples of the rays before each ray
    block = torch.div(before, max(int(budget), 1), rounding_mode="floor")
    starts = torch.nonzero(torch.diff(block, prepend=block[:1] - 1)).reshape(-1).tolist()
    return list(zip(starts, starts[1:] + [r]))


def render_and_backprop(field: RadianceField, cameras: Cameras, width: int, height: int, loss_fn: ImageLossFn,
                        *, shadings: Optional[Sequence[Optional[Shading]]] = None, background=None,
                        with_normals: bool = False, generator: Optional[torch.Generator] = None,
                        grad_sample_budget: int = DEFAULT_GRAD_SAMPLE_BUDGET, chunk: int = DEFAULT_CHUNK,
                        check_finite: Optional[Callable[[torch.Tensor], None]] = None,
                        expected_samples: Optional[int] = None
                        ) -> Tuple[torch.Tensor, Dict[str, float], Dict[str, torch.Tensor]]:
    """Render ``cameras``, evaluate ``loss_fn`` and accumulate its parameter gradients.

    Args:
        field: the field; gradients accumulate into its parameters' ``.grad``.
        cameras: N views.
        width, height: image size.
        loss_fn: see :data:`ImageLossFn`.
        shadings: one :class:`Shading` (or None: albedo) per view; None: all albedo.
        background: as :meth:`RadianceField.render`.
        with_normals: render ``normal`` and ``orientation`` too.
        generator: source of the jitter seed (None: sample midpoints).
        grad_sample_budget: samples held in one autograd graph at most (> 0).
        chunk: rays per marching batch.
        check_finite: called with the detached loss before any gradient is
            propagated (may raise, e.g. on a non-finite loss).
        expected_samples: an estimate of the samples this render evaluates (e.g.
            from the previous iteration's ``samples``); one pass with autograd is
            used when twice the estimate fits the budget.

    Returns:
        (loss detached, terms, outputs detached (N, H, W, ...), including
        ``samples`` (N, H, W) long: the samples each pixel's ray evaluated).
    """
    n = len(cameras)
    if shadings is None:
        shadings = [None] * n
    if len(shadings) != n:
        raise ValueError(f"shadings: expected one per view ({n}), got {len(shadings)}")
    if grad_sample_budget < 1:
        raise ValueError(f"grad_sample_budget must be >= 1, got {grad_sample_budget}")
    origins, dirs = field.rays(cameras, width, height)
    per_view = width * height
    seed = jitter_seed_from(generator)

    def render_view(v: int, lo: int = 0, hi: Optional[int] = None, count: bool = False):
        hi = per_view if hi is None else hi
        a, b = v * per_view + lo, v * per_view + hi
        return field.render_rays(origins[a:b], dirs[a:b], background=background, with_normals=with_normals,
                                 shading=shadings[v], jitter_seed=seed, ray_offset=a, chunk=chunk,
                                 count_samples=count)

    def images(parts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return {k: torch.cat([p[k] for p in parts]).reshape(n, height, width, *parts[0][k].shape[1:])
                for k in parts[0]}

    worst = n * per_view * field.samples_per_ray
    if worst <= grad_sample_budget or (expected_samples is not None and 2 * expected_samples <= grad_sample_budget):
        out = images([render_view(v, count=True) for v in range(n)])
        loss, terms = loss_fn(out)
        if check_finite is not None:
            check_finite(loss.detach())
        loss.backward()
        return loss.detach(), terms, {k: v.detach() for k, v in out.items()}

    with torch.no_grad():
        parts = [render_view(v, count=True) for v in range(n)]
    leaves = {k: v.requires_grad_(v.is_floating_point()) for k, v in images(parts).items()}
    loss, terms = loss_fn(leaves)
    if check_finite is not None:
        check_finite(loss.detach())
    loss.backward()
    grads = {k: v.grad.reshape(n * per_view, *v.shape[3:]) for k, v in leaves.items() if v.grad is not None}
    for v in range(n):
        for lo, hi in _block_bounds(parts[v]["samples"], grad_sample_budget):
            block = render_view(v, lo, hi)
            keys = [k for k in grads if block[k].requires_grad]
            if keys:
                a = v * per_view
                torch.autograd.backward([block[k] for k in keys], [grads[k][a + lo:a + hi] for k in keys])
    return loss.detach(), terms, {k: t.detach() for k, t in leaves.items()}
