"""The families on a CUDA device in bf16 (skipped without one): coalescing within bf16's
batch-invariance, exact offload round trips through pinned host memory."""

from __future__ import annotations

import pytest
import torch

from turboserve.models.registry import load_generator

from model_helpers import clone_state, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("model", ["tiny", "helios-tiny"])
def test_cuda_bf16_coalescing_and_offload(model):
    gen = load_generator(model, device="cuda", seed=0)
    assert gen.dtype == torch.bfloat16 and gen.batch_vae
    spec = gen.default_spec()
    a = gen.start_session("a", spec.with_(seed=1), "a harbour at dusk")
    run(gen, a, 2)
    b = gen.start_session("b", spec.with_(seed=2), "a snowy street")
    solo = [clone_state(s) for s in (a, b)]
    together = gen.generate([a, b])
    alone = [gen.generate([s])[0] for s in solo]
    for x, y in zip(together, alone):
        # bf16 GEMMs and convolutions may block differently by batch size
        assert x.shape == y.shape and (x.float() - y.float()).abs().mean() < 2.0
    # offload to pinned host memory and back: the continuation is unchanged
    reference = clone_state(a)
    expected = gen.generate([reference])[0]
    host = {k: v.to("cpu").pin_memory() for k, v in a.tensors.items()}
    a.tensors = {k: v.to("cuda", non_blocking=True) for k, v in host.items()}
    torch.cuda.synchronize()
    assert torch.equal(gen.generate([a])[0], expected)
