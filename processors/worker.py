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
import threading
from collections.abc import Callable

from confluent_kafka import KafkaException

from chargify_stream.errors import TransientError
from chargify_stream.kafka_admin import ensure_pipeline_topics
from chargify_stream.settings import Settings
from processors import lifecycle, pipeline, seam
from processors.fields import NATIVE_SCAN
from processors.metrics import CONTENT_TYPE, ProcessorMetrics
from processors.state import Slot, Store

__all__ = ["build_app", "run"]

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 50_000
STOP_TIMEOUT_S = 15.0


def build_app(settings: Settings, metrics: ProcessorMetrics) -> seam.App:
    """The Faust app: no Kafka services, a web server with the metrics page."""
    app = seam.ProcessorApp(
        settings.processor_app_id,
        broker=[f"kafka://{s}" for s in settings.kafka_bootstrap_servers.split(",")],
        datadir=settings.processor_data_dir,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        web_port=settings.processor_web_port,
        web_tables_enabled=False,
        web_graph_enabled=False,
    )

    @app.page("/metrics")
    async def metrics_page(self: seam.View, request: seam.Request) -> seam.Response:
        return self.bytes(metrics.render(), content_type=CONTENT_TYPE)

    return app


class PipelineService(seam.Service):
    """Runs the pipeline in a thread while the worker runs; stops it when the worker stops."""

    def __init__(
        self,
        work: Callable[[threading.Event], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        super().__init__()
        self._work = work
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)

    def _run(self) -> None:
        try:
            self._work(self._stop)
        except BaseException as exc:
            if not self._stop.is_set():
                self._on_failure(exc)
            else:
                log.exception("the pipeline failed while stopping")

    async def on_start(self) -> None:
        self._thread.start()

    async def on_stop(self) -> None:
        self._stop.set()
        call_off = lifecycle.exit_if_still_running(STOP_TIMEOUT_S)
        await lifecycle.join(self._thread)
        call_off()


def run(settings: Settings) -> int:
    """Prepare the topics, then run a worker until it is stopped."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def prepare() -> tuple[int, pipeline.Changelogs]:
        ensure_pipeline_topics(settings)
        partitions = lifecycle.partition_count(settings, settings.topic("raw"))
        return partitions, pipeline.ensure_changelogs(settings, partitions)

    try:
        partitions, changelogs = lifecycle.retry_at_start("preparing the topics", prepare)
    except (TransientError, KafkaException) as exc:
        log.critical("the processor could not prepare its topics; giving up: %s", exc)
        return 1
    slot = Slot(settings.processor_data_dir)
    store = Store(slot.path, settings.processor_dedup_window_s)
    metrics = ProcessorMetrics()
    work = pipeline.build(
        settings, store=store, slot=slot.number, changelogs=changelogs, metrics=metrics
    )
    log.info(
        "processor %s reading %s (%d partitions, transactional id %s); "
        "metrics on http://127.0.0.1:%d/metrics",
        settings.processor_app_id,
        settings.topic("raw"),
        partitions,
        pipeline.transactional_id(settings, slot.number),
        settings.processor_web_port,
    )
    if not NATIVE_SCAN:
        log.warning(
            "processors._formscan is not built (no C compiler at install): "
            "field extraction runs in Python, about 20 us more per webhook"
        )
    app = build_app(settings, metrics)
    service = PipelineService(work.run, lifecycle.exit_on_failure)
    worker = seam.Worker(
        app, service, loglevel=settings.log_level.lower(), quiet=True, override_logging=False
    )
    try:
        return seam.execute(worker)
    finally:
        slot.release()
