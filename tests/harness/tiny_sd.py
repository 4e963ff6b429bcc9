"""Tiny random diffusers/transformers models for core tests of the training loops (textual
inversion, theme fine-tune): UNet2DConditionModel on 8x8x4 latents, AutoencoderKL 32 -> 8,
CLIPTextModel of width 32 over a word-level vocabulary, and that vocabulary's tokenizer.

Import after ``pytest.importorskip("diffusers")`` / ``("transformers")``.
"""
from __future__ import annotations

from typing import Iterable, List

import torch

SPECIAL = {"<bos>": 0, "<eos>": 1, "<pad>": 2}
#: Width of the text encoder and the UNet's cross-attention.
DIM = 32


def vocabulary(words: Iterable[str]) -> dict:
    """Token ids: the special tokens, then ``words`` sorted."""
    return {**SPECIAL, **{w: i + len(SPECIAL) for i, w in enumerate(sorted(set(words)))}}


def word_tokenizer(vocab: dict):
    """Word-level: one token per known word; an unknown word is split into its letters' count of
    tokens (so "hotdog" is several tokens, like a rare word in CLIP's BPE)."""
    def tokenize(text: str) -> List[int]:
        ids = []
        for w in text.lower().split():
            ids += [vocab[w]] if w in vocab else [vocab["a"]] * len(w)
        return ids
    return tokenize


def tiny_models(vocab_size: int, seed: int = 0):
    """(unet, vae, text_encoder), frozen and in eval mode."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=DIM, attention_head_dim=4, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return unet, vae, text


def ddpm_scheduler(prediction_type: str = "epsilon"):
    """SD's scaled-linear DDPM schedule (1000 steps)."""
    import diffusers
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type=prediction_type)
