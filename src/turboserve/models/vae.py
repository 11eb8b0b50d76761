"""Chunk-by-chunk decoding with diffusers' `AutoencoderKLWan` and a per-session causal cache.

In: a session's latents for one chunk (C, n, h, w) in the transformer's normalised space,
and the session's tensors/meta where its decoder cache lives. Out: the chunk's video
(3, T, H, W) in [-1, 1]; the session's cache advanced in place.

`AutoencoderKLWan.decode` clears its causal cache on every call, so decoding chunks
independently loses frames at the seams. Its `_decode` loops one latent frame at a time
through `decoder(x, feat_cache=..., feat_idx=[0], first_chunk=...)`; we run that same loop
with the *session's* `feat_cache` list (one slot per causal conv of the decoder), a fresh
`feat_idx=[0]` per latent frame and `first_chunk=True` only on the session's very first
latent frame. Chunk-by-chunk decoding then equals one whole decode exactly.

The cache is flattened into the session's tensors as `vae.{i}`; a slot holds None (not yet
used), the marker "Rep" (the temporal upsampler's first-frame marker) or a tensor, and the
non-tensor kinds are recorded in `meta["vae_slots"]`.

The cache is not small: each causal conv keeps its last 2 input frames at its own
resolution. For the Wan2.1 VAE (shape checked on the meta device) it is 1.9 GB per session
at 480x832 in bf16 (3.8 GB float32) and 1.2 GB at 384x640: part of every session's state,
of either family, that offload and migration move. The tiny VAE's is 1.6 MB at 64x64 (float32).

`decode_chunks` batches several sessions through the decoder when their caches have the
same structure: on a GPU at small shapes that saves kernel launches (the decoder runs ~100
small kernels per latent frame). On a CPU the convolution kernels' results depend on the
batch size in the last float bits, so generators there decode per session and a coalesced
session's frames stay bit-identical to its solo frames.
"""

from __future__ import annotations

from typing import Any

import torch

from .configs import VAE_TIME_FACTOR

SLOTS_META = "vae_slots"  # meta key: per cache slot "none" | "rep" | "tensor"
FRAMES_META = "vae_frames"  # meta key: latent frames decoded so far by this session
_PREFIX = "vae."


