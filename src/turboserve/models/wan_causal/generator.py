"""The `wan-causal` family: diffusers' `WanTransformer3DModel` driven chunk by chunk.

In: sessions' `StreamState`s of one compatibility group. Out: each session's next chunk as
uint8 frames (T, H, W, 3) on the CPU; each state advanced in place.

A chunk of n latent frames is generated Self-Forcing style: fresh noise from the session's
own RNG, `steps` few-step flow-matching passes (predict x0 from the flow, re-noise to the next
level with fresh noise), then one clean pass at t=0 over the denoised chunk whose K/V are
appended to the session's cache. Every pass is ONE forward over all sessions of the round
(see `attention.py` for how different cache lengths share it). The model's own modules do
the work: `patch_embedding`, `condition_embedder`, `blocks`, `norm_out`/`proj_out`; we only
replace the attention processors and compute rotary tables at each chunk's absolute frames.

Session state (`StreamState.tensors`; `meta` holds the JSON-able rest):
- `kv.{layer}` (2, L, heads, head_dim): self-attention K/V of the cached frames, rotary
  applied; one tensor per layer so that appending a chunk reallocates one layer at a time
  (a single tensor would briefly need twice the cache's memory).
  The cache keeps at most `window_frames - n` latent frames (the chunk's own n complete the
  attention window): the first `sink_frames` of the session forever, then the most recent.
- `xkv` (layers, 2, text_len, heads, head_dim): the prompt's cross-attention K/V.
- `latents` (C, F, h, w) float32: clean latents of the cached frames (the checkpoint's history).
- `rng`: the session's CPU generator state; `vae.{i}`: the VAE decoder's causal cache.
- meta: `frame_pos` (absolute latent index of each cached frame), `frame_prompts` (the
  prompt each cached frame was generated under), `next_frame`, `evicted`, VAE slot kinds.

- `vae_hist` (C, <=R, h, w) float32: the last R decoded latent frames, R = the VAE decoder's
  causal reach (`vae.causal_reach`, 39 frames for every Wan2.1 VAE shape).

Checkpoint = `latents`, `vae_hist`, `rng` and meta (kilobytes to ~20 MB at 480p, against the
gigabytes of `kv.*` and the VAE cache). Rebuild replays the clean passes over the retained
frames chunk by chunk, each under its own prompt, and decodes `vae_hist` again through the
VAE. The VAE cache comes back bit for bit (R covers the decoder's reach). The KV cache
comes back bit for bit until the session first evicts a frame (same computations in the
same order). After an eviction it cannot: the evicted frames shaped the K/V of the retained
ones through the deeper layers; the rebuilt cache is the one a stream holding only the
retained frames would have (LongLive's "re-cache"): ~1% relative difference in K/V on the
tiny random model, and the video continues with small differences (tests bound them).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch

from ...types import SessionSpec
from ..base import Checkpoint, StreamState
from ..common import RNG_KEY, GeneratorBase, draw_noise, few_step_sigmas, latent_shape, new_rng_state
from ..configs import VAE_SPACE_FACTOR, ModelConfig
from ..vae import FRAMES_META
from .attention import ContextHolder, RoundContext, install, prompt_kv, rope_tables


_ROPE_CACHE_ENTRIES = 256
_ROPE_CACHE_MAX_TABLE_BYTES = 1 << 20


class WanCausalGenerator(GeneratorBase):
    family = "wan-causal"
    state_probe_key = "kv.0"

    def __init__(self, cfg: ModelConfig, *args: Any, **kwargs: Any):
        super().__init__(cfg, *args, **kwargs)
        tcfg = self.transformer.config
        self.layers = len(self.transformer.blocks)
        self.heads = int(tcfg.num_attention_heads)
        self.head_dim = int(tcfg.attention_head_dim)
        self.patch = tuple(int(p) for p in tcfg.patch_size)
        if self.patch[0] != 1:
            raise ValueError(f"wan-causal needs a temporal patch of 1, the checkpoint has {self.patch}")
        self.in_channels = int(tcfg.in_channels)
        self._rope_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _prepare_transformer(self) -> None:
        self._holder = ContextHolder()
        install(self.transformer, self._holder)

    @property
    def max_latent_frames_per_chunk(self) -> int:
        # the cache must keep the sink plus at least one recent frame besides the chunk
        return max(1, self.cfg.window_frames - self.cfg.sink_frames - 1)

    # -- sessions -------------------------------------------------------------------------
    def start_session(self, session_id: str, spec: SessionSpec, prompt: str) -> StreamState:
        spec = self.validate_spec(spec)
        state = StreamState(session_id=session_id, spec=spec, prompt=prompt)
        self._init_tensors(state, new_rng_state(spec.seed))
        state.tensors["xkv"] = self._prompt_kv(prompt)
        return state

    def _init_tensors(self, state: StreamState, rng: torch.Tensor) -> None:
        c, _, h, w = latent_shape(self.cfg, state.spec, 0)
        for layer in range(self.layers):
            state.tensors[f"kv.{layer}"] = torch.empty(2, 0, self.heads, self.head_dim, device=self.device, dtype=self.dtype)
        state.tensors["latents"] = torch.empty(c, 0, h, w, device=self.device, dtype=torch.float32)
        state.tensors["vae_hist"] = torch.empty(c, 0, h, w, device=self.device, dtype=torch.float32)
        state.tensors[RNG_KEY] = rng.to(self.device)
        state.meta.update(frame_pos=[], frame_prompts=[], next_frame=0, evicted=False)
        self.decoder.init_state(state.tensors, state.meta)

    def set_prompt(self, state: StreamState, prompt: str) -> None:
        super().set_prompt(state, prompt)
        state.tensors.pop("xkv", None)  # recomputed at the next chunk

    @torch.no_grad()
    def _prompt_kv(self, prompt: str) -> torch.Tensor:
        emb = self.text.encode(prompt).to(self.device, self.dtype)
        context = self.transformer.condition_embedder.text_embedder(emb.unsqueeze(0))[0]
        return torch.stack([prompt_kv(block.attn2, context) for block in self.transformer.blocks])

    # -- generation -----------------------------------------------------------------------
    def _rope(self, positions: tuple[int, ...], gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (positions, gh, gw)
        hit = self._rope_cache.get(key)
        if hit is None:
            cos, sin = rope_tables(self.transformer.rope, torch.tensor(positions), gh, gw)
            hit = (cos.to(self.device), sin.to(self.device))
            # Small tables (tiny shapes, where recomputing would dominate) are kept; large
            # ones (MBs at 480p) are rebuilt per round: positions move on every chunk anyway.
            if cos.numel() * 8 <= _ROPE_CACHE_MAX_TABLE_BYTES:
                self._rope_cache[key] = hit
                while len(self._rope_cache) > _ROPE_CACHE_ENTRIES:
                    self._rope_cache.popitem(last=False)
        else:
            self._rope_cache.move_to_end(key)
        return hit

    def _context(self, states: Sequence[StreamState], positions: list[tuple[int, ...]],
                 xkvs: list[torch.Tensor], write: bool) -> RoundContext:
        spec = states[0].spec
        gh = spec.height // VAE_SPACE_FACTOR // self.patch[1]
        gw = spec.width // VAE_SPACE_FACTOR // self.patch[2]
        tables = [self._rope(p, gh, gw) for p in positions]
        return RoundContext(
            self_kv=[[s.tensors[f"kv.{layer}"] for layer in range(self.layers)] for s in states],
            cross_kv=torch.stack(xkvs, dim=2),
            rope_cos=torch.stack([t[0] for t in tables]),
            rope_sin=torch.stack([t[1] for t in tables]),
            write=write,
        )

    @torch.no_grad()
    def _forward(self, latents: torch.Tensor, timestep: float, ctx: RoundContext) -> torch.Tensor:
        """One pass of the transformer's modules over (B, C, n, h, w) latents; returns the
        predicted flow (noise - x0) as float32, like `WanTransformer3DModel.forward`."""
        tr = self.transformer
        batch, _, frames, height, width = latents.shape
        p_t, p_h, p_w = self.patch
        # Per session: the CPU's Conv3d kernels block differently by batch size, and a
        # coalesced session must see exactly the numbers it would see alone.
        latents = latents.to(self.dtype)
        hidden = torch.cat([tr.patch_embedding(latents[b : b + 1]) for b in range(batch)])
        hidden = hidden.flatten(2).transpose(1, 2).contiguous()
        # Every session of a round is at the same timestep: embed it once (batch 1, as alone).
        emb = tr.condition_embedder
        t = emb.timesteps_proj(torch.full((1,), float(timestep), device=self.device))
        time_dtype = next(iter(emb.time_embedder.parameters())).dtype
        temb = emb.time_embedder(t.to(time_dtype)).type_as(hidden)
        timestep_proj = emb.time_proj(emb.act_fn(temb)).unflatten(1, (6, -1))
        temb = temb.expand(batch, -1)
        timestep_proj = timestep_proj.expand(batch, -1, -1)
        self._holder.ctx = ctx
        try:
            for block in tr.blocks:
                hidden = block(hidden, None, timestep_proj, None)
        finally:
            self._holder.ctx = None
        shift, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (tr.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = tr.proj_out(hidden)
        hidden = hidden.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()

    @torch.no_grad()
    def _generate_round(self, states: Sequence[StreamState], n: int,
                        shape: tuple[int, int, int, int]) -> list[torch.Tensor]:
        spec = states[0].spec
        for s in states:
            if "xkv" not in s.tensors:
                s.tensors["xkv"] = self._prompt_kv(s.prompt)
        xkvs = [s.tensors["xkv"] for s in states]
        positions = [tuple(range(s.meta["next_frame"], s.meta["next_frame"] + n)) for s in states]

        ctx = self._context(states, positions, xkvs, write=False)
        sigmas = few_step_sigmas(spec.steps, self.cfg.timestep_shift)
        x = torch.stack([draw_noise(s.tensors, shape) for s in states]).to(self.device)
        x0 = x
        for i, sigma in enumerate(sigmas):
            flow = self._forward(x, sigma * 1000.0, ctx)
            x0 = x - sigma * flow
            if i + 1 < len(sigmas):
                nxt = sigmas[i + 1]
                eps = torch.stack([draw_noise(s.tensors, shape) for s in states]).to(self.device)
                x = (1.0 - nxt) * x0 + nxt * eps
        # clean pass: the denoised chunk at t=0 writes its K/V into every session's cache
        ctx.write = True  # same caches, prompts and rotary tables as the denoising passes
        self._forward(x0, 0.0, ctx)

        outputs = self._decode_round(x0, states)
        for b, s in enumerate(states):
            new_kv = [torch.stack([ctx.new_kv[layer][0][b], ctx.new_kv[layer][1][b]]) for layer in range(self.layers)]
            self._append(s, new_kv, x0[b], positions[b])
            s.chunk_index += 1
        return outputs

    def _append(self, s: StreamState, new_kv: list[torch.Tensor], x0: torch.Tensor, positions: tuple[int, ...]) -> None:
        """Add a chunk's K/V and clean latents to the session's cache, then evict down to the
        window: keep the sink frames and the most recent ones."""
        n = len(positions)
        tokens = new_kv[0].shape[1] // n  # tokens per latent frame
        latents = torch.cat([s.tensors["latents"], x0.float()], dim=1)
        frame_pos = s.meta["frame_pos"] + list(positions)
        frame_prompts = s.meta["frame_prompts"] + [s.prompt] * n
        capacity = self.cfg.window_frames - n
        count = len(frame_pos)
        if count > capacity:
            sink = min(self.cfg.sink_frames, capacity)
            first_recent = count - (capacity - sink)
            keep = list(range(sink)) + list(range(first_recent, count))
            latents = latents[:, keep].contiguous()
            frame_pos = [frame_pos[i] for i in keep]
            frame_prompts = [frame_prompts[i] for i in keep]
            s.meta["evicted"] = True
        for layer, chunk_kv in enumerate(new_kv):
            kv = torch.cat([s.tensors[f"kv.{layer}"], chunk_kv.to(self.dtype)], dim=1)
            if count > capacity:
                kv = torch.cat([kv[:, : sink * tokens], kv[:, first_recent * tokens :]], dim=1)
            s.tensors[f"kv.{layer}"] = kv
        s.tensors["latents"] = latents
        s.meta["frame_pos"], s.meta["frame_prompts"] = frame_pos, frame_prompts
        s.meta["next_frame"] = positions[-1] + 1

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self, state: StreamState) -> Checkpoint:
        meta = {k: state.meta[k] for k in ("frame_pos", "frame_prompts", "next_frame", "evicted", FRAMES_META)}
        return Checkpoint(
            session_id=state.session_id, spec=state.spec, prompt=state.prompt, chunk_index=state.chunk_index,
            tensors={key: state.tensors[key].detach().cpu().clone() for key in ("latents", "vae_hist", RNG_KEY)},
            meta=dict(meta, frame_pos=list(meta["frame_pos"]), frame_prompts=list(meta["frame_prompts"])),
        )

    @torch.no_grad()
    def rebuild(self, ckpt: Checkpoint) -> StreamState:
        spec = self.validate_spec(ckpt.spec)
        state = StreamState(session_id=ckpt.session_id, spec=spec, prompt=ckpt.prompt, chunk_index=ckpt.chunk_index)
        self._init_tensors(state, ckpt.tensors[RNG_KEY])
        latents = ckpt.tensors["latents"].to(self.device, torch.float32)
        frame_pos, frame_prompts = ckpt.meta["frame_pos"], ckpt.meta["frame_prompts"]
        n = spec.frames_per_chunk // 4
        # replay the clean passes chunk by chunk (a chunk = frames generated together)
        i = 0
        while i < len(frame_pos):
            j = i
            while j < len(frame_pos) and frame_pos[j] // n == frame_pos[i] // n:
                j += 1
            positions = tuple(frame_pos[i:j])
            state.prompt = frame_prompts[i]
            ctx = self._context([state], [positions], [self._prompt_kv(frame_prompts[i])], write=True)
            chunk = latents[:, i:j].unsqueeze(0)
            self._forward(chunk, 0.0, ctx)
            for layer in range(self.layers):
                chunk_kv = torch.stack([ctx.new_kv[layer][0][0], ctx.new_kv[layer][1][0]]).to(self.dtype)
                state.tensors[f"kv.{layer}"] = torch.cat([state.tensors[f"kv.{layer}"], chunk_kv], dim=1)
            i = j
        state.tensors["latents"] = latents.clone()
        state.meta.update(frame_pos=list(frame_pos), frame_prompts=list(frame_prompts),
                          next_frame=ckpt.meta["next_frame"], evicted=ckpt.meta["evicted"])
        # warm the VAE's causal cache by decoding the last frames again: exact, because the
        # history spans the decoder's whole causal reach (or starts at the stream's frame 0)
        hist = ckpt.tensors["vae_hist"].to(self.device, torch.float32)
        if hist.shape[1]:
            self.decoder.decode_chunk(hist, state.tensors, state.meta)
        state.tensors["vae_hist"] = hist.clone()
        state.meta[FRAMES_META] = ckpt.meta[FRAMES_META]
        state.prompt = ckpt.prompt
        state.tensors["xkv"] = self._prompt_kv(ckpt.prompt)
        return state
