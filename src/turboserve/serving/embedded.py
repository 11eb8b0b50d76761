"""Assembling the live runtime: model, engines, transport, controller and policy.

In: the config, a model config name (`tiny` by default) and optional weights, a policy
name, a backend (`local` or `ray`), a worker count. Out: a `ClusterRuntime` ready to
`start()`, the `ServingRuntime` the app serves.

Devices: with CUDA, one engine slot per GPU; without, `workers` CPU engines (2 by
default) that split the cores between them. `cluster.gpus` is capped at the slots, so the
policy scales within the devices present; `cluster.min_gpus` is at least 1.
The latency model is the built-in profiles plus any `extra_profiles`; the served model's
shape (its config name, e.g. `tiny`) must be among them, since the policy plans with it.
A `generator_factory(device) -> ChunkGenerator` replaces the real model (tests).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

from ..cluster.runtime import ClusterRuntime, SpecError
from ..config import TurboConfig
from ..types import SessionSpec

log = logging.getLogger(__name__)

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(SessionSpec))


def local_devices(config: TurboConfig, workers: int | None) -> list[str]:
    """Engine slots: one per GPU, or `workers` CPU engines (default 2)."""
    import torch

    want = config.engine.device
    if want in ("auto", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        slots = [f"cuda:{i}" for i in range(n)]
        return slots[:workers] if workers else slots
    if want.startswith("cuda:"):
        return [want] * (workers or 1)
    if want == "cuda":
        raise ValueError("engine.device=cuda but CUDA is not available; use auto or cpu")
    return ["cpu"] * (workers or 2)


def spec_resolver(generator, served_model: str) -> Callable[[dict], SessionSpec]:
    """Requested fields -> a validated spec, or `SpecError` naming the field."""

    def resolve(requested: dict) -> SessionSpec:
        requested = dict(requested)
        model = requested.pop("model", None)
        if model is not None and model != served_model:
            raise SpecError("model", f"this server serves {served_model!r}; got {model!r}")
        unknown = set(requested) - set(SPEC_FIELDS)
        if unknown:
            raise SpecError(sorted(unknown)[0], "unknown session field")
        spec = generator.default_spec().with_(**requested)
        try:
            return generator.validate_spec(spec)
        except ValueError as e:
            raise SpecError(_field_named(str(e)), str(e)) from None

    return resolve


def _field_named(message: str) -> str:
    """The spec field an error message is about (the model names it), else `spec`."""
    head = message.split(":", 1)[0].strip()
    if head in SPEC_FIELDS:
        return head
    hits = [(message.find(f), f) for f in SPEC_FIELDS if f in message]
    return min(hits)[1] if hits else "spec"


def warm_up(generator, chunks: int) -> None:
    spec = generator.validate_spec(generator.default_spec())
    state = generator.start_session("warmup", spec, "warm-up")
    for _ in range(chunks):
        generator.generate([state])


def build_runtime(config: TurboConfig, *, model: str = "tiny", weights: str | None = None,
                  policy: str = "turboserve", backend: str = "local", workers: int | None = None,
                  generator_factory: Callable[[str], object] | None = None,
                  extra_profiles: Sequence[str | Path] = (), latency_model=None,
                  warmup_chunks: int = 3) -> ClusterRuntime:
    """`warmup_chunks`: chunks each engine generates for a throw-away session before it
    reports ready, so first-call costs (allocator, kernels, lazy imports) never land on a
    user's chunk."""
    from ..cluster.controller import Controller
    from ..engine.torch_executor import TorchExecutor
    from ..policy.registry import get_policy

    if generator_factory is None:
        def generator_factory(device: str):
            from ..models.registry import generator_options, load_generator

            return load_generator(model, weights=weights, device=device, **generator_options(config.engine))
    if latency_model is None:
        from ..profile import load_latency_model

        latency_model = load_latency_model(extra_profiles)
    try:
        latency_model.shape(model)
    except (KeyError, ValueError, LookupError):
        raise ValueError(f"no latency profile for model {model!r}: run `turboserve profile --model "
                         f"{model} --out F` and pass it (serve.profile / --set), so the scheduler "
                         "can plan with measured round times") from None

    if backend == "ray":
        from ..cluster.ray_transport import RayTransport

        import torch

        slots = workers or config.cluster.gpus
        gpus = 1.0 if (config.engine.device in ("auto", "cuda") and torch.cuda.is_available()) else 0.0
        transport = RayTransport(generator_factory, slots=slots, gpus_per_worker=gpus,
                                 max_batch=config.engine.max_batch, model=latency_model)
        devices = ["ray"] * slots
    elif backend == "local":
        devices = local_devices(config, workers)
        cpu_engines = sum(1 for d in devices if d == "cpu")
        if cpu_engines:
            import torch

            # CPU engines share the cores: give each its slice instead of oversubscribing.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_engines))
        transport = None
    else:
        raise ValueError(f"backend must be local or ray, got {backend!r}")

    gpus = min(config.cluster.gpus, len(devices))
    cluster = dataclasses.replace(config.cluster, gpus=gpus,
                                  min_gpus=max(1, min(config.cluster.min_gpus, gpus)))
    config = dataclasses.replace(config, cluster=cluster)

    reference: dict = {}
    ref_lock = threading.Lock()

    def make_executor(worker_id: str, device: str):
        gen = generator_factory(device)
        if warmup_chunks:
            warm_up(gen, warmup_chunks)
        with ref_lock:
            reference.setdefault("generator", gen)
        return TorchExecutor(gen, device=device)

    runtime_holder: dict = {}
    if transport is None:
        from ..cluster.local import LocalTransport

        transport = LocalTransport(make_executor, devices, clock=lambda: runtime_holder["rt"].now(),
                                   max_batch=config.engine.max_batch, model=latency_model)
    pol = get_policy(policy)
    controller = Controller(pol, latency_model, config, transport, shape=model)

    # Spec validation needs a generator; the first engine's is built at bootstrap, and a
    # separate one (cheap for small models) serves until then or on other backends.
    fallback: dict = {}

    def resolve(requested: dict) -> SessionSpec:
        gen = reference.get("generator")
        if gen is None:
            gen = fallback.get("generator")
            if gen is None:
                gen = fallback["generator"] = generator_factory("cpu")
        return spec_resolver(gen, model)(requested)

    runtime = ClusterRuntime(controller=controller, transport=transport, config=config,
                             policy_name=policy, resolve_spec=resolve)
    runtime_holder["rt"] = runtime
    if backend == "ray":
        transport.set_clock(runtime.now)
    return runtime
