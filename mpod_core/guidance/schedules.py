"""Timestep schedules of score distillation, scaled to the length of a run.

The reference configurations anneal the sampled timestep range over a fixed
number of steps of their own run length (threestudio's
``[start_iter, start_value, end_value, end_iter]``). A fixed count inside a
longer run leaves most of it at low noise, where little global shape is
learned, so the schedules here are stated as *fractions of the run* and turned
into step counts for the run at hand by :func:`sds_for_run`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .sds import SDSConfig


@dataclass(frozen=True)
class TimestepSchedule:
    """A timestep range annealed linearly between two fractions of the run.

    Fractions of the T training timesteps: ``(min_step, max_step)`` until
    ``anneal_start`` x run length, then linearly to ``(anneal_min_step,
    anneal_max_step)``, reached at ``anneal_end`` x run length and kept to the end.
    ``anneal_min_step = anneal_max_step = None`` keeps the range fixed.
    """

    min_step: float
    max_step: float
    anneal_min_step: Optional[float] = None
    anneal_max_step: Optional[float] = None
    anneal_start: float = 0.0
    """Fraction of the run where the anneal starts, in [0, 1]."""
    anneal_end: float = 0.0
    """Fraction of the run where the annealed range is reached, in [anneal_start, 1]."""
    source: str = "custom"
    """Where the numbers come from."""

    def validate(self) -> None:
        for name in ("anneal_start", "anneal_end"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"timestep schedule: {name} must be a fraction of the run in [0, 1], got {v!r}")
        if self.anneal_end < self.anneal_start:
            raise ValueError(f"timestep schedule: anneal_end ({self.anneal_end}) must not be before anneal_start "
                             f"({self.anneal_start})")
        self.sds_config(SDSConfig(), 1).validate()

    def sds_config(self, base: SDSConfig, run_length: int) -> SDSConfig:
        """``base`` with this schedule's range and anneal, for a run of ``run_length`` steps."""
        if run_length < 1:
            raise ValueError(f"run_length must be >= 1, got {run_length}")
        annealed = self.anneal_min_step is not None or self.anneal_max_step is not None
        start = int(round(self.anneal_start * run_length)) if annealed else 0
        end = int(round(self.anneal_end * run_length)) if annealed else 0
        return dataclasses.replace(base, min_step=self.min_step, max_step=self.max_step,
                                   anneal_min_step=self.anneal_min_step, anneal_max_step=self.anneal_max_step,
                                   anneal_start_step=start, anneal_steps=max(end, start))


#: Named schedules users ask for (the node's ``timestep_preset`` widget).
TIMESTEP_PRESETS: Dict[str, TimestepSchedule] = {
    "stable-zero123": TimestepSchedule(
        0.7, 0.98, 0.3, 0.8, 50 / 600, 200 / 600,
        source="threestudio configs/stable-zero123.yaml: min_step_percent [50, 0.7, 0.3, 200], "
               "max_step_percent [50, 0.98, 0.8, 200] in a 600-step run (8% to 33%)"),
    "zero123-xl": TimestepSchedule(
        0.4, 0.85, 0.2, 0.5, 0.0, 200 / 600,
        source="threestudio configs/zero123.yaml (Zero123-XL): [0.4, 0.85] -> [0.2, 0.5] over 200 of 600 steps"),
    "magic123": TimestepSchedule(
        0.2, 0.6, source="Magic123 (official code), coarse stage: a fixed [0.2, 0.6]"),
}
#: The widget's choices: the presets, then "custom" (the node's own min/max/anneal widgets).
TIMESTEP_PRESET_NAMES: Tuple[str, ...] = tuple(TIMESTEP_PRESETS) + ("custom",)

#: Stable Diffusion's timesteps in MPOD123's DMTet refine (REFERENCE.md "Score distillation").
REFINE_TIMESTEP_PRESETS: Dict[str, TimestepSchedule] = {
    "magic123-refine": TimestepSchedule(
        0.02, 0.5, source="Magic123 (official code), fine stage: a fixed [0.02, 0.5]"),
    "threestudio-magic123-refine": TimestepSchedule(
        0.2, 0.6, source="threestudio configs/magic123-refine-sd.yaml: a fixed [0.2, 0.6]"),
}
#: DMTet Refine's choices: its presets, then "custom".
REFINE_TIMESTEP_PRESET_NAMES: Tuple[str, ...] = tuple(REFINE_TIMESTEP_PRESETS) + ("custom",)


def timestep_schedule(preset: str, custom: Optional[TimestepSchedule] = None,
                      presets: Optional[Dict[str, TimestepSchedule]] = None) -> TimestepSchedule:
    """The schedule named ``preset`` in ``presets`` (default :data:`TIMESTEP_PRESETS`), or ``custom``
    when ``preset == "custom"``."""
    presets = TIMESTEP_PRESETS if presets is None else presets
    if preset == "custom":
        if custom is None:
            raise ValueError("timestep_preset 'custom' needs the custom schedule's values")
        custom.validate()
        return custom
    if preset not in presets:
        raise ValueError(f"timestep_preset must be one of {', '.join([*presets, 'custom'])}; got {preset!r}")
    return presets[preset]
