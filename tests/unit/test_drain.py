"""``processors.drain``: the fetch loop delivers in place, and a blocked delivery still
gives way to a rebalance (on a fake consumer; the real one is covered by the processor's
integration and fault tests)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, NamedTuple

import pytest
from aiokafka import AIOKafkaConsumer
from faust.types import TP
from mode import Service

from processors.drain import (
    BULK,
    Feed,
    Resumed,
    _fetch_deliverable,
    deliver_in_batches,
    deliver_without_tasks,
    shorten_fetch_wait,
)

RAW = TP("raw", 0)
CHANGELOG = TP("changelog", 0)


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class Message:
    def __init__(self, offset: int, tp: TP = RAW) -> None:
        self.offset = offset
        self.tp = tp
        self.topic = tp.topic


class Flags:
    def set_flag(self, flag: str) -> None: ...

    def unset_flag(self, flag: str) -> None: ...


class Topics:
    def acks_enabled_for(self, topic: str) -> bool:
        return True


class Monitor:
    def __init__(self) -> None:
        self.stream_inbound_time: dict[TP, float] = {}


class App:
    topics = Topics()
    should_stop = False

    def __init__(self) -> None:
        self.monitor = Monitor()


class Transport:
    app = App()


class Fetcher(Service):
    pass


class FakeConsumer(Service):
    """What ``_drain_messages`` uses of a Faust consumer; ``callback`` is set per test.

    ``getmany`` yields ``batches`` one per call, then stops the consumer.
    """

    consumer_stopped_errors = ()

    def __init__(self, batches: list[list[int | tuple[TP, int]]]) -> None:
        super().__init__()
        self.batches = batches
        self.suspend_flow = asyncio.Event()
        self._read_offset: dict[TP, int | None] = {RAW: None}
        self.diag = Flags()
        self._commit_every = None
        self._n_acked = 0
        self.app = App()
        self.transport = Transport()
        self.gaps: list[tuple[int, int]] = []
        self.callback: Any = None

    async def _add_gap(self, tp: TP, start: int, end: int) -> None:
        self.gaps.append((start, end))

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        if not self.batches:
            self._stopped.set()
            return
        for item in self.batches.pop(0):
            tp, offset = item if isinstance(item, tuple) else (RAW, item)
            yield tp, Message(offset, tp)

    async def _drain_messages(self, fetcher: Any) -> None:
        raise AssertionError("the stock loop ran")


def drain(consumer: FakeConsumer) -> asyncio.Future[None]:
    deliver_without_tasks(consumer)
    return asyncio.ensure_future(consumer._drain_messages(Fetcher()))


@in_loop
async def test_deliveries_that_do_not_block_run_in_place_without_tasks() -> None:
    consumer = FakeConsumer([[0, 1, 2], [3]])
    delivered: list[tuple[int, asyncio.Task[Any] | None]] = []

    async def callback(message: Message) -> None:
        delivered.append((message.offset, asyncio.current_task()))

    consumer.callback = callback
    loop_task = drain(consumer)
    await asyncio.wait_for(loop_task, 5)
    assert [offset for offset, _ in delivered] == [0, 1, 2, 3]
    # Run by the loop's own task, not by a task made for the delivery.
    assert {task for _, task in delivered} == {loop_task}
    assert consumer._read_offset[RAW] == 3


@in_loop
async def test_a_delivery_that_blocks_is_finished_before_the_next_record() -> None:
    consumer = FakeConsumer([[0, 1, 2]])
    room = asyncio.get_running_loop().create_future()
    delivered: list[int] = []

    async def callback(message: Message) -> None:
        if message.offset == 1:
            await room  # a full buffer
        delivered.append(message.offset)

    consumer.callback = callback
    loop_task = drain(consumer)
    await asyncio.sleep(0.05)
    assert delivered == [0]
    room.set_result(None)
    await asyncio.wait_for(loop_task, 5)
    assert delivered == [0, 1, 2]


@in_loop
async def test_a_rebalance_abandons_a_blocked_delivery_and_the_loop_goes_on() -> None:
    consumer = FakeConsumer([[0, 1, 2]])
    delivered: list[int] = []
    abandoned: list[int] = []

    async def callback(message: Message) -> None:
        if message.offset == 1:
            try:
                await asyncio.get_running_loop().create_future()  # blocks for good
            except asyncio.CancelledError:
                abandoned.append(message.offset)
                raise
        delivered.append(message.offset)

    consumer.callback = callback
    loop_task = drain(consumer)
    await asyncio.sleep(0.05)
    consumer.suspend_flow.set()  # what Faust does at a rebalance
    await asyncio.wait_for(loop_task, 5)
    await asyncio.sleep(0)  # the abandoned delivery's cancellation
    assert abandoned == [1]
    assert delivered == [0, 2]


@in_loop
async def test_with_flow_suspended_a_delivery_goes_the_stock_way() -> None:
    consumer = FakeConsumer([[0]])
    consumer.suspend_flow.set()
    tasks: list[asyncio.Task[Any] | None] = []

    async def callback(message: Message) -> None:
        tasks.append(asyncio.current_task())

    consumer.callback = callback
    loop_task = drain(consumer)
    await asyncio.wait_for(loop_task, 5)
    # wait_first ran it in a task of its own (it may or may not have finished first).
    assert all(task is not loop_task for task in tasks)


@in_loop
async def test_an_error_in_a_delivery_stops_the_loop_as_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = FakeConsumer([[0, 1]])

    async def callback(message: Message) -> None:
        raise ValueError(f"bad {message.offset}")

    consumer.callback = callback
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="bad 0"):
        await asyncio.wait_for(drain(consumer), 5)
    assert "Drain messages raised" in caplog.text


@in_loop
async def test_an_offset_jump_is_still_reported_as_a_gap() -> None:
    consumer = FakeConsumer([[0, 1, 5]])

    async def callback(message: Message) -> None:
        pass

    consumer.callback = callback
    await asyncio.wait_for(drain(consumer), 5)
    assert consumer.gaps == [(2, 5)]


# -- Resumed --------------------------------------------------------------------------


async def _stepped(coro: Any) -> Resumed:
    first = coro.send(None)
    return Resumed(coro, first)


@in_loop
async def test_resumed_returns_what_the_coroutine_returns() -> None:
    gate = asyncio.get_running_loop().create_future()

    async def work() -> str:
        value = await gate
        await asyncio.sleep(0)
        return f"got {value}"

    task = asyncio.ensure_future(await _stepped(work()))
    await asyncio.sleep(0)
    gate.set_result("x")
    assert await asyncio.wait_for(task, 5) == "got x"


@in_loop
async def test_resumed_passes_exceptions_and_cancellation_into_the_coroutine() -> None:
    events: list[str] = []

    async def failing() -> None:
        await asyncio.sleep(0)
        raise KeyError("inner")

    with pytest.raises(KeyError, match="inner"):
        await asyncio.ensure_future(await _stepped(failing()))

    async def waiting() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            events.append("cancelled inside")
            raise

    task = asyncio.ensure_future(await _stepped(waiting()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["cancelled inside"]


# -- the fetch wait ----------------------------------------------------------------------


class ConsumerThread:
    """Faust's AIOKafkaConsumerThread, as far as shorten_fetch_wait touches it."""

    def __init__(self) -> None:
        self.created: list[Any] = []

    def _create_worker_consumer(self, transport: Any) -> Any:
        client = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1500)
        self.created.append((transport, client))
        return client


