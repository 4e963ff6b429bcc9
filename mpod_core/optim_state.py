"""Adam's moments kept with what they optimise, so a resumed run continues them (fields, refine states)."""
from __future__ import annotations

from typing import Dict, Mapping

import torch

#: Per parameter name: ``{"exp_avg", "exp_avg_sq", "step"}`` tensors (detached, on the CPU).
Moments = Dict[str, Dict[str, torch.Tensor]]


def restore_moments(optimiser: torch.optim.Optimizer, named: Mapping[str, torch.Tensor], saved: Moments) -> None:
    """Load ``saved`` moments into ``optimiser`` for each parameter of ``named`` whose size matches
    (a parameter whose shape changed starts fresh)."""
    for name, p in named.items():
        moments = saved.get(name)
        if moments is None or moments["exp_avg"].numel() != p.numel():
            continue
        optimiser.state[p] = {
            "step": moments["step"].detach().float().reshape(()).cpu().clone(),
            "exp_avg": moments["exp_avg"].detach().to(p).reshape(p.shape).clone(),
            "exp_avg_sq": moments["exp_avg_sq"].detach().to(p).reshape(p.shape).clone(),
        }


def current_moments(optimiser: torch.optim.Optimizer, named: Mapping[str, torch.Tensor]) -> Moments:
    """Adam's state for each parameter of ``named`` that has one (detached CPU copies)."""
    out: Moments = {}
    for name, p in named.items():
        state = optimiser.state.get(p)
        if state and "exp_avg" in state:
            out[name] = {k: torch.as_tensor(state[k]).detach().to("cpu").clone()
                         for k in ("exp_avg", "exp_avg_sq", "step")}
    return out
