"""Chunk-by-chunk causal VAE decoding and the prompt encoder."""

from __future__ import annotations

import pytest
import torch

from turboserve.models.configs import CONFIGS
from turboserve.models.loading import random_modules_vae
from turboserve.models.text import TextEncoder
from turboserve.models.vae import ChunkDecoder, causal_reach


@pytest.fixture(scope="module")
def decoder():
    return ChunkDecoder(random_modules_vae(CONFIGS["tiny"], 0))


def test_chunked_decode_equals_whole_decode(decoder):
    z = torch.randn(16, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = decoder.decode_whole(z)
    tensors, meta = {}, {}
    decoder.init_state(tensors, meta)
    parts = [decoder.decode_chunk(z[:, :2], tensors, meta), decoder.decode_chunk(z[:, 2:], tensors, meta)]
    assert parts[0].shape[1] == ChunkDecoder.frames_for(2, first=True) == 5
    assert parts[1].shape[1] == ChunkDecoder.frames_for(3, first=False) == 12
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert meta["vae_frames"] == 5 and set(meta["vae_slots"]) <= {"none", "rep", "tensor"}
    # decoding each chunk on its own loses frames at the seam
    alone = decoder.decode_chunk(z[:, 2:], *_fresh(decoder))
    assert alone.shape[1] != parts[1].shape[1] or not torch.equal(alone, parts[1])


def _fresh(decoder):
    tensors, meta = {}, {}
    decoder.init_state(tensors, meta)
    return tensors, meta


def test_causal_reach_is_enough_to_rebuild_the_cache(decoder):
    """Decoding the last `causal_reach` frames from an empty cache reproduces the cache."""
    reach = causal_reach(decoder.vae.decoder)
    assert 30 < reach < 60
    z = torch.randn(16, reach + 3, 1, 1, generator=torch.Generator().manual_seed(1))
    t1, m1 = _fresh(decoder)
    decoder.decode_chunk(z[:, :-1], t1, m1)
    t2, m2 = _fresh(decoder)
    decoder.decode_chunk(z[:, -1 - reach : -1], t2, m2)
    a, b = decoder.decode_chunk(z[:, -1:], t1, m1), decoder.decode_chunk(z[:, -1:], t2, m2)
    assert torch.equal(a, b)


def test_bad_latents_shape(decoder):
    with pytest.raises(ValueError, match="latents"):
        decoder.decode_chunk(torch.zeros(1, 16, 1, 8, 8), *_fresh(decoder))


def test_hash_text_encoder_is_deterministic_and_cached():
    enc = TextEncoder(64, 8)
    a = enc.encode("a cat on a mat")
    assert a.shape == (8, 64)
    assert torch.equal(a[5:], torch.zeros(3, 64))  # padding rows are zero, like UMT5's
    assert enc.encode("a cat on a mat") is a and enc.hits == 1 and enc.misses == 1
    b = TextEncoder(64, 8).encode("a cat on a mat")
    assert torch.equal(a, b)
    assert not torch.equal(enc.encode("a dog"), a)
    small = TextEncoder(64, 8, cache_size=2)
    for p in ("x", "y", "z"):
        small.encode(p)
    assert len(small._cache) == 2


def test_text_encoder_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="prompt"):
        TextEncoder(64, 8).encode(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="text_encoder"):
        TextEncoder(64, 8, weights_dir=tmp_path)


def test_umt5_encoder_from_a_pipeline_folder(tmp_path):
    from model_helpers import write_tiny_umt5

    write_tiny_umt5(tmp_path)
    enc = TextEncoder(64, 8, weights_dir=tmp_path)
    assert enc.kind == "umt5"
    a = enc.encode("a red cat")
    assert a.shape == (8, 64)
    assert torch.equal(a[3:], torch.zeros(5, 64))  # three tokens, the rest zero-padded
    assert a[:3].abs().sum() > 0
    assert not torch.equal(enc.encode("a blue sea"), a)
    assert enc.encode("a red cat") is a  # cached
    with pytest.raises(ValueError, match="features"):
        TextEncoder(32, 8, weights_dir=tmp_path)
