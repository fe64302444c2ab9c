"""Faust's fetch loop without four new asyncio tasks for every record.

faust-streaming 0.15's ``Consumer._drain_messages`` hands each fetched record to the
streams with ``await self.wait_first(callback(message), self.suspend_flow.wait())``, so
that a rebalance (which sets ``suspend_flow``) can abandon a delivery blocked on a full
stream buffer. ``wait_first`` wraps the delivery, the flow event and the consumer's
stopped and crashed events in four tasks and waits on them, then cancels the three
losers: about 50 µs per record on this project's machine, more than half of what Faust
costs per record in all. Yet a delivery almost never blocks: it appends the record to
the agent's buffer and returns without yielding to the event loop.

:func:`deliver_without_tasks` installs the same loop with one change: the delivery
coroutine is first stepped in place. When it finishes without yielding, the common case,
the record is delivered and no task was made. When it yields (the buffer is full, or
flow is suspended), the rest of it runs under ``wait_first`` as before, so a rebalance
still cuts it short. When flow is already suspended the record goes the old way. A
record a rebalance cuts short is read again: :mod:`processors.positions` sees the hole.
Until its first pause a delivery runs as the fetch loop's task, in its context: fine for
Faust's delivery path, which sets no context variables and starts no timeouts or task
groups there; code added to that path must not either.

:func:`shorten_fetch_wait` is about the fetches under that loop. Faust 0.15 creates its
aiokafka consumer with ``fetch_max_wait_ms=1500`` and no setting to change it, and
aiokafka keeps one fetch in flight per broker. When Faust's stream buffer is under
pressure it stops taking a partition's fetched records; aiokafka then sends the next
fetch for the other partitions alone, such as the tables' changelogs, where nothing
arrives, so the broker holds it the full 1.5 s, and the raw partitions wait behind it
even once the buffer has room. Under a steady 2,000 webhooks/s this locked the worker
into a cycle of 1.5 s stalls, about one benchmark run in two (p99 over 2 s). With a
short wait the stall lasts at most that long; an idle worker asks the broker a few more
times per second.

:func:`shorten_fetch_wait` also makes every fetch take from aiokafka only records the
fetch loop will deliver (:func:`_fetch_deliverable`). Faust's fetch hands aiokafka its
*live* set of active (unpaused) partitions and waits up to a second for records; aiokafka
reads an empty set as "every partition", and a wait that began before a rebalance goes on
after it (aiokafka waits out the reassignment). So a fetch started in one generation could
return, in the next, records of partitions Faust had paused, such as a table's changelog
that recovery had just sought back to the start; Faust's ``getmany`` then discarded them
(flow still stopped, or partition not active) while aiokafka had moved past them. A
changelog has no committed offset to seek back to, so the recovery waited for records
that were never fetched again: "No event received for active tp ... since recovery start"
and no raw record processed, found in ``test_scale_out_survives_losing_a_worker_of_each_stage``
about once in 30 runs under load. Now the fetch asks for a snapshot of the active
partitions (none: no fetch), and records of a partition that is no longer active, or that
came while flow is stopped, are put back (aiokafka seeks to the first of them), so they are
fetched again once the partition is resumed.

:func:`deliver_in_batches` goes further for the raw topic: its records skip Faust's
per-record path (conductor, ``Event``, stream buffer, ack bookkeeping: about 50 µs a
record in all, more than half of the worker's time) and are handed to the agent a batch
at a time through a :class:`Feed`. Faust's ``wait_empty``, which a rebalance and a stop
call to let the streams finish what they started, then waits for the agent's batch in
hand and drops the records not yet taken (they are read again, as Faust's own buffers
are cleared at a rebalance). Records of every other topic (the tables' changelogs) go
Faust's way as before. With a ``make`` function it also replaces Faust's ``getmany``
(:func:`_getmany_in_bulk`): the raw records of a fetch become the agent's records in one
pass, skipping Faust's round-robin iterator, message object and generator step per record.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from typing import Any, Final, cast

from aiokafka.errors import ConsumerStoppedError, IllegalStateError
from faust.transport.consumer import CONSUMER_FETCHING

log = logging.getLogger(__name__)

__all__ = [
    "BULK",
    "FETCH_MAX_WAIT_MS",
    "FINISH_TIMEOUT_S",
    "Feed",
    "Resumed",
    "deliver_in_batches",
    "deliver_without_tasks",
    "shorten_fetch_wait",
]

FETCH_MAX_WAIT_MS = 100
FINISH_TIMEOUT_S = 10.0  # below worker.STOP_TIMEOUT_S


class Resumed(Awaitable[Any]):
    """A coroutine already stepped once (it yielded ``first``), as an awaitable.

    Awaiting it (or wrapping it in a task) passes ``first`` up to the event loop, then
    drives the coroutine on exactly as ``await`` would have: values sent or exceptions
    thrown in go to the coroutine, and its return value is the result.
    """

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first
        # A future the coroutine awaits comes up marked as being awaited; until a task
        # takes it over, anyone else awaiting the same future would be refused for it.
        # The mark is cleared here, where nothing is waiting for it, and set again when
        # the future goes up to the task, as a first ``await`` would have done.
        self._blocking = bool(getattr(first, "_asyncio_future_blocking", False))
        if self._blocking:
            first._asyncio_future_blocking = False

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._first
        if self._blocking:
            value._asyncio_future_blocking = True
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # every exception goes on to the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class Feed:
    """Raw records on their way from the fetch loop to the agent, in fetch order.

    The fetch loop puts what each fetch brought and waits for ``room`` while
    ``limit`` records are waiting; the agent takes up to ``limit`` at a time (all
    that came while it worked on the last batch) and calls ``done`` when the batch is
    finished. ``finish`` drops the records not taken yet and returns once the batch in
    hand, if any, is done.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._records: list[Any] = []
        self._waiting = asyncio.Event()  # records to take
        self._room = asyncio.Event()  # fewer than ``limit`` waiting
        self._room.set()
        self._idle = asyncio.Event()  # no batch in hand
        self._idle.set()

    def __len__(self) -> int:
        return len(self._records)

    def put(self, records: list[Any]) -> None:
        self._records.extend(records)
        self._waiting.set()
        if len(self._records) >= self.limit:
            self._room.clear()

    async def room(self) -> None:
        await self._room.wait()

    async def take(self) -> list[Any]:
        while not self._records:
            self._waiting.clear()
            await self._waiting.wait()
        batch = self._records[: self.limit]
        del self._records[: self.limit]
        if len(self._records) < self.limit:
            self._room.set()
        self._idle.clear()
        return batch

    def done(self) -> None:
        self._idle.set()

    def clear(self) -> int:
        """Drop the records not taken yet; how many there were."""
        dropped = len(self._records)
        self._records.clear()
        self._room.set()
        return dropped

    async def finish(self) -> int:
        """``clear``, then wait until the batch in hand is done; records dropped."""
        dropped = self.clear()
        await self._idle.wait()
        return dropped


