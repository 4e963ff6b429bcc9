"""Optimisation loops of the pack, independent of ComfyUI: each takes a config
dataclass, a denoiser (see :mod:`mpod_core.guidance`) and a ``progress``
callback, and returns plain tensors."""
