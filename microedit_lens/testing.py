"""Tiny random models, SAEs and a tokenizer: no files, no network. Used by the unit tests and handy
for trying the API in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata


@dataclass
class _Encoding:
    input_ids: Any


_ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:;()ABCDEFGHIJKLMN"


class CharTokenizer:
    """A character-level tokenizer with the slice of the HF tokenizer interface microedit-lens uses:
    0 = pad, 1 = eos, then one id per character of a fixed alphabet (other characters share ids)."""

    def __init__(self, vocab_size: int = 64):
        self.vocab_size = vocab_size
        self.pad_token_id = 0
        self.eos_token_id = 1
        self.bos_token_id = None
        self.padding_side = "right"

    def _id(self, c: str) -> int:
        n = self.vocab_size - 2
        i = _ALPHABET.find(c)
        return 2 + (i if 0 <= i < n else ord(c) % n)

    def _ids(self, text: str) -> list[int]:
        return [self._id(c) for c in text]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = False, **_: Any) -> _Encoding:
        if isinstance(text, str):
            return _Encoding(self._ids(text))
        return _Encoding([self._ids(t) for t in text])

    def decode(self, ids: Any, **_: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return "".join(_ALPHABET[i - 2] if 2 <= i < 2 + len(_ALPHABET) else "" for i in ids)


def tiny_model(n_layers: int = 2, d_model: int = 32, d_vocab: int = 64, n_ctx: int = 64, seed: int = 0):
    """A random Llama-shaped HookedSAETransformer with a :class:`CharTokenizer`."""
    from microedit_lens.models import load_model, tiny_config

    torch.manual_seed(seed)
    model = load_model(tiny_config(n_layers=n_layers, d_model=d_model, d_vocab=d_vocab, n_ctx=n_ctx, seed=seed))
    model.tokenizer = CharTokenizer(d_vocab)
    return model


def tiny_sae(d_in: int = 32, d_sae: int = 128, k: int = 4, hook_name: str = "blocks.0.hook_resid_post", seed: int = 0, rescale: bool = False) -> TopKSAE:
    """A random TopK SAE (unit-norm decoder rows) at ``hook_name``."""
    torch.manual_seed(seed)
    cfg = TopKSAEConfig(
        d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=rescale,
        metadata=SAEMetadata(hook_name=hook_name, model_name="tiny"),
    )
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in))
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        sae.W_enc.copy_(sae.W_dec.T.clone())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
