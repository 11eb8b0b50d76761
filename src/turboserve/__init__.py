"""turboserve: serving streaming video generation with coalesced chunks, offload, migration
and a closed-loop scheduler that rebalances sessions and autoscales GPUs."""

__version__ = "0.1.0"
