"""The Faust floor: the processor's agent with nothing inside it.

    python bench/processor/faust_floor.py BOOTSTRAP TOPIC COUNT APP_ID [batches|stock]

The same kind of Faust app as ``processors.worker`` (memory store, one agent with
concurrency 1) that only takes the raw records, in batches of up to ``BATCH_MAX``.
``batches`` (the default) delivers them as the processor does, past Faust's per-record
stream path, each fetch's records made into the processor's records in one pass
(:func:`processors.drain.deliver_in_batches`); ``stock`` takes them through
Faust's own fetch loop and stream (``noack_take``, acking each record), as the processor
did before. Prints ``FLOOR <seconds>`` from its first record to its ``COUNT``-th and exits:
what Faust and aiokafka cost per record before any work of ours, the ceiling for the
processor.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, cast

import faust
from faust.worker import Worker

from processors.drain import Feed, deliver_in_batches
from processors.worker import BATCH_MAX, _fetched

STOCK_WITHIN_S = 0.05  # how long noack_take waits to fill a batch


def main() -> None:
    bootstrap, topic, count, app_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    delivery = sys.argv[5] if len(sys.argv) > 5 else "batches"
    if delivery not in ("batches", "stock"):
        raise SystemExit(f"delivery must be batches or stock, not {delivery!r}")
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
    feed = Feed(BATCH_MAX)
    if delivery == "batches":
        deliver_in_batches(app.consumer, topic, feed, make=_fetched)
    state = {"seen": 0, "first": 0.0}

    def took(n: int) -> None:
        if not state["seen"]:
            state["first"] = time.perf_counter()
        state["seen"] += n
        if state["seen"] >= count:
            print(f"FLOOR {time.perf_counter() - state['first']:.6f}", flush=True)
            os._exit(0)

    @app.agent(raw, concurrency=1)
    async def floor(stream: faust.StreamT[bytes]) -> None:
        if delivery == "batches":
            while True:
                batch = await feed.take()
                took(len(batch))
                feed.done()
        async for events in cast(Any, stream).noack_take(BATCH_MAX, within=STOCK_WITHIN_S):
            for event in events:
                await stream.ack(event)
            took(len(events))

    Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
