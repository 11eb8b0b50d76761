"""`turboserve trace synth | convert | stats`: make, convert and describe session traces.

In: the parsed arguments of `turboserve.cli` (`args.trace_command` and its options). Out:
a trace JSONL written (synth, convert) or a statistics table printed (stats); exit code 0.
Only the profile package is imported (no torch): these commands start fast.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..config import load_config
from .rescale import TraceTooSmall, fit_factor, fit_to_gpus, peak_demand
from .schema import read_trace, write_trace
from .span_fit import DEFAULT_COPY_JITTER_S, fit_in_span
from .stats import format_stats, trace_stats
from .synth import SynthConfig, synth_trace

DEFAULT_SHAPE = "demo91"
FIT_ROUNDS = 10  # synth: regenerations at a corrected rate so a fitted trace keeps its length


def _model_and_shape(name: str | None, gpu_memory_bytes: int):
    """The latency model on GPUs of `gpu_memory_bytes` (`cluster.gpu_memory_bytes`, as
    `simulate` runs it) and the shape `name` resolves to in it."""
    from ..profile import load_latency_model, resolve_shape

    model = load_latency_model()
    shape = resolve_shape(name or DEFAULT_SHAPE, model)
    return model.on_gpu(gpu_memory_bytes), shape


def run(args) -> int:
    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
    slo_ms, gpu_bytes = cfg.slo.slo_ms, cfg.cluster.gpu_memory_bytes
    cmd = args.trace_command
    if cmd == "synth":
        return _synth(args, slo_ms, gpu_bytes)
    if cmd == "convert":
        return _convert(args, slo_ms, gpu_bytes)
    if cmd == "stats":
        return _stats(args, slo_ms, gpu_bytes)
    raise ValueError(f"unknown trace command {cmd!r}; expected synth, convert or stats")


def _synth(args, slo_ms, gpu_bytes: int) -> int:
    if args.hours <= 0:
        raise ValueError(f"--hours must be > 0, got {args.hours}")
    model, shape = _model_and_shape(args.model, gpu_bytes)
    cfg = SynthConfig(hours=args.hours, seed=args.seed, shape=shape, daily_cycle=args.daily_cycle)
    if getattr(args, "steps_mix", None):
        cfg = replace(cfg, law=replace(cfg.law, steps_mix=_parse_steps_mix(args.steps_mix)))
    if args.rate is not None:
        if args.rate <= 0:
            raise ValueError(f"--rate must be > 0, got {args.rate}")
        cfg = replace(cfg, rate_per_min=args.rate)
    records = synth_trace(cfg, model)
    _check_span_flags(args)
    if args.span_hours is not None:
        records = _fit_in_span(args, records, model, shape, slo_ms)
    elif args.fit_gpus is not None:
        # Fitting scales arrival times; to keep the trace about `hours` long, regenerate at
        # the rate the fit implies and keep the draw that needed the smallest rescaling.
        best = None
        for _ in range(FIT_ROUNDS):
            try:
                f = fit_factor(records, model, shape, args.fit_gpus, slo_ms)
            except TraceTooSmall:
                if best is None:
                    raise
                # a redraw at a low rate can come out with too few sessions to need the
                # GPUs at all: draw again at a higher rate
                cfg = replace(cfg, rate_per_min=cfg.rate_per_min * 1.5)
                records = synth_trace(cfg, model)
                continue
            if best is None or abs(math.log(f)) < abs(math.log(best[0])):
                best = (f, records, cfg.rate_per_min)
            if abs(math.log(f)) < 0.03:
                break
            cfg = replace(cfg, rate_per_min=cfg.rate_per_min / f)
            records = synth_trace(cfg, model)
        f, records, rate = best
        records = fit_to_gpus(records, model, shape, args.fit_gpus, slo_ms)
        print(f"rate {rate:.2f}/min, arrivals scaled by {f:.4f} to fit {args.fit_gpus} GPUs of {shape}")
    _write(records, args.out, model, shape, slo_ms)
    return 0


def _convert(args, slo_ms, gpu_bytes: int) -> int:
    from .adapters import azure, mooncake, servegen

    _check_span_flags(args)
    model, shape = _model_and_shape(args.model, gpu_bytes)
    fpc = model.shape(shape).video_frames_per_chunk
    if args.format == "mooncake":
        records = mooncake.convert(args.inputs, shape, fpc, args.seed, video_s_per_token=args.video_s_per_token)
    elif args.format == "azure":
        records = azure.convert(args.inputs, shape, fpc, args.seed, video_s_per_token=args.video_s_per_token)
    else:
        rate = args.rate if args.rate is not None else 6.0
        records = servegen.convert(args.inputs, shape, fpc, args.seed, compress=args.compress,
                                   rate_per_min=rate, hours=args.hours)
    if args.hours is not None:
        records = [r for r in records if r.arrival_s < args.hours * 3600.0]
    if not records:
        raise ValueError(f"no sessions left from {args.inputs} (check the inputs and --hours)")
    if args.span_hours is not None:
        records = _fit_in_span(args, records, model, shape, slo_ms)
    elif args.fit_gpus is not None:
        f = fit_factor(records, model, shape, args.fit_gpus, slo_ms)
        records = fit_to_gpus(records, model, shape, args.fit_gpus, slo_ms)
        print(f"arrivals scaled by {f:.4f} to fit {args.fit_gpus} GPUs of {shape}")
    _write(records, args.out, model, shape, slo_ms)
    return 0


def _check_span_flags(args) -> None:
    """Before any work: the span fit's flags only make sense together."""
    if args.span_hours is not None and args.fit_gpus is None:
        raise ValueError("--span-hours fits the peak within the span: give --fit-gpus too")
    if args.copy_jitter_s is not None and args.span_hours is None:
        raise ValueError("--copy-jitter-s sets the jitter of --span-hours' overlaid copies: give --span-hours too")


