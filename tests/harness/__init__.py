"""Test harness: a real headless ComfyUI server, UI→API workflow conversion,
and glTF validation. Importable as ``harness`` (tests/ is on sys.path)."""

from harness.paths import REPO_ROOT, PACK_LINK_NAME, find_comfyui, find_python

__all__ = ["REPO_ROOT", "PACK_LINK_NAME", "find_comfyui", "find_python"]
