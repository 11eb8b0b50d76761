"""helios on the helios-tiny config: chunks over a fixed multi-scale history, coalescing,
offload/migration, exact rebuild, prompt changes and spec validation."""

from __future__ import annotations

import pytest
import torch

from turboserve.models.base import ChunkGenerator

from model_helpers import clone_state, run, ship, small


def test_is_a_chunk_generator_with_small_state(helios, tiny):
    assert isinstance(helios, ChunkGenerator) and helios.family == "helios"
    s = helios.start_session("a", helios.default_spec(), "a cat")
    frames = run(helios, s, 2)
    assert all(f.shape == (4, 64, 64, 3) and f.dtype == torch.uint8 for f in frames)
    long_, mid, short = helios.history_sizes
    assert s.tensors["history"].shape[1] == long_ + mid + short  # fixed window, no KV cache
    assert not any(k.startswith("kv") for k in s.tensors)
    assert not torch.equal(s.tensors["prefix"], torch.zeros_like(s.tensors["prefix"]))


def test_coalesced_equals_alone(helios):
    spec = small(helios)
    a = helios.start_session("a", spec.with_(seed=1), "rain on a window")
    b = helios.start_session("b", spec.with_(seed=2), "a busy market")
    run(helios, a, 2)  # a is further along than b
    solo = [clone_state(s) for s in (a, b)]
    together = helios.generate([a, b])
    alone = [helios.generate([s])[0] for s in solo]
    for x, y in zip(together, alone):
        assert torch.equal(x, y)
    for s, t in zip((a, b), solo):
        assert torch.equal(s.tensors["history"], t.tensors["history"])


def test_offload_migration_and_rebuild_are_exact(helios, helios_twin):
    s = helios.start_session("m", small(helios).with_(seed=4), "a glacier")
    run(helios, s, 2)
    reference = clone_state(s)
    expected = run(helios, reference, 2)
    ckpt = helios.checkpoint(s)
    s.tensors = {k: v.to("cpu", copy=True) for k, v in s.tensors.items()}  # offload and back
    moved = ship(s)  # migration into another instance
    assert torch.equal(run(helios_twin, moved, 1)[0], expected[0])
    rebuilt = helios_twin.rebuild(ckpt)
    assert all(torch.equal(rebuilt.tensors[k], clone_state(s).tensors[k]) for k in s.tensors)
    assert torch.equal(run(helios_twin, rebuilt, 1)[0], expected[0])
    assert ckpt.nbytes() < s.nbytes()


def test_prompt_change_takes_effect_next_chunk(helios):
    s = helios.start_session("p", small(helios), "a calm sea")
    run(helios, s, 1)
    other = clone_state(s)
    helios.set_prompt(other, "a storm at sea")
    assert not torch.equal(helios.generate([s])[0], helios.generate([other])[0])


@pytest.mark.parametrize("change, field", [(dict(width=70), "width"), (dict(steps=0, frames_per_chunk=5), "frames_per_chunk")])
def test_bad_spec_names_the_field(helios, change, field):
    with pytest.raises(ValueError, match=field):
        helios.validate_spec(helios.default_spec().with_(**change))
