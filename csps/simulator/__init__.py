"""`csps simulate`: the engine's Scheduler and policies driven by a discrete-event loop in which
only time is simulated, through the cost-model interface (csps/costmodel). No torch.

`loop` (events, the Simulator), `timer` (SchedulerOutput -> seconds), `cluster` (KV blocks per
rank, one Scheduler per replica), `routing` (which replica a request goes to), `prompt_tokens`
(prompt ids shared where trace hash ids are), `trace_reuse` (the prefix reuse hash ids offer),
`result` (bench-serve JSON plus scheduling delays, prefix-cache hits and simulator figures),
`capacity` (the highest rate within SLOs, `csps simulate --capacity`), `cli`.
"""
