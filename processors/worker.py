"""``chargify-stream processor``: the Faust app that splits raw webhooks by type.

One agent reads ``chargify.webhooks.raw`` (keyed by subscription id, so every event of a
subscription reaches the same worker) and, for each webhook, asks
:func:`processors.routing.route` what to do: emit an Avro record keyed by customer
reference, ignore it (test traffic, events we do not act on), or dead-letter it.

Two tables, both partitioned like the raw topic:

- ``subscription-references``: subscription id -> customer reference, learned from every
  event that carries both, to resolve ``component_allocation_change`` (which carries no
  customer);
- ``seen-webhooks``: webhook id -> when it was emitted, so an exact duplicate (Chargify
  retries, replays) is dropped within ``PROCESSOR_DEDUP_WINDOW_S``. The sink is
  idempotent regardless; this keeps duplicates off the analysts' topics.

Delivery is at-least-once. Events are taken in small batches with ``take_events``; Faust
acks them only when the batch body returns, and commits only after flushing its producer.
The body returns only once every record it sent has been acknowledged by the broker (it
retries a failed send rather than raising, since raising would ack the batch). Agent
concurrency is 1, so an offset is never committed past an event still in flight. Faust's
``exactly_once`` guarantee is not used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import faust
from faust.types import EventT

from chargify_stream.kafka_admin import ensure_topics
from chargify_stream.settings import Settings
from processors.routing import DeadLetter, Emit, Ignore, route
from schemas import headers as h
from schemas.codec import encode
from schemas.deadletter import dead_letter_headers

log = logging.getLogger(__name__)

BATCH_MAX = 500
BATCH_WITHIN_S = 0.05


def _header_list(event: EventT) -> list[tuple[str, bytes]]:
    raw: Any = event.message.headers or []
    items: Iterable[tuple[str, Any]] = raw.items() if isinstance(raw, dict) else raw
    return [(k, v) for k, v in items if v is not None]


def _raw_partitions(settings: Settings) -> int:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    md = admin.list_topics(settings.topic("raw"), timeout=30)
    return len(md.topics[settings.topic("raw")].partitions) or settings.topic_partitions


def build_app(settings: Settings, *, partitions: int | None = None) -> faust.App:
    """The Faust app with its topics, tables and agent, for ``settings``."""
    partitions = partitions or settings.topic_partitions
    app = faust.App(
        settings.processor_app_id,
        broker=[f"kafka://{s}" for s in settings.kafka_bootstrap_servers.split(",")],
        store="memory://",
        datadir=settings.processor_data_dir,
        topic_partitions=partitions,
        topic_replication_factor=settings.topic_replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_host="127.0.0.1",
        web_port=settings.processor_web_port,
        web_bind="127.0.0.1",
        table_cleanup_interval=60.0,
    )
    raw = app.topic(
        settings.topic("raw"),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    outputs = {
        name: app.topic(
            settings.topic(name),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        for name in ("transactions", "subscriptions", "deadletter")
    }
    references = app.Table(
        "subscription-references",
        default=None,
        partitions=partitions,
        key_type=str,
        value_type=str,
    )
    seen = app.Table(
        "seen-webhooks", default=None, partitions=partitions, key_type=str, value_type=float
    )
    stats = {"emitted": 0, "ignored": 0, "dead": 0, "duplicate": 0}

    async def send_all(
        pending: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]],
    ) -> None:
        """Send every record and return once the broker acknowledged each one."""
        delay = 0.2
        while pending:
            futures = []
            for topic, key, value, headers in pending:
                futures.append(await outputs[topic].send(key=key, value=value, headers=headers))
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = [
                p for p, r in zip(pending, results, strict=True) if isinstance(r, BaseException)
            ]
            if failed:
                log.warning(
                    "%d sends failed (%s); retrying in %.1fs",
                    len(failed),
                    next(r for r in results if isinstance(r, BaseException)),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            pending = failed

    @app.agent(raw, concurrency=1)
    async def split(stream: faust.StreamT[bytes]) -> None:
        # take_events exists on faust-streaming's Stream but not on its StreamT protocol.
        batches = cast(Any, stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S)
        async for events in batches:
            await handle_batch(events)

    async def handle_batch(events: Sequence[EventT]) -> None:
        pending: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        emitted_now: set[str] = set()
        learned: dict[str, str] = {}
        for event in events:
            body: bytes = event.message.value or b""
            headers = _header_list(event)
            hdr = dict(headers)
            wid = hdr.get(h.WEBHOOK_ID, b"").decode(errors="replace")
            replayed = int(hdr.get(h.DLQ_REPLAY_COUNT, b"0") or 0) > 0
            if wid and not replayed and (wid in emitted_now or seen.get(wid) is not None):
                stats["duplicate"] += 1
                log.info("dropped duplicate webhook %s", wid)
                continue

            def lookup(sid: int) -> str | None:
                return learned.get(str(sid)) or references.get(str(sid))

            decision = route(body, lookup)
            if decision.learn is not None:
                sid, ref = decision.learn
                if learned.get(str(sid)) != ref and references.get(str(sid)) != ref:
                    learned[str(sid)] = ref
            action = decision.action
            carried = [(k, v) for k, v in headers if k in h.CARRIED_OVER]
            if isinstance(action, Emit):
                pending.append((action.topic, action.key.encode(), encode(action.record), carried))
                if decision.webhook_id is not None:
                    emitted_now.add(str(decision.webhook_id))
                stats["emitted"] += 1
            elif isinstance(action, Ignore):
                stats["ignored"] += 1
                log.info("ignored webhook %s (%s): %s", wid, decision.event, action.reason)
            elif isinstance(action, DeadLetter):
                stats["dead"] += 1
                log.warning(
                    "dead-lettering webhook %s (%s): %s", wid, decision.event, action.reason
                )
                dl_headers = dead_letter_headers(
                    reason=action.reason,
                    stage=h.STAGE_PROCESSOR,
                    error=action.error,
                    source_topic=event.message.topic,
                    source_partition=event.message.partition,
                    source_offset=event.message.offset,
                    original_headers=headers,
                )
                pending.append(("deadletter", event.message.key, body, dl_headers))
        await send_all(pending)
        # Table writes go to their changelogs, which Faust flushes before committing.
        for sub_id, reference in learned.items():
            references[sub_id] = reference
        now = time.time()
        for wid in emitted_now:
            seen[wid] = now

    @app.timer(interval=300.0)
    async def expire_seen() -> None:
        horizon = time.time() - settings.processor_dedup_window_s
        old = [k for k, v in list(seen.items()) if v is not None and v < horizon]
        for key in old:
            del seen[key]
        if old:
            log.info("forgot %d webhook ids older than the dedup window", len(old))

    @app.timer(interval=60.0)
    async def report() -> None:
        log.info("processor totals: %s", stats)

    return app


def run(settings: Settings) -> int:
    """Pre-create the topics (Faust does not create source topics), then run a worker."""
    from faust.worker import Worker

    ensure_topics(
        settings.kafka_bootstrap_servers,
        settings.all_topics,
        partitions=settings.topic_partitions,
        replication_factor=settings.topic_replication_factor,
    )
    Path(settings.processor_data_dir).mkdir(parents=True, exist_ok=True)
    app = build_app(settings, partitions=_raw_partitions(settings))
    log.info("processor %s reading %s", settings.processor_app_id, settings.topic("raw"))
    worker = Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        override_logging=False,
    )
    worker.execute_from_commandline()
    return 0