def _fit_in_span(args, records, model, shape, slo_ms):
    jitter_s = DEFAULT_COPY_JITTER_S if args.copy_jitter_s is None else args.copy_jitter_s
    records, fit = fit_in_span(records, model, shape, args.fit_gpus, args.span_hours * 3600.0, slo_ms,
                               seed=args.seed, jitter_s=jitter_s)
    print(f"{fit.describe()} to fit {args.fit_gpus} GPUs of {shape}")
    return records


def _write(records, out, model, shape, slo_ms) -> None:
    n = write_trace(records, out)
    peak, _ = peak_demand(records, model, shape, slo_ms)
    span = max((r.arrival_s for r in records), default=0.0)
    print(f"wrote {n} sessions to {out}: arrivals over {span / 60:.1f} min, peak demand "
          f"{peak:.2f} GPUs of {shape} (needs {math.ceil(peak - 1e-9)})")


def _stats(args, slo_ms, gpu_bytes: int) -> int:
    records = read_trace(args.trace)
    model = shape = None
    if args.model:
        model, shape = _model_and_shape(args.model, gpu_bytes)
    print(format_stats(trace_stats(records, model, shape, slo_ms)))
    return 0


def _parse_steps_mix(text: str) -> tuple[tuple[int, float], ...]:
    """`4:0.8,2:0.2` -> ((4, 0.8), (2, 0.2))."""
    mix = []
    for part in text.split(","):
        try:
            steps, p = part.split(":")
            mix.append((int(steps), float(p)))
        except ValueError:
            raise ValueError(f"--steps-mix wants STEPS:PROBABILITY pairs like 4:0.8,2:0.2, got {part!r}") from None
    if any(s < 1 or p < 0 for s, p in mix) or sum(p for _, p in mix) <= 0:
        raise ValueError(f"--steps-mix needs steps >= 1 and probabilities >= 0 summing above 0, got {text!r}")
    return tuple(mix)
