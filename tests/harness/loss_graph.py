"""Core Plot Loss Graph (``LossGraphNode``) fed by an optimisation node's LOSS_MAP output in a
live prompt, and a check of the image it saves."""

from __future__ import annotations

import numpy as np
from PIL import Image

NODE = "loss_graph"


def add_loss_graph(api: dict, source: str, slot: int) -> None:
    """Add a Plot Loss Graph node (id ``loss_graph``) reading output ``slot`` of node ``source``."""
    api[NODE] = {"class_type": "LossGraphNode", "inputs": {"loss": [source, slot], "filename_prefix": "loss"}}


def check_loss_graph(server, entry: dict, steps: int) -> None:
    """Assert the graph was saved, with a curve over ``steps`` finite, not all equal losses, and
    remove its outputs from ``entry`` (so callers count their own images as before).

    Core draws an 800x480 plot plus a 40 px margin: the losses scaled to [0, 1] between their min
    and max (so NaN or equal values make the node fail), step i at x = 40 + int(800 i / steps),
    in blue, then black axes over the bottom and left edges (which may hide the lowest points).
    """
    graphs = server.output_files({"outputs": {NODE: entry["outputs"].pop(NODE)}}, kinds=("images",))
    assert len(graphs) == 1 and graphs[0].is_file(), graphs
    graph = np.asarray(Image.open(graphs[0]).convert("RGB")).astype(int)
    assert graph.shape == (520, 840, 3), graph.shape
    blue = (graph[..., 2] > 200) & (graph[..., 0] < 80) & (graph[..., 1] < 80)
    assert blue.sum() > 50, blue.sum()
    assert not blue[:, 842:].any() and not blue[482:].any()  # inside the plot box
    # The largest loss is drawn at y = 0, at one of the steps' x positions.
    top = np.nonzero(blue[:3].any(0))[0]
    positions = 40 + (np.arange(steps) * 800) // steps
    assert len(top) and np.abs(top[:, None] - positions[None, :]).min() <= 3, (top[:10], positions[:10])
