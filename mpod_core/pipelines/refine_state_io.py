"""Save and load DMTet refine states (:class:`~.dmtet_refine.RefineState`): one ``.safetensors`` file.

Everything a resumed refine needs travels in it: the grid (cells and box, rebuilt on load), the SDF
and the deformation, the texture field (in the radiance-field file layout, under ``texture.``,
portable between the torch and tinycudann hash grids), Adam's moments of every parameter, the
reference camera and the iteration count. The JSON settings sit in the header, as in radiance-field
files (:mod:`mpod_core.fields.io`), and writes are atomic: an interrupted save leaves no file.

Tensor names::

    sdf (V,), delta (V, 3)
    texture.<radiance-field tensor>             # fields.io layout, without optimizer entries
    optimizer.<param>.<exp_avg|exp_avg_sq|step> # param: sdf, delta, texture.<field parameter>
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_paths
from ..fields.io import (OPTIMIZER_PREFIX, PathLike, _split_optimizer_state, _state_for_file, field_from_state,
                         header_metadata, settings_of)
from ..geometry import TetGrid
from .dmtet_refine import RefineState

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "save_refine_state", "load_refine_state", "read_refine_settings",
           "copy_refine_state"]

FORMAT_NAME = "mpod3d-dmtet-refine-state"
#: Bump when the tensor layout or the meaning of a setting changes.
FORMAT_VERSION = 1
SETTINGS_KEY = "mpod3d_settings"
TEXTURE_PREFIX = "texture."


def _tensors_and_settings(state: RefineState) -> tuple:
    """(tensors, settings) of ``state`` in the file layout (CPU, contiguous)."""
    texture = state.texture
    own = {k[len(TEXTURE_PREFIX):]: v for k, v in state.optimizer_state.items() if k.startswith(TEXTURE_PREFIX)}
    saved_moments, texture.optimizer_state = texture.optimizer_state, own
    try:  # the field's own writer converts the texture's moments to the portable layout with its table
        field_tensors = _state_for_file(texture)
        texture_settings = settings_of(texture)
    finally:
        texture.optimizer_state = saved_moments
    tensors: Dict[str, torch.Tensor] = {
        "sdf": state.sdf.detach().float().cpu().contiguous(),
        "delta": state.delta.detach().float().cpu().contiguous()}
    for k, v in field_tensors.items():
        if k.startswith(OPTIMIZER_PREFIX):
            tensors[f"{OPTIMIZER_PREFIX}{TEXTURE_PREFIX}{k[len(OPTIMIZER_PREFIX):]}"] = v
        else:
            tensors[TEXTURE_PREFIX + k] = v
    for name in ("sdf", "delta"):
        for key, value in state.optimizer_state.get(name, {}).items():
            value = value.detach().float().cpu().contiguous()
            tensors[f"{OPTIMIZER_PREFIX}{name}.{key}"] = value.reshape(-1) if key == "step" else value
    settings = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "grid": {"cells": state.grid.resolution, "bbox": [float(x) for x in state.grid.bbox]},
                "reference_view": {k: float(v) for k, v in state.reference_view.items()},
                "steps_done": int(state.steps_done), "texture": texture_settings}
    return tensors, settings


def _state_from(settings: dict, tensors: dict, *, backend: str, device, name: str) -> RefineState:
    """A :class:`RefineState` from the file layout; ``tensors`` is consumed. ValueError naming ``name``."""
    moments = _split_optimizer_state(tensors)
    texture_tensors = {k[len(TEXTURE_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(TEXTURE_PREFIX)}
    texture_tensors.update({f"{OPTIMIZER_PREFIX}{k[len(TEXTURE_PREFIX):]}.{key}": v
                            for k, m in moments.items() if k.startswith(TEXTURE_PREFIX) for key, v in m.items()})
    texture = field_from_state(settings["texture"], texture_tensors, backend=backend, device=device,
                               name=f"{name} (texture field)")
    grid_settings = settings["grid"]
    grid = TetGrid.cube(int(grid_settings["cells"]), tuple(float(x) for x in grid_settings["bbox"]), device=device)
    sdf, delta = tensors.pop("sdf", None), tensors.pop("delta", None)
    n = grid.vertices.shape[0]
    if sdf is None or delta is None or sdf.shape != (n,) or delta.shape != (n, 3) or tensors:
        raise ValueError(f"{name}: tensors do not match a {grid.resolution}-cell grid ({n} vertices): sdf "
                         f"{None if sdf is None else tuple(sdf.shape)}, delta "
                         f"{None if delta is None else tuple(delta.shape)}, unexpected {sorted(tensors)}")
    optimizer_state = {f"{TEXTURE_PREFIX}{k}": v for k, v in texture.optimizer_state.items()}
    texture.optimizer_state = {}
    for pname, param in (("sdf", sdf), ("delta", delta)):
        m = moments.get(pname)
        if m is None:
            continue
        if set(m) != {"exp_avg", "exp_avg_sq", "step"} or m["exp_avg"].shape != param.shape \
                or m["exp_avg_sq"].shape != param.shape:
            raise ValueError(f"{name}: optimizer state of {pname!r} does not match its parameter")
        optimizer_state[pname] = m
    return RefineState(grid=grid, sdf=torch.nn.Parameter(sdf.float().to(device)),
                       delta=torch.nn.Parameter(delta.float().to(device)), texture=texture,
                       reference_view={k: float(v) for k, v in settings["reference_view"].items()},
                       steps_done=int(settings["steps_done"]), optimizer_state=optimizer_state)


def save_refine_state(state: RefineState, path: PathLike) -> Path:
    """Write ``state`` to ``path`` (``.safetensors``) atomically; returns the path."""
    path = Path(path)
    tensors, settings = _tensors_and_settings(state)
    with atomic_paths([path]) as (tmp,):
        save_file(tensors, str(tmp), metadata={SETTINGS_KEY: json.dumps(settings)})
    return path


def read_refine_settings(path: PathLike) -> dict:
    """The settings JSON of a refine-state file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable .safetensors file, not a refine state of this pack (a radiance
            field is named as such), or another format version.
    """
    path = Path(path)
    meta = header_metadata(path, "refine state")
    settings = json.loads(meta[SETTINGS_KEY]) if SETTINGS_KEY in meta else {}
    fmt = settings.get("format")
    if fmt != FORMAT_NAME:
        what = "a radiance field (load it with Load Radiance Field)" if fmt == "mpod3d-radiance-field" else \
            "not an MPOD3D DMTet refine state"
        raise ValueError(f"{path.name} is {what}; save refine states with the Save DMTet State node")
    if settings.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path.name} was saved in refine-state format version {settings.get('version')}; this "
                         f"version of the pack reads version {FORMAT_VERSION}")
    return settings


def load_refine_state(path: PathLike, *, backend: str = "auto", device=None) -> RefineState:
    """Read a state written by :func:`save_refine_state` onto ``device`` (default CPU), the texture
    field on hash-grid ``backend``."""
    path = Path(path)
    settings = read_refine_settings(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _state_from(settings, tensors, backend=backend, device=device, name=path.name)


def copy_refine_state(state: RefineState, *, backend: str = "auto", device=None) -> RefineState:
    """An independent, trainable copy (ComfyUI caches node outputs: a node refines a copy), through the
    file layout so hash-grid backends convert as on load."""
    tensors, settings = _tensors_and_settings(state)
    return _state_from(json.loads(json.dumps(settings)), {k: v.clone() for k, v in tensors.items()},
                       backend=backend, device=state.sdf.device if device is None else device,
                       name="the refine state")
