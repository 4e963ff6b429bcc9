"""Save and load radiance fields: one ``.safetensors`` file whose header
metadata carries the JSON settings (format, version, field config, marching
settings, metadata), so weights and settings can never be separated.

Writes are atomic: the file is written under a temporary name in the target
folder and renamed into place, so an interrupted save leaves no partial file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_paths
from .nerf import NeRFFieldConfig
from .radiance_field import DEFAULT_ALPHA_THRESHOLD, DEFAULT_EARLY_STOP_EPS, RadianceField

FORMAT_NAME = "mpod3d-radiance-field"
#: Bump when the tensor layout or the meaning of a setting changes.
#: 2: optional Adam moments under ``optimizer.<parameter>.<exp_avg|exp_avg_sq|step>``.
FORMAT_VERSION = 2
#: Versions this code reads (version 1 files have no optimizer state).
READABLE_VERSIONS = (1, 2)
SETTINGS_KEY = "mpod3d_settings"
OPTIMIZER_PREFIX = "optimizer."
TCNN_TABLE = "encoding.tcnn.params"
TORCH_TABLE = "encoding.table"
#: What ``grid.density`` holds. Files without this key (written before it existed) hold the raw
#: density; they are converted on load (the EMA max-decay commutes with the scaling).
GRID_ESTIMATE = "density*step_size"

PathLike = Union[str, os.PathLike]


def _state_for_file(field: RadianceField) -> dict:
    """State dict with the hash table under its torch-backend name and shape, so
    files are portable between the torch and tinycudann backends (same layout)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in field.state_dict().items()}
    tcnn_key = "field.encoding.tcnn.params"
    if tcnn_key in state:
        state["field.encoding.table"] = state.pop(tcnn_key).float().reshape(
            -1, field.config.hash_grid.n_features_per_level)
    state["grid.mask"] = state["grid.mask"].to(torch.uint8)  # safetensors has bool, but keep it simple
    features = field.config.hash_grid.n_features_per_level
    for name, moments in field.optimizer_state.items():
        for key, value in moments.items():
            value = value.detach().to("cpu").float().contiguous()
            if name == TCNN_TABLE and key != "step":  # same portable layout as the table itself
                name_out, value = TORCH_TABLE, value.reshape(-1, features)
            else:
                name_out = name
            state[f"{OPTIMIZER_PREFIX}{name_out}.{key}"] = value.reshape(-1) if key == "step" else value
    return state


def _split_optimizer_state(tensors: dict) -> dict:
    """Pop ``optimizer.*`` tensors out of ``tensors`` into ``{param name: {key: tensor}}``."""
    moments: dict = {}
    for k in [k for k in tensors if k.startswith(OPTIMIZER_PREFIX)]:
        name, key = k[len(OPTIMIZER_PREFIX):].rsplit(".", 1)
        value = tensors.pop(k)
        moments.setdefault(name, {})[key] = value.reshape(()) if key == "step" else value
    return moments


def settings_of(field: RadianceField) -> dict:
    """The JSON settings stored beside the tensors."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": field.config.to_dict(),
            "samples_per_ray": field.samples_per_ray, "grid_resolution": list(field.grid.resolution),
            "grid": {"ema_decay": field.grid.ema_decay, "threshold": field.grid.threshold,
                     "warmup_steps": field.grid.warmup_steps, "estimate": GRID_ESTIMATE},
            "pruning": {"alpha_threshold": field.alpha_threshold, "early_stop_eps": field.early_stop_eps},
            "meta": field.meta}


def save_radiance_field(field: RadianceField, path: PathLike) -> Path:
    """Write ``field`` to ``path`` (``.safetensors``) atomically.

    Returns:
        The path written.
    """
    path = Path(path)
    metadata = {SETTINGS_KEY: json.dumps(settings_of(field))}
    with atomic_paths([path]) as (tmp,):
        save_file(_state_for_file(field), str(tmp), metadata=metadata)
    return path


def header_metadata(path: Path, what: str) -> dict:
    """The string metadata in a ``.safetensors`` header (``{}`` when there is none).

    Raises:
        FileNotFoundError: no such file (naming ``what`` it should be).
        ValueError: not a readable .safetensors file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path.name} is not a readable .safetensors file ({e})") from e


