"""tinycudann twin of the torch hash grid (same config, same flat parameter layout).

tinycudann is imported lazily, inside the functions, so a missing or broken
install never breaks importing the pack. It needs CUDA; its ``HashGrid`` is the
reference implementation whose geometry :mod:`.hashgrid` reproduces, so a table
copied between the backends (``tcnn.params.view(-1, F)`` <-> ``table``) gives the
same encoding. This backend computes in float32 (tinycudann's half-precision
default is not used, so values match the torch backend closely).
"""
from __future__ import annotations

from typing import Dict

import torch

from ..lazy_cuda import LazyCudaModule, warn_fallback_once

INSTALL_HINT = ("tinycudann is not installed. It needs a CUDA GPU and a CUDA toolkit: "
                "`pip install ninja && pip install "
                "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch`; "
                "or use backend='torch' (or 'auto') for the pure-PyTorch hash grid.")

_TCNN = LazyCudaModule("tinycudann", INSTALL_HINT)


def _tcnn():
    """Import ``tinycudann`` (lazily), raising ImportError with the install hint."""
    return _TCNN.load()


def is_available() -> bool:
    """True when CUDA is available and tinycudann imports."""
    return _TCNN.is_available()


def resolve_backend(backend: str) -> str:
    """Map ``"auto" | "torch" | "tcnn"`` to the backend to use.

    ``"tcnn"`` raises ImportError (with the install hint) when tinycudann or CUDA is
    missing; ``"auto"`` falls back to ``"torch"`` with one RuntimeWarning per process.
    """
    if backend == "torch":
        return "torch"
    if backend == "tcnn":
        if not torch.cuda.is_available():
            raise ImportError("backend='tcnn' needs CUDA, which is not available. " + INSTALL_HINT)
        _tcnn()
        return "tcnn"
    if is_available():
        return "tcnn"
    reason = "no CUDA" if not torch.cuda.is_available() else "tinycudann does not import"
    warn_fallback_once("tinycudann", f"mpod_core.encoding: backend='auto' uses the pure-PyTorch hash grid ({reason})",
                       stacklevel=4)
    return "torch"


def encoding_config(config) -> Dict[str, object]:
    """tinycudann encoding config dict for a :class:`~.hashgrid.HashGridConfig`."""
    return {
        "otype": "HashGrid",
        "n_levels": config.n_levels,
        "n_features_per_level": config.n_features_per_level,
        "log2_hashmap_size": config.log2_hashmap_size,
        "base_resolution": config.base_resolution,
        "per_level_scale": config.per_level_scale,
        "interpolation": "Linear",
    }


def make_encoding(config) -> torch.nn.Module:
    """A ``tinycudann.Encoding`` (3 inputs, float32) for ``config``; its ``params`` are the flat table."""
    tcnn = _tcnn()
    enc = tcnn.Encoding(3, encoding_config(config), dtype=torch.float32)
    with torch.no_grad():
        enc.params.uniform_(-config.init_scale, config.init_scale)
    return enc