def deliver_without_tasks(consumer: Any) -> None:
    """Replace ``consumer._drain_messages`` (before the consumer starts)."""
    consumer._drain_messages = types.MethodType(_drain_messages, consumer)


# What :func:`_getmany_in_bulk` yields in place of a (tp, message) pair for the records
# of the fed topic: (BULK, [record, ...]).
BULK: Final = "bulk"

# Makes the fed record of one aiokafka record: (tp, record, generation id) -> a record
# with a ``tp`` attribute (the fetch loop notes each partition's hand-over time).
MakeRecord = Callable[[Any, Any, int | None], Any]


def deliver_in_batches(
    consumer: Any,
    topic: str,
    feed: Feed,
    finish_timeout: float = FINISH_TIMEOUT_S,
    make: MakeRecord | None = None,
) -> None:
    """Hand every fetched record of ``topic`` to ``feed``; others as :func:`deliver_without_tasks`.

    Call before the consumer starts. Also makes the consumer's ``wait_empty`` (a
    rebalance, a stop) finish the feed first, and keeps Faust's "stream is idle" check
    fed with the time each partition's records were last handed over.

    With ``make``, the fetch itself (:func:`_getmany_in_bulk`) turns each of a fetch's
    records of ``topic`` into ``make(tp, record, generation id)`` in one pass, instead of
    a Faust message handed over one at a time (Faust's round-robin iterator, a message
    object and an async generator step per record); without it the records are Faust's
    messages.

    The wait for the batch in hand lasts at most ``finish_timeout`` seconds: a batch that
    is not done then (its outputs not acknowledged) is left behind with a warning. Nothing
    is lost that way: its offsets are not committed, so it is read again, by this worker
    or by the partition's next owner.
    """
    consumer._raw_feed = (topic, feed)
    consumer._drain_messages = types.MethodType(_drain_messages, consumer)
    if make is not None:
        consumer.getmany = types.MethodType(_getmany_in_bulk, consumer)
        consumer._make_fed = make
    wait_empty = consumer.wait_empty

    async def finish_feed_then_wait_empty() -> None:
        try:
            dropped = await asyncio.wait_for(feed.finish(), finish_timeout)
        except TimeoutError:
            log.warning(
                "the batch in hand was not done after %.0fs; going on without it (its "
                "records are not committed and will be read again)",
                finish_timeout,
            )
        else:
            if dropped:
                log.info("dropped %d raw records not yet taken; they will be read again", dropped)
        await wait_empty()

    consumer.wait_empty = finish_feed_then_wait_empty