class WithThread:
    def __init__(self) -> None:
        self._thread = ConsumerThread()


@in_loop
async def test_the_aiokafka_consumer_faust_creates_waits_at_most_the_short_wait() -> None:
    consumer = WithThread()
    shorten_fetch_wait(consumer, 100)
    client = consumer._thread._create_worker_consumer("transport")
    try:
        assert consumer._thread.created == [("transport", client)]
        assert client._fetch_max_wait_ms == 100
    finally:
        await client.stop()  # never started: only marks it closed


def test_aiokafka_still_reads_the_wait_when_it_starts() -> None:
    # The attribute shorten_fetch_wait sets is what start() hands to the fetcher.
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)


@in_loop
async def test_a_future_the_delivery_waits_on_can_be_awaited_by_others_meanwhile() -> None:
    shared = asyncio.get_running_loop().create_future()

    async def delivery() -> str:
        return f"delivered {await shared}"

    async def bystander() -> str:
        return f"saw {await shared}"

    resumed = await _stepped(delivery())  # the delivery now waits on ``shared``
    other = asyncio.ensure_future(bystander())  # runs before the delivery's task below
    await asyncio.sleep(0)
    task = asyncio.ensure_future(resumed)
    await asyncio.sleep(0)
    shared.set_result("x")
    assert await asyncio.wait_for(other, 5) == "saw x"
    assert await asyncio.wait_for(task, 5) == "delivered x"


# -- batches of raw records through a Feed ----------------------------------------------


