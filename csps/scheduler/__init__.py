"""The pure-Python scheduler: decides each iteration and emits one SchedulerOutput. No torch."""

from csps.contract.step import RunnerOutput, ScheduledRequest, SchedulerOutput
from csps.scheduler.scheduler import RequestUpdate, Scheduler

__all__ = ["RunnerOutput", "ScheduledRequest", "Scheduler", "SchedulerOutput", "RequestUpdate"]
