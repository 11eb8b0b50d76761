"""Streaming attention for diffusers' `WanTransformer3DModel`: per-session KV caches.

In: a `RoundContext` the generator fills before each forward pass (each session's cached
self-attention K/V, its cached cross-attention K/V, rotary tables at each session's absolute
frame offset, and whether this pass writes the chunk into the cache). Out: attention
outputs for the stacked tokens of all sessions; on a writing pass, the chunk's K/V per layer.

Installed with `set_attn_processor({"blocks.{i}.attn1.processor": ..., ...})`. diffusers'
Wan blocks never pass a mask or extra kwargs to processors, so the context travels through
a shared object, not through the call.

Coalescing: projections, norms and FFN run batched over the sessions' stacked chunk tokens
(all sessions in a round have equal chunk shapes); only the attention itself is per
session, because sessions hold different cache lengths. Sessions with equal cache length
share one attention call. Measured on 2 CPU cores (torch 2.13, diffusers' dispatcher):
8 sessions x 256 tokens x 12 heads with caches of 0..2048 tokens took 82 ms per-session
against 209 ms padded to the longest cache with a boolean mask (padding computes the
masked keys anyway and falls off the fast kernel); at the tiny shape both cost ~0.2 ms.
Per-session attention is also bit-identical to running the session alone (padding is
not: longer reductions change the float32 sums). On this CPU the batched linears give the
same rows at any batch size once a session contributes >= 8 token rows (tiny has 16 per
latent frame), and the generator runs the patch convolution per session and the timestep
MLP once per round, so at tiny's shape a coalesced session's frames equal its solo frames
bit for bit; with fewer rows (e.g. a 32x32 video) the GEMM kernels differ in the last
float bits and frames agree to within 1 of 255.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


@dataclass
class RoundContext:
    """What the processors need for one forward pass over a batch of B sessions."""

    self_kv: list[list[torch.Tensor]]  # per session, per layer: (2, L_b, heads, head_dim) cached K/V
    cross_kv: torch.Tensor  # (layers, 2, B, text_len, heads, head_dim) prompt K/V
    rope_cos: torch.Tensor  # (B, S, 1, head_dim) float32, at each session's absolute frames
    rope_sin: torch.Tensor
    write: bool = False  # clean pass: record the chunk's K/V
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (B,S,H,D) K, V


class ContextHolder:
    """Shared by all processors of one model; the generator sets `ctx` around each pass."""

    def __init__(self) -> None:
        self.ctx: RoundContext | None = None

    def get(self) -> RoundContext:
        if self.ctx is None:
            raise RuntimeError("streaming attention used outside a generator round")
        return self.ctx


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding, the convention of diffusers' Wan processor.
    x (B, S, H, D); cos/sin (B, S, 1, D) with each pair's value repeated."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class _LayerProcessor:
    """An attention processor of one transformer layer that reads the round's context from
    the shared holder."""

    _attention_backend = None  # set by the model's `set_attention_backend` (diffusers' dispatcher)
    _parallel_config = None

    def __init__(self, layer: int, holder: ContextHolder):
        self.layer, self.holder = layer, holder

    @staticmethod
    def _project_out(attn, hidden: torch.Tensor) -> torch.Tensor:
        return attn.to_out[1](attn.to_out[0](hidden))


class StreamingSelfAttnProcessor(_LayerProcessor):
    """Self-attention of the chunk's tokens over [cached K/V of the session, the chunk]."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.holder.get()
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query = apply_rotary(query, ctx.rope_cos, ctx.rope_sin)
        key = apply_rotary(key, ctx.rope_cos, ctx.rope_sin)
        if ctx.write:
            ctx.new_kv[self.layer] = (key, value)

        out = torch.empty_like(query)
        groups: dict[int, list[int]] = {}
        for b, layers in enumerate(ctx.self_kv):
            groups.setdefault(layers[self.layer].shape[1], []).append(b)
        for cache_len, members in groups.items():
            idx = members
            q = query[idx]
            if cache_len:
                if len(idx) == 1:  # a view, no copy
                    cached = ctx.self_kv[idx[0]][self.layer].unsqueeze(0)  # (1, 2, L, H, D)
                else:
                    cached = torch.stack([ctx.self_kv[b][self.layer] for b in idx])  # (g, 2, L, H, D)
                k = torch.cat([cached[:, 0].to(key.dtype), key[idx]], dim=1)
                v = torch.cat([cached[:, 1].to(value.dtype), value[idx]], dim=1)
            else:
                k, v = key[idx], value[idx]
            res = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend)
            out[idx] = res.type_as(out)
        return self._project_out(attn, out.flatten(2, 3))


class CachedCrossAttnProcessor(_LayerProcessor):
    """Cross-attention over the session's prompt K/V, computed once per prompt."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.holder.get()
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key, value = ctx.cross_kv[self.layer, 0], ctx.cross_kv[self.layer, 1]
        out = dispatch_attention_fn(
            query, key.to(query.dtype), value.to(query.dtype), attn_mask=None, dropout_p=0.0,
            is_causal=False, backend=self._attention_backend,
        )
        return self._project_out(attn, out.flatten(2, 3).type_as(query))


@torch.no_grad()
def prompt_kv(attn, context: torch.Tensor) -> torch.Tensor:
    """(2, text_len, heads, head_dim) cross-attention K/V of one layer for a projected prompt
    `context` (text_len, inner_dim), as diffusers' processor would compute them per pass."""
    key = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.heads, -1))
    value = attn.to_v(context).unflatten(-1, (attn.heads, -1))
    return torch.stack([key, value])


def install(transformer, holder: ContextHolder) -> None:
    """Replace every attention processor of a WanTransformer3DModel with the streaming ones."""
    processors = {}
    for i, block in enumerate(transformer.blocks):
        if getattr(block.attn2, "add_k_proj", None) is not None:
            raise ValueError("image-conditioned Wan (added K/V projections) is not supported for streaming")
        processors[f"blocks.{i}.attn1.processor"] = StreamingSelfAttnProcessor(i, holder)
        processors[f"blocks.{i}.attn2.processor"] = CachedCrossAttnProcessor(i, holder)
    transformer.set_attn_processor(processors)


def rope_tables(rope, frame_positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (S, 1, head_dim), float32 on the CPU, for a chunk whose latent frames
    sit at absolute `frame_positions` (n,) on an h x w token grid. Computed exactly as
    diffusers' `WanRotaryPosEmbed` builds its table (float64 angles, interleaved pairs,
    theta 10000) but from the chunk's own frames instead of frame 0, and without the table's
    `rope_max_seq_len` limit, so a stream can run for any number of frames."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    def axis(dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return get_1d_rotary_pos_embed(
            dim, positions, 10000.0, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
        )

    n = frame_positions.numel()
    t_cos, t_sin = axis(rope.t_dim, frame_positions.to(torch.int64).cpu())
    h_cos, h_sin = axis(rope.h_dim, torch.arange(height))
    w_cos, w_sin = axis(rope.w_dim, torch.arange(width))

    def grid(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                t.view(n, 1, 1, -1).expand(n, height, width, -1),
                h.view(1, height, 1, -1).expand(n, height, width, -1),
                w.view(1, 1, width, -1).expand(n, height, width, -1),
            ],
            dim=-1,
        ).reshape(n * height * width, 1, -1)

    return grid(t_cos, h_cos, w_cos), grid(t_sin, h_sin, w_sin)
