"""`csps simulate`: the engine's Scheduler and policies driven by a discrete-event loop in which
only time is simulated, through the cost-model interface (csps/costmodel). No torch.

`loop` (events, the Simulator), `timer` (SchedulerOutput -> seconds), `cluster` (KV blocks per
rank, one Scheduler per replica), `result` (bench-serve JSON plus scheduling delays and
simulator figures), `capacity` (the highest rate within SLOs, `csps simulate --capacity`), `cli`.
"""