def shorten_fetch_wait(consumer: Any, max_wait_ms: int = FETCH_MAX_WAIT_MS) -> None:
    """Make the aiokafka consumer that Faust creates wait at most ``max_wait_ms`` per fetch,
    and make each fetch keep only records the fetch loop delivers (:func:`_fetch_deliverable`).

    Call before the consumer starts (it creates its aiokafka consumer when it starts).
    """
    thread = consumer._thread
    create = thread._create_worker_consumer

    def create_with_short_wait(transport: Any) -> Any:
        client = create(transport)
        client._fetch_max_wait_ms = max_wait_ms  # read when the client starts
        return client

    thread._create_worker_consumer = create_with_short_wait
    thread._fetch_records = types.MethodType(_fetch_deliverable, thread)


async def _fetch_deliverable(
    self: Any,
    client: Any,
    active_partitions: Any,
    timeout: float | None = None,
    max_records: int | None = None,
) -> dict[Any, list[Any]]:
    """``AIOKafkaConsumerThread._fetch_records`` of faust-streaming 0.15.3, keeping no
    record that the fetch loop would drop (see the module docstring).

    Runs in the consumer's thread, like the original; ``self.consumer`` is Faust's
    consumer and ``active_partitions`` its live set of active partitions.
    """
    consumer = self.consumer
    if not consumer.flow_active:
        return {}
    fetcher = client._fetcher
    if client._closed or fetcher._closed:
        raise ConsumerStoppedError()
    # A snapshot: aiokafka takes an empty set for "every partition", and the live set is
    # emptied while a rebalance or a recovery has every partition paused.
    wanted = frozenset(active_partitions)
    if not wanted:
        return {}
    with fetcher._subscriptions.fetch_context():
        records: dict[Any, list[Any]] = await fetcher.fetched_records(
            wanted, timeout=timeout, max_records=max_records
        )
    if not records:
        return records
    # The wait may have outlasted a pause or a whole rebalance. Faust's getmany delivers
    # only what is active now, with flow running; aiokafka has already moved past all of
    # it, so the rest goes back. Nothing is awaited between the fetch and these seeks.
    buffered = consumer._buffered_partitions
    flowing = consumer.flow_active
    kept: dict[Any, list[Any]] = {}
    for tp, batch in records.items():
        if flowing and (tp in active_partitions or tp in buffered):
            kept[tp] = batch
        elif batch:
            try:
                client.seek(tp, batch[0].offset)
            except IllegalStateError:  # no longer assigned: a new assignment starts afresh
                continue
            log.debug(
                "%s[%d]: %d fetched records put back (offset %d): partition paused or flow "
                "stopped while the fetch waited",
                tp.topic,
                tp.partition,
                len(batch),
                batch[0].offset,
            )
    return kept


