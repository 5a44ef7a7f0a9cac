"""parallel/mailbox.py on a real 3-rank world: rank 0 posts each rank its own calls and polls
for replies without blocking; every message is read once, in order, and deleted."""

from __future__ import annotations

import time

from gloo_harness import run_distributed

from csps.parallel.comm import CommStats


def _rank(rank: int, world_size: int) -> dict:
    from csps.parallel.groups import init_parallel_groups
    from csps.parallel.mailbox import Mailbox

    init_parallel_groups(world_size, 1, backend="gloo")
    if rank != 0:
        mail, seen = Mailbox(), []
        while True:
            call = mail.next_call(rank, timeout_s=60)
            if call == "stop":
                return {"seen": seen}
            seen.append(call)
            if rank == 2:
                time.sleep(0.3)  # a slow rank: rank 0 must not wait for it to read rank 1's
            mail.reply(rank, (rank, call))
    stats = CommStats()
    mail = Mailbox(stats)
    assert mail.poll_reply(1) == (False, None)  # nothing posted yet: no block, no reply
    for n in range(3):
        mail.post_call(1, f"a{n}")
    mail.post_call(2, "b0")
    order = []
    while len(order) < 4:
        for r in (1, 2):
            arrived, reply = mail.poll_reply(r)
            if arrived:
                order.append(reply)
        time.sleep(0.001)
    for r in (1, 2):
        mail.post_call(r, "stop")
    return {"order": order, "bytes": stats.bytes_sent["control"],
            "left": mail.store.check(["csps/mail/reply/1/0"])}


def test_mail_goes_point_to_point_in_order_and_replies_do_not_wait_for_slow_ranks():
    results = run_distributed(_rank, 3, timeout_s=60)
    order = results[0]["order"]
    assert [c for r, c in order if r == 1] == ["a0", "a1", "a2"]  # in order, each once
    assert order.index((1, "a2")) < order.index((2, "b0"))  # rank 2 was slower
    assert results[1]["seen"] == ["a0", "a1", "a2"] and results[2]["seen"] == ["b0"]
    assert results[0]["bytes"] > 0 and results[0]["left"] is False  # read mail is deleted
