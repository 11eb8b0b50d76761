"""`turboserve` command line: the stable interface of DESIGN.md ("Command line").

In: argv. Out: the exit code. Each subcommand's implementation lives with its package and is
imported lazily, so `turboserve trace stats` never pays for importing torch or diffusers.
Errors a user can fix (bad file, bad option value) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .profile.format import JITTER_UNITS  # a constant: no torch, no numpy

# subcommand -> "module:function"; each function takes the parsed args and returns an int
COMMANDS = {
    "trace": "turboserve.traces.cli:run",
    "simulate": "turboserve.sim.cli:run",
    "profile": "turboserve.profile.cli:run",
    "generate": "turboserve.engine.generate:run",
    "serve": "turboserve.serving.cli:run_serve",
    "loadgen": "turboserve.serving.loadgen:run",
    "demo": "turboserve.serving.cli:run_demo",
}


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (sections as in turboserve.config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set autoscale.target_util=0.8 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    trace = sub.add_parser("trace", help="make, convert and describe session traces")
    tsub = trace.add_subparsers(dest="trace_command", required=True)
    synth = tsub.add_parser("synth", help="synthetic bursty trace")
    synth.add_argument("--out", required=True, help="trace file to write (JSONL, one session per line)")
    synth.add_argument("--hours", type=float, default=1.0, help="arrivals over this many hours (default 1)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same trace (default 0)")
    synth.add_argument("--rate", type=float, default=None, help="mean arrivals per minute")
    synth.add_argument("--model", default=None, help="shape for every session / for --fit-gpus")
    synth.add_argument("--fit-gpus", type=int, default=None, metavar="N",
                       help="rescale arrivals so the peak demand needs N GPUs of --model")
    synth.add_argument("--daily-cycle", action=argparse.BooleanOptionalAction, default=True,
                       help="modulate the arrival rate over the day (default on)")
    synth.add_argument("--steps-mix", default=None, metavar="STEPS:P,...",
                       help="mix of denoising step counts, e.g. 4:0.8,2:0.2 (default: all 4)")
    conv = tsub.add_parser("convert", help="map a public request trace onto video sessions")
    conv.add_argument("--format", required=True, choices=["mooncake", "azure", "servegen"],
                      help="the input's format (mappings documented in turboserve/traces/adapters/)")
    conv.add_argument("--out", required=True, help="trace file to write (JSONL, one session per line)")
    conv.add_argument("--model", default=None, help="shape for every session / for --fit-gpus")
    conv.add_argument("--fit-gpus", type=int, default=None, metavar="N",
                      help="rescale so the peak demand needs N GPUs of --model")
    conv.add_argument("--seed", type=int, default=0, help="seed of any random choice (default 0)")
    conv.add_argument("--hours", type=float, default=None, help="keep only the first H hours")
    conv.add_argument("--video-s-per-token", type=float, default=0.1,
                      help="mooncake/azure: seconds of video per generated token")
    conv.add_argument("--compress", type=float, default=24.0,
                      help="servegen: squeeze time by this factor (24: a day becomes an hour)")
    conv.add_argument("--rate", type=float, default=None,
                      help="servegen: mean sessions per minute after compression (default 6)")
    conv.add_argument("inputs", nargs="+",
                      help="input files, or directories standing for their files of the format "
                           "(mooncake *.jsonl; azure, and servegen's per-window files, *.csv)")
    for p in (synth, conv):
        p.add_argument("--span-hours", type=float, default=None,
                       help="with --fit-gpus: scale arrivals so the trace spans H hours, then fit the peak "
                            "by keeping a seeded random share of the sessions (overlaying jittered copies "
                            "where the trace is too small) instead of moving arrivals")
        p.add_argument("--copy-jitter-s", type=float, default=None,
                       help="with --span-hours: each overlaid copy's sessions arrive within this many "
                            "seconds of the original's (default 60)")
    stats = tsub.add_parser("stats", help="describe a trace")
    stats.add_argument("trace", help="trace file (JSONL)")
    stats.add_argument("--model", default=None, help="also report peak demand in GPUs of this shape")
    for p in (synth, conv, stats):
        _common(p)

    sim = sub.add_parser("simulate", help="replay a trace against the real scheduler, simulated GPUs")
    sim.add_argument("--trace", required=True, help="session trace (JSONL, as `turboserve trace` writes)")
    sim.add_argument("--model", required=True, help="shape: demo91, wan1.3b-320p, wan1.3b-480p, wan14b-480p or a profile file")
    sim.add_argument("--gpus", type=int, required=True, help="fixed count / autoscaling ceiling")
    sim.add_argument("--policy", default="all", help="all or a comma-separated list of policy names")
    sim.add_argument("--json", dest="json_out", default=None, help="write the report as JSON here")
    sim.add_argument("--plot", default=None, help="directory for PNG plots")
    sim.add_argument("--slo-ms", type=float, default=None,
                     help="per-chunk latency target (default: the chunk's playback time)")
    sim.add_argument("--until", type=float, default=None, metavar="S",
                     help="stop at S simulated seconds (chunks still owed then count late only if "
                          "already past the SLO); default: until every session has left")
    sim.add_argument("--link", default=None, help="migration link: nvlink, infiniband, pcie")
    sim.add_argument("--no-equal-cost", dest="equal_cost", action="store_false",
                     help="skip the fixed-count baselines' runs at turboserve's mean GPU count")
    sim.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run the policies in N processes, one core each (the same figures, sooner; "
                          "decision times then share the machine)")
    _common(sim)

    prof = sub.add_parser("profile", help="measure a model on this machine and write a profile")
    prof.add_argument("--model", default=None, help="model config: tiny, helios-tiny, wan1.3b, ...")
    prof.add_argument("--weights", default=None)
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--out", required=True)
    prof.add_argument("--quick", action="store_true", help="fewer points (for tests)")
    prof.add_argument("--batches", default=None, help="batch sizes to time, e.g. 1,2,4,8 (default 1,2,4,...,32)")
    prof.add_argument("--contexts", default=None,
                      help="cached latent frames to time at, e.g. 0,-1 (-1 = the window's steady state; "
                           "default every chunk step)")
    prof.add_argument("--size", default=None, help="video WIDTHxHEIGHT, e.g. 208x112 (default: the model's)")
    prof.add_argument("--frames-per-chunk", type=int, default=None, help="video frames per chunk (multiple of 4)")
    prof.add_argument("--name", default=None, help="shape name in the written profile (default: the model name)")
    prof.add_argument("--calibrate", default=None, metavar="ROUNDS",
                      help="measure nothing: fit --base to the rounds `serve --record-rounds` timed")
    prof.add_argument("--base", default=None, help="with --calibrate: the profile file (or built-in shape) served with")
    prof.add_argument("--no-contention", action="store_true",
                      help="with --calibrate: one jitter distribution for all rounds (default: rounds begun "
                           "while another engine was mid-round get their own, `jitter_shared`)")
    prof.add_argument("--jitter-unit", choices=JITTER_UNITS, default="ms",
                      help="with --calibrate: draws added to a round's time (ms, default) or multiplying it")
    prof.add_argument("--pooled-jitter", action="store_true",
                      help="with --calibrate: one jitter table for all batch sizes (default: a batch size "
                           "timed often enough gets its own, `jitter_by_batch`)")
    _common(prof)

    gen = sub.add_parser("generate", help="generate videos for a few prompts, no server")
    gen.add_argument("--model", default="tiny")
    gen.add_argument("--weights", default=None)
    gen.add_argument("--prompt", action="append", required=True)
    gen.add_argument("--chunks", type=int, default=8)
    gen.add_argument("--out", required=True)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--seed", type=int, default=0)
    _common(gen)

    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--model", default="tiny")
    serve.add_argument("--weights", default=None)
    serve.add_argument("--policy", default="turboserve")
    serve.add_argument("--backend", default="local", choices=["local", "ray"])
    serve.add_argument("--workers", type=int, default=None, help="engines (default: one per device, 2 on CPU)")
    serve.add_argument("--profile", default=None, help="latency profile JSON of the model (turboserve profile output)")
    serve.add_argument("--record-rounds", default=None, metavar="FILE",
                       help="append every round's batch, context and measured ms to FILE (JSONL), "
                            "for `turboserve profile --calibrate`")
    _common(serve)

    lg = sub.add_parser("loadgen", help="replay a trace against a running server")
    lg.add_argument("--trace", required=True)
    lg.add_argument("--url", required=True)
    lg.add_argument("--json", dest="json_out", default=None)
    lg.add_argument("--time-scale", type=float, default=1.0, help="compress the trace's clock by this factor")
    lg.add_argument("--max-sessions", type=int, default=None, help="replay only the first N sessions")
    lg.add_argument("--timeout-s", type=float, default=3600.0, help="stop after this many seconds")
    lg.add_argument("--sessions-out", default=None, metavar="FILE",
                    help="write what each client saw to FILE (JSONL: trace id, server session id, "
                         "per-chunk latencies, error)")
    _common(lg)

    demo = sub.add_parser("demo", help="start a server, replay a short bursty trace, print the report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--sessions", type=int, default=6)
    demo.add_argument("--profile", default=None, help="latency profile JSON of the tiny model")
    _common(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = COMMANDS[args.command].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        if os.environ.get("TURBOSERVE_DEBUG"):
            raise
        print(f"turboserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
