"""``chargify-stream reconcile``: find the webhooks that never arrived; have Chargify resend them.

Chargify retries a webhook 5 times over about 5 minutes, then marks it failed and gives up
(``shared/chargify/WEBHOOKS.md`` §3). One pass of reconcile:

1. lists every webhook record of the site created in the window, whatever its status
   (``GET /webhooks.json``, paged, oldest first; API.md §2). The API filters by *date* in
   an unconfirmed time zone, so the dates asked for are widened by a day on each side and
   the records are then cut to the window by their ``created_at``. The window ends 10
   minutes ago unless ``--until`` says otherwise: younger webhooks are still in Chargify's
   own retries. Records last sent to another endpoint of the site (another system's
   copies) are left alone; ``--url`` says which endpoint is this pipeline's;
2. reads which webhook ids the pipeline accepted: the raw topic from the window's start
   (an hour earlier, for clocks that disagree), and ``webhook_outcomes`` when that table
   exists (:mod:`chargify_stream.received`);
3. asks Chargify to replay every webhook it holds that the pipeline never accepted,
   failed, pending or even "successful" (accepted by something else, e.g. an old
   endpoint), in batches of at most 1,000 ids, never the same id twice in a run;
4. with ``--wait``, keeps reading the raw topic until the replayed ids arrive or the time
   is up, and reports those still missing;
5. reports endpoints Chargify no longer sends to (paused, disabled) with what to do, and
   the site's events (``GET /events.json``) of the types the pipeline acts on that have no
   webhook at all: Chargify made none (endpoint disabled or not subscribed), so no replay
   can bring them (matched through the body's ``payload[event_id]``, API.md §6).

``--every 15m`` repeats passes forever and serves Prometheus metrics on
``RECONCILE_METRICS_PORT`` (see :mod:`chargify_stream.reconcile_metrics`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from chargify_stream import connect
from chargify_stream.arguments import argument, parse_time
from chargify_stream.base.errors import ChargifyStreamError, ConfigError, TransientError
from chargify_stream.base.settings import Settings
from chargify_stream.chargify_api import (
    MAX_REPLAY_IDS,
    ChargifyApi,
    ChargifyApiError,
    ChargifyUnavailable,
)
from chargify_stream.received import RawTopicReader, outcome_ids
from chargify_stream.reconcile_report import (
    Report,
    Webhook,
    Window,
    format_ids,
    format_time,
    parse_api_time,
    print_report,
)

__all__ = [
    "EXIT_ATTENTION",
    "Report",
    "Webhook",
    "Window",
    "add_arguments",
    "parse_interval",
    "reconcile",
    "request_replays",
    "run",
]

log = logging.getLogger(__name__)

EXIT_ATTENTION = 3
RAW_SLACK = timedelta(hours=1)
# Chargify's own 5 attempts span about 5 minutes (WEBHOOKS.md §3.2): a younger webhook is
# not lost yet, and replaying it would only add a duplicate (and noise to the metrics).
DEFAULT_UNTIL = "10m"
_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

EXIT_CODES = """exit codes:
  0  nothing missing, or every missing webhook was replayed (and, with --wait, arrived)
  1  failed: Chargify, Kafka or Postgres unreachable, or Chargify refused a request;
     the message says what was and was not done
  2  usage or configuration error, including a CHARGIFY_API_KEY that Chargify rejects,
     or a site with several endpoints and no --url
  3  needs an operator: --dry-run found missing webhooks, replayed webhooks still
     missing after --wait, an endpoint paused or disabled, or events with no webhook"""


class ReplayIncomplete(ChargifyStreamError):
    """A replay batch failed; the message says which ids were and were not requested."""


def reconcile(
    api: ChargifyApi,
    settings: Settings,
    window: Window,
    *,
    dry_run: bool = False,
    wait: float = 0.0,
    endpoint_url: str | None = None,
) -> Report:
    """One pass; see the module docstring."""
    report = Report(window, dry_run)
    try:
        report.endpoints = api.endpoints()
        report.endpoint_url = our_endpoint(report.endpoints, endpoint_url, report.notes)
        listed = _list_webhooks(api, window)
    except (ChargifyUnavailable, ChargifyApiError) as exc:
        raise _failed(exc, "nothing was compared or replayed") from None
    # Chargify lists the webhooks of every endpoint of the site; each endpoint gets its own
    # copy (own id) of an event. Those last sent to another endpoint are not ours to replay.
    others = {str(e.get("url")) for e in report.endpoints} - {report.endpoint_url}
    ours = {i: w for i, w in listed.items() if w.sent_to not in others}
    in_window = [w for w in listed.values() if window.contains(w.created_at)]
    webhooks = sorted((w for w in in_window if w.id in ours), key=_id)
    report.other_endpoints = len(in_window) - len(webhooks)
    report.checked = len(webhooks)
    for webhook in webhooks:
        report.by_state[webhook.state] = report.by_state.get(webhook.state, 0) + 1

    with RawTopicReader(settings) as raw:
        received = set(raw.read(window.since - RAW_SLACK))
        if raw.truncated:
            report.notes.append(
                f"the raw topic no longer holds records before {format_time(raw.oldest)}: older "
                "webhooks count as received only if webhook_outcomes has them"
            )
        unseen = [w.id for w in webhooks if w.id not in received]
        known, note = outcome_ids(settings, unseen)
        received |= known
        if note:
            report.notes.append(note)
        report.missing = [w for w in webhooks if w.id not in received]
        report.received = report.checked - len(report.missing)
        if report.missing and not dry_run:
            report.replayed = request_replays(api, [w.id for w in report.missing], set())
            if wait > 0:
                started = time.monotonic()
                report.still_missing = sorted(raw.follow(report.replayed, wait))
                report.waited = round(time.monotonic() - started, 1)
        have_webhook = {w.event_id for w in ours.values() if w.event_id is not None}
        have_webhook |= raw.event_ids

    try:
        # Again: accepted replays re-enable a paused endpoint (API.md §4.4).
        report.endpoints = api.endpoints()
        _check_events(api, window, have_webhook, report)
    except (ChargifyUnavailable, ChargifyApiError) as exc:
        done = (
            f"replay was requested for {len(report.replayed)} webhooks "
            f"({format_ids(report.replayed)})"
            if report.replayed
            else "nothing was replayed"
        )
        raise _failed(exc, f"{done}; endpoints and events were not checked") from None
    return report


def our_endpoint(endpoints: list[dict[str, Any]], url: str | None, notes: list[str]) -> str | None:
    """This pipeline's endpoint URL: ``url`` (``--url``), else the site's only endpoint.
    With several endpoints and no ``url``, which one is ours cannot be guessed."""
    urls = [str(e.get("url")) for e in endpoints]
    if url:
        if url not in urls:
            notes.append(
                f"no endpoint of the site has the URL {url}: Chargify sends this pipeline "
                "nothing (run `chargify-stream connect URL`)"
            )
        return url
    if len(urls) == 1:
        return urls[0]
    if not urls:
        notes.append("the site has no webhook endpoint (run `chargify-stream connect URL`)")
        return None
    raise ConfigError(
        f"the site has {len(urls)} webhook endpoints ({', '.join(urls)}); say which one is "
        "this pipeline's with --url, so that the others' webhooks are left alone"
    )


def _list_webhooks(api: ChargifyApi, window: Window) -> dict[int, Webhook]:
    since_date, until_date = window.api_dates()
    listed: dict[int, Webhook] = {}
    for record in api.webhooks(
        since_date=since_date.isoformat(), until_date=until_date.isoformat(), order="oldest_first"
    ):
        webhook = Webhook.from_api(record)
        listed.setdefault(webhook.id, webhook)  # pages can shift under new records
    return listed


def _check_events(api: ChargifyApi, window: Window, have_webhook: set[int], report: Report) -> None:
    """Report the window's events of the pipeline's types that no webhook carries."""
    since_date, until_date = window.api_dates()
    for event in api.events(
        date_field="created_at",
        start_date=since_date.isoformat(),
        end_date=until_date.isoformat(),
        filter=connect.EVENTS,
        direction="asc",
    ):
        if not window.contains(parse_api_time(event["created_at"])):
            continue
        report.events_checked += 1
        if int(event["id"]) not in have_webhook:
            report.events_without_webhook.append(
                {k: event.get(k) for k in ("id", "key", "subscription_id", "created_at")}
            )


def _failed(exc: Exception, done: str) -> ChargifyStreamError:
    kind = TransientError if isinstance(exc, TransientError) else ChargifyStreamError
    return kind(f"{exc}; {done}")


def request_replays(api: ChargifyApi, ids: Sequence[int], requested: set[int]) -> list[int]:
    """Ask Chargify to replay ``ids`` in batches of at most 1,000, skipping (and adding to)
    ``requested``; :class:`ReplayIncomplete` says what was and was not asked for."""
    todo = list(dict.fromkeys(i for i in ids if i not in requested))
    done: list[int] = []
    for start in range(0, len(todo), MAX_REPLAY_IDS):
        batch = todo[start : start + MAX_REPLAY_IDS]
        try:
            api.replay(batch)
        except ChargifyStreamError as exc:
            rest = todo[start + len(batch) :]
            raise ReplayIncomplete(
                f"{exc}. Replay was requested for {len(done)} of {len(todo)} missing webhooks"
                f"{' (' + format_ids(done) + ')' if done else ''}; the batch of {len(batch)} "
                f"being sent ({format_ids(batch)}) may or may not have been queued; {len(rest)} "
                "more were not requested. Run reconcile again: it asks only for what is still "
                "missing."
            ) from None
        requested.update(batch)
        done.extend(batch)
    return done


# -- command -----------------------------------------------------------------------------


def run(args: argparse.Namespace, settings: Settings) -> int:
    api = ChargifyApi(settings.chargify_base_url(), settings.chargify_key())

    def one_pass() -> Report:
        window = window_for(args)
        return reconcile(
            api, settings, window, dry_run=args.dry_run, wait=args.wait, endpoint_url=args.url
        )

    if args.every is not None:
        from chargify_stream.reconcile_metrics import run_forever

        return run_forever(
            one_pass,
            every=args.every,
            port=settings.reconcile_metrics_port,
            host=settings.metrics_host,
            as_json=args.json,
        )
    report = one_pass()
    if args.json:
        print(json.dumps(report.as_json(), indent=2, sort_keys=True))
    else:
        print_report(report)
    return EXIT_ATTENTION if report.needs_attention else 0


def window_for(args: argparse.Namespace, now: datetime | None = None) -> Window:
    now = now or datetime.now(UTC)
    try:
        since = parse_time(args.since, now)
        until = parse_time(args.until, now)
    except ValueError as exc:
        raise ConfigError(f"--since/--until: {exc}") from None
    if since >= until:
        raise ConfigError(
            f"--since ({format_time(since)}) must be before --until ({format_time(until)})"
        )
    return Window(since, until)


def parse_interval(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d`` in seconds; ``ValueError`` otherwise."""
    found = _INTERVAL.match(text)
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"{text!r} is not an interval such as 90s, 15m, 2h or 1d")
    return float(found.group(1)) * _SECONDS[found.group(2)]


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--since", default="2d",
        help="start of the window: an age (90m, 2d) or an RFC 3339 time (default 2d)",
    )  # fmt: skip
    parser.add_argument(
        "--until",
        default=DEFAULT_UNTIL,
        help=f"end of the window (default {DEFAULT_UNTIL} ago: younger webhooks may still be "
        "on their way, or in Chargify's own retries, which take about 5 minutes; 0s for now)",
    )
    parser.add_argument(
        "--url",
        help="this pipeline's endpoint URL, as given to `connect`; needed only when the site "
        "has several endpoints (the others' webhooks are left alone)",
    )
    parser.add_argument("--dry-run", action="store_true", help="compare and report; replay nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--wait", type=_seconds_arg, default=0.0, metavar="SECONDS",
        help="after replaying, wait up to SECONDS for the replayed webhooks to arrive",
    )  # fmt: skip
    parser.add_argument(
        "--every", type=argument(parse_interval), metavar="INTERVAL",
        help="run a pass every INTERVAL (e.g. 15m) forever, with Prometheus metrics on "
        "RECONCILE_METRICS_PORT",
    )  # fmt: skip


def _id(webhook: Webhook) -> int:
    return webhook.id
