"""Session traces: the JSONL schema, a synthetic bursty generator, adapters for public
request traces, rescaling to a GPU count, and statistics.

In: JSONL files or generator settings. Out: `types.SessionRecord`s for the simulator and
the load generator.
"""

from .rescale import demand_curve, fit_to_gpus, peak_demand
from .schema import TraceError, read_trace, write_trace
from .synth import SynthConfig, synth_trace

__all__ = ["SynthConfig", "TraceError", "demand_curve", "fit_to_gpus", "peak_demand", "read_trace", "synth_trace", "write_trace"]
