"""nvdiffrast twins of the functions in :mod:`.rasterize` (same arguments, same outputs).

nvdiffrast is imported lazily, inside the functions, so a missing or broken
install never breaks importing the pack. Conventions are converted here, at the
boundary: nvdiffrast's image row 0 is the bottom of the image (NDC y = -1), the
pack's is the top, so every image going in or out is flipped along H (that is a
pure reordering of rows: the clip-space positions are the same). nvdiffrast's
texture v = 0 is the first texture row (the top), the pack's uv has v = 0 at
the bottom, so v is flipped for :func:`texture_sample`.

Differences from the torch backend: nvdiffrast clips triangles against the
near/far planes geometrically (the torch backend drops triangles with a vertex
behind the camera), its rasterizer gives no gradient to the z channel of
``rast``, and it needs float32 CUDA tensors (inputs are cast; outputs are cast
back to the input dtype).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..lazy_cuda import LazyCudaModule

INSTALL_HINT = ("nvdiffrast is not installed. It needs a CUDA GPU and a CUDA toolkit: "
                "`pip install ninja setuptools wheel && pip install "
                "git+https://github.com/NVlabs/nvdiffrast.git --no-build-isolation`; "
                "or use backend='torch' (or 'auto') for the pure-PyTorch rasterizer.")

_CONTEXTS: Dict[int, object] = {}
_NVDIFFRAST = LazyCudaModule("nvdiffrast.torch", INSTALL_HINT)


def _dr():
    """Import ``nvdiffrast.torch`` (lazily), raising ImportError with the install hint."""
    return _NVDIFFRAST.load()


def is_available() -> bool:
    """True when CUDA is available and nvdiffrast imports."""
    return _NVDIFFRAST.is_available()


def _context(device: torch.device):
    """One cached ``RasterizeCudaContext`` per CUDA device."""
    dr = _dr()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CONTEXTS:
        _CONTEXTS[index] = dr.RasterizeCudaContext(device=index)
    return _CONTEXTS[index]


def _check_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda:
            raise ValueError(f"backend='nvdiffrast' needs CUDA tensors, got one on {t.device}; "
                             "move the inputs to the GPU or use backend='torch'")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def rasterize(pos_clip: torch.Tensor, tri: torch.Tensor, resolution: Tuple[int, int]) -> torch.Tensor:
    """nvdiffrast ``rasterize`` in the pack's conventions (rows flipped to top-first)."""
    dr = _dr()
    _check_cuda(pos_clip, tri)
    rast, _ = dr.rasterize(_context(pos_clip.device), _f32(pos_clip), tri.to(torch.int32).contiguous(),
                           resolution=[int(resolution[0]), int(resolution[1])], grad_db=False)
    return rast.flip(1).to(pos_clip.dtype)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """nvdiffrast ``interpolate``; ``rast`` and the output use the pack's row order."""
    dr = _dr()
    _check_cuda(attr, rast, tri)
    out, _ = dr.interpolate(_f32(attr), _f32(rast.flip(1)), tri.to(torch.int32).contiguous())
    return out.flip(1).to(torch.promote_types(attr.dtype, rast.dtype))


def antialias(color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor,
              tri: torch.Tensor) -> torch.Tensor:
    """nvdiffrast ``antialias``; images use the pack's row order."""
    dr = _dr()
    _check_cuda(color, rast, pos_clip, tri)
    out = dr.antialias(_f32(color.flip(1)), _f32(rast.flip(1)), _f32(pos_clip),
                       tri.to(torch.int32).contiguous())
    return out.flip(1).to(color.dtype)


def texture_sample(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """nvdiffrast ``texture`` (bilinear, wrap); uv with v = 0 at the bottom row."""
    dr = _dr()
    _check_cuda(texture, uv)
    uv_dr = torch.stack([uv[..., 0], 1.0 - uv[..., 1]], dim=-1)
    out = dr.texture(_f32(texture[None]), _f32(uv_dr), filter_mode="linear", boundary_mode="wrap")
    return out.to(torch.promote_types(texture.dtype, uv.dtype))
