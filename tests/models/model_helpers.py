"""Helpers shared by the model tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import copy
import io

import torch

from turboserve.models.base import StreamState


def clone_state(state: StreamState) -> StreamState:
    return copy.deepcopy(state)


def ship(state: StreamState) -> StreamState:
    """Export a state as bytes and import it back: what crossing a process boundary does."""
    buf = io.BytesIO()
    torch.save({"tensors": state.tensors, "meta": state.meta}, buf)
    buf.seek(0)
    payload = torch.load(buf, weights_only=True)
    return StreamState(session_id=state.session_id, spec=state.spec, prompt=state.prompt,
                       chunk_index=state.chunk_index, tensors=payload["tensors"], meta=payload["meta"])


def run(gen, state: StreamState, chunks: int) -> list[torch.Tensor]:
    return [gen.generate([state])[0] for _ in range(chunks)]


def small(gen):
    """A 32x32 spec of the generator's default model: a quarter of the default's cost, the
    same code paths (tests of behaviour that does not depend on resolution use it)."""
    return gen.default_spec().with_(width=32, height=32)


def write_tiny_umt5(folder, d_model: int = 64) -> list[str]:
    """A real (tiny, random) UMT5 encoder and a word-level tokenizer, saved the way a
    diffusers pipeline folder holds them (`text_encoder/`, `tokenizer/`)."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    words = ["<pad>", "</s>", "<unk>"] + "a cat dog red blue sea sky over the".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder / "tokenizer"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = UMT5Config(vocab_size=len(words), d_model=d_model, d_kv=32, d_ff=128, num_layers=1, num_heads=2)
        UMT5EncoderModel(config).save_pretrained(folder / "text_encoder")
    return words
