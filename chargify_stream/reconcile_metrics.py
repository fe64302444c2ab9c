"""``chargify-stream reconcile --every 15m``: reconcile forever, with metrics to alert on.

Prometheus text on ``http://METRICS_HOST:RECONCILE_METRICS_PORT/metrics``:

- ``reconcile_missing``: webhooks Chargify holds that the pipeline had not received at the
  end of the last pass (after ``--wait``, if given; else before the replays arrived);
- ``reconcile_replayed_total``: webhook ids whose replay was requested;
- ``reconcile_events_without_webhook``: events of the last pass that Chargify made no
  webhook for (replay cannot bring them);
- ``reconcile_endpoints_inoperative``: endpoints paused or disabled;
- ``reconcile_failures_total``: passes that failed (Chargify or Kafka unreachable, ...);
- ``reconcile_last_success_timestamp_seconds``: when a pass last completed.

A pass that fails is logged and the next one runs on time. A key Chargify rejects (401)
ends the command: waiting will not fix it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from chargify_stream.chargify_api import ChargifyApi
from chargify_stream.errors import ChargifyStreamError, ConfigError
from chargify_stream.settings import Settings

log = logging.getLogger("chargify_stream.reconcile")


class ReconcileMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.missing = Gauge(
            "reconcile_missing", "Webhooks in Chargify's log not received by the pipeline",
            registry=r,
        )  # fmt: skip
        self.replayed = Counter(
            "reconcile_replayed", "Webhook ids whose replay was requested", registry=r
        )
        self.events_without_webhook = Gauge(
            "reconcile_events_without_webhook", "Events Chargify made no webhook for", registry=r
        )
        self.inoperative = Gauge(
            "reconcile_endpoints_inoperative", "Endpoints paused or disabled", registry=r
        )
        self.failures = Counter("reconcile_failures", "Passes that failed", registry=r)
        self.last_success = Gauge(
            "reconcile_last_success_timestamp_seconds", "When a pass last completed", registry=r
        )


def run_forever(
    api: ChargifyApi,
    settings: Settings,
    args: argparse.Namespace,
    window_for: Callable[[argparse.Namespace], object],
    *,
    stop: threading.Event | None = None,
) -> int:
    from chargify_stream.reconcile import reconcile
    from chargify_stream.reconcile_report import Window, print_report

    metrics = ReconcileMetrics()
    if settings.reconcile_metrics_port:
        start_http_server(
            settings.reconcile_metrics_port, settings.metrics_host, registry=metrics.registry
        )
    stop = stop or threading.Event()
    log.info(
        "reconciling every %.0fs; metrics on %s:%s",
        args.every,
        settings.metrics_host,
        settings.reconcile_metrics_port,
    )
    while not stop.is_set():
        started = time.monotonic()
        try:
            window = window_for(args)
            assert isinstance(window, Window)
            report = reconcile(
                api,
                settings,
                window,
                dry_run=args.dry_run,
                wait=args.wait,
                endpoint_url=args.url,
            )
        except ConfigError:
            raise
        except ChargifyStreamError as exc:
            metrics.failures.inc()
            log.error("reconcile pass failed: %s", exc)
        else:
            still = report.still_missing
            metrics.missing.set(len(still) if still is not None else len(report.missing))
            metrics.replayed.inc(len(report.replayed))
            metrics.events_without_webhook.set(len(report.events_without_webhook))
            metrics.inoperative.set(len(report.advice))
            metrics.last_success.set_to_current_time()
            log.info(
                "reconcile pass: checked=%d received=%d missing=%d replayed=%d",
                report.checked,
                report.received,
                len(report.missing),
                len(report.replayed),
            )
            if args.json:
                print(json.dumps(report.as_json(), sort_keys=True))
            else:
                print_report(report)
            sys.stdout.flush()
        stop.wait(max(0.0, args.every - (time.monotonic() - started)))
    return 0