class BatchConsumer(FakeConsumer):
    """A fake consumer whose ``wait_empty`` records that Faust's own wait ran."""

    def __init__(self, batches: list[list[int | tuple[TP, int]]]) -> None:
        super().__init__(batches)
        self._read_offset[CHANGELOG] = None
        self.waited_empty = 0

    async def wait_empty(self) -> None:
        self.waited_empty += 1


def drain_in_batches(consumer: FakeConsumer, feed: Feed) -> asyncio.Future[None]:
    deliver_in_batches(consumer, RAW.topic, feed)
    return asyncio.ensure_future(consumer._drain_messages(Fetcher()))


@in_loop
async def test_raw_records_reach_the_feed_in_fetch_order_and_others_go_faust_s_way() -> None:
    consumer = BatchConsumer([[0, (CHANGELOG, 7), 1], [2, 3]])
    delivered: list[tuple[str, int]] = []

    async def callback(message: Message) -> None:
        delivered.append((message.topic, message.offset))

    consumer.callback = callback
    feed = Feed(limit=10)
    await asyncio.wait_for(drain_in_batches(consumer, feed), 5)
    assert delivered == [("changelog", 7)]
    batch = await asyncio.wait_for(feed.take(), 5)
    assert [m.offset for m in batch] == [0, 1, 2, 3]
    assert RAW in consumer.app.monitor.stream_inbound_time  # Faust's idle check sees them


@in_loop
async def test_the_agent_takes_at_most_the_limit_and_the_fetch_loop_waits_for_room() -> None:
    consumer = BatchConsumer([[0, 1, 2], [3, 4], [5]])
    consumer.callback = None
    feed = Feed(limit=2)
    loop_task = drain_in_batches(consumer, feed)
    await asyncio.sleep(0.05)
    assert len(feed) == 3  # the first fetch, then no room: the loop waits
    assert not loop_task.done()
    first = await feed.take()
    feed.done()
    assert [m.offset for m in first] == [0, 1]
    await asyncio.sleep(0.05)
    assert len(feed) == 3  # [2] left, room again, [3, 4] added, full again
    taken = []
    while len(taken) < 4:
        taken += [m.offset for m in await asyncio.wait_for(feed.take(), 5)]
        feed.done()
    await asyncio.wait_for(loop_task, 5)
    assert taken == [2, 3, 4, 5]


@in_loop
async def test_wait_empty_drops_the_untaken_records_and_waits_for_the_batch_in_hand() -> None:
    consumer = BatchConsumer([[0, 1, 2]])
    consumer.callback = None
    feed = Feed(limit=2)
    loop_task = drain_in_batches(consumer, feed)
    batch = await asyncio.wait_for(feed.take(), 5)  # the agent holds [0, 1]; [2] waits
    waiting = asyncio.ensure_future(consumer.wait_empty())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # Faust's rebalance or stop waits for the agent
    assert len(feed) == 0  # the record not taken is dropped, to be read again
    assert consumer.waited_empty == 0
    assert [m.offset for m in batch] == [0, 1]
    feed.done()
    await asyncio.wait_for(waiting, 5)
    assert consumer.waited_empty == 1  # then Faust's own wait
    await asyncio.wait_for(loop_task, 5)


@in_loop
async def test_records_fetched_while_flow_is_suspended_are_not_fed() -> None:
    consumer = BatchConsumer([[0, 1]])
    consumer.callback = None
    consumer.suspend_flow.set()  # a rebalance is under way
    feed = Feed(limit=10)
    await asyncio.wait_for(drain_in_batches(consumer, feed), 5)
    assert len(feed) == 0


@in_loop
async def test_a_rebalance_ends_the_wait_for_room() -> None:
    consumer = BatchConsumer([[0, 1], [2]])
    consumer.callback = None
    feed = Feed(limit=2)
    loop_task = drain_in_batches(consumer, feed)
    await asyncio.sleep(0.05)
    assert not loop_task.done()  # waiting for room
    consumer.suspend_flow.set()
    await asyncio.wait_for(loop_task, 5)  # went on: [2] was fetched with flow suspended
    assert [m.offset for m in await feed.take()] == [0, 1]


# -- the fed topic's records of a fetch made in bulk ------------------------------------


RAW_1 = TP("raw", 1)
RAW_2 = TP("raw", 2)


class Record:
    """An aiokafka ConsumerRecord as far as the tests' ``make`` reads it."""

    def __init__(self, tp: TP, offset: int) -> None:
        self.topic, self.partition, self.offset = tp.topic, tp.partition, offset


class Made(NamedTuple):
    tp: TP
    offset: int
    generation_id: int | None


