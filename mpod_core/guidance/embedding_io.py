"""Token-embedding files: what textual inversion saves and what it can resume from.

Saved format: a safetensors file with one float32 tensor of shape (1, D) under
``"emb_params"`` (the layout Automatic1111 and ComfyUI's loader,
``comfy/sd1_clip.py: load_embed``, read: a file with one tensor gives that
tensor, one row per token). Written atomically (:mod:`mpod_core.atomic`): an
interrupted save leaves no half-written file.

Readable for resuming: that format; diffusers' / Magic123's ``learned_embeds.bin``
(``torch.save({token_string: tensor (D,)})``); Automatic1111's ``.pt``
(``{"string_to_param": {"*": tensor (n, D)}}``). Pickled files are read with
``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Union

import torch

from ..atomic import atomic_paths

#: The key of the saved tensor (Automatic1111's, which ComfyUI reads).
EMBEDDING_KEY = "emb_params"
#: File suffixes ComfyUI's embedding loader tries, in its order.
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def check_model_name(name: str, input_name: str, folder: str, suffixes: tuple, what: str) -> str:
    """``name`` if it can be a file (without suffix) directly in ComfyUI's ``folder`` and a word of a prompt.

    Letters, digits, ``_``, ``-`` and ``.`` only (no ``..``), not starting with ``.`` or ``-``:
    ComfyUI's tokenizer ends an ``embedding:NAME`` at whitespace, its prompt parser reads
    parentheses and colons, and path characters would leave the folder.

    Raises:
        ValueError: naming ``input_name`` and the rule broken.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{input_name}: empty; give the {what} a name (letters, digits, _ - .)")
    if "/" in name or "\\" in name or ".." in name:
        raise ValueError(f"{input_name}: {name!r} contains a path ('/', '\\' or '..'); give a plain name, the file "
                         f"goes to ComfyUI's models/{folder} folder")
    if not _NAME.match(name):
        raise ValueError(f"{input_name}: {name!r} may contain only letters, digits, '_', '-' and '.' (not first)")
    if name.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{input_name}: {name!r}: leave out the file suffix (.safetensors is added)")
    return name


def check_embedding_name(name: str, input_name: str = "embedding_name") -> str:
    """``name`` if it can be an embedding file and a word of a prompt (:func:`check_model_name`), so that
    'embedding:NAME' reads back as one word.

    Raises:
        ValueError: naming ``input_name`` and the rule broken.
    """
    return check_model_name(name, input_name, "embeddings", EMBEDDING_SUFFIXES, "embedding")


def save_embedding(path: Union[str, Path], embedding: torch.Tensor) -> Path:
    """Write ``embedding`` (D,) or (1, D) to ``path`` as ``{"emb_params": (1, D) float32}``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensor = embedding.detach().float().cpu().reshape(1, -1).contiguous()
    with atomic_paths([path]) as (tmp,):
        save_file({EMBEDDING_KEY: tensor}, str(tmp))
    return path


def load_embedding(path: Union[str, Path], dim: int) -> torch.Tensor:
    """The one token embedding stored in ``path`` (any format of the module docstring), as (D,) float32.

    Raises:
        ValueError: the file holds no tensor, several tokens, or a width other than ``dim``
            (e.g. an SD 1.x embedding for an SD 2.x text encoder).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        data = load_file(str(path), device="cpu")
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with objects weights_only refuses, or not a torch file
            raise ValueError(f"{path.name}: not a readable embedding file ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        data = data["string_to_param"]
    if isinstance(data, torch.Tensor):
        tensors = [data]
    elif isinstance(data, dict):
        if EMBEDDING_KEY in data and isinstance(data[EMBEDDING_KEY], torch.Tensor):
            tensors = [data[EMBEDDING_KEY]]
        else:
            tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    else:
        tensors = []
    if len(tensors) != 1:
        raise ValueError(f"{path.name}: expected one embedding tensor, found {len(tensors)}")
    t = tensors[0]
    if t.shape[-1] != dim:
        raise ValueError(f"{path.name}: embedding width {t.shape[-1]} does not match this text encoder's {dim} "
                         "(768 = SD 1.x CLIP-L, 1024 = SD 2.x OpenCLIP-H)")
    rows = t.reshape(-1, dim)
    if rows.shape[0] != 1:
        raise ValueError(f"{path.name}: holds {rows.shape[0]} token vectors; textual inversion here learns one")
    if not torch.isfinite(rows).all():
        raise ValueError(f"{path.name}: the embedding contains NaN or infinite values")
    return rows[0].float().clone()


def find_embedding_file(folder: Union[str, Path], name: str):
    """The file ComfyUI's loader would read for ``embedding:name`` in ``folder`` (``name`` itself, else
    ``name`` + ``.safetensors``, ``.pt``, ``.bin`` in that order), or None."""
    folder = Path(folder)
    if (folder / name).is_file():
        return folder / name
    for suffix in EMBEDDING_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None
