"""The step contract now lives in csps/contract/step.py (below every package); this module
keeps the old import path working for code written before the move."""

from csps.contract.step import (  # noqa: F401
    COMM_PHASES,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    Step,
)
