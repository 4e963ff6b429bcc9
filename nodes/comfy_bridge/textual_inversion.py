"""Textual inversion over ComfyUI's MODEL / CLIP / VAE (the core's
:class:`~mpod_core.guidance.textual_inversion.TextualInversionModel` protocol).

Training through ComfyUI's models (the trainable copies, the UNet call) is
:class:`~.sd_training.ComfySDTraining`'s, shared with the theme fine-tune.

Text. ComfyUI's own tokenizer and ``SDClipModel.process_tokens`` place a tensor
given in the token list at its position (how ``embedding:NAME`` works), so a
template is tokenized with a one-token marker word where ``{}`` is, and the
marker's id is replaced by the trainable tensor: the context is exactly what
core CLIP Text Encode computes for the saved file as ``embedding:NAME`` (CLIP's
BPE splits at spaces, so the words around it tokenize alike), including
``CLIPSetLastLayer`` (``clip.layer_idx``) and SD 2.x's penultimate layer.

"""
from __future__ import annotations

import functools
import numbers
from typing import List, Sequence

import torch

import comfy.sd1_clip

from .sd_training import ComfySDTraining

__all__ = ["ComfyTextualInversionModel", "count_clip_tokens"]

#: A single CLIP token standing for ``{}`` while tokenizing; any word would do that is one token and
#: absent from the templates (checked on every prompt).
MARKER = "sks"


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    """ComfyUI's CLIP BPE tokenizer (``comfy/sd1_tokenizer``; SD 2.x's OpenCLIP uses the same vocabulary)."""
    return comfy.sd1_clip.SDTokenizer().tokenizer


def count_clip_tokens(word: str) -> int:
    """Number of CLIP tokens of ``word`` (without start/end), as ComfyUI's tokenizer splits it."""
    return len(_clip_bpe()(word)["input_ids"]) - 2


class ComfyTextualInversionModel(ComfySDTraining):
    """SD 1.x / 2.x MODEL + its CLIP + VAE, for :func:`~mpod_core.guidance.textual_inversion.train_textual_inversion`.

    Raises:
        ValueError: as :class:`~.sd_training.ComfySDTraining`.
    """

    def __init__(self, model, clip, vae):
        super().__init__(model, clip, vae, "textual inversion")
        marker = self._bpe(MARKER)["input_ids"][1:-1]
        assert len(marker) == 1, "the marker word must be one CLIP token"
        self._marker = marker[0]

    # ------------------------------------------------------------ the token
    def token_embedding(self, word: str, input_name: str = "initializer_word") -> torch.Tensor:
        """(D,) float32 input embedding of ``word``, which must be a single CLIP token."""
        ids = self._bpe(word)["input_ids"][1:-1]
        if len(ids) != 1:
            raise ValueError(f"{input_name}: {word!r} is {len(ids)} CLIP tokens; it must be a single token "
                             "(a common word such as 'dog', 'chair', 'toy')")
        table = self.text.transformer.get_input_embeddings().weight
        return table[ids[0]].detach().float().cpu().clone()

    def _tokens(self, template: str, embedding: torch.Tensor) -> List:
        ids = self._token_ids(template.replace("{}", MARKER))
        if sum(1 for tok in ids if isinstance(tok, numbers.Integral) and tok == self._marker) != 1:
            raise ValueError(f"prompt {template!r} must hold '{{}}' once and not the word {MARKER!r}")
        return [embedding if isinstance(tok, numbers.Integral) and tok == self._marker else tok for tok in ids]

    # -------------------------------------------------------- the protocol
    def encode_text(self, templates: Sequence[str], embedding: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) context, differentiable w.r.t. ``embedding`` (D,)."""
        tokens = [self._tokens(t, embedding) for t in templates]
        z, _ = self.text(tokens)[:2]
        return z.to(self.device)
