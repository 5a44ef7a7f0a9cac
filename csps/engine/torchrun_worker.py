"""Joining torchrun's world, and a rank other than 0: build the Worker rank 0 describes and
serve its calls.

See torchrun_executor.py for the launch and the protocol: the worker kwargs arrive by
broadcast, then each call by mail (parallel/mailbox.py) until a stop message.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from csps.config import EngineConfig
from csps.contract.step import RunnerOutput
from csps.engine.worker import Worker
from csps.engine.worker_proc import STOP, WORKER_METHODS, error_payload
from csps.parallel.control import broadcast_object, gather_objects, new_control_group, post_error
from csps.parallel.groups import destroy_parallel_groups, init_parallel_groups
from csps.parallel.mailbox import Mailbox

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 365 * 86400.0  # the ranks wait for rank 0's next call while the server idles
REPLY_TIMEOUT_S = 600.0  # a rank alive but silent this long after a call (or model load) fails
HEARTBEAT_S = 0.5  # each rank's beat period; rank 0 calls a rank dead after DEAD_AFTER_S
DEAD_AFTER_S = 10.0


def join_world(sp_size: int, tp_size: int):
    """Join torchrun's world: (ParallelGroups, call group, reply group). ValueError when
    WORLD_SIZE is not sp_size * tp_size. Collective: every rank calls it the same way."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != sp_size * tp_size:
        raise ValueError(f"torchrun started {world_size} ranks (WORLD_SIZE) but -sp {sp_size} "
                         f"x -tp {tp_size} needs {sp_size * tp_size}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    groups = init_parallel_groups(sp_size, tp_size)
    return groups, new_control_group(IDLE_TIMEOUT_S), new_control_group(REPLY_TIMEOUT_S)


def local_worker_kwargs(worker_kwargs: dict[str, Any], config: EngineConfig) -> dict[str, Any]:
    """Rank 0's kwargs, with the model folder found on this node when rank 0's path is not."""
    if not Path(worker_kwargs["model_dir"]).is_dir():
        from csps.model.resolve import resolve_model

        worker_kwargs = {**worker_kwargs, "model_dir": resolve_model(config.model.model)}
    return worker_kwargs


def run_call(worker: Worker, groups, method: str, args: tuple) -> Any:
    """worker.method(*args); a step whose instances leave this rank out gets an empty output."""
    if method == "execute_step" and groups.sp_rank not in args[0].instances:
        return RunnerOutput()
    return getattr(worker, method)(*args)


def run_torchrun_worker(config: EngineConfig) -> int:
    """A rank other than 0: serve rank 0's calls until it stops us (returns 0). On an error the
    rank posts it, prints it and exits with status 1 at once: its peers may be stuck in a
    collective with it, and only its exit breaks them out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # NOTE: Ctrl-C is rank 0's (or torchrun's)
    parallel = config.parallel
    groups, calls, replies = join_world(parallel.sequence_parallel_size,
                                        parallel.tensor_parallel_size)
    try:
        worker_kwargs = local_worker_kwargs(broadcast_object(None, calls), config)
        worker = Worker(**worker_kwargs, groups=groups)
        gather_objects("ready", replies)
        logger.info("rank %d of %d ready", groups.rank, groups.world_size)
        mail = Mailbox()
        mail.start_heartbeat(groups.rank, HEARTBEAT_S)  # rank 0 notices a kill (mailbox.py)
        while True:
            method, args = mail.next_call(groups.rank, IDLE_TIMEOUT_S)
            if method == STOP:
                break
            if method not in WORKER_METHODS:
                raise ValueError(f"worker method {method!r} is not callable remotely")
            mail.reply(groups.rank, run_call(worker, groups, method, args))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, then this rank exits
        post_error(error_payload(exc))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # NOTE: not sys.exit: tearing the broken groups down could block
    destroy_parallel_groups()
    return 0
