"""Per-iteration loss histories in ComfyUI's ``LOSS_MAP`` layout.

A loss map is ``{"loss": [total at each iteration], "<term>": [that term at each
iteration], ...}``, lists of Python floats. ``"loss"`` is what core Train LoRA
outputs and what core Plot Loss Graph draws (it reads that key only and ignores
the others). Every list has one entry per iteration. A term is recorded
unweighted; at an iteration where it is not part of the loss (SDS on a
reference-view step of stage 1, a semantic loss evaluated every n-th step) it is
0, so that ``loss[i] == sum_k weight_k * loss_map[k][i]`` with each term's
constant weight.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

#: A loss history as ComfyUI's LOSS_MAP type carries it.
LossMap = Dict[str, List[float]]

#: The key of the total loss (the one core Plot Loss Graph draws).
TOTAL = "loss"


class LossHistory:
    """Collects a loss map, one :meth:`record` per iteration."""

    def __init__(self) -> None:
        self._total: List[float] = []
        self._terms: Dict[str, List[float]] = {}

    def __len__(self) -> int:
        return len(self._total)

    def record(self, total: float, terms: Optional[Mapping[str, float]] = None) -> None:
        """Append one iteration: its total loss and the (unweighted) terms that were part of it.

        Terms seen for the first time get 0 for the earlier iterations; known terms
        missing from ``terms`` get 0 for this one.
        """
        terms = dict(terms or {})
        if TOTAL in terms:
            raise ValueError(f"a loss term cannot be named {TOTAL!r}: that key holds the total")
        n = len(self._total)
        for name in terms:
            if name not in self._terms:
                self._terms[name] = [0.0] * n
        for name, values in self._terms.items():
            values.append(float(terms.get(name, 0.0)))
        self._total.append(float(total))

    def as_loss_map(self) -> LossMap:
        """A fresh ``{"loss": [...], term: [...], ...}`` (terms in the order first seen)."""
        return {TOTAL: list(self._total), **{k: list(v) for k, v in self._terms.items()}}