class ChunkDecoder:
    """Wraps one `AutoencoderKLWan`; stateless itself, every session's cache lives in its state."""

    def __init__(self, vae: Any):
        self.vae = vae.eval()
        self.slots = int(vae._cached_conv_counts["decoder"])
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = vae.config
        z_dim = int(cfg.z_dim)
        # The transformer works in normalised latents: z_norm = (z - mean) / std.
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(z_dim, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(z_dim, 1, 1, 1)
        self._patch_size = getattr(cfg, "patch_size", None)
        self.history_frames = causal_reach(vae.decoder)

    # -- cache (de)serialisation -------------------------------------------------------
    def init_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for key in [k for k in tensors if k.startswith(_PREFIX)]:
            del tensors[key]
        meta[SLOTS_META] = ["none"] * self.slots
        meta[FRAMES_META] = 0

    def _load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list:
        cache: list = []
        for i, kind in enumerate(meta[SLOTS_META]):
            if kind == "tensor":
                cache.append(tensors[f"{_PREFIX}{i}"])
            else:
                cache.append("Rep" if kind == "rep" else None)
        return cache

    def _store(self, cache: list, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        kinds = []
        for i, slot in enumerate(cache):
            key = f"{_PREFIX}{i}"
            if isinstance(slot, torch.Tensor):
                tensors[key] = slot
                kinds.append("tensor")
            else:
                tensors.pop(key, None)
                kinds.append("rep" if isinstance(slot, str) else "none")
        meta[SLOTS_META] = kinds

    # -- decoding ----------------------------------------------------------------------
    @torch.no_grad()
    def decode_chunk(
        self, latents: torch.Tensor, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> torch.Tensor:
        """latents (C, n, h, w), normalised -> video (3, T, H, W) in [-1, 1] on the VAE's
        device; T = 4n, or 4n - 3 for the session's first chunk."""
        if latents.ndim != 4:
            raise ValueError(f"latents must be (C, n, h, w), got shape {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32)
        z = z * self._std.to(z.device) + self._mean.to(z.device)
        z = z.unsqueeze(0).to(self.dtype)
        cache = self._load(tensors, meta)
        out = self._run(z, cache, meta[FRAMES_META])
        self._store(cache, tensors, meta)
        meta[FRAMES_META] += z.shape[2]
        return out[0]

    @torch.no_grad()
    def decode_chunks(
        self, latents: list[torch.Tensor], states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]
    ) -> list[torch.Tensor]:
        """Several sessions' chunks, batched through the decoder where their caches have the
        same structure (slot kinds and shapes, first frame or not); else one by one. Saves
        launches on a GPU at small shapes; on a CPU the convolutions' results depend on the
        batch size in the last bits, so callers there decode per session."""
        groups: dict[tuple, list[int]] = {}
        for i, (tensors, meta) in enumerate(states):
            shapes = tuple(tuple(tensors[f"{_PREFIX}{j}"].shape) if k == "tensor" else k
                           for j, k in enumerate(meta[SLOTS_META]))
            groups.setdefault((shapes, meta[FRAMES_META] == 0, tuple(latents[i].shape)), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(states)
        for members in groups.values():
            if len(members) == 1:
                i = members[0]
                out[i] = self.decode_chunk(latents[i], *states[i])
                continue
            caches = [self._load(*states[i]) for i in members]
            batched = [
                torch.cat([c[j] for c in caches]) if isinstance(caches[0][j], torch.Tensor) else caches[0][j]
                for j in range(self.slots)
            ]
            z = torch.stack([latents[i].to(self.device, torch.float32) for i in members])
            z = (z * self._std.to(z.device) + self._mean.to(z.device)).to(self.dtype)
            video = self._run(z, batched, states[members[0]][1][FRAMES_META])
            for b, i in enumerate(members):
                tensors, meta = states[i]
                own = [slot[b : b + 1].clone() if isinstance(slot, torch.Tensor) else slot for slot in batched]
                self._store(own, tensors, meta)
                meta[FRAMES_META] += z.shape[2]
                out[i] = video[b]
        return out  # type: ignore[return-value]

    def _run(self, z: torch.Tensor, cache: list, decoded: int) -> torch.Tensor:
        x = self.vae.post_quant_conv(z)
        outs = [
            self.vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=(decoded + i == 0))
            for i in range(x.shape[2])
        ]
        out = torch.cat(outs, dim=2)
        if self._patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self._patch_size)
        return out.clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_whole(self, latents: torch.Tensor) -> torch.Tensor:
        """Reference: diffusers' own one-call decode of (C, F, h, w) normalised latents."""
        z = latents.to(self.device, torch.float32)
        z = (z * self._std.to(z.device) + self._mean.to(z.device)).unsqueeze(0).to(self.dtype)
        return self.vae.decode(z, return_dict=False)[0][0]

    @staticmethod
    def frames_for(latent_frames: int, first: bool) -> int:
        return latent_frames * VAE_TIME_FACTOR - (VAE_TIME_FACTOR - 1 if first else 0)


def causal_reach(decoder: Any) -> int:
    """Latent frames the decoder's causal cache can still depend on: each causal conv looks
    (kernel_t - 1) frames back at its own frame rate, and each temporal upsampler doubles the
    rate after its own time conv. Decoding this many latent frames from an empty cache
    reproduces a session's cache bit for bit (measured: 38 for the tiny VAE, where 36
    frames still leave an error of 1e-5)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    reach, rate, upsampler_convs = 0.0, 1, set()
    for module in decoder.modules():
        if isinstance(module, WanResample) and module.mode == "upsample3d":
            reach += (module.time_conv.kernel_size[0] - 1) / rate
            upsampler_convs.add(id(module.time_conv))
            rate *= 2
        elif isinstance(module, WanCausalConv3d) and id(module) not in upsampler_convs:
            reach += (module.kernel_size[0] - 1) / rate
    return int(reach) + 2
