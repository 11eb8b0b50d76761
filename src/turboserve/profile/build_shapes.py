"""Build the built-in shapes (`profile/shapes/*.json`) from the measured H100 reference profiles.

In: the directory of the shared reference profiles (`python -m
turboserve.profile.build_shapes ../shared/profiles [--out DIR]`). Out: one own-format JSON
per built-in shape (profile/format.py), written into the package's `shapes/` folder by
default, so that pip users get the shapes without the reference data.

Choices made here (the reference data carry no such fields):
- Shape names: `demo91` (from `wan1.3b-demo91`: 1 latent frame = 4 video frames = 250 ms
  per chunk at 16 fps), `wan1.3b-320p` (from `wan1.3b-320p`), `wan1.3b-480p` (from
  `wan1.3b`), `wan14b-480p` (from `wan14b`): 3 latent frames = 12 video frames = 750 ms.
- Window: 21 latent frames for the 3-frame shapes (Self-Forcing's 7 chunks; 6.0 GB of KV
  for the 1.3B model at 480p). For `demo91`, 13 latent frames: the largest measured cache
  (12 frames) plus the chunk, so the steady state is a measured point, not an extrapolation.
- fixed_ms (VAE decode, per session per chunk): measured 230 ms at 480x832 for 3 latent
  frames (median per session); the other resolutions are scaled by video pixels per chunk,
  an estimate (a small decode is less efficient on a GPU, so likely an underestimate).
- Transfer rates: `copy` (the 480p 6.0 GB cache) for the 480p shapes, `copy_small` for
  the others.
- `wan14b` was measured up to 9 cached frames only; its longer contexts are clamped there
  (optimistic at a full window; the shape misses a 750 ms SLO regardless).

Capacity (sessions per GPU at the chunk's playback time, full window, 4 steps) that these
tables give, round only / with the VAE decode: demo91 41 / 22 (32 measured sessions take
200 ms), wan1.3b-320p 4 / 2, wan1.3b-480p 1 / 1, wan14b-480p 0 / 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .format import ProfileError, save_profile, shared_to_profiles

SHAPES_DIR = Path(__file__).with_name("shapes")

# reference model name -> (built-in shape name, window in latent frames, resolution words)
BUILTIN = {
    "wan1.3b-demo91": ("demo91", 13, "112x208 (14x26 latent grid, 91 tokens/frame)"),
    "wan1.3b-320p": ("wan1.3b-320p", 21, "320x576-class (720 tokens/frame)"),
    "wan1.3b": ("wan1.3b-480p", 21, "480x832 (1560 tokens/frame)"),
    "wan14b": ("wan14b-480p", 21, "480x832 (1560 tokens/frame)"),
}
DEVICE = "NVIDIA H100 80GB HBM3"
MEASURED_AT = "2026-11-22"
SOFTWARE = "PyTorch 2.11, bf16, eager, scaled_dot_product_attention, random weights"


def build(profiles_dir: str | Path, out_dir: str | Path = SHAPES_DIR) -> list[Path]:
    profiles_dir = Path(profiles_dir)
    files = sorted(profiles_dir.glob("*.json"))
    if not files:
        raise ProfileError(f"{profiles_dir}: no *.json reference profiles found")
    loaded = {f: json.loads(f.read_text()) for f in files}
    vae = next((d["vae"] for d in loaded.values() if "vae" in d), None)
    copy_big = next((d["copy"] for d in loaded.values() if "copy" in d), None)
    copy_small = next((d["copy_small"] for d in loaded.values() if "copy_small" in d), copy_big)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f, data in loaded.items():
        models = {k: v for k, v in data.items() if k in BUILTIN}
        if not models:
            continue
        windows = {k: BUILTIN[k][1] for k in models}
        for p in shared_to_profiles(models, f.name, window_frames=windows, vae=vae):
            ref = p.name
            name, window, resolution = BUILTIN[ref]
            big = "480" in name
            p.transfer = {k: float(v) for k, v in (copy_big if big else copy_small).items() if k.endswith("_gbps")}
            p.shape = type(p.shape)(**{**p.shape.__dict__, "name": name})
            vae_note = (
                "VAE decode measured at 480x832 (median per session)"
                if big
                else "VAE decode ESTIMATED: the 480x832 measurement scaled by video pixels per chunk"
            )
            p.source = (
                f"{DEVICE}, {SOFTWARE}, measured {MEASURED_AT}; reference model {ref!r} in "
                f"{f.name}; video {resolution}; {p.shape.latent_frames_per_chunk} latent frame(s) = "
                f"{p.shape.video_frames_per_chunk} video frames per chunk at 16 fps; "
                f"{p.shape.passes} passes (4 steps + 1 clean); window {window} latent frames; "
                f"fixed_ms: {vae_note}; weights = params_b * 1e9 * 2 bytes (bf16); state bytes = "
                f"measured KV (self-attention) bytes, linear in context; activation bytes = peak "
                f"- weights - cached KV; built by turboserve.profile.build_shapes"
            )
            measured_ctx = max(r.context_frames for r in p.rounds)
            if measured_ctx + p.shape.latent_frames_per_chunk < window:
                p.source += (
                    f"; NOTE: rounds measured up to {measured_ctx:g} cached frames only; longer "
                    f"contexts are clamped to it, which underestimates a full {window}-frame window"
                )
            p.device = DEVICE
            p.measured_at = MEASURED_AT
            path = out_dir / f"{name}.json"
            save_profile(p, path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profiles_dir", help="directory of the shared reference profiles")
    ap.add_argument("--out", default=str(SHAPES_DIR))
    args = ap.parse_args(argv)
    for path in build(args.profiles_dir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
