"""Monocular depth for REPARO's layout loss: Load Depth Model and Estimate Depth.

``transformers`` is imported only when a model loads (through mpod_core.depth_estimation), so the
pack loads without it.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..mpod_core import depth_estimation as de
from . import comfy_bridge as bridge
from .schema import DepthModelType, check_image, node_schema

log = logging.getLogger(__name__)

#: ComfyUI model folder of depth estimators (Hugging Face-format folders): models/depth_estimation.
DEPTH_FOLDER = "depth_estimation"
#: Loose checkpoint files are listed too, so that picking one gives the message saying what to download.
CHECKPOINT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
DEVICES = ("auto", "cpu")
_DOWNLOAD = (f"hf download {de.EXAMPLE_REPOSITORY} --local-dir "
             f"ComfyUI/models/{DEPTH_FOLDER}/{de.EXAMPLE_REPOSITORY.split('/')[1]}")
#: The largest model input (pixels): 4x Depth Anything's 518² (the head's full-resolution feature maps
#: dominate the memory). A wide image at a large resolution exceeds it, since the processor keeps the
#: aspect ratio and fits the shorter side.
MAX_INPUT_PIXELS = 4 * 518 * 518


def _model_choices() -> list[str]:
    folders = bridge.list_model_folders(DEPTH_FOLDER, "config.json")
    loose = [f for f in bridge.list_model_files(DEPTH_FOLDER, CHECKPOINT_EXTENSIONS)
             if not any(f.startswith(d + "/") for d in folders)]
    return folders + loose


def _where(reason: str) -> str:
    folders = ", ".join(map(str, bridge.ensure_model_folder(DEPTH_FOLDER)))
    return (f"Load Depth Model: {reason}. Put a Hugging Face-format depth model folder (config.json, "
            f"model.safetensors, preprocessor_config.json) in ComfyUI's models/{DEPTH_FOLDER} folder ({folders}), "
            f"e.g. {_DOWNLOAD}")


def _folder_fingerprint(name: str):
    """Re-load when a file of the folder changes (mtime, size), not only when its name does."""
    try:
        path = bridge.resolve_model_path(DEPTH_FOLDER, name)
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        return (name, tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    except (OSError, ValueError):
        return name


class LoadDepthModel(io.ComfyNode):
    """A Depth Anything or DPT folder from models/depth_estimation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_LoadDepthModel",
            description=f"Load a monocular depth estimator for REPARO's layout loss (eq. 4's frozen depth model): a "
                        f"Hugging Face-format folder in ComfyUI's models/{DEPTH_FOLDER} (config.json + "
                        "model.safetensors + preprocessor_config.json) of Depth Anything V1/V2 or DPT (MiDaS v3), "
                        f"e.g. {de.EXAMPLE_REPOSITORY} (Apache-2.0; Base and Large are CC-BY-NC-4.0), "
                        "Intel/dpt-large or Intel/dpt-hybrid-midas. Read offline: nothing is downloaded.",
            inputs=[
                io.Combo.Input("model_folder", options=_model_choices(),
                               tooltip=f"A folder in models/{DEPTH_FOLDER} holding config.json (listed by that "
                                       f"folder), e.g. from `{_DOWNLOAD}`. Single checkpoint files found there "
                                       "are listed too and refused with what to download instead."),
                io.Combo.Input("device", options=list(DEVICES), default="auto",
                               tooltip="auto: ComfyUI's compute device (GPU when there is one); cpu keeps the "
                                       "model off the GPU (V2-Small is 25 M parameters, ~100 MB)."),
            ],
            outputs=[DepthModelType.Output("depth_model", display_name="depth_model",
                                           tooltip="The depth model and its image processor's settings, for "
                                                   "Estimate Depth.")],
        )

    @classmethod
    def validate_inputs(cls, model_folder: str) -> bool | str:
        try:
            bridge.resolve_model_path(DEPTH_FOLDER, model_folder)
        except (ValueError, FileNotFoundError) as exc:
            return _where(str(exc))
        return True

    @classmethod
    def fingerprint_inputs(cls, model_folder: str, **_):
        return _folder_fingerprint(model_folder)

    @classmethod
    def execute(cls, model_folder: str, device: str) -> io.NodeOutput:
        try:
            path = bridge.resolve_model_path(DEPTH_FOLDER, model_folder)
        except (ValueError, FileNotFoundError) as exc:
            raise FileNotFoundError(_where(str(exc))) from None
        try:
            model = de.load_depth_model(path, device=bridge.torch_device() if device == "auto" else "cpu")
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"Load Depth Model: model_folder '{model_folder}': {exc}") from None
        return io.NodeOutput(model)