def read_settings(path: PathLike) -> dict:
    """The settings JSON of a field file; ValueError for files that are not
    radiance fields of this pack or come from another format version."""
    path = Path(path)
    meta = header_metadata(path, "radiance field")
    if SETTINGS_KEY not in meta:
        raise ValueError(f"{path.name} is a .safetensors file but not an MPOD3D radiance field "
                         f"(no '{SETTINGS_KEY}' metadata); save fields with the Save Radiance Field node")
    settings = json.loads(meta[SETTINGS_KEY])
    if settings.get("format") != FORMAT_NAME:
        raise ValueError(f"{path.name}: unknown format {settings.get('format')!r}")
    version = settings.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path.name} was saved in radiance-field format version {version}; this version of "
                         f"the pack reads versions {', '.join(map(str, READABLE_VERSIONS))}. "
                         f"Re-create the field with this version, "
                         f"or load it with the pack version that saved it.")
    return settings


def load_radiance_field(path: PathLike, *, backend: str = "auto", device=None) -> RadianceField:
    """Read a field written by :func:`save_radiance_field`.

    Args:
        path: the ``.safetensors`` file.
        backend: hash-grid backend for the loaded field.
        device: where to put it (default CPU).
    """
    path = Path(path)
    settings = read_settings(path)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return field_from_state(settings, tensors, backend=backend, device=device, name=path.name)


def copy_radiance_field(field: RadianceField, *, backend: str = "auto", device=None) -> RadianceField:
    """An independent copy of ``field`` (weights, occupancy grid, Adam moments, settings, meta), with
    fresh tensors that autograd accepts, on hash-grid ``backend`` and ``device`` (default: the field's).

    ComfyUI caches node outputs, and hands nodes inference tensors: a node that trains a field
    trains a copy, never the upstream object. Goes through the file layout, so it converts
    between the torch and tinycudann backends exactly as saving and loading does.
    """
    tensors = {k: v.clone() for k, v in _state_for_file(field).items()}
    return field_from_state(json.loads(json.dumps(settings_of(field))), tensors, backend=backend,
                            device=field.device if device is None else device, name="the field")


def field_from_state(settings: dict, tensors: dict, *, backend: str = "auto", device=None,
                     name: str = "the field") -> RadianceField:
    """A field from its settings (:func:`settings_of`) and portable tensors (:func:`_state_for_file`);
    ``tensors`` is consumed. ValueError (naming ``name``) when they do not fit together."""
    pruning = settings.get("pruning", {})  # absent in older files: the defaults
    field = RadianceField(NeRFFieldConfig.from_dict(settings["config"]),
                          samples_per_ray=settings["samples_per_ray"],
                          grid_resolution=settings["grid_resolution"][0], backend="torch",
                          meta=settings.get("meta"),
                          alpha_threshold=float(pruning.get("alpha_threshold", DEFAULT_ALPHA_THRESHOLD)),
                          early_stop_eps=float(pruning.get("early_stop_eps", DEFAULT_EARLY_STOP_EPS)))
    g = settings["grid"]
    field.grid.ema_decay, field.grid.threshold, field.grid.warmup_steps = (
        float(g["ema_decay"]), float(g["threshold"]), int(g["warmup_steps"]))
    tensors["grid.mask"] = tensors["grid.mask"].bool()
    moments = _split_optimizer_state(tensors)
    missing, unexpected = field.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name}: tensors do not match the settings (missing {missing}, "
                         f"unexpected {unexpected})")
    params = dict(field.field.named_parameters())
    for pname, m in moments.items():
        if pname not in params or set(m) != {"exp_avg", "exp_avg_sq", "step"} \
                or m["exp_avg"].shape != params[pname].shape or m["exp_avg_sq"].shape != params[pname].shape:
            raise ValueError(f"{name}: optimizer state of {pname!r} does not match the field's parameters")
    field.optimizer_state = moments
    if g.get("estimate", "density") == "density":  # an older file: raw-density estimates
        with torch.no_grad():
            field.grid.density.mul_(field.step_size)
    if backend != "torch":
        field = _rebuild_with_backend(field, backend)
    return field.to(device) if device is not None else field


def _rebuild_with_backend(field: RadianceField, backend: str) -> RadianceField:
    """Same field on another hash-grid backend (``auto`` stays torch without CUDA)."""
    from ..encoding import tcnn_backend  # noqa: PLC0415 (lazy: tinycudann)

    if tcnn_backend.resolve_backend(backend) == "torch":
        return field
    new = RadianceField(field.config, samples_per_ray=field.samples_per_ray,
                        grid_resolution=field.grid.resolution[0], backend=backend, meta=field.meta,
                        alpha_threshold=field.alpha_threshold, early_stop_eps=field.early_stop_eps)
    new.optimizer_state = {(TCNN_TABLE if k == TORCH_TABLE else k): v for k, v in field.optimizer_state.items()}
    state = field.state_dict()
    table = state.pop("field.encoding.table")
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        new.field.encoding.tcnn.params.copy_(table.reshape(-1).to(new.field.encoding.tcnn.params))
    return new
