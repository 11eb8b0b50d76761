"""turboserve.sim: the trace-driven simulator.

In: a session trace, a model shape (latency profile), policies and a config. Out: per
policy, chunk latencies, SLO attainment, GPU-hours and cost, mechanism counts and the
controller's decision times; oracle bounds; a table, JSON and plots.

The simulator has no scheduling rule of its own: `driver.TraceDriver` replays the trace
into the real `cluster.controller.Controller`, which runs the registered policy over
`transport.SimTransport`, whose workers are real `engine.core.EngineCore`s with the
profiled executor, on the simulated clock of `loop.EventLoop`.

Modules: `loop` (event heap), `transport` (the Transport protocol on simulated time),
`cruise` (identical rounds in one step, equal results), `driver` (trace replay,
`simulate(...)`), `metrics`, `oracle`, `report`, `plots`, `cli` (`turboserve simulate`).
"""