def made(tp: TP, record: Record, generation_id: int | None) -> Made:
    return Made(tp, record.offset, generation_id)


class BulkConsumer(BatchConsumer):
    """Faust's consumer as far as ``_getmany_in_bulk`` uses it: one fetch per call."""

    def __init__(self, fetches: list[dict[TP, list[Record]]], active: set[TP] | None) -> None:
        super().__init__([])
        self.fetches = fetches
        self.active = active
        self.flow_active = True
        self._buffered_partitions: set[TP] = set()
        self.app.consumer_generation_id = 3  # type: ignore[attr-defined]
        self.tracked: list[tuple[TP, int]] = []
        self.app.monitor.track_tp_end_offset = (  # type: ignore[attr-defined]
            lambda tp, offset: self.tracked.append((tp, offset))
        )
        self.sought = 0
        self._read_offset[RAW_1] = self._read_offset[RAW_2] = None

    def highwater(self, tp: TP) -> int:
        return 100 + tp.partition

    async def _wait_next_records(
        self, timeout: float
    ) -> tuple[dict[TP, list[Record]] | None, set[TP] | None]:
        if not self.fetches:
            self._stopped.set()
            return None, None
        return self.fetches.pop(0), self.active

    def _to_message(self, tp: TP, record: Record) -> Message:
        return Message(record.offset, tp)

    async def perform_seek(self) -> None:
        self.sought += 1


async def bulk_items(consumer: BulkConsumer) -> list[tuple[Any, Any]]:
    deliver_in_batches(consumer, RAW.topic, Feed(limit=10), make=made)
    return [item async for item in consumer.getmany(timeout=1.0)]


@in_loop
async def test_a_fetch_s_raw_records_come_as_one_bulk_and_the_others_one_by_one() -> None:
    fetch = {
        RAW: [Record(RAW, 0), Record(RAW, 1)],
        CHANGELOG: [Record(CHANGELOG, 7), Record(CHANGELOG, 8)],
        RAW_1: [Record(RAW_1, 5)],
        RAW_2: [Record(RAW_2, 9)],  # not active (paused): skipped
    }
    consumer = BulkConsumer([fetch], active={RAW, RAW_1, CHANGELOG})
    items = await bulk_items(consumer)
    assert items[0] == (
        BULK,
        [Made(RAW, 0, 3), Made(RAW, 1, 3), Made(RAW_1, 5, 3)],
    )
    assert [(tp, m.offset) for tp, m in items[1:]] == [(CHANGELOG, 7), (CHANGELOG, 8)]
    assert consumer.tracked == [(RAW, 100), (RAW_1, 101), (CHANGELOG, 100), (CHANGELOG, 100)]


@in_loop
async def test_a_partition_paused_between_two_messages_gets_no_more() -> None:
    fetch = {CHANGELOG: [Record(CHANGELOG, 7), Record(CHANGELOG, 8)]}
    active = {CHANGELOG}
    consumer = BulkConsumer([fetch], active=active)
    deliver_in_batches(consumer, RAW.topic, Feed(limit=10), make=made)
    items = consumer.getmany(timeout=1.0)
    assert (await items.__anext__())[1].offset == 7
    active.discard(CHANGELOG)  # paused while the first was delivered (recovery done)
    assert [item async for item in items] == []


@in_loop
async def test_a_buffered_partition_counts_as_active() -> None:
    consumer = BulkConsumer([{RAW_2: [Record(RAW_2, 9)]}], active={RAW})
    consumer._buffered_partitions = {RAW_2}
    assert await bulk_items(consumer) == [(BULK, [Made(RAW_2, 9, 3)])]


@in_loop
async def test_nothing_while_flow_is_stopped_but_a_seek_to_the_committed_offsets() -> None:
    consumer = BulkConsumer([{RAW: [Record(RAW, 0)]}], active=None)
    consumer.flow_active = False
    assert await bulk_items(consumer) == []
    assert consumer.sought == 1


@in_loop
async def test_no_more_messages_once_the_generation_changes() -> None:
    fetch = {CHANGELOG: [Record(CHANGELOG, 7), Record(CHANGELOG, 8)]}
    consumer = BulkConsumer([fetch], active=None)
    deliver_in_batches(consumer, RAW.topic, Feed(limit=10), make=made)
    items = consumer.getmany(timeout=1.0)
    assert (await items.__anext__())[1].offset == 7
    consumer.app.consumer_generation_id = 4  # type: ignore[attr-defined]  # a rebalance
    assert [item async for item in items] == []


