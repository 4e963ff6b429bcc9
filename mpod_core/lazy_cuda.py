"""Lazy imports of optional CUDA libraries (nvdiffrast, tinycudann, ...).

A missing or broken CUDA package must never break importing the pack: each
backend imports its library inside the function that needs it, through a
:class:`LazyCudaModule`, which remembers a failed import and re-raises it as an
ImportError carrying the install hint.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_WARNED: set = set()


def warn_fallback_once(library: str, message: str, stacklevel: int = 3) -> None:
    """One RuntimeWarning per process and ``library`` that ``backend='auto'`` fell back to PyTorch.

    Args:
        library: the CUDA library's name (the once-per-process key).
        message: why, and what is used instead.
    """
    if library in _WARNED:
        return
    _WARNED.add(library)
    warnings.warn(f"{message}; this warning is shown once per process.", RuntimeWarning, stacklevel=stacklevel + 1)


class LazyCudaModule:
    """``load()`` imports ``module_name`` on first use; ``is_available()`` says
    whether CUDA is there and the module imports.

    Args:
        module_name: dotted name, e.g. ``"nvdiffrast.torch"``.
        install_hint: the message of the ImportError raised when it does not import.
    """

    def __init__(self, module_name: str, install_hint: str):
        self.module_name = module_name
        self.install_hint = install_hint
        self._module = None
        self._error: Exception | None = None

    def load(self):
        """The imported module; raises ImportError(install_hint) if it does not import."""
        if self._module is not None:
            return self._module
        if self._error is not None:
            raise ImportError(self.install_hint) from self._error
        try:
            self._module = importlib.import_module(self.module_name)
        except Exception as exc:  # ImportError, or a broken build raising OSError/RuntimeError
            self._error = exc
            raise ImportError(self.install_hint) from exc
        return self._module

    def is_available(self) -> bool:
        """True when CUDA is available and the module imports."""
        if not torch.cuda.is_available():
            return False
        try:
            self.load()
        except ImportError:
            return False
        return True
