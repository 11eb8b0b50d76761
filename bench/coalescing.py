"""Coalescing gain: chunk throughput of one batched round of B sessions against running the
same sessions one by one, for both model families at a few shapes.

For each shape and batch size B, B sessions run `--rounds` timed rounds together through
`TorchExecutor.execute` (after a warm-up round); the sequential baseline is the batch-1
round time at the same contexts, i.e. B rounds of one session. Gain = (B / coalesced round
time) / (1 / solo round time). Rounds include every per-session cost the family has.

Shapes (`--shapes`):
- `tiny`, `helios-tiny`: the test configs, full path (transformer and VAE decode);
  `tiny-dit`, `helios-tiny-dit`: the same with the VAE decode stubbed out, i.e. the part of
  the round that coalescing acts on (the VAE decodes session by session).
- `wan-320p`, `wan-480p`, `helios-320p`, `helios-480p`: 320x576 and 480x832 video (720
  and 1560 tokens per latent frame, the token counts of the paper's 320p-class and 480p
  shapes) with one latent frame per chunk and a REDUCED transformer (width 256 = 2 heads x
  128, FFN 1024, 2 layers; the 1.3B model is width 1536, FFN 8960, 30 layers) so that a CPU
  finishes; the VAE decode is stubbed out for these (the full-size VAE takes seconds per
  chunk on a CPU and decodes session by session, so it cannot gain from coalescing anyway).
  They show where the round stops being overhead-bound, not H100 figures.

    python bench/coalescing.py [--shapes tiny,helios-tiny,wan-320p,...] [--batches 1,2,4,8,16,32]

Prints a table and writes JSON (`--json`, default bench/results/coalescing.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import (  # first: puts src/ on sys.path
    add_device_and_json, banner, describe_device, run_round, write_results,
)

import torch

from turboserve.engine.torch_executor import TorchExecutor
from turboserve.models.configs import TINY_HELIOS, TINY_WAN, get_config

REDUCED = {"num_attention_heads": 2, "attention_head_dim": 128, "ffn_dim": 1024, "num_layers": 2}
SHAPES = {
    # name: (base config, width, height, transformer overrides or None, stub VAE, default max batch)
    "tiny": ("tiny", 0, 0, None, False, 32),
    "helios-tiny": ("helios-tiny", 0, 0, None, False, 32),
    "tiny-dit": ("tiny", 0, 0, None, True, 32),  # transformer only: what coalescing acts on
    "helios-tiny-dit": ("helios-tiny", 0, 0, None, True, 32),
    "wan-320p": ("tiny", 576, 320, {**TINY_WAN, **REDUCED}, True, 8),
    "wan-480p": ("tiny", 832, 480, {**TINY_WAN, **REDUCED}, True, 4),
    "helios-320p": ("helios-tiny", 576, 320, {**TINY_HELIOS, **REDUCED, "rope_dim": (44, 42, 42)}, True, 8),
    "helios-480p": ("helios-tiny", 832, 480, {**TINY_HELIOS, **REDUCED, "rope_dim": (44, 42, 42)}, True, 4),
}


def build(shape: str, device: torch.device):
    from turboserve.models.registry import build_family, default_dtype

    base, width, height, transformer, stub_vae, max_batch = SHAPES[shape]
    cfg = get_config(base)
    if transformer is not None:
        cfg = cfg.with_(name=shape, transformer=transformer, width=width, height=height, max_side=1280)
    gen = build_family(cfg, weights=None, device=device, dtype=default_dtype(device), seed=0)
    if stub_vae:
        stub_decoder(gen.decoder)
    return gen, max_batch


def stub_decoder(decoder) -> None:
    """Replace the VAE decode on this instance by zeros of the right frame count."""
    from turboserve.models.vae import FRAMES_META

    def one(latents, tensors, meta):
        n = latents.shape[1]
        first = meta.get(FRAMES_META, 0) == 0
        meta[FRAMES_META] = meta.get(FRAMES_META, 0) + n
        frames = decoder.frames_for(n, first)
        h, w = latents.shape[2] * 8, latents.shape[3] * 8
        return torch.zeros(3, frames, h, w, device=latents.device)

    decoder.decode_chunk = one
    decoder.decode_chunks = lambda latents, states: [one(z, t, m) for z, (t, m) in zip(latents, states)]


def round_times(ex: TorchExecutor, spec, batch: int, rounds: int, tag: str) -> list[float]:
    sids = [f"{tag}{i}" for i in range(batch)]
    for i, sid in enumerate(sids):
        ex.add_session(sid, spec.with_(seed=i), f"prompt {i % 5}")

    def one() -> float:
        res = run_round(ex, spec, tuple(sids))
        if res.errors:
            raise RuntimeError(dict(res.errors))
        return res.duration_ms

    one()  # warm-up (also the first chunk, whose decode differs)
    times = [one() for _ in range(rounds)]
    for sid in sids:
        ex.remove_session(sid)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,tiny-dit,helios-tiny,helios-tiny-dit,wan-320p,wan-480p,"
                                        "helios-320p,helios-480p")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    add_device_and_json(ap, "coalescing.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    where = describe_device(device)
    print(banner("coalescing", where) + ("" if device.type == "cuda" else "; no GPU here: CPU figures"))
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    print(f"{'shape':<12} {'batch':>5} {'round ms':>9} {'chunks/s':>9} {'sequential':>10} {'gain':>6}")
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        gen, max_batch = build(shape, device)
        ex = TorchExecutor(gen, device=device)
        spec = gen.default_spec()
        rows = []
        solo_ms = None
        for b in [b for b in batches if b <= max_batch]:
            ms = statistics.median(round_times(ex, spec, b, args.rounds, f"b{b}-"))
            if b == 1 or solo_ms is None:
                solo_ms = ms / b
            rate, seq = b / ms * 1000.0, 1000.0 / solo_ms
            rows.append({"batch": b, "round_ms": ms, "chunks_per_s": rate, "sequential_chunks_per_s": seq,
                         "gain": rate / seq})
            print(f"{shape:<12} {b:>5} {ms:>9.1f} {rate:>9.1f} {seq:>10.1f} {rate / seq:>5.1f}x", flush=True)
        base, width, height, transformer, stub, _ = SHAPES[shape]
        results[shape] = {"rows": rows, "width": spec.width, "height": spec.height,
                          "latent_frames_per_chunk": spec.frames_per_chunk // 4, "steps": spec.steps,
                          "reduced_transformer": transformer is not None, "vae_stubbed": stub,
                          "transformer": {k: v for k, v in (transformer or get_config(base).transformer).items()
                                          if k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers")},
                          "seconds": time.perf_counter() - t0}
    write_results(args.json, where, device.type == "cuda", {"rounds": args.rounds, "shapes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
