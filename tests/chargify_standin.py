"""A local stand-in of Chargify's management API and webhook delivery, for tests only.

Built from ``shared/chargify/API.md`` (section numbers below) and ``WEBHOOKS.md``; the real
Chargify is unreachable from here. What it does:

- routes of §0 with the ``.json`` suffix, JSON in and out, HTTP Basic (API key as user,
  ``x``/``X`` as password; 401 body ``HTTP Basic: Access denied.``, §1.2);
- ``429`` with Chargify's message when more than ``max_concurrent`` (4) requests are in
  flight (§1.5), or for the next N requests after :meth:`ChargifyStandIn.throttle`;
- ``GET /webhooks.json`` with ``status``, ``since_date``/``until_date`` (inclusive, on the
  ``created_at`` date in the site's time zone), ``subscription``, ``order`` (default
  newest first, as both doc examples), ``page``/``per_page`` (default 20, clamped to 200),
  ``[]`` past the end, items wrapped in ``{"webhook": ...}`` (§2);
- ``POST /webhooks/replay.json``: ``{"status":"ok"}`` at once, unknown ids ignored, more
  than 1000 or no ids refused (422; unconfirmed, §11.7); each replay clears
  ``accepted_at`` and is re-sent once, later, with the stored body re-signed with the
  site's shared key, to the endpoint's *current* URL, then the status fields are updated
  as §3 describes;
- ``PUT /webhooks/settings.json`` (the site's switch; off: no webhook records are made);
- endpoints list (bare array), create and update (``{"endpoint": ...}``; 404 unknown id;
  422 ``{"errors": [...]}`` for a bad URL or event key), with the inoperative-endpoint
  rule of §4.4: ``pause_after`` failures in a row pause it (its new webhooks are made
  ``paused`` and not sent), ``disable_after`` seconds paused disable it (no new records);
  a paused endpoint is retried every ``probe_every`` seconds (2 hours) with the webhook
  that paused it; a success or a URL change re-enables it (held ``paused`` records stay
  unsent until replayed);
- ``GET /events.json`` (``since_id``/``max_id`` inclusive, ``direction`` default desc,
  ``filter`` CSV, ``date_field`` with ``start_date``/``end_date`` or
  ``start_datetime``/``end_datetime``), ``/subscriptions/{id}/events.json`` (404 unknown
  subscription), ``/events/count.json`` (§5);
- :meth:`ChargifyStandIn.emit`: an occurrence on the site: an event record and one webhook
  per subscribed endpoint (``payload[event_id]`` = the event id, §6), delivered with
  Chargify's retry schedule (ASAP, +10 s, +15 s, +90 s, +180 s; multiplied by
  ``time_scale`` to compress it), marked failed with ``"<code> <reason> (retry N of 5)"``
  when the endpoint does not answer 200.

Choices where API.md says "unconfirmed" are named where they are made.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

RETRY_SCHEDULE = (0.0, 10.0, 15.0, 90.0, 180.0)  # WEBHOOKS.md §3.2
THROTTLED = (
    "Your request was denied due to a usage violation. You can track this request with "
    "support by referencing {ref}"
)
# WEBHOOKS.md §5, the 2024 enum.
SUBSCRIPTION_KEYS = frozenset(
    {
        "billing_date_change",
        "component_allocation_change",
        "customer_create",
        "customer_update",
        "dunning_step_reached",
        "expiring_card",
        "expiration_date_change",
        "invoice_issued",
        "metered_usage",
        "payment_failure",
        "payment_success",
        "direct_debit_payment_pending",
        "direct_debit_payment_paid_out",
        "direct_debit_payment_rejected",
        "prepaid_subscription_balance_changed",
        "prepaid_usage",
        "refund_failure",
        "refund_success",
        "renewal_failure",
        "renewal_success",
        "signup_failure",
        "signup_success",
        "statement_closed",
        "statement_settled",
        "subscription_card_update",
        "subscription_group_card_update",
        "subscription_product_change",
        "subscription_state_change",
        "trial_end_notice",
        "upcoming_renewal_notice",
        "upgrade_downgrade_failure",
        "upgrade_downgrade_success",
        "pending_cancellation_change",
        "subscription_prepayment_account_balance_changed",
        "subscription_service_credit_account_balance_changed",
    }
)
STATUSES = ("successful", "failed", "pending", "paused")
REPLAY, PROBE = 0, -1  # kinds of send besides the automatic attempts 1..5
# A site time zone other than UTC, so that date filters are tested against one (§1.4).
EASTERN = timezone(timedelta(hours=-5))


@dataclass
class Endpoint:
    id: int
    url: str
    events: list[str]
    status: str = "enabled"
    failures: int = 0  # in a row
    paused_at: float | None = None

    def as_json(self, site_id: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "site_id": site_id,
            "status": self.status,
            "webhook_subscriptions": list(self.events),
        }


@dataclass
class Webhook:
    id: int
    event: str
    body: bytes
    endpoint_id: int
    subscription_id: int | None
    created_at: datetime
    status: str = "pending"
    successful: bool = False
    accepted_at: datetime | None = None
    last_sent_at: datetime | None = None
    last_sent_url: str | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    deliveries: int = 0  # POSTs made (automatic attempts and replays)


@dataclass
class Event:
    id: int
    key: str
    subscription_id: int | None
    customer_id: int | None
    created_at: datetime
    message: str
    data: dict[str, Any] | None


@dataclass
class Request:
    method: str
    path: str
    body: Any


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    webhook_id: int = field(compare=False)
    attempt: int = field(compare=False)  # 1..5; REPLAY; PROBE (a paused endpoint's retry)


class ChargifyStandIn:
    """One Chargify site. ``start()`` serves it on 127.0.0.1; ``close()`` stops it."""

    def __init__(
        self,
        *,
        api_key: str = "standin-api-key",
        shared_key: str = "test-shared-key",
        subdomain: str = "acme",
        site_id: int = 31615,
        time_scale: float = 1.0,
        pause_after: int = 25,
        disable_after: float = 48 * 3600.0,
        probe_every: float = 2 * 3600.0,
        max_concurrent: int = 4,
        request_delay: float = 0.0,
        delivery_timeout: float = 15.0,
        site_tz: timezone = EASTERN,
    ) -> None:
        self.api_key = api_key
        self.shared_key = shared_key
        self.subdomain = subdomain
        self.site_id = site_id
        self.time_scale = time_scale
        self.pause_after = pause_after
        self.disable_after = disable_after
        self.probe_every = probe_every
        self.max_concurrent = max_concurrent
        self.request_delay = request_delay
        self.delivery_timeout = delivery_timeout
        self.site_tz = site_tz
        self.webhooks_enabled = False
        self.endpoints: dict[int, Endpoint] = {}
        self.webhooks: dict[int, Webhook] = {}
        self.events: dict[int, Event] = {}
        self.requests: list[Request] = []  # every authenticated, answered request
        self.replays: list[list[int]] = []  # the ids of each replay call
        self.throttled = 0  # 429s answered
        self.lock = threading.RLock()
        self._in_flight = 0
        self._throttle_next = 0
        self._ids = itertools.count(3_900_000_001)  # above 2**31, like real ids
        self._event_ids = itertools.count(4_800_000_001)
        self._seq = itertools.count()
        self._queue: list[_Due] = []
        self._busy = 0
        self._wake = threading.Condition(self.lock)
        self._stopping = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._threads: list[threading.Thread] = []

    # -- life ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ChargifyStandIn:
        for target in (self._server.serve_forever, self._deliver_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        with self.lock:
            self._stopping = True
            self._wake.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> ChargifyStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a test does to the site --------------------------------------------------

    def add_endpoint(self, url: str, events: Iterable[str]) -> int:
        with self.lock:
            endpoint = Endpoint(next(self._ids), url, list(events))
            self.endpoints[endpoint.id] = endpoint
            self.webhooks_enabled = True
            return endpoint.id

    def emit(
        self,
        key: str,
        build: Callable[[int, int], bytes],
        *,
        subscription_id: int | None = None,
        customer_id: int | None = None,
        data: dict[str, Any] | None = None,
        lost: bool = False,
    ) -> list[int]:
        """Something happens on the site: an event record, and a webhook for every endpoint
        subscribed to ``key`` (body ``build(webhook_id, event_id)``), sent in the
        background. ``lost``: marked accepted without being sent (as if something else
        had answered 200, e.g. an old load balancer). Return the new webhook ids."""
        event = self.add_event(key, subscription_id=subscription_id, customer_id=customer_id,
                               data=data)  # fmt: skip
        made = []
        with self.lock:
            if not self.webhooks_enabled:
                return made
            now = time.monotonic()
            for endpoint in self.endpoints.values():
                if key not in endpoint.events:
                    continue
                if (
                    endpoint.status == "paused"
                    and endpoint.paused_at is not None
                    and now - endpoint.paused_at >= self.disable_after * self.time_scale
                ):
                    endpoint.status = "disabled"
                if endpoint.status == "disabled":
                    continue  # no record at all (§4.4)
                webhook_id = next(self._ids)
                webhook = Webhook(
                    webhook_id, key, build(webhook_id, event.id), endpoint.id,
                    subscription_id, self._now(),
                )  # fmt: skip
                self.webhooks[webhook_id] = webhook
                made.append(webhook_id)
                if lost:
                    webhook.status, webhook.successful = "successful", True
                    webhook.accepted_at = webhook.last_sent_at = self._now()
                    webhook.last_sent_url = endpoint.url
                elif endpoint.status == "paused":
                    webhook.status = "paused"  # made paused, not sent
                else:
                    self._schedule(webhook_id, 1, RETRY_SCHEDULE[0])
        return made

    def add_event(
        self,
        key: str,
        *,
        subscription_id: int | None = None,
        customer_id: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> Event:
        """An event record alone: what happens while no endpoint is subscribed to it."""
        with self.lock:
            event = Event(
                next(self._event_ids), key, subscription_id, customer_id, self._now(),
                f"{key.replace('_', ' ').capitalize()} on subscription {subscription_id}", data,
            )  # fmt: skip
            self.events[event.id] = event
            return event

    def throttle(self, count: int) -> None:
        """Answer the next ``count`` requests with 429."""
        with self.lock:
            self._throttle_next = count

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no delivery is queued or being made (a paused endpoint's next probe,
        hours away, does not count)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self._busy or any(d.attempt != PROBE for d in self._queue):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"stand-in still delivering: {len(self._queue)} queued")
                self._wake.wait(min(left, 0.1))

    def mutations(self) -> list[Request]:
        """Every request that could change the site (not a GET)."""
        return [r for r in self.requests if r.method != "GET"]

    # -- delivery ----------------------------------------------------------------------

    def _schedule(self, webhook_id: int, attempt: int, delay: float) -> None:
        due = _Due(time.monotonic() + delay * self.time_scale, next(self._seq), webhook_id, attempt)
        heapq.heappush(self._queue, due)
        self._wake.notify_all()

    def _deliver_loop(self) -> None:
        while True:
            with self.lock:
                while not self._stopping and (
                    not self._queue or self._queue[0].at > time.monotonic()
                ):
                    wait = self._queue[0].at - time.monotonic() if self._queue else 0.5
                    self._wake.wait(max(0.001, min(wait, 0.5)))
                if self._stopping:
                    return
                due = heapq.heappop(self._queue)
                webhook = self.webhooks[due.webhook_id]
                endpoint = self.endpoints.get(webhook.endpoint_id)
                if endpoint is None or endpoint.status == "disabled":
                    continue  # unconfirmed (§11.7): nothing is sent to a disabled endpoint
                if due.attempt == PROBE and endpoint.status != "paused":
                    continue  # re-enabled meanwhile
                url, body = endpoint.url, webhook.body
                self._busy += 1
            try:
                error = self._post(url, body, webhook.id)
            finally:
                with self.lock:
                    self._busy -= 1
                    self._record(webhook, endpoint, url, due.attempt, error)
                    self._wake.notify_all()

    def _post(self, url: str, body: bytes, webhook_id: int) -> str | None:
        """POST like Chargify; ``None`` when answered 200, else the error text."""
        key = self.shared_key.encode()
        request = urllib.request.Request(url, data=body, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        request.add_header(
            "X-Chargify-Webhook-Signature-Hmac-Sha-256",
            hmac.new(key, body, hashlib.sha256).hexdigest(),
        )
        request.add_header("X-Chargify-Webhook-Signature", hashlib.md5(key + body).hexdigest())
        request.add_header("X-Chargify-Webhook-Id", str(webhook_id))
        try:
            with urllib.request.urlopen(request, timeout=self.delivery_timeout) as response:
                status, reason = response.status, response.reason
        except urllib.error.HTTPError as exc:
            status, reason = exc.code, exc.reason
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return str(getattr(reason, "strerror", None) or reason)
        return None if status == 200 else f"{status} {reason}"

    def _record(
        self, webhook: Webhook, endpoint: Endpoint, url: str, attempt: int, error: str | None
    ) -> None:
        now = self._now()
        webhook.deliveries += 1
        webhook.last_sent_at, webhook.last_sent_url = now, url
        if error is None:
            webhook.status, webhook.successful, webhook.accepted_at = "successful", True, now
            webhook.last_error = webhook.last_error_at = None
            endpoint.failures, endpoint.status, endpoint.paused_at = 0, "enabled", None
            return
        webhook.status, webhook.successful = "failed", False
        retry = f" (retry {attempt} of {len(RETRY_SCHEDULE)})" if attempt > 0 else ""
        webhook.last_error, webhook.last_error_at = error + retry, now
        endpoint.failures += 1
        if endpoint.status == "enabled" and endpoint.failures >= self.pause_after:
            endpoint.status, endpoint.paused_at = "paused", time.monotonic()
            self._schedule(webhook.id, PROBE, self.probe_every)
        elif attempt == PROBE and endpoint.status == "paused":
            # Still failing: probe again in 2 hours, until 48 hours paused disable it.
            assert endpoint.paused_at is not None
            if time.monotonic() - endpoint.paused_at >= self.disable_after * self.time_scale:
                endpoint.status = "disabled"
            else:
                self._schedule(webhook.id, PROBE, self.probe_every)
        if 0 < attempt < len(RETRY_SCHEDULE):
            self._schedule(webhook.id, attempt + 1, RETRY_SCHEDULE[attempt])

    def _now(self) -> datetime:
        return datetime.now(self.site_tz).replace(microsecond=0)

    # -- the API ------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """Answer one authenticated request: (status, JSON value or text)."""
        with self.lock:
            self.requests.append(Request(method, path, body))
            route = (method, path)
            if route == ("GET", "/webhooks.json"):
                return self._list_webhooks(query)
            if route == ("POST", "/webhooks/replay.json"):
                return self._replay(body)
            if route == ("PUT", "/webhooks/settings.json"):
                if not isinstance(body, dict) or not isinstance(body.get("webhooks_enabled"), bool):
                    return 422, {"errors": ["webhooks_enabled: must be true or false"]}
                self.webhooks_enabled = body["webhooks_enabled"]
                return 200, {"webhooks_enabled": self.webhooks_enabled}
            if route == ("GET", "/endpoints.json"):
                return 200, [e.as_json(self.site_id) for e in self.endpoints.values()]
            if route == ("POST", "/endpoints.json"):
                return self._save_endpoint(None, body)
            found = re.fullmatch(r"/endpoints/(\d+)\.json", path)
            if found and method == "PUT":
                return self._save_endpoint(int(found.group(1)), body)
            if route == ("GET", "/events.json"):
                return self._list_events(query, None)
            if route == ("GET", "/events/count.json"):
                return 200, {"count": len(self._events(query, None, dates=False))}
            found = re.fullmatch(r"/subscriptions/(\d+)/events\.json", path)
            if found and method == "GET":
                sub = int(found.group(1))
                if not any(e.subscription_id == sub for e in self.events.values()):
                    return 404, "Not Found"  # body unconfirmed (§11.1)
                return self._list_events(query, sub)
            return 404, "Not Found"

    def _list_webhooks(self, q: dict[str, str]) -> tuple[int, Any]:
        status, order = q.get("status"), q.get("order", "newest_first")
        if status is not None and status not in STATUSES:
            return 422, {"errors": [f"status: {status} is not valid"]}  # unconfirmed (§11.6)
        if order not in {"newest_first", "oldest_first"}:
            return 422, {"errors": [f"order: {order} is not valid"]}
        since, until = _date(q.get("since_date")), _date(q.get("until_date"))
        sub = int(q["subscription"]) if q.get("subscription") else None
        chosen = [
            w
            for w in self.webhooks.values()
            if (status is None or w.status == status)
            and (since is None or w.created_at.date() >= since)
            and (until is None or w.created_at.date() <= until)
            and (sub is None or w.subscription_id == sub)
        ]
        chosen.sort(key=lambda w: w.id, reverse=order == "newest_first")
        return 200, [{"webhook": self._webhook_json(w)} for w in _page(chosen, q)]

    def _webhook_json(self, w: Webhook) -> dict[str, Any]:
        key = self.shared_key.encode()
        return {
            "id": w.id,
            "event": w.event,
            "created_at": w.created_at.isoformat(),
            "accepted_at": _iso(w.accepted_at),
            "last_sent_at": _iso(w.last_sent_at),
            "last_sent_url": w.last_sent_url,
            "last_error": w.last_error,
            "last_error_at": _iso(w.last_error_at),
            "successful": w.successful,
            "body": w.body.decode(),
            "signature": hashlib.md5(key + w.body).hexdigest(),
            "signature_hmac_sha_256": hmac.new(key, w.body, hashlib.sha256).hexdigest(),
        }

    def _replay(self, body: Any) -> tuple[int, Any]:
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or len(ids) > 1000:
            return 422, {"errors": ["ids: between 1 and 1000 webhook ids"]}  # unconfirmed
        self.replays.append([int(i) for i in ids])
        for webhook_id in ids:
            webhook = self.webhooks.get(int(webhook_id))
            if webhook is None:
                continue  # unknown ids are ignored (§3)
            webhook.accepted_at = None
            webhook.status = "pending"
            # Unconfirmed (§11.7): one send, not a new retry cycle.
            self._schedule(webhook.id, REPLAY, 0.05)
        return 200, {"status": "ok"}

    def _save_endpoint(self, endpoint_id: int | None, body: Any) -> tuple[int, Any]:
        spec = body.get("endpoint") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            return 422, {"errors": ["endpoint: is required"]}
        url, events = spec.get("url"), spec.get("webhook_subscriptions")
        if not isinstance(url, str) or urlsplit(url).scheme not in {"http", "https"}:
            return 422, {"errors": ["URL: invalid, only http and https supported"]}
        if not isinstance(events, list):
            return 422, {"errors": ["Webhook subscriptions: is required"]}
        for key in events:
            if key not in SUBSCRIPTION_KEYS:
                return 422, {"errors": [f"Event key is not valid - {key}"]}
        if endpoint_id is None:
            if len(self.endpoints) >= 5:  # HELP-SETTINGS; the message is unconfirmed
                return 422, {"errors": ["Only 5 endpoints are allowed"]}
            endpoint = Endpoint(next(self._ids), url, list(events))
            self.endpoints[endpoint.id] = endpoint
        else:
            found = self.endpoints.get(endpoint_id)
            if found is None:
                return 404, "Not Found"
            endpoint = found
            if url != endpoint.url:  # a URL change re-enables it (§4.4)
                endpoint.url, endpoint.failures = url, 0
                endpoint.status, endpoint.paused_at = "enabled", None
            endpoint.events = list(events)
        return 200, {"endpoint": endpoint.as_json(self.site_id)}

    def _events(self, q: dict[str, str], sub: int | None, *, dates: bool) -> list[Event]:
        since_id = int(q["since_id"]) if q.get("since_id") else None
        max_id = int(q["max_id"]) if q.get("max_id") else None
        keys = set(q["filter"].split(",")) if q.get("filter") else None
        low = high = None
        if dates and q.get("date_field") == "created_at":
            if q.get("start_datetime"):
                low = self._datetime(q["start_datetime"])
            elif q.get("start_date"):
                low = datetime.combine(_date(q["start_date"]) or date.min, datetime.min.time(),
                                       self.site_tz)  # fmt: skip
            if q.get("end_datetime"):
                high = self._datetime(q["end_datetime"])
            elif q.get("end_date"):
                end = _date(q["end_date"]) or date.max
                high = datetime.combine(end, datetime.max.time(), self.site_tz)
        return [
            e
            for e in self.events.values()
            if (sub is None or e.subscription_id == sub)
            and (since_id is None or e.id >= since_id)
            and (max_id is None or e.id <= max_id)
            and (keys is None or e.key in keys)
            and (low is None or e.created_at >= low)
            and (high is None or e.created_at <= high)
        ]

    def _list_events(self, q: dict[str, str], sub: int | None) -> tuple[int, Any]:
        chosen = self._events(q, sub, dates=sub is None)
        chosen.sort(key=lambda e: e.id, reverse=q.get("direction", "desc") != "asc")
        return 200, [
            {
                "event": {
                    "id": e.id,
                    "key": e.key,
                    "message": e.message,
                    "subscription_id": e.subscription_id,
                    "customer_id": e.customer_id,
                    "created_at": e.created_at.isoformat(),
                    "event_specific_data": e.data,
                }
            }
            for e in _page(chosen, q)
        ]

    def _datetime(self, text: str) -> datetime:
        moment = datetime.fromisoformat(text.strip())
        return moment if moment.tzinfo else moment.replace(tzinfo=self.site_tz)

    # -- HTTP plumbing ------------------------------------------------------------------

    def admit(self) -> bool:
        """Count a request in; ``False`` when it must be answered 429."""
        with self.lock:
            if self._throttle_next > 0:
                self._throttle_next -= 1
                self.throttled += 1
                return False
            if self._in_flight >= self.max_concurrent:
                self.throttled += 1
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self.lock:
            self._in_flight -= 1

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, self.api_key) and password in {"x", "X"}


def _handler(site: ChargifyStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
            if isinstance(value, str):
                data, kind = (value + "\n").encode(), "text/plain; charset=utf-8"
            else:
                data, kind = json.dumps(value).encode(), "application/json; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            for name, v in (headers or {}).items():
                self.send_header(name, v)
            self.end_headers()
            self.wfile.write(data)

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not site.admit():
                self._answer(429, THROTTLED.format(ref=f"standin-{time.monotonic_ns()}"))
                return
            try:
                if site.request_delay:
                    time.sleep(site.request_delay)
                if not site.authorized(self.headers.get("Authorization")):
                    self._answer(401, "HTTP Basic: Access denied.", {
                        "WWW-Authenticate": 'Basic realm="Application"'})  # fmt: skip
                    return
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                body: Any = None
                if self.command in {"POST", "PUT"}:
                    if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                        self._answer(422, {"errors": ["Content-Type must be application/json"]})
                        return
                    try:
                        body = json.loads(raw or b"null")
                    except ValueError:
                        self._answer(422, {"errors": ["body is not JSON"]})
                        return
                status, value = site.handle(self.command, parts.path, query, body)
                self._answer(status, value)
            finally:
                site.release()

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler


def _page(items: list[Any], q: dict[str, str]) -> list[Any]:
    page = max(1, int(q.get("page") or 1))
    per_page = min(200, max(1, int(q.get("per_page") or 20)))  # clamped (§2.1)
    return items[(page - 1) * per_page : page * per_page]


def _date(text: str | None) -> date | None:
    return date.fromisoformat(text) if text else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)
