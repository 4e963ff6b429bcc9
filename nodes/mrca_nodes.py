"""MRCA Attention Patch: confine one token's cross-attention to a mask (MPOD123 §3.3)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..mpod_core.guidance.mrca import RESIZE_MODES
from .comfy_bridge.mrca import MRCAPatch, apply_mrca, check_sd_model, token_columns
from .schema import check_masks, node_schema

NODE_ID = "MPOD3D_MRCAAttentionPatch"

#: MPOD123 §3.3's prompt, with the token learned by Textual Inversion.
DEFAULT_PROMPT = "A high-resolution DSLR image of embedding:NAME"


class MRCAAttentionPatch(io.ComfyNode):
    """MODEL + the prompt's token -> a MODEL whose cross-attention confines that token to a mask."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            NODE_ID,
            description="Mask Rectified Cross-Attention (MPOD123 §3.3, eq. 8): in every cross-attention layer of "
                        "an SD 1.x/2.x UNet, the chosen token's attention is set to zero outside the mask (its "
                        "logits to -inf), so the object it names is drawn only inside the outline; other tokens "
                        "and the unconditional pass are untouched. Use the static mask with KSampler; DMTet Refine "
                        "sends each rendered view's outline at run time instead. Connect the same prompt text to "
                        "CLIP Text Encode.",
            inputs=[
                io.Model.Input("model", tooltip="SD 1.x / 2.x MODEL (any LoRA or patch applied before this node)."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt: it finds the token's columns."),
                io.String.Input("prompt", default=DEFAULT_PROMPT, multiline=True,
                                tooltip="The prompt given to CLIP Text Encode (Textual Inversion's prompt output "
                                        "fits). Default: MPOD123 §3.3's 'A high-resolution DSLR image of <e>'."),
                io.String.Input("token", default="",
                                tooltip="The word(s) or embedding:NAME to confine, comma-separated; every "
                                        "occurrence in the prompt is confined. Empty: every embedding of the prompt "
                                        "(the learned <e> of MPOD123)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Static outline mask (1 = object), one for all images or one per image, with "
                                      "the generated image's aspect ratio. Without it (and without a per-view mask "
                                      "from DMTet Refine) attention is unchanged."),
                io.Boolean.Input("invert_mask", default=False,
                                 tooltip="Turn on when the mask is 1 on the background, e.g. Load Image's MASK "
                                         "(1 where the picture is transparent)."),
                io.Boolean.Input("confine_end_tokens", default=False,
                                 tooltip="Also confine the end token and the padding after it, which in CLIP's causal "
                                         "encoder summarise the whole prompt. Off: only the token, as the paper's "
                                         "eq. 8 (a stronger variant, not in the paper)."),
                io.Combo.Input("mask_resize", options=list(RESIZE_MODES), default=RESIZE_MODES[0],
                               tooltip="How the mask is shrunk to each layer (64, 32, 16, 8 cells for a 512 image): "
                                       "area = a cell is inside when half its pixels are (default); max = when any "
                                       "pixel is (looser at the outline); nearest = the pixel at the cell centre "
                                       "(aliases thin parts). The paper only says 'resize'."),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone of the MODEL (the input MODEL is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, token, mask_resize):
        if token is not None and any(c in token for c in "()[]{}"):
            return "token: give the plain word or embedding:NAME, without prompt weights or brackets"
        if mask_resize is not None and mask_resize not in RESIZE_MODES:
            return f"mask_resize: one of {', '.join(RESIZE_MODES)}"
        return True

    @classmethod
    def execute(cls, model, clip, prompt, token, invert_mask, confine_end_tokens, mask_resize,
                mask=None) -> io.NodeOutput:
        check_sd_model(model)
        if clip is None:
            raise ValueError("MRCA Attention Patch: clip: connect the checkpoint's CLIP (it finds the token)")
        if "embedding:NAME" in prompt:
            raise ValueError("MRCA Attention Patch: prompt: replace NAME in 'embedding:NAME' by the embedding's "
                             "name (Textual Inversion's prompt output has it)")
        columns = token_columns(clip, prompt, token, confine_end_tokens)
        static = None
        if mask is not None:
            static = check_masks(mask, "MRCA Attention Patch", "mask").float()
            if not torch.isfinite(static).all():
                raise ValueError("MRCA Attention Patch: mask: contains NaN or infinite values")
            static = (1.0 - static) if invert_mask else static
            if not (static >= 0.5).any():
                raise ValueError("MRCA Attention Patch: mask: empty (no pixel is 1), which would remove the token "
                                 "everywhere; turn invert_mask on if the mask is 1 on the background")
        return io.NodeOutput(apply_mrca(model, MRCAPatch(columns, static, mask_resize)))


NODES = [MRCAAttentionPatch]
