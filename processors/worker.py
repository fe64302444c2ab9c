"""``chargify-stream processor``: the Faust worker that runs the batch pipeline.

The work is :class:`processors.pipeline.Pipeline`: a confluent-kafka consumer of
``chargify.webhooks.raw`` and a transactional producer, one Kafka transaction per batch
(outputs, state changelogs and input offsets together). It runs in a thread of its own,
started and stopped as a service of a Faust worker.

What Faust still does here, and why: the worker's lifecycle (mode's ``Worker``: signal
handling, a graceful stop of every service in order, logging set-up) and the web server
(``127.0.0.1:PROCESSOR_WEB_PORT``, the Prometheus metrics at ``/metrics``). What it no
longer does: Faust's Kafka services (its aiokafka consumer, fetch loop, offset bookkeeping,
producer and tables) are switched off with its public ``BootStrategy`` switch
(``enable_kafka = False``), because none of them can take part in a Kafka transaction
written through librdkafka; :mod:`processors.seam` lists the (public) Faust names this
relies on, and its tests pin them.

SIGTERM is graceful: the pipeline finishes the batch in hand (committed or aborted), leaves
the group and the process exits 0. A stop not done ``STOP_TIMEOUT_S`` after it began is cut
short (:mod:`processors.lifecycle`): every thread's stack is printed and the process exits
1; nothing is lost, as only committed transactions count.
"""

from __future__ import annotations

import gc
import logging

from confluent_kafka import KafkaException

from chargify_stream.base.errors import TransientError
from chargify_stream.base.kafka_admin import check_deadletter_topic, ensure_pipeline_topics
from chargify_stream.base.settings import Settings
from chargify_stream.processors import clients, lifecycle
from chargify_stream.processors.fields import NATIVE_SCAN
from chargify_stream.processors.metrics import ProcessorMetrics
from chargify_stream.processors.state import Slot, Store

__all__ = ["run"]

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 50_000
STOP_TIMEOUT_S = 15.0


def run(settings: Settings, *, transactional: bool = True) -> int:
    """Prepare the topics, then run a worker until it is stopped.

    ``transactional=False`` is at-least-once delivery, for the benchmark's comparison.
    """
    lifecycle.exit_early_on_signal()
    try:
        return _run(settings, transactional)
    except lifecycle.StopRequested as stop:
        log.info("%s before the processor was running: stopped", stop)
        return 0


def _run(settings: Settings, transactional: bool) -> int:
    # Faust is imported here, once a stop signal is handled (its import takes a while).
    from chargify_stream.processors import seam

    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def prepare() -> tuple[int, clients.Changelogs]:
        ensure_pipeline_topics(settings)
        check_deadletter_topic(settings)
        partitions = lifecycle.partition_count(settings, settings.topic("raw"))
        return partitions, clients.ensure_changelogs(settings, partitions)

    try:
        partitions, changelogs = lifecycle.retry_at_start("preparing the topics", prepare)
    except (TransientError, KafkaException) as exc:
        log.critical("the processor could not prepare its topics; giving up: %s", exc)
        return 1
    slot = Slot(settings.processor_data_dir)
    store = Store(slot.path, settings.processor_dedup_window_s)
    metrics = ProcessorMetrics()
    work = clients.build(
        settings,
        store=store,
        slot=slot.number,
        changelogs=changelogs,
        metrics=metrics,
        transactional=transactional,
    )
    log.info(
        "processor %s reading %s (%d partitions, transactional id %s); "
        "metrics on http://%s:%d/metrics",
        settings.processor_app_id,
        settings.topic("raw"),
        partitions,
        clients.transactional_id(settings, slot.number),
        settings.metrics_host,
        settings.processor_web_port,
    )
    if not NATIVE_SCAN:
        log.warning(
            "chargify_stream.processors._formscan is not built (no C compiler at install): "
            "field extraction runs in Python, about 20 us more per webhook"
        )
    app = seam.build_app(settings, metrics)
    service = seam.ThreadService(work.run, lifecycle.exit_on_failure, STOP_TIMEOUT_S)
    worker = seam.Worker(
        app, service, loglevel=settings.log_level.lower(), quiet=True, override_logging=False
    )
    try:
        return seam.execute(worker)
    finally:
        slot.release()
