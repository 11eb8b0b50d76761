"""Checkpoints in both layouts load through diffusers and give the saved model's output;
the registry resolves built-in names and entry-point plugins, and refuses unknown names."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from turboserve.models.registry import load_generator, model_names

from model_helpers import run, write_tiny_umt5

# diffusers -> original Wan layout: the inverse of diffusers' convert_wan_transformer_to_diffusers
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
    (".norm2.", ".norm3."),  # diffusers' cross-attention norm is the original norm3
]


def to_original_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        new = key
        for a, b in TO_ORIGINAL:
            new = new.replace(a, b)
        if new == "scale_shift_table":
            new = "head.modulation"
        elif new.endswith(".scale_shift_table"):
            new = new.replace(".scale_shift_table", ".modulation")
        out[new] = value.detach().clone().contiguous()
    return out


@pytest.fixture(scope="module")
def source():
    gen = load_generator("tiny", seed=5)
    s = gen.start_session("s", gen.default_spec().with_(seed=3), "a lighthouse")
    return gen, run(gen, s, 2)


def _same_output(gen, expected):
    s = gen.start_session("s", gen.default_spec().with_(seed=3), "a lighthouse")
    got = run(gen, s, 2)
    return all(torch.equal(a, b) for a, b in zip(got, expected))


def test_diffusers_folder_roundtrip(source, tmp_path):
    gen, expected = source
    gen.transformer.save_pretrained(tmp_path / "transformer")
    gen.decoder.vae.save_pretrained(tmp_path / "vae")
    loaded = load_generator("tiny", weights=str(tmp_path), seed=999)  # seed unused: weights given
    assert loaded.weights_source == str(tmp_path) and loaded.text.kind == "hash"
    assert _same_output(loaded, expected)
    # with a text encoder in the folder, prompts go through UMT5
    write_tiny_umt5(tmp_path)
    with_text = load_generator("tiny", weights=str(tmp_path))
    assert with_text.text.kind == "umt5"
    s = with_text.start_session("t", with_text.default_spec(), "a red cat")
    assert run(with_text, s, 1)[0].shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="HeliosTransformer3DModel"):
        load_generator("helios-tiny", weights=str(tmp_path))


def test_original_layout_single_files(source, tmp_path):
    gen, expected = source
    original = to_original_layout(gen.transformer.state_dict())
    assert "head.modulation" in original and "blocks.0.self_attn.q.weight" in original
    single = tmp_path / "causal_wan.safetensors"
    save_file(original, str(single))
    # no vae/ beside the file: the VAE is the seed's random one, as in the source model
    assert _same_output(load_generator("tiny", weights=str(single), seed=5), expected)
    # a training checkpoint as Self-Forcing / LongLive save it: wrapped, with wrapper prefixes
    wrapped = tmp_path / "checkpoint_model_000100.pt"
    torch.save({"generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in original.items()}}, wrapped)
    assert _same_output(load_generator("tiny", weights=str(wrapped), seed=5), expected)


def test_bad_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_generator("tiny", weights=str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="must end in"):
        load_generator("tiny", weights=str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="transformer"):
        load_generator("tiny", weights=str(tmp_path))
    junk = tmp_path / "junk.safetensors"
    save_file({"x": torch.zeros(1)}, str(junk))
    with pytest.raises(ValueError, match="original-layout"):
        load_generator("tiny", weights=str(junk))
    with pytest.raises(ValueError, match="single-file|diffusers folder"):
        load_generator("helios-tiny", weights=str(junk))


def test_unknown_model_lists_names():
    with pytest.raises(ValueError) as err:
        load_generator("no-such-model")
    for name in ("tiny", "helios-tiny", "wan1.3b", "wan14b", "helios-14b"):
        assert name in str(err.value)


def test_entry_point_plugin(tmp_path, monkeypatch):
    pkg = tmp_path / "turbo_plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from turboserve.models.registry import load_generator

        def make(model, *, weights, device, dtype, seed):
            gen = load_generator("tiny", weights=weights, device=device, dtype=dtype, seed=seed)
            gen.plugin_name = model
            return gen
    '''))
    info = tmp_path / "turbo_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: turbo-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[turboserve.models]\nmy-family = turbo_plugin_demo:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "my-family" in model_names()
    gen = load_generator("my-family", seed=1)
    assert gen.plugin_name == "my-family"
