"""`turboserve profile --model M [--weights W] --device cpu|cuda --out F [--quick]`, and
`turboserve profile --calibrate ROUNDS --base P --out F`.

In: parsed CLI args. Out: a `turboserve-profile/1` JSON file at `--out` (the shape is
named after the model config), a progress bar while measuring, and a short summary table
on stdout. `simulate --model F` and the live scheduler plan with that file. With
`--calibrate`, nothing is measured: profile P (a file, or a built-in shape) is fitted to
the rounds `turboserve serve --record-rounds ROUNDS` timed (profile/calibrate.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def run(args) -> int:
    from ..engine.generate import resolve_device
    from .format import load_profiles, save_profile
    from .profiler import profile_model

    out = Path(args.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    if getattr(args, "calibrate", None):
        return run_calibrate(args, out)
    if not getattr(args, "model", None):
        raise ValueError("--model is required (or --calibrate ROUNDS --base PROFILE)")
    from ..config import load_config
    from ..models.registry import generator_options

    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
    device = resolve_device(args.device)
    profile = profile_model(args.model, weights=args.weights, device=device, quick=bool(args.quick),
                            seed=int(getattr(args, "seed", 0) or 0), shape_name=getattr(args, "name", None),
                            batches=_ints(getattr(args, "batches", None), "--batches"),
                            contexts=_ints(getattr(args, "contexts", None), "--contexts"),
                            spec_changes=_spec_changes(args), **generator_options(cfg.engine))
    save_profile(profile, out)
    load_profiles(out)  # what we wrote must read back (validates every field)
    print(summary(profile))
    print(f"wrote {out}")
    return 0


def run_calibrate(args, out: Path) -> int:
    from . import load_latency_model
    from .calibrate import calibrate, read_timed_rounds
    from .format import load_profiles, save_profile

    base = getattr(args, "base", None)
    if not base:
        raise ValueError("--calibrate needs --base: the profile the rounds ran with (a file or a built-in shape)")
    if Path(base).exists():
        profile = load_profiles(base)[0]
    else:
        profile = load_latency_model().profile(base)
    rounds, shared = read_timed_rounds(args.calibrate, profile.name)
    if getattr(args, "no_contention", False):
        shared = None  # one distribution for every round, whatever the other engines did
    calibrated = calibrate(profile, rounds, note=str(args.calibrate), shared=shared,
                           unit=getattr(args, "jitter_unit", "ms"), by_batch=not getattr(args, "pooled_jitter", False))
    if getattr(args, "name", None):
        calibrated = replace(calibrated, shape=replace(calibrated.shape, name=args.name))
    save_profile(calibrated, out)
    load_profiles(out)
    print(summary(calibrated))
    print(calibrated.source)
    print(f"wrote {out}")
    return 0


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. 1,2,4; got {text!r}") from None


def _spec_changes(args) -> dict[str, int]:
    """--size WxH and --frames-per-chunk as SessionSpec fields (the generator validates them)."""
    changes: dict[str, int] = {}
    size = getattr(args, "size", None)
    if size:
        try:
            width, height = (int(x) for x in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size takes WIDTHxHEIGHT in pixels, e.g. 208x112; got {size!r}") from None
        changes.update(width=width, height=height)
    if getattr(args, "frames_per_chunk", None):
        changes["frames_per_chunk"] = int(args.frames_per_chunk)
    return changes


def summary(profile) -> str:
    """A small table: round ms over batch x context, then the per-chunk and transfer figures."""
    contexts = sorted({r.context_frames for r in profile.rounds})
    batches = sorted({r.batch for r in profile.rounds})
    cell = {(r.batch, r.context_frames): r.round_ms for r in profile.rounds}
    lines = [f"shape {profile.name}: round ms (VAE excluded) by batch x context (latent frames), "
             f"{profile.shape.passes} passes, on {profile.device}"]
    lines.append("batch " + "".join(f"{'ctx ' + format(c, 'g'):>10}" for c in contexts))
    for b in batches:
        lines.append(f"{b:>5} " + "".join(f"{cell[(b, c)]:>10.1f}" if (b, c) in cell else f"{'-':>10}"
                                          for c in contexts))
    state = ", ".join(f"{c:g}:{b / 2**20:.2f}" for c, b in profile.state_bytes)
    lines.append(f"VAE per chunk {profile.fixed_ms:.1f} ms; state MiB by context {state}")
    lines.append("transfer GB/s " + ", ".join(f"{k.removesuffix('_gbps')} {v:g}" for k, v in profile.transfer.items()))
    return "\n".join(lines)