async def _getmany_in_bulk(self: Any, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
    """``faust.transport.consumer.Consumer.getmany`` of faust-streaming 0.15.3, with the
    fed topic's records of a fetch made by ``self._make_fed`` and yielded as one item,
    ``(BULK, records)``; other records are yielded as before, one message at a time.

    The checks are Faust's: nothing while flow is stopped (Faust then seeks back to the
    committed offsets), only active or buffered partitions, and no more messages once
    flow stops or the generation changes. The bulk is made in one go, with no pause in
    which any of these could change; the other records are checked one by one, between
    the deliveries, as Faust checks them.
    """
    records, active_partitions = await self._wait_next_records(timeout)
    generation_id = self.app.consumer_generation_id
    if records is None or self.should_stop:
        return
    if not self.flow_active:
        self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
        try:
            await self.perform_seek()
        except Exception as ex:
            self.log.warning(f"exception performing seek when flow not active {ex}")
        return
    feed_topic = self._raw_feed[0]
    make = self._make_fed
    track_end_offset = self.app.monitor.track_tp_end_offset
    buffered = self._buffered_partitions
    bulk: list[Any] = []
    others: list[tuple[Any, list[Any]]] = []

    def deliverable(tp: Any) -> bool:
        return active_partitions is None or tp in active_partitions or tp in buffered

    for tp, fetched in records.items():
        if tp.topic != feed_topic:
            others.append((tp, fetched))
        elif deliverable(tp):
            track_end_offset(tp, self.highwater(tp))
            bulk.extend([make(tp, record, generation_id) for record in fetched])
    if bulk:
        yield BULK, bulk
    to_message = self._to_message
    for tp, fetched in others:
        for record in fetched:  # checked before each one, as Faust does
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                return
            if deliverable(tp):
                track_end_offset(tp, self.highwater(tp))
                yield tp, to_message(tp, record)


async def _drain_messages(self: Any, fetcher: Any) -> None:
    # faust.transport.consumer.Consumer._drain_messages of faust-streaming 0.15.3, with
    # the delivery changed as the module docstring says; the rest is kept as it is.
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    flow_suspended = self.suspend_flow.is_set

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep
    feed_topic, feed = getattr(self, "_raw_feed", (None, None))
    inbound = self.app.monitor.stream_inbound_time if feed is not None else {}

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            ait = getmany(timeout=1.0)
            await self.sleep(0)
            fed: list[Any] = []
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0
                    if tp is BULK:
                        fed.extend(message)
                        continue
                    if tp.topic == feed_topic:
                        fed.append(message)
                        continue

                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        delivery = cast(Coroutine[Any, Any, Any], callback(message))
                        if flow_suspended():
                            await self.wait_first(delivery, self.suspend_flow.wait())
                        else:
                            try:
                                first = delivery.send(None)
                            except StopIteration:
                                pass  # delivered without yielding
                            else:
                                await self.wait_first(
                                    Resumed(delivery, first), self.suspend_flow.wait()
                                )
                        set_read_offset(tp, offset)
                    else:
                        self.log.dev(
                            "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                            offset,
                            message.key,
                            message.value,
                        )
                unset_flag(CONSUMER_FETCHING)
            if fed and not flow_suspended():
                # (With flow suspended a rebalance is under way: the records are dropped,
                # as Faust drops what it fetched then, and read again.)
                assert feed is not None
                now = time.monotonic()
                for message in fed:
                    inbound[message.tp] = now
                feed.put(fed)
                if len(feed) >= feed.limit:
                    await self.wait_first(feed.room(), self.suspend_flow.wait())
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(CONSUMER_FETCHING)