class EstimateDepth(io.ComfyNode):
    """Relative depth of each image, near = bright."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_EstimateDepth",
            description="Monocular depth of each image of a batch with a model from Load Depth Model: relative "
                        "inverse depth (near = bright, what Depth Anything and DPT predict; metric models are "
                        "inverted to match), min-max normalised to [0, 1] per image, grey in 3 channels, at the "
                        "image's size. The pre-processing is the model's own image processor's (Depth Anything: "
                        "518 px, aspect kept, sides a multiple of 14, bicubic, ImageNet mean/std). Wire it into "
                        "OT Layout Align's depth input.",
            inputs=[
                DepthModelType.Input("depth_model", tooltip="From Load Depth Model."),
                io.Image.Input("image", tooltip="One image or a batch (RGBA is composited on white, as the "
                                                "model's processor does)."),
                io.Int.Input("resolution", default=0, min=0, max=2072, step=1, optional=True,
                             tooltip="Model input side; 0 = the model's own from its preprocessor_config.json: "
                                     "518 for Depth Anything V1/V2 (model card and paper), 384 for DPT-Large / "
                                     "Hybrid. The processor's rules apply (Depth Anything: aspect kept, the "
                                     "side whose scale is closer to 1 fitted, both sides rounded to a multiple "
                                     f"of 14). Inputs above {MAX_INPUT_PIXELS} pixels (4 x 518²) are refused."),
            ],
            outputs=[io.Image.Output("depth_map", display_name="depth",
                                     tooltip="(B, H, W, 3): per image, depth in [0, 1], near = 1 (bright), "
                                             "min-max over the whole image; a constant prediction is black and "
                                             "reported on the node.")],
        )

    @classmethod
    def execute(cls, depth_model, image, resolution: int = 0) -> io.NodeOutput:
        node = "Estimate Depth"
        if not isinstance(depth_model, de.DepthModel):
            raise ValueError(f"{node}: depth_model: expected a model from Load Depth Model, got "
                             f"{type(depth_model).__name__}")
        image = check_image(image, node)
        b, h, w = image.shape[:3]
        size = depth_model.preprocess.input_size(h, w, resolution or None)
        if size[0] * size[1] > MAX_INPUT_PIXELS:
            raise ValueError(f"{node}: resolution: the model input for a {w}x{h} image would be {size[1]}x{size[0]}, "
                             f"above {MAX_INPUT_PIXELS} pixels (4 x 518²): lower resolution (0 = the model's own, "
                             f"{depth_model.default_resolution})")
        raw = de.estimate_depth(depth_model.model, depth_model.preprocess, image.float(), resolution=resolution or None,
                                normalise=False, batch_size=1, progress=bridge.Progress(b))  # checks for Cancel
        depth, constant = de.normalise_depth_maps(raw)
        if constant.any():
            which = ", ".join(str(i) for i in constant.nonzero().flatten().tolist())
            message = (f"the depth predicted for image {which} of the batch is constant (no depth information); "
                       "its map is black (all far)")
            log.warning("MPOD3D %s: %s", node, message)
            bridge.node_text(f"Warning: {message}")
        return io.NodeOutput(depth.cpu()[..., None].expand(b, h, w, 3).contiguous())


NODES = [LoadDepthModel, EstimateDepth]
