"""The Faust floor: the processor's agent with nothing inside it.

    python bench/processor/faust_floor.py BOOTSTRAP TOPIC COUNT APP_ID [stock|fast]

The same kind of Faust app as ``processors.worker`` (memory store, one agent with
concurrency 1 taking batches with ``noack_take`` of the same size) that only acks what it
takes. ``fast`` (the default) gives it the processor's fetch loop (:mod:`processors.drain`);
``stock`` leaves Faust's own. Prints ``FLOOR <seconds>`` from its first record to its
``COUNT``-th and exits: what Faust and aiokafka cost per record before any work of ours,
the ceiling for the processor.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, cast

import faust
from faust.worker import Worker

from processors.drain import deliver_without_tasks
from processors.worker import BATCH_MAX, BATCH_WITHIN_S


def main() -> None:
    bootstrap, topic, count, app_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    fetch_loop = sys.argv[5] if len(sys.argv) > 5 else "fast"
    if fetch_loop not in ("fast", "stock"):
        raise SystemExit(f"fetch loop must be fast or stock, not {fetch_loop!r}")
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
    )
    raw = app.topic(
        topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    if fetch_loop == "fast":
        deliver_without_tasks(app.consumer)
    state = {"seen": 0, "first": 0.0}

    @app.agent(raw, concurrency=1)
    async def floor(stream: faust.StreamT[bytes]) -> None:
        async for events in cast(Any, stream).noack_take(BATCH_MAX, within=BATCH_WITHIN_S):
            if not state["seen"]:
                state["first"] = time.perf_counter()
            for event in events:
                await stream.ack(event)
            state["seen"] += len(events)
            if state["seen"] >= count:
                print(f"FLOOR {time.perf_counter() - state['first']:.6f}", flush=True)
                os._exit(0)

    Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
