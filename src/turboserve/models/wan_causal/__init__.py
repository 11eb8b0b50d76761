"""`wan-causal`: causal Wan2.1 (Self-Forcing, CausVid, LongLive) streamed chunk by chunk."""

from .generator import WanCausalGenerator

__all__ = ["WanCausalGenerator"]