@in_loop
async def test_the_fetch_loop_feeds_the_bulk_in_fetch_order() -> None:
    fetches = [
        {RAW: [Record(RAW, 0), Record(RAW, 1)], CHANGELOG: [Record(CHANGELOG, 7)]},
        {RAW: [Record(RAW, 2)]},
    ]
    consumer = BulkConsumer(fetches, active=None)
    delivered: list[int] = []

    async def callback(message: Message) -> None:
        delivered.append(message.offset)

    consumer.callback = callback
    feed = Feed(limit=10)
    deliver_in_batches(consumer, RAW.topic, feed, make=made)
    await asyncio.wait_for(consumer._drain_messages(Fetcher()), 5)
    assert delivered == [7]
    assert await feed.take() == [Made(RAW, 0, 3), Made(RAW, 1, 3), Made(RAW, 2, 3)]
    assert RAW in consumer.app.monitor.stream_inbound_time


# -- fetching only what the fetch loop delivers ---------------------------------------


class FetchRecord:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class Subscriptions:
    @contextlib.contextmanager
    def fetch_context(self) -> Iterator[None]:
        yield


class AioFetcher:
    """aiokafka's Fetcher as far as ``_fetch_deliverable`` uses it."""

    _closed = False

    def __init__(self, records: dict[TP, list[FetchRecord]]) -> None:
        self.records = records
        self.asked: list[frozenset[TP]] = []
        self.while_waiting: Callable[[], None] = lambda: None
        self._subscriptions = Subscriptions()

    async def fetched_records(
        self, partitions: frozenset[TP], timeout: float = 0, max_records: int | None = None
    ) -> dict[TP, list[FetchRecord]]:
        self.asked.append(partitions)
        self.while_waiting()
        # aiokafka reads an empty set as "every partition".
        return {tp: b for tp, b in self.records.items() if not partitions or tp in partitions}


class AioClient:
    _closed = False

    def __init__(self, fetcher: AioFetcher) -> None:
        self._fetcher = fetcher
        self.seeks: list[tuple[TP, int]] = []

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


class FlowConsumer:
    flow_active = True

    def __init__(self) -> None:
        self._buffered_partitions: set[TP] = set()


class FetchThread:
    def __init__(self) -> None:
        self.consumer = FlowConsumer()


def _fetching() -> tuple[FetchThread, AioFetcher, AioClient]:
    fetcher = AioFetcher(
        {RAW: [FetchRecord(5), FetchRecord(6)], CHANGELOG: [FetchRecord(0), FetchRecord(1)]}
    )
    return FetchThread(), fetcher, AioClient(fetcher)


@in_loop
async def test_no_active_partition_means_no_fetch_not_a_fetch_of_every_partition() -> None:
    thread, fetcher, client = _fetching()
    assert await _fetch_deliverable(thread, client, set(), timeout=1) == {}
    assert fetcher.asked == []


@in_loop
async def test_records_of_a_partition_paused_during_the_wait_are_put_back() -> None:
    thread, fetcher, client = _fetching()
    active = {RAW, CHANGELOG}
    fetcher.while_waiting = lambda: active.discard(CHANGELOG)  # recovery paused it
    fetched = await _fetch_deliverable(thread, client, active, timeout=1)
    assert fetcher.asked == [frozenset({RAW, CHANGELOG})]  # a snapshot, not the live set
    assert [r.offset for r in fetched[RAW]] == [5, 6] and CHANGELOG not in fetched
    assert client.seeks == [(CHANGELOG, 0)]  # fetched again once resumed


@in_loop
async def test_records_fetched_while_flow_stopped_are_all_put_back() -> None:
    thread, fetcher, client = _fetching()

    def stop_flow() -> None:
        thread.consumer.flow_active = False  # a rebalance began during the wait

    fetcher.while_waiting = stop_flow
    assert await _fetch_deliverable(thread, client, {RAW, CHANGELOG}, timeout=1) == {}
    assert sorted(client.seeks) == sorted([(RAW, 5), (CHANGELOG, 0)])


@in_loop
async def test_wait_empty_goes_on_without_a_batch_that_is_never_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = BatchConsumer([[0, 1]])
    consumer.callback = None
    feed = Feed(limit=10)
    deliver_in_batches(consumer, RAW.topic, feed, finish_timeout=0.1)
    await asyncio.wait_for(consumer._drain_messages(Fetcher()), 5)
    await feed.take()  # and never done: its outputs are never acknowledged
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(consumer.wait_empty(), 5)
    assert consumer.waited_empty == 1
    assert "not done after" in caplog.text
