"""The textual-inversion model protocol over diffusers + transformers models.

For library users and for core tests with tiny random models. Neither diffusers
nor transformers is imported: the adapter only calls the objects it is given
(a ``UNet2DConditionModel``-like ``unet(x, t, encoder_hidden_states=...)``, an
``AutoencoderKL``-like ``vae.encode(x).latent_dist``, a ``CLIPTextModel``-like
``text_encoder(input_ids)`` with ``get_input_embeddings()``, and a DDPM-family
scheduler with ``alphas_cumprod`` and ``config.prediction_type``).

The learned token enters the text encoder as diffusers' textual_inversion.py
puts it there, a row of the input embeddings, without resizing the vocabulary:
a forward hook on the token-embedding module replaces the output at the
marker token's position by the (differentiable) embedding.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .diffusers_adapter import _config_get, _module_device_dtype

_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


class DiffusersTextualInversionModel:
    """:class:`~mpod_core.guidance.textual_inversion.TextualInversionModel` over diffusers models.

    Args:
        unet, vae, text_encoder, scheduler: see the module docstring; freeze them
            (``requires_grad_(False)``): only the token is trained.
        tokenize: ``tokenize(text) -> [ids]`` without start/end tokens (e.g.
            ``lambda s: tokenizer(s, add_special_tokens=False).input_ids`` for a CLIPTokenizer).
        bos, eos, pad: the start, end and padding token ids.
        max_length: the text encoder's context length (77 for CLIP).
        scaling_factor: latent scale; default ``vae.config.scaling_factor``.
    """

    def __init__(self, unet, vae, text_encoder, scheduler, tokenize: Callable[[str], List[int]], *, bos: int,
                 eos: int, pad: int, max_length: int = 77, scaling_factor: Optional[float] = None):
        prediction = _config_get(scheduler, "prediction_type", "epsilon")
        if prediction not in _PREDICTION:
            raise ValueError(f"scheduler prediction_type must be one of {', '.join(_PREDICTION)}, got {prediction!r}")
        self.unet, self.vae, self.text_encoder, self.tokenize = unet, vae, text_encoder, tokenize
        self.bos, self.eos, self.pad, self.max_length = int(bos), int(eos), int(pad), int(max_length)
        self.prediction_type = _PREDICTION[prediction]
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else _config_get(vae, "scaling_factor", 1.0))
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().float()
        self.embedding_dim = int(text_encoder.get_input_embeddings().weight.shape[1])

    def token_embedding(self, word: str, input_name: str = "initializer_word") -> torch.Tensor:
        """(D,) input embedding of ``word``, which must be a single token."""
        ids = self.tokenize(word)
        if len(ids) != 1:
            raise ValueError(f"{input_name}: {word!r} is {len(ids)} tokens for this text encoder; "
                             "it must be a single token")
        return self.text_encoder.get_input_embeddings().weight[ids[0]].detach().float().clone()

    def _ids(self, template: str):
        before, after = template.split("{}")
        ids = [self.bos] + self.tokenize(before) + [self.pad]
        slot = len(ids) - 1
        ids += self.tokenize(after) + [self.eos]
        if len(ids) > self.max_length:
            raise ValueError(f"prompt {template!r} is {len(ids)} tokens, more than {self.max_length}")
        return ids + [self.pad] * (self.max_length - len(ids)), slot

    def encode_text(self, templates: Sequence[str], embedding: torch.Tensor) -> torch.Tensor:
        table = self.text_encoder.get_input_embeddings()
        device = table.weight.device
        rows = [self._ids(t) for t in templates]
        ids = torch.tensor([r[0] for r in rows], device=device)
        slots = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        slots[torch.arange(len(rows)), torch.tensor([r[1] for r in rows])] = True

        def put_token(module, inputs, output):
            return torch.where(slots[..., None], embedding.to(output), output)

        handle = table.register_forward_hook(put_token)
        try:
            out = self.text_encoder(ids)
        finally:
            handle.remove()
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _module_device_dtype(self.vae, images)
        with torch.no_grad():
            z = self.vae.encode((images * 2 - 1).to(device=device, dtype=dtype)).latent_dist.mean
        return z.float() * self.scaling_factor

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.unet(x_t, t, encoder_hidden_states=context)
        return out.sample if hasattr(out, "sample") else out[0]
