"""Prompt -> text embedding, cached by prompt hash.

In: a prompt string. Out: a (text_len, text_dim) tensor on the model's device and dtype,
rows past the prompt's tokens zero (as Wan's pipelines pad UMT5 output).

Two encoders behind one interface:
- `umt5`: transformers' `UMT5EncoderModel` + tokenizer loaded from a diffusers pipeline
  folder's `text_encoder/` and `tokenizer/` (local files only).
- `hash`: without weights, a deterministic embedding: one unit-variance vector per word,
  seeded by a hash of the word, so the same prompt gives the same conditioning on every
  machine and prompts sharing words are related. Used by the tiny configs and tests.

An LRU cache keyed by the prompt's SHA-256 makes a repeated prompt cost nothing.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class TextEncoder:
    def __init__(
        self,
        text_dim: int,
        text_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        weights_dir: str | Path | None = None,
        cache_size: int = 256,
    ):
        if text_dim <= 0 or text_len <= 0:
            raise ValueError(f"text_dim ({text_dim}) and text_len ({text_len}) must be positive")
        self.text_dim, self.text_len = text_dim, text_len
        self.device, self.dtype = torch.device(device), dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._model = self._tokenizer = None
        self.kind = "hash"
        if weights_dir is not None:
            self._load_umt5(Path(weights_dir))

    def _load_umt5(self, folder: Path) -> None:
        enc_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
        if not enc_dir.is_dir() or not tok_dir.is_dir():
            raise ValueError(f"text encoder weights need {enc_dir} and {tok_dir}")
        from transformers import AutoTokenizer, UMT5EncoderModel

        self._tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(enc_dir, local_files_only=True)
        self._model = model.to(self.device, self.dtype).eval()
        hidden = int(model.config.d_model)
        if hidden != self.text_dim:
            raise ValueError(f"text encoder in {enc_dir} outputs {hidden} features, the transformer expects {self.text_dim}")
        self.kind = "umt5"

    def encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        key = prompt_key(prompt)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        emb = self._encode_umt5(prompt) if self._model is not None else self._encode_hash(prompt)
        emb = emb.to(self.device, self.dtype)
        self._cache[key] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def _encode_hash(self, prompt: str) -> torch.Tensor:
        words = prompt.lower().split()[: self.text_len]
        emb = torch.zeros(self.text_len, self.text_dim, dtype=torch.float32)
        for i, word in enumerate(words):
            gen = torch.Generator().manual_seed(int(prompt_key(word)[:15], 16))
            emb[i] = torch.randn(self.text_dim, generator=gen)
        return emb

    @torch.no_grad()
    def _encode_umt5(self, prompt: str) -> torch.Tensor:
        tok = self._tokenizer(
            [prompt], padding="max_length", max_length=self.text_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self._model(ids, mask).last_hidden_state[0].float()
        n = int(mask.sum())
        hidden[n:] = 0.0  # Wan pipelines zero the padding rows
        return hidden
